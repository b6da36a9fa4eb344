"""Muon's gather -> Newton-Schulz -> scatter under ZeRO-1 streamed within a memory budget
(MuonClipConfig.buffer_bytes, k2_megatron.config.memory.muon_gather_spans): the buffers handed to the
data-parallel collectives and the matrices stacked for Newton-Schulz stay within the budget (measured by wrapping
the collectives and the Newton-Schulz entry during the optimizer step), and the parameters after the steps are
bitwise those of the unstreamed run (whole buckets gathered) in DP2 and TP2, with the same Newton-Schulz work per
rank. k2-tiny in float32 on gloo."""

import os

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import pytest
import torch

from k2_megatron.config.memory import muon_gather_spans

STEPS = 2
LAYOUTS = {"DP2": (1, 1), "TP2": (2, 1)}  # name -> (tensor, expert parallel) on 2 processes


def test_spans_cover_the_matrices_within_the_budget():
    matrices = [(0, 10), (12, 30), (42, 5), (50, 100), (150, 20), (170, 20)]
    assert muon_gather_spans(matrices, 200, 2, 4 * 300) == (True, [(0, 200, 6)])  # bucket + shard fit
    whole, spans = muon_gather_spans(matrices, 200, 2, 4 * 50)
    assert not whole and spans == [(0, 47, 3), (50, 150, 1), (150, 190, 2)]  # the 100-element matrix alone
    assert sum(c for _, _, c in spans) == len(matrices)
    assert muon_gather_spans(matrices, 200, 1, 4 * 10)[1] == [(0, 10, 1), (12, 42, 1), (42, 47, 1), (50, 150, 1),
                                                               (150, 170, 1), (170, 190, 1)]


def _measured_step(opt, seen):
    """opt.step() with the bytes of every tensor the Muon orthogonalisation hands to a collective (per call: input
    and output together) and of every stack of matrices it orthogonalises appended to ``seen``."""
    import torch.distributed as dist

    import k2_megatron.megatron.optimizer as mopt

    def wrap(fn, tensors_of, dp_group):
        def wrapped(*args, **kwargs):
            if kwargs.get("group") is dp_group:  # not the TP gathers of whole matrices inside Newton-Schulz
                seen["collective"].append(sum(t.numel() * t.element_size() for t in tensors_of(*args)))
            return fn(*args, **kwargs)
        return wrapped

    def ns(local, *args):
        seen["stacked"].append(sum(m.numel() * m.element_size() for m in local))
        return orthogonalize_whole(local, *args)

    originals = {name: getattr(dist, name) for name in ("all_gather_into_tensor", "reduce_scatter_tensor",
                                                        "all_reduce")}
    orthogonalize_whole = mopt._orthogonalize_whole
    subs = [sub for sub in opt.chained_optimizers if sub.optimizer is not None]
    inners = [sub.optimizer for sub in subs]
    outer = [inner.orthogonalize for inner in inners]

    def measured(orthogonalize, dp_group):
        def run(items):
            dist.all_gather_into_tensor = wrap(originals["all_gather_into_tensor"], lambda out, inp: (out, inp),
                                               dp_group)
            dist.reduce_scatter_tensor = wrap(originals["reduce_scatter_tensor"], lambda out, inp: (out, inp),
                                              dp_group)
            dist.all_reduce = wrap(originals["all_reduce"], lambda t: (t,), dp_group)
            mopt._orthogonalize_whole = ns
            try:
                return orthogonalize(items)
            finally:
                for name, fn in originals.items():
                    setattr(dist, name, fn)
                mopt._orthogonalize_whole = orthogonalize_whole
        return run

    for sub, inner, fn in zip(subs, inners, outer):
        inner.orthogonalize = measured(fn, sub.data_parallel_group)
    try:
        ok, _, _ = opt.step()
    finally:
        for inner, fn in zip(inners, outer):
            inner.orthogonalize = fn
    assert ok


def _run(cfg, full, buffer_bytes):
    from tests.helpers.model import train_step_losses
    from tests.megatron.test_muonclip_megatron import TAU, _batches, _build
    from megatron.core import parallel_state

    from k2_megatron.megatron.optimizer import MuonClipConfig

    ddp, opt = _build(cfg, full, muonclip=MuonClipConfig(ns_dtype=torch.float32, qk_clip_tau=TAU,
                                                         buffer_bytes=buffer_bytes))
    dp_rank, dp = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    seen = {"collective": [], "stacked": []}
    for step in range(STEPS):
        ddp.zero_grad_buffer()
        opt.zero_grad()
        train_step_losses(ddp, _batches(cfg, step)[dp_rank::dp], 16, 2)
        _measured_step(opt, seen)
    subs = [s for s in opt.chained_optimizers if s.optimizer is not None]
    sizes = {"matrix": max(m.numel for s in subs for _, _, units in s.ns_plan for m, _, _ in units),
             "bucket": max(s.buffers[g].buckets[b].grad_data.numel() for s in subs for g, b, _ in s.ns_plan)}
    params = {n: p.detach().clone() for n, p in ddp.module.named_parameters()}
    return params, seen, opt.newton_schulz_work(), sizes


def _body(rank, world, init_file, state_path):
    from k2_megatron.config import ParallelLayout
    from k2_megatron.megatron import init_distributed_cpu
    from tests.megatron.test_muonclip_megatron import _config

    cfg, full, out = _config(), torch.load(state_path), {}
    for name, (tp, ep) in LAYOUTS.items():
        init_distributed_cpu(ParallelLayout(tensor_parallel=tp, expert_parallel=ep), rank=rank, world_size=world,
                             init_method=f"file://{init_file}_{name}")
        whole, seen_whole, work_whole, sizes = _run(cfg, full, 2**30)
        budget = 4 * 2 * sizes["matrix"]  # two of the largest matrices, far below a bucket
        streamed, seen, work, _ = _run(cfg, full, budget)
        out[name] = {"equal": [n for n in whole if torch.equal(whole[n], streamed[n])], "names": list(whole),
                     "budget": budget, "sizes": sizes, "seen": seen, "seen_whole": seen_whole, "work": work,
                     "work_whole": work_whole}
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from tests.helpers.model import run_gloo_bodies, saved_full_state
    from tests.megatron.test_muonclip_megatron import _config

    tmp = tmp_path_factory.mktemp("muon_budget")
    state_path = saved_full_state(tmp, _config())
    return run_gloo_bodies(_body, 2, lambda r: (r, 2, str(tmp / "init"), state_path), timeout=600)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_streamed_temporaries_respect_the_budget_and_change_nothing(runs, layout):
    for rank, res in enumerate(runs):
        r = res[layout]
        budget, sizes = r["budget"], r["sizes"]
        assert 4 * sizes["bucket"] > budget  # the budget forces streaming
        assert max(r["seen_whole"]["collective"]) > budget  # gathering whole buckets would exceed it
        assert r["seen"]["collective"] and max(r["seen"]["collective"]) <= budget, (rank, max(r["seen"]["collective"]))
        assert r["seen"]["stacked"] and max(r["seen"]["stacked"]) <= budget, (rank, max(r["seen"]["stacked"]))
        assert len(r["seen"]["collective"]) > len(r["seen_whole"]["collective"])  # more, smaller collectives
        assert r["equal"] == r["names"], (rank, sorted(set(r["names"]) - set(r["equal"])))
        assert r["work"] == r["work_whole"]
