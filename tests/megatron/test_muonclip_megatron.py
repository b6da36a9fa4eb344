"""MuonClip on megatron-core (k2_megatron.megatron.optimizer) under gloo, against one process running the plain
k2_megatron.optim.MuonClip on the same model, data and hyper-parameters.

Layouts (ZeRO-1 distributed optimizer on in all): DP2, TP2, PP2, EP2 (2 processes), TP2xPP2 and DP2xEP2
(4 processes). k2-tiny in float32 with Newton-Schulz in float32, so the layouts differ from the single process
only in the summation order of gradient reductions. tau is low enough that QK-Clip fires at every step. Gradients
are clipped to a global norm of 1.0, as in the recipe (megatron's clipping in the layouts, torch's clip_grad_norm_ in
the single process), and the norms exceed it.
Also: resume from a dist_checkpointing checkpoint on the same and on another DP size, each rank's share of the
Newton-Schulz work, the QK-Clip bound on recomputed logits, and the errors that must agree across ranks.
One spawn per world size runs every scenario of that size (process start-up dominates on a CPU).
"""

import os

import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

SEQ, MICRO_BATCH, GLOBAL_MICROBATCHES, STEPS, SAVE_AT = 16, 2, 4, 3, 2
LR, WD, TAU = 1e-2, 0.1, 0.15  # k2-tiny's max logits start near 0.1-0.2: some heads clip at every step
CLIP_GRAD = 1.0  # the recipe's global grad-norm clip (examples/configs/k2_tiny_cpu.yaml); k2-tiny's norms exceed it
# name -> (tensor, pipeline, expert parallel) for the world size that runs it
LAYOUTS = {2: {"DP2": (1, 1, 1), "TP2": (2, 1, 1), "PP2": (1, 2, 1), "EP2": (1, 1, 2)},
           4: {"TP2xPP2": (2, 2, 1), "DP2xEP2": (1, 1, 2)}}
# Parameters after STEPS steps vs the single process (float32; measured on this CPU): Muon matrices within
# 2.6e-7 (PP2 bit-identical). AdamW parameters within 2.3e-5 absolute and 1.1e-6 relative (Frobenius). Adam's
# normalised update m / (sqrt(v) + eps) turns float32 summation-order noise in a gradient entry at the noise floor
# into a change of up to lr (seen: 7.7e-3 on one embedding element with eps 1e-8); with eps 1e-6 such entries get
# updates linear in the gradient (g / eps) and the noise stays small.
ADAM_EPS = 1e-6
MUON_ATOL = 1e-6
ADAMW_ATOL, ADAMW_RTOL = 5e-4, 5e-5  # 5e-4 = 5% of one lr step
RESUME_OTHER_DP_ATOL = 1e-5
GRAD_NORM_RTOL = 2e-6  # measured at most 2.3e-7 over the 3 steps (float32 summation order)


def _batches(cfg, step):
    from tests.helpers.model import make_batches

    return make_batches(cfg, GLOBAL_MICROBATCHES, MICRO_BATCH, SEQ, seed=1000 + step)


def _config():
    from tests.helpers.model import k2_like_tiny_config

    return k2_like_tiny_config()


def _model(cfg, full):
    """This rank's fp32 k2-tiny loaded with ``full``; router biases frozen (their update follows the load
    balance, which the plain single-process run does not compute)."""
    from tests.helpers.model import loaded_k2_model

    return loaded_k2_model(cfg, full, params_dtype=torch.float32)


