"""MuonClip's optimizer state in host memory (MuonClipConfig.state_on_host, the config's
memory.optimizer_state_on_host; k2_megatron.megatron.host_state) against the device-resident step, on the CPU, where
host and device are the same memory but the streamed step still keeps separate state tensors and copies every piece:
1 process and ZeRO-1 DP2 on gloo, k2-tiny with bf16 weights (fp32 master shards exist) and fp32 weights (the
master shards are the model's own). The budget makes the step stream every parameter in several pieces and Muon's
gathers in spans; QK-Clip fires at every step and gradients are clipped. After every step the losses, the model
weights and the whole optimizer state (master weights, momentum, Adam moments) are bitwise those of the switch off;
a checkpoint saved with the switch on resumes bitwise with it off and vice versa; a non-finite gradient skips the step
on both, changing nothing."""

import os

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import pytest
import torch

STEPS, SAVE_AT = 3, 2
BUDGET = 4096  # bytes: 256-element pieces (host_state.STREAMED_BYTES_PER_ELEMENT), Muon's spans a few matrices


def _build(cfg, full, dtype, on_host):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig

    from k2_megatron.megatron.optimizer import MuonClipConfig, get_muonclip_optimizer
    from tests.helpers.model import loaded_k2_model
    from tests.megatron.test_muonclip_megatron import ADAM_EPS, CLIP_GRAD, LR, TAU, WD

    model = loaded_k2_model(cfg, full, params_dtype=dtype)
    model.config.finalize_model_grads_func = finalize_model_grads
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(
        use_distributed_optimizer=True, grad_reduce_in_fp32=True, overlap_grad_reduce=False, bucket_size=None), model)
    opt = get_muonclip_optimizer(
        OptimizerConfig(optimizer="adam", lr=LR, weight_decay=WD, bf16=dtype == torch.bfloat16, adam_eps=ADAM_EPS,
                        use_distributed_optimizer=True, clip_grad=CLIP_GRAD),
        [ddp], MuonClipConfig(ns_dtype=torch.float32, qk_clip_tau=TAU, buffer_bytes=BUDGET, nonfinite="skip",
                              state_on_host=on_host))
    return ddp, opt


def _state(ddp, opt) -> dict:
    """Model weights and every optimizer state tensor (by model parameter name), cloned."""
    out = {f"model.{n}": p.detach().clone() for n, p in ddp.module.named_parameters()}
    names = {p: n for n, p in ddp.module.named_parameters()}
    for i, sub in enumerate(opt.chained_optimizers):
        if sub.optimizer is None:
            continue
        for main, model in sub.main_to_model.items():
            out[f"{i}.master.{names[model]}"] = main.detach().clone()
            for key, t in sub.optimizer.state[main].items():
                out[f"{i}.{key}.{names[model]}"] = t.detach().clone()
    return out


def _step(ddp, opt, cfg, step):
    from megatron.core import parallel_state

    from tests.helpers.model import train_step_losses
    from tests.megatron.test_muonclip_megatron import MICRO_BATCH, SEQ, _batches

    dp_rank, dp = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    ddp.zero_grad_buffer()
    opt.zero_grad()
    losses = train_step_losses(ddp, _batches(cfg, step)[dp_rank::dp], SEQ, MICRO_BATCH)
    ok, grad_norm, _ = opt.step()
    assert ok
    return losses, float(grad_norm), {n: int(s.num_clipped) for n, s in opt.qk_clip_stats.items()}


def _run(cfg, full, dtype, on_host, tmp, tag):
    """STEPS steps; (per step: losses, grad norm, clipped heads and the state after it), a checkpoint at SAVE_AT."""
    from tests.megatron.test_muonclip_megatron import _save

    ddp, opt = _build(cfg, full, dtype, on_host)
    steps = []
    for step in range(STEPS):
        steps.append((*_step(ddp, opt, cfg, step), _state(ddp, opt)))
        if step + 1 == SAVE_AT:
            _save(ddp, opt, os.path.join(tmp, tag))
    skipped = _skipped_step_changes_nothing(ddp, opt, cfg)
    return steps, opt.host_state_bytes(), skipped


def _resumed(cfg, full, dtype, on_host, path):
    """The state after the last step, resumed from the checkpoint at ``path`` (saved after SAVE_AT steps)."""
    from tests.megatron.test_muonclip_megatron import _load

    ddp, opt = _build(cfg, full, dtype, on_host)
    _load(ddp, opt, path)
    for step in range(SAVE_AT, STEPS):
        _step(ddp, opt, cfg, step)
    return _state(ddp, opt)


