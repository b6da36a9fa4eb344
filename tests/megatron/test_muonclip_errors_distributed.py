"""Errors that only one rank sees, with 2 gloo processes: a NaN gradient, a layer without max logits, an infinite max
logit, each on rank 0 only. This is the case that deadlocks real jobs: a rank that raises alone leaves the others
waiting in the optimizer's collectives. MuonClip agrees on the error across ranks before anything changes, so
every rank must raise the same error (or, with ``nonfinite="skip"``, skip the same step), no parameter may change,
and the next, clean step must then run on both ranks (nobody is stuck in a collective). A hang fails the test at
run_gloo_workers' timeout.

Layouts: DP2 (ZeRO-1 over both ranks: rank 0's NaN sits in its unreduced gradient) and PP2 (the ranks hold different
layers, so only rank 0 has the layers it breaks).
"""


import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

SEQ, MICRO_BATCH, MICROBATCHES = 16, 2, 4
LAYOUTS = {"DP2": (1, 1, 1), "PP2": (1, 2, 1)}
# scenario -> (what rank 0 breaks after forward_backward, MuonClipConfig.nonfinite)
SCENARIOS = {"nan_gradient": ("nan_gradient", "raise"), "nan_gradient_skip": ("nan_gradient", "skip"),
             "missing_max_logits": ("missing_max_logits", "raise"), "inf_max_logit": ("inf_max_logit", "raise")}
TIMEOUT = 300  # seconds for the whole run (about 70 s on a loaded 2-core machine); a deadlock fails here


def _break_on_rank0(kind: str, ddp, opt) -> str | None:
    """Breaks what ``kind`` says; for a NaN gradient returns the parameter whose gradient holds it (by address)."""
    if kind == "nan_gradient":
        ddp.buffers[0].grad_data[3] = float("nan")
        return _parameter_at(ddp, ddp.buffers[0].grad_data[3].data_ptr())
    elif kind == "missing_max_logits":
        opt.reset_max_logits()  # as if this rank's attention layers had not run forward
    elif kind == "inf_max_logit":
        _, attn = opt.attention_layers[0]
        attn.core_attention.current_max_attn_logits[0] = float("inf")


def _parameter_at(ddp, address: int) -> str:
    for name, p in ddp.module.named_parameters():
        start = p.main_grad.data_ptr()
        if start <= address < start + p.main_grad.numel() * p.main_grad.element_size():
            return name
    raise AssertionError(f"no parameter's gradient at {address}")


def _train_step(ddp, opt, batches):
    from tests.helpers.model import train_step_losses

    ddp.zero_grad_buffer()
    opt.zero_grad()
    train_step_losses(ddp, batches, SEQ, MICRO_BATCH)


def _scenario(cfg, full, batches, kind: str, nonfinite: str, rank: int) -> dict:
    from tests.helpers.model import ddp_chunks_and_muonclip

    from k2_megatron.megatron.optimizer import MuonClipConfig

    (ddp,), opt = ddp_chunks_and_muonclip(cfg, full, muonclip=MuonClipConfig(ns_dtype=torch.float32, qk_clip_tau=0.15,
                                                                             nonfinite=nonfinite))
    before = {n: p.detach().clone() for n, p in ddp.module.named_parameters()}
    _train_step(ddp, opt, batches)
    broken = _break_on_rank0(kind, ddp, opt) if rank == 0 else None
    try:
        outcome = ("returned", repr(opt.step()))
    except Exception as exc:  # noqa: BLE001 - the outcome is what is compared
        outcome = (type(exc).__name__, str(exc))
    unchanged = all(torch.equal(p, before[n]) for n, p in ddp.module.named_parameters())
    _train_step(ddp, opt, batches)  # a clean step on every rank: they are still in step with each other
    ok, grad_norm, _ = opt.step()
    return {"outcome": outcome, "unchanged": unchanged, "skipped_steps": opt.skipped_steps, "broken": broken,
            "next_step": (ok, grad_norm is not None)}


def _run(rank, world, init_file, state_path) -> dict:
    from tests.helpers.model import k2_like_tiny_config, make_batches
    from megatron.core import parallel_state

    from k2_megatron.config import ParallelLayout
    from k2_megatron.megatron import init_distributed_cpu

    cfg, full = k2_like_tiny_config(), torch.load(state_path)
    out = {}
    for layout_name, (tp, pp, ep) in LAYOUTS.items():
        layout = ParallelLayout(tensor_parallel=tp, pipeline_parallel=pp, expert_parallel=ep)
        init_distributed_cpu(layout, rank=rank, world_size=world, init_method=f"file://{init_file}")
        dp_rank, dp = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
        batches = make_batches(cfg, MICROBATCHES, MICRO_BATCH, SEQ, seed=5)[dp_rank::dp]
        for name, (kind, nonfinite) in SCENARIOS.items():
            out[layout_name, name] = _scenario(cfg, full, batches, kind, nonfinite, rank)
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from tests.helpers.model import run_tiny_gloo_workers

    return run_tiny_gloo_workers(_run, 2, tmp_path_factory.mktemp("k2_gloo_errors"), timeout=TIMEOUT)


EXPECTED = {  # scenario -> (exception type or "returned", text every rank's message holds)
    "nan_gradient": ("NonFiniteGradientError", "non-finite gradients on at least one rank ("),
    "nan_gradient_skip": ("returned", "(False, None, None)"),
    "missing_max_logits": ("RuntimeError", "attention layers recorded no max logits this step"),
    "inf_max_logit": ("ValueError", "non-finite max attention logits"),
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_error_on_one_rank_is_agreed_by_all(results, layout, scenario):
    kind, text = EXPECTED[scenario]
    for rank, res in enumerate(results):
        res = res[layout, scenario]
        assert res["outcome"][0] == kind and text in res["outcome"][1], (rank, res["outcome"])
        if scenario == "nan_gradient":  # the parameter is named where it is (rank 0 broke one)
            where = f"(first on this rank: {res['broken']})" if rank == 0 else "(on another rank)"
            assert f"{where}; nothing was updated" in res["outcome"][1], (rank, res["outcome"])
        assert res["unchanged"], f"rank {rank}: parameters changed"
        assert res["skipped_steps"] == (1 if scenario == "nan_gradient_skip" else 0), (rank, res["skipped_steps"])
        assert res["next_step"] == (True, True), (rank, res["next_step"])