def _build(cfg, full, *, distributed=True, muonclip=None, optimizer="adam"):
    """This rank's DDP-wrapped fp32 k2-tiny loaded with ``full`` and its MuonClip optimizer."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig

    from k2_megatron.megatron.optimizer import MuonClipConfig, get_muonclip_optimizer

    model = _model(cfg, full)
    # as megatron's training loop: TP/sequence-parallel and DP gradient reduction after forward_backward
    model.config.finalize_model_grads_func = finalize_model_grads
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(
        use_distributed_optimizer=distributed, grad_reduce_in_fp32=True, overlap_grad_reduce=False,
        bucket_size=None), model)
    opt = get_muonclip_optimizer(
        OptimizerConfig(optimizer=optimizer, lr=LR, weight_decay=WD, bf16=False, adam_eps=ADAM_EPS,
                        use_distributed_optimizer=distributed, clip_grad=CLIP_GRAD),
        [ddp], muonclip or MuonClipConfig(ns_dtype=torch.float32, qk_clip_tau=TAU))
    return ddp, opt


def _train(ddp, opt, cfg, steps, *, on_step=None, grad_norms=None):
    from tests.helpers.model import train_step_losses
    from megatron.core import parallel_state

    dp_rank, dp = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    stats = []
    for step in steps:
        ddp.zero_grad_buffer()
        opt.zero_grad()
        train_step_losses(ddp, _batches(cfg, step)[dp_rank::dp], SEQ, MICRO_BATCH)  # + finalize_model_grads
        ok, grad_norm, _ = opt.step()
        assert ok
        if grad_norms is not None:
            grad_norms.append(grad_norm)
        stats.append({n: (float(s.max_logit), s.num_clipped) for n, s in opt.qk_clip_stats.items()})
        if on_step is not None:
            on_step(step)
    return stats


def _save(ddp, opt, path):
    from megatron.core import dist_checkpointing

    if torch.distributed.get_rank() == 0:
        os.makedirs(path)
    torch.distributed.barrier()
    msd = ddp.module.sharded_state_dict()
    dist_checkpointing.save({"model": msd, "optimizer": opt.sharded_state_dict(msd)}, path)


def _load(ddp, opt, path):
    from megatron.core import dist_checkpointing

    msd = ddp.module.sharded_state_dict()
    loaded = dist_checkpointing.load({"model": msd, "optimizer": opt.sharded_state_dict(msd, is_loading=True)}, path)
    ddp.module.load_state_dict(loaded["model"])
    opt.load_state_dict(loaded["optimizer"])


def _save_model(ddp, path):
    from megatron.core import dist_checkpointing

    if torch.distributed.get_rank() == 0:
        os.makedirs(path)
    torch.distributed.barrier()
    dist_checkpointing.save(ddp.module.sharded_state_dict(), path)


def _load_full(cfg, path, rank, world, init_file):
    """The whole model saved by _save_model from any layout, loaded into an unsharded model (pure DP)."""
    from megatron.core import dist_checkpointing

    from k2_megatron.megatron import build_k2_model, init_distributed_cpu

    init_distributed_cpu(rank=rank, world_size=world, init_method=f"file://{init_file}")
    single = build_k2_model(cfg, params_dtype=torch.float32)
    single.load_state_dict(dist_checkpointing.load(single.sharded_state_dict(), path), strict=False)
    return {n: p.detach().clone() for n, p in single.named_parameters()}


def _clip_bound(ddp, opt, cfg):
    """With lr = 0 a step changes weights only through QK-Clip: recomputed on the same batch, every clipped head of
    the first attention layer (whose input the clip does not change) has max logit tau, the others are unchanged.
    Returns (clipped heads, worst |max logit - tau| of a clipped head, worst change of an unclipped head); zeros on
    other stages. Two-sided: a head clipped too far (below tau) is as wrong as one left above it."""
    from tests.helpers.model import train_step_losses
    from megatron.core import parallel_state

    for sub in opt.chained_optimizers:
        for g in sub.optimizer.param_groups:
            g["lr"] = 0.0
    dp_rank, dp = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    batches = _batches(cfg, 99)[dp_rank::dp]

    def step_max_logits():  # the per-head max logits (all heads, global batch) a step saw
        ddp.zero_grad_buffer()
        opt.zero_grad()
        train_step_losses(ddp, batches, SEQ, MICRO_BATCH)
        opt.step()
        return {name: s.max_logits for name, s in opt.qk_clip_stats.items()}

    before = step_max_logits()  # clips with these
    after = step_max_logits()  # the same batch again, after the clip
    first = "layers.0.self_attention"
    if first not in before:
        return 0, 0.0, 0.0
    b, a = before[first], after[first]
    hit = b > TAU
    off_tau = float((a[hit] - TAU).abs().max()) if hit.any() else 0.0
    change = float((a[~hit] - b[~hit]).abs().max()) if (~hit).any() else 0.0
    return int(hit.sum()), off_tau, change


def _worker(rank, world, init_file, state_path, tmp, result_path):
    os.environ["TORCHDYNAMO_DISABLE"] = "1"
    torch.set_num_threads(1)
    out = {}
    try:
        from k2_megatron.config import ParallelLayout
        from k2_megatron.megatron import init_distributed_cpu

        cfg, full = _config(), torch.load(state_path)
        if world == 1:
            out.update(_single_process(cfg, full, tmp, init_file))
        for name, (tp, pp, ep) in LAYOUTS.get(world, {}).items():
            init_distributed_cpu(ParallelLayout(tensor_parallel=tp, pipeline_parallel=pp, expert_parallel=ep),
                                 rank=rank, world_size=world, init_method=f"file://{init_file}")
            ddp, opt = _build(cfg, full)
            ckpt = os.path.join(tmp, "resume_ckpt")
            save = (lambda step: _save(ddp, opt, ckpt) if step + 1 == SAVE_AT else None) if name == "DP2" else None
            grad_norms = []
            stats = _train(ddp, opt, cfg, range(STEPS), on_step=save, grad_norms=grad_norms)
            work = opt.newton_schulz_work()
            model_path = os.path.join(tmp, f"model_{name}")
            _save_model(ddp, model_path)  # the parameters after STEPS steps, read back below
            bound = _clip_bound(ddp, opt, cfg)
            out[name] = {"stats": stats, "work": work, "clip_bound": bound, "grad_norms": grad_norms,
                         "params": _load_full(cfg, model_path, rank, world, init_file)}
            if name == "DP2":  # resume on the same DP size from the checkpoint taken after step SAVE_AT
                init_distributed_cpu(rank=rank, world_size=world, init_method=f"file://{init_file}")
                ddp, opt = _build(cfg, full)
                _load(ddp, opt, ckpt)
                _train(ddp, opt, cfg, range(SAVE_AT, STEPS))
                out["resume_DP2"] = {"params": {n: p.detach().clone() for n, p in ddp.module.named_parameters()}}
    except BaseException as exc:  # report to the parent
        import traceback

        out["error"] = "".join(traceback.format_exception(exc))
    torch.save(out, result_path)


def _single_process(cfg, full, tmp, init_file):
    """The reference (plain MuonClip, no megatron optimizer wrappers), the DP1 resume and the error cases."""
    from tests.helpers.model import train_step_losses
    from megatron.core.transformer.multi_latent_attention import MLASelfAttention

    from k2_megatron.megatron import init_distributed_cpu
    from k2_megatron.megatron.optimizer import MuonClipConfig
    from k2_megatron.optim import MLAHeadLayout, MuonClip, NonFiniteGradientError, matrices_of_update, uses_muon

    out = {}
    init_distributed_cpu(rank=0, world_size=1, init_method=f"file://{init_file}")
    model = _model(cfg, full)
    # megatron's groups: no weight decay on 1-D parameters and biases
    muon, decay, no_decay = [], [], []
    for name, p in model.named_parameters():
        (muon if uses_muon(name, p) else no_decay if p.dim() == 1 or name.endswith(".bias") else decay).append(p)
    opt = MuonClip([{"params": muon, "use_muon": True}, {"params": decay, "use_muon": False},
                    {"params": no_decay, "use_muon": False, "weight_decay": 0.0}],
                   lr=LR, weight_decay=WD, ns_dtype=torch.float32, adamw_betas=(0.9, 0.999), adamw_eps=ADAM_EPS,
                   qk_clip_tau=TAU)
    attention = [m for m in model.modules() if isinstance(m, MLASelfAttention)]
    for attn in attention:
        c = attn.config
        opt.register_attention(f"layers.{attn.layer_number - 1}.self_attention", w_q_up=attn.linear_q_up_proj.weight,
                               w_kv_up=attn.linear_kv_up_proj.weight,
                               layout=MLAHeadLayout(attn.num_attention_heads_per_partition, c.qk_head_dim,
                                                    c.qk_pos_emb_head_dim, c.v_head_dim),
                               max_logits=attn.core_attention.take_max_attn_logits)
    stats, grad_norms = [], []
    for step in range(STEPS):
        model.zero_grad(set_to_none=True)
        train_step_losses(model, _batches(cfg, step), SEQ, MICRO_BATCH)
        grad_norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP_GRAD)))  # torch's clip
        opt.step()
        stats.append({n: (float(s.max_logit), s.num_clipped) for n, s in opt.qk_clip_stats.items()})
    matrices = sum(matrices_of_update(p, p).shape[0] for g in opt.param_groups if g["use_muon"] for p in g["params"])
    out["single"] = {"stats": stats, "params": {n: p.detach().clone() for n, p in model.named_parameters()},
                     "matrices_per_step": matrices, "grad_norms": grad_norms}

    # Resume the DP2 checkpoint on one process (another DP size).
    ddp, mopt = _build(cfg, full)
    _load(ddp, mopt, os.path.join(tmp, "resume_ckpt"))
    _train(ddp, mopt, cfg, range(SAVE_AT, STEPS))
    out["resume_DP1"] = {"params": {n: p.detach().clone() for n, p in ddp.module.named_parameters()}}

    # Without the distributed optimizer (megatron's Float16/FP32 wrappers): save after SAVE_AT steps, resume.
    ddp, mopt = _build(cfg, full, distributed=False)
    _train(ddp, mopt, cfg, range(STEPS), on_step=lambda step: _save(ddp, mopt, os.path.join(tmp, "replicated_ckpt"))
           if step + 1 == SAVE_AT else None)
    uninterrupted = {n: p.detach().clone() for n, p in ddp.module.named_parameters()}
    ddp, mopt = _build(cfg, full, distributed=False)
    _load(ddp, mopt, os.path.join(tmp, "replicated_ckpt"))
    _train(ddp, mopt, cfg, range(SAVE_AT, STEPS))
    out["resume_replicated"] = {"got": {n: p.detach().clone() for n, p in ddp.module.named_parameters()},
                                "want": uninterrupted}

    # Errors, raised on every rank alike (here one rank).
    errors = {}
    try:
        _build(cfg, full, optimizer="sgd")
    except ValueError as exc:
        errors["sgd"] = str(exc)
    ddp, mopt = _build(cfg, full)
    ddp.zero_grad_buffer()
    try:
        mopt.step()  # no forward since the optimizer was built: no max logits
    except RuntimeError as exc:
        errors["missing_logits"] = str(exc)
    for policy in ("raise", "skip"):
        ddp, mopt = _build(cfg, full, muonclip=MuonClipConfig(ns_dtype=torch.float32, qk_clip_tau=TAU,
                                                               nonfinite=policy))
        before = {n: p.detach().clone() for n, p in ddp.module.named_parameters()}
        ddp.zero_grad_buffer()
        mopt.zero_grad()
        train_step_losses(ddp, _batches(cfg, 0), SEQ, MICRO_BATCH)
        ddp.buffers[0].grad_data[3] = float("nan")
        try:
            errors[f"nan_{policy}"] = repr(mopt.step())
        except NonFiniteGradientError as exc:
            errors[f"nan_{policy}"] = str(exc)
        errors[f"nan_{policy}_unchanged"] = all(torch.equal(p, before[n]) for n, p in ddp.module.named_parameters())
    out["errors"] = errors
    return out


def _spawn(world, tmp, state_path):
    from tests.helpers.model import run_gloo_workers

    init_file = str(tmp / f"init_{world}")
    return run_gloo_workers(_worker, world, lambda r, path: (r, world, init_file, state_path, str(tmp), path),
                            timeout=900)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from tests.helpers.model import saved_full_state

    tmp = tmp_path_factory.mktemp("muonclip_gloo")
    state_path = saved_full_state(tmp, _config())
    two = _spawn(2, tmp, state_path)  # writes the resume checkpoint the single process reads
    one = _spawn(1, tmp, state_path)
    four = _spawn(4, tmp, state_path)
    return {1: one, 2: two, 4: four}


ALL_LAYOUTS = [(w, n) for w, layouts in LAYOUTS.items() for n in layouts]


@pytest.mark.parametrize("world,layout", ALL_LAYOUTS, ids=[n for _, n in ALL_LAYOUTS])
def test_layout_matches_single_process(runs, world, layout):
    from k2_megatron.optim import uses_muon

    want = runs[1][0]["single"]["params"]
    got = runs[world][0][layout]["params"]
    assert set(got) == set(want), set(got) ^ set(want)
    for name, w in want.items():
        err = (got[name] - w).abs().max().item()
        if uses_muon(name, w):
            assert err <= MUON_ATOL, (name, err)
        else:
            rel = ((got[name] - w).norm() / w.norm()).item()
            assert err <= ADAMW_ATOL and rel <= ADAMW_RTOL, (name, err, rel)


@pytest.mark.parametrize("world,layout", ALL_LAYOUTS, ids=[n for _, n in ALL_LAYOUTS])
def test_grad_norm_matches_single_process_and_clipping_is_active(runs, world, layout):
    """The global grad norm opt.step() returns (megatron's, over every model-parallel shard once) equals torch's
    clip_grad_norm_ on the whole model at every step, and exceeds CLIP_GRAD: the parameter comparison above ran with
    the gradients clipped."""
    want = runs[1][0]["single"]["grad_norms"]
    assert len(want) == STEPS and min(want) > CLIP_GRAD, want
    for rank_result in runs[world]:
        got = rank_result[layout]["grad_norms"]
        assert all(g is not None for g in got), got
        torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), torch.tensor(want, dtype=torch.float64),
                                   rtol=GRAD_NORM_RTOL, atol=0)


@pytest.mark.parametrize("world,layout", ALL_LAYOUTS, ids=[n for _, n in ALL_LAYOUTS])
def test_qk_clip_fires_identically(runs, world, layout):
    single = runs[1][0]["single"]["stats"]
    merged = [{} for _ in range(STEPS)]
    for rank_result in runs[world]:
        for step, stats in enumerate(rank_result[layout]["stats"]):
            merged[step].update(stats)
    clipped = 0
    for got, want in zip(merged, single):
        assert set(got) == set(want)
        for name, (max_logit, num_clipped) in want.items():
            assert got[name][1] == num_clipped, (name, got[name], want[name])
            assert abs(got[name][0] - max_logit) <= 1e-5 * max(1.0, abs(max_logit)), (name, got[name], want[name])
            clipped += num_clipped
    assert clipped > 0, "tau too high: QK-Clip never fired"


@pytest.mark.parametrize("world,layout", ALL_LAYOUTS, ids=[n for _, n in ALL_LAYOUTS])
def test_clipped_heads_recompute_to_tau(runs, world, layout):
    for rank_result in runs[world]:
        clipped, off_tau, unclipped_change = rank_result[layout]["clip_bound"]
        assert off_tau <= TAU * 1e-5, off_tau
        assert unclipped_change <= 1e-6, unclipped_change
    assert sum(r[layout]["clip_bound"][0] for r in runs[world]) > 0


def test_newton_schulz_work_is_split_over_data_parallel_ranks(runs):
    """Under DP2 each matrix is orthogonalised once, by one of the two ranks, which share the FLOPs about evenly."""
    work = [r["DP2"]["work"] for r in runs[2]]
    assert sum(w["matrices"] for w in work) == STEPS * runs[1][0]["single"]["matrices_per_step"]
    assert all(0.4 <= w["flops_share"] <= 0.6 for w in work), work


def test_resume_same_dp_is_exact(runs):
    got, want = runs[2][0]["resume_DP2"]["params"], runs[2][0]["DP2"]["params"]
    assert set(got) == set(want)
    for name, p in got.items():
        assert torch.equal(p, want[name]), name


def test_resume_other_dp_size(runs):
    got = runs[1][0]["resume_DP1"]["params"]
    want = runs[2][0]["DP2"]["params"]
    worst = max((got[n] - want[n]).abs().max().item() for n in got)
    assert worst <= RESUME_OTHER_DP_ATOL, worst


def test_resume_without_distributed_optimizer_is_exact(runs):
    res = runs[1][0]["resume_replicated"]
    for name, p in res["got"].items():
        assert torch.equal(p, res["want"][name]), name


def test_errors_agree_and_change_nothing(runs):
    errors = runs[1][0]["errors"]
    assert "must be 'adam'" in errors["sgd"]
    assert "recorded no max logits" in errors["missing_logits"]
    assert "non-finite gradients" in errors["nan_raise"] and errors["nan_raise_unchanged"]
    assert errors["nan_skip"] == "(False, None, None)" and errors["nan_skip_unchanged"]