def _skipped_step_changes_nothing(ddp, opt, cfg) -> bool:
    from megatron.core import parallel_state

    from tests.helpers.model import train_step_losses
    from tests.megatron.test_muonclip_megatron import MICRO_BATCH, SEQ, _batches

    before = _state(ddp, opt)
    dp_rank, dp = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    ddp.zero_grad_buffer()
    opt.zero_grad()
    train_step_losses(ddp, _batches(cfg, STEPS)[dp_rank::dp], SEQ, MICRO_BATCH)
    next(p for p in ddp.module.parameters() if p.requires_grad).main_grad.view(-1)[0] = float("inf")
    ok, _, _ = opt.step()
    after = _state(ddp, opt)
    return not ok and all(torch.equal(before[k], after[k]) for k in before)


def _body(rank, world, init_file, state_path, tmp):
    from k2_megatron.megatron import init_distributed_cpu, teardown_distributed_cpu
    from tests.megatron.test_muonclip_megatron import _config

    cfg, full, out = _config(), torch.load(state_path), {}
    for dtype in (torch.bfloat16, torch.float32):
        name = str(dtype).split(".")[-1]
        init_distributed_cpu(rank=rank, world_size=world, init_method=f"file://{init_file}_{name}")
        runs = {on: _run(cfg, full, dtype, on, tmp, f"{name}_{on}") for on in (False, True)}
        resumed = {(saved, on): _resumed(cfg, full, dtype, on, os.path.join(tmp, f"{name}_{saved}"))
                   for saved in (False, True) for on in (False, True) if saved != on}
        off = runs[False][0]
        out[name] = {
            "steps": [{"same_losses_norm_clips": a[:3] == b[:3], "differing": _differing(a[3], b[3])}
                      for a, b in zip(off, runs[True][0])],
            "clipped": [sum(a[2].values()) for a in off], "norms": [a[1] for a in off],
            "host_bytes": {on: r[1] for on, r in runs.items()}, "skipped": {on: r[2] for on, r in runs.items()},
            "resumed": {k: _differing(off[-1][3], v) for k, v in resumed.items()}}
        teardown_distributed_cpu()
    return out


def _differing(a: dict, b: dict) -> list[str]:
    """Names whose tensors differ (bitwise), or are in one only."""
    return sorted(set(a) ^ set(b)) + [k for k in a if k in b and not torch.equal(a[k], b[k])]


@pytest.fixture(scope="module", params=[1, 2], ids=["single", "DP2"])
def runs(request, tmp_path_factory):
    from tests.helpers.model import run_gloo_bodies, saved_full_state
    from tests.megatron.test_muonclip_megatron import _config

    world = request.param
    tmp = tmp_path_factory.mktemp(f"state_on_host_{world}")
    state_path = saved_full_state(tmp, _config())
    return run_gloo_bodies(_body, world, lambda r: (r, world, str(tmp / "init"), state_path, str(tmp)),
                           timeout=600)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_state_on_host_changes_nothing(runs, dtype):
    for rank, res in enumerate(runs):
        r = res[dtype]
        assert all(c > 0 for c in r["clipped"]), r["clipped"]  # QK-Clip fires: the clipped masters are streamed
        assert all(n > 1.0 for n in r["norms"]), r["norms"]  # gradient clipping is active (CLIP_GRAD 1.0)
        for step, s in enumerate(r["steps"]):
            assert s["same_losses_norm_clips"] and s["differing"] == [], (rank, step, s["differing"][:5])
        assert r["host_bytes"][False] == 0 and r["host_bytes"][True] > 0, r["host_bytes"]
        assert r["skipped"] == {False: True, True: True}


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_checkpoints_cross_the_switch(runs, dtype):
    for rank, res in enumerate(runs):
        for (saved, loaded), differing in res[dtype]["resumed"].items():
            assert differing == [], (rank, f"saved with state_on_host={saved}, loaded with {loaded}", differing[:5])


def test_state_on_host_needs_the_distributed_optimizer():
    from megatron.core.optimizer import OptimizerConfig

    from k2_megatron.megatron.optimizer import MuonClipConfig, get_muonclip_optimizer

    with pytest.raises(ValueError, match="state_on_host .*needs the distributed optimizer"):
        get_muonclip_optimizer(OptimizerConfig(optimizer="adam", use_distributed_optimizer=False),
                               [torch.nn.Linear(2, 2)], MuonClipConfig(state_on_host=True))
    with pytest.raises(ValueError, match="state_on_host must be a bool, got 'yes'"):
        MuonClipConfig(state_on_host="yes")
