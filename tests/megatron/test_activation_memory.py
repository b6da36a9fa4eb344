"""Activation memory as in K2 (k2_megatron.megatron.activation_memory): FP8-stored MoE fc1 / SwiGLU inputs,
selective recomputation (RMSNorm, MLA up-projections, SwiGLU), CPU-offload wiring, the planner's accounting.

On k2-tiny in bf16 (CPU): forward outputs bit-identical with every option; recomputation gives the same
gradients bit for bit; FP8 storage keeps every parameter's gradient within 2^-4 relative (Frobenius) of
bf16 storage (2^-4 is e4m3's relative rounding step, an error bound for each stored element); saved bytes per
layer measured with saved-tensor hooks (tests/helpers/activation_meter.py); 20 pretraining steps with FP8 storage and
recomputation stay within 0.01 nats of the bf16-storage losses at every step.
"""

from __future__ import annotations

import contextlib
import types

import math

import pytest
import torch

from k2_megatron.config import ConfigError, MemoryOptions, get_preset, load_config
from k2_megatron.megatron.activation_memory import transformer_config_overrides
from k2_megatron.training.plan import activation_bytes_per_token, offload_leftover_bytes

ALL_RECOMPUTE = ("layernorm", "mla_up_proj", "swiglu")
OPTION_SETS = {
    "none": MemoryOptions(),
    "fp8": MemoryOptions(fp8_activations=True),
    "layernorm": MemoryOptions(recompute=("layernorm",)),
    "mla_up_proj": MemoryOptions(recompute=("mla_up_proj",)),
    "swiglu": MemoryOptions(recompute=("swiglu",)),
    "recompute": MemoryOptions(recompute=ALL_RECOMPUTE),
    "all": MemoryOptions(fp8_activations=True, recompute=ALL_RECOMPUTE),
    "all+mlp": MemoryOptions(fp8_activations=True, recompute=ALL_RECOMPUTE + ("dense_mlp", "shared_expert")),
}
BATCH, SEQ = 2, 64
FP8_GRAD_BOUND = 2.0 ** -4


# ----- options and config -----

def test_options_validate_and_map_to_megatron():
    assert transformer_config_overrides(MemoryOptions()) == {}
    assert transformer_config_overrides(MemoryOptions(recompute=("dense_mlp", "shared_expert")))[
        "recompute_modules"] == ["mlp", "shared_experts"]
    assert transformer_config_overrides(MemoryOptions(recompute=ALL_RECOMPUTE, cpu_offload=("core_attn",))) == {
        "recompute_granularity": "selective", "recompute_modules": ["layernorm", "mla_up_proj", "moe_act"],
        "fine_grained_activation_offloading": True, "offload_modules": ["core_attn"]}
    with pytest.raises(ValueError, match=r"memory.recompute: \['rmsnorm'\] has unknown"):
        MemoryOptions(recompute=("rmsnorm",))
    with pytest.raises(ValueError, match="memory.cpu_offload"):
        MemoryOptions(cpu_offload=("fused_group_mlp",))  # megatron's, TE op fuser only
    with pytest.raises(TypeError, match="memory.fp8_activations must be a bool"):
        MemoryOptions(fp8_activations="yes")


@pytest.mark.slow
def test_pretrain_config_memory_section(tmp_path):
    cfg = load_config(None, ["memory.fp8_activations=true", "memory.recompute=[layernorm,swiglu]"])
    assert cfg.memory.options() == MemoryOptions(True, ("layernorm", "swiglu"))
    with pytest.raises(ConfigError, match="memory.recompute"):
        load_config(None, ["memory.recompute=[everything]"])
    with pytest.raises(ConfigError, match="memory.fp8_activations"):
        load_config(None, ["memory.fp8_activations=3"])
    from k2_megatron.megatron.activation_memory import check_supported

    with pytest.raises(ValueError, match="memory.cpu_offload=.*needs CUDA"):
        check_supported(MemoryOptions(cpu_offload=("core_attn",)), cuda=False)
    check_supported(MemoryOptions(cpu_offload=("core_attn", "expert_fc1", "moe_act")), cuda=True)


def test_offload_runs_without_transformer_engine(monkeypatch):
    """megatron's offload manager sets TE's cpu_offload flag and raises without TE; with offload on, building the
    activation memory gives it a flag holder (only TE's layers read the flag), and leaves TE's module alone."""
    from megatron.core.extensions import transformer_engine as te_extension
    from megatron.core.pipeline_parallel.fine_grained_activation_offload import PipelineOffloadManager

    from k2_megatron.megatron.activation_memory import apply_activation_memory

    monkeypatch.setattr(te_extension, "cpu_offload", None)
    manager = PipelineOffloadManager.__new__(PipelineOffloadManager)
    manager._saved_tensors_hooks = contextlib.nullcontext()
    manager._cur_forward_chunk = types.SimpleNamespace(do_offload=True)  # inside a chunk that offloads
    with pytest.raises(RuntimeError, match="TE CPU offload is not available"):
        manager.__enter__()
    apply_activation_memory([], MemoryOptions(cpu_offload=("core_attn",)))
    manager.__enter__()
    assert te_extension.cpu_offload.CPUOffloadEnabled
    manager.__exit__(None, None, None)
    assert not te_extension.cpu_offload.CPUOffloadEnabled
    te = object()
    monkeypatch.setattr(te_extension, "cpu_offload", te)
    apply_activation_memory([], MemoryOptions(cpu_offload=("core_attn",)))
    assert te_extension.cpu_offload is te


def test_checkpoint_without_output_default_fixed():
    from megatron.core.tensor_parallel.random import CheckpointWithoutOutput

    from k2_megatron.megatron.cpu_compat import fix_checkpoint_without_output_default

    fix_checkpoint_without_output_default()
    fix_checkpoint_without_output_default()  # idempotent
    assert CheckpointWithoutOutput().fp8 is False  # no FP8 (Transformer Engine) path unless asked for
    assert CheckpointWithoutOutput(fp8="e4m3").fp8 is True


def test_pretrain_refuses_cpu_offload_without_cuda(tmp_path):
    from tests.helpers.model import require_no_cuda

    require_no_cuda()
    from k2_megatron.training.pretrain import pretrain

    with pytest.raises(ConfigError, match=r"memory.cpu_offload=\['core_attn'\] needs CUDA"):
        pretrain(load_config(None, [f"output.dir={tmp_path}", "train.iters=1", "memory.cpu_offload=[core_attn]",
                                    "output.progress_bar=false"]))


# ----- the saved-tensor mechanism on its own -----

@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_fp8_saved_tensors_only_changes_the_saved_copy(device):
    from tests.helpers.activation_meter import SavedActivationMeter

    from k2_megatron.megatron.activation_memory import fp8_saved_tensors
    from k2_megatron.ops import fp8_tile_dequantize, fp8_tile_quantize

    g = torch.Generator().manual_seed(0)
    x = torch.randn(33, 200, generator=g).bfloat16().to(device).requires_grad_()
    w = torch.randn(200, 48, generator=g).bfloat16().to(device).requires_grad_()
    y_ref = x @ w
    dy = torch.randn(y_ref.shape, generator=g).bfloat16().to(device)
    gx_ref, gw_ref = torch.autograd.grad(y_ref, (x, w), dy)
    meter = SavedActivationMeter(torch.nn.Module())
    with meter, fp8_saved_tensors(x):
        y = x @ w
    assert torch.equal(y, y_ref)
    gx, gw = torch.autograd.grad(y, (x, w), dy)
    assert torch.equal(gx, gx_ref)  # needs w only, saved as is
    # dw = x^T dy with x from its FP8 copy: exactly what the dequantised copy gives
    xq = fp8_tile_dequantize(*fp8_tile_quantize(x.detach()), torch.bfloat16)
    if device == "cpu":
        assert torch.equal(gw, xq.t() @ dy)
    else:  # cuBLAS may pick another algorithm for the standalone product
        torch.testing.assert_close(gw, xq.t() @ dy, rtol=1e-2, atol=1e-2)
    assert float((gw.float() - gw_ref.float()).norm() / gw_ref.float().norm()) < FP8_GRAD_BOUND
    saved = meter.dtypes_per_layer()[0]
    assert saved["float8_e4m3fn"] == x.numel() and saved["float32"] == 33 * 2 * 4  # 2 tiles per row
    assert saved["bfloat16"] == w.numel() * 2


# ----- k2-tiny -----

@pytest.fixture(scope="module")
def tiny_runs():
    """One forward + backward of k2-tiny (bf16) per option set, same weights and batch: outputs, gradients and
    the per-layer saved bytes."""
    from tests.helpers.activation_meter import SavedActivationMeter

    from k2_megatron.config import get_preset
    from k2_megatron.megatron import (apply_activation_memory, build_k2_model, init_distributed_cpu,
                                      teardown_distributed_cpu)

    init_distributed_cpu()
    cfg = get_preset("k2-tiny")
    tokens = torch.randint(0, cfg.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(SEQ)[None].expand(BATCH, -1)
    state, runs = None, {}
    try:
        for name, options in OPTION_SETS.items():
            model = build_k2_model(cfg, params_dtype=torch.bfloat16, **transformer_config_overrides(options))
            apply_activation_memory(model, options)
            if state is None:
                state = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
            else:
                model.load_state_dict(state, strict=False)
            with SavedActivationMeter(model) as meter:
                out = model(tokens, pos, None, labels=tokens)
            saved = {"bytes": meter.bytes_per_layer(), "dtypes": meter.dtypes_per_layer()}
            out.float().mean().backward()
            grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}
            runs[name] = {"out": out.detach().clone(), "grads": grads, **saved}
    finally:
        teardown_distributed_cpu()
    return cfg, runs


@pytest.mark.slow
def test_forward_is_bit_identical(tiny_runs):
    _, runs = tiny_runs
    for name, run in runs.items():
        assert torch.equal(run["out"], runs["none"]["out"]), name


@pytest.mark.slow
def test_recompute_gradients_are_identical(tiny_runs):
    _, runs = tiny_runs
    ref = runs["none"]["grads"]
    for name in ("layernorm", "mla_up_proj", "swiglu", "recompute"):
        grads = runs[name]["grads"]
        assert grads.keys() == ref.keys()
        for k in ref:
            assert torch.equal(grads[k], ref[k]), (name, k)


@pytest.mark.slow
def test_fp8_gradients_close_to_bf16_storage(tiny_runs):
    _, runs = tiny_runs
    ref = runs["none"]["grads"]
    for name in ("fp8", "all", "all+mlp"):
        grads = runs[name]["grads"]
        errors = {k: float((grads[k] - ref[k]).norm() / ref[k].norm()) for k in ref if ref[k].norm() > 0}
        worst = max(errors, key=errors.get)
        assert errors[worst] <= FP8_GRAD_BOUND, (name, worst, errors[worst])
        assert max(errors.values()) > 0  # the FP8 copies are really used
        # nothing after the last FP8-stored tensor changes: the output layer's and the final norm's gradients
        for k in ref:
            if k.startswith(("output_layer", "decoder.final_layernorm")):
                assert torch.equal(grads[k], ref[k]), k


@pytest.mark.slow
def test_saved_bytes_per_layer(tiny_runs):
    cfg, runs = tiny_runs
    tokens = BATCH * SEQ
    moe_layers = range(cfg.first_k_dense_replace + 1, cfg.num_hidden_layers + 1)  # megatron's layer_number
    dense = runs["none"]["bytes"][1]
    rows = tokens * cfg.num_experts_per_tok  # dispatched token copies
    h, f = cfg.hidden_size, cfg.moe_intermediate_size
    for n in moe_layers:
        base, fp8 = runs["none"]["dtypes"][n], runs["fp8"]["dtypes"][n]
        # FP8 copies: fc1 input [rows, h] and SwiGLU input (gate and up, [rows, f] each), one byte each
        assert fp8["float8_e4m3fn"] == rows * (h + 2 * f)
        assert base["bfloat16"] - fp8["bfloat16"] == 2 * rows * (h + 2 * f)  # their bf16 copies are gone
        scales = fp8["float32"] - base["float32"]
        assert scales == 4 * rows * (math.ceil(h / 128) + 2 * math.ceil(f / 128))
        ratio = (fp8["float8_e4m3fn"] + scales) / (2 * rows * (h + 2 * f))
        assert 0.5 <= ratio <= 0.5 + 2 / min(h, f, 128)  # ~half the bf16 bytes (+ a scale per <= 128)
    # recomputation removes at least the listed outputs (bf16): two RMSNorm outputs [tokens, h]; MLA's q and kv
    # up-projection outputs; SwiGLU's output and the routed copy fed to the down-projection [rows, f] x 2
    up = tokens * cfg.num_attention_heads * (2 * cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim)
    removed = {"layernorm": 2 * tokens * h * 2, "mla_up_proj": up * 2, "swiglu": 2 * rows * f * 2}
    for name, at_least in removed.items():
        for n in moe_layers:
            assert runs["none"]["bytes"][n] - runs[name]["bytes"][n] >= at_least, (name, n)
    assert runs["swiglu"]["bytes"][1] == dense  # the dense layer's MLP is megatron's (no SwiGLU-only recompute)
    assert runs["layernorm"]["bytes"][1] <= dense - 2 * tokens * h * 2
    for n in moe_layers:
        assert runs["all"]["bytes"][n] < runs["recompute"]["bytes"][n] < runs["none"]["bytes"][n]
        # the whole shared expert recomputed: its fc1 output [tokens, 2 fs] and SwiGLU output go too
        fs = cfg.moe_intermediate_size * cfg.n_shared_experts
        assert runs["all"]["bytes"][n] - runs["all+mlp"]["bytes"][n] >= 3 * tokens * fs * 2
    dense_f = cfg.intermediate_size
    assert runs["all"]["bytes"][1] - runs["all+mlp"]["bytes"][1] >= 3 * tokens * dense_f * 2  # dense MLP
    _print_table(runs)


def _print_table(runs) -> None:
    layers = sorted(k for k in runs["none"]["bytes"] if k)
    print(f"\nsaved-for-backward bytes per layer, k2-tiny bf16, {BATCH}x{SEQ} tokens (layer 1 dense, 2.. MoE):")
    for name, run in runs.items():
        print(f"  {name:>12}: " + "  ".join(f"L{n}={run['bytes'][n]:>7}" for n in layers))


# ----- planner -----

def test_planner_accounts_for_the_options():
    cfg = get_preset("k2")
    h, H, k, fe = cfg.hidden_size, cfg.num_attention_heads, cfg.num_experts_per_tok, cfg.moe_intermediate_size
    qkv = 2 * H * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) + H * cfg.v_head_dim
    none = {layer: activation_bytes_per_token(cfg, layer, MemoryOptions()) for layer in (0, 5)}
    # what each recomputation drops (bf16): the norms' outputs and fp32 1/RMS, MLA's q / k / v, SwiGLU's two
    # intermediates and output, the dense MLP's and the shared expert's fc1 output and SwiGLU tensors
    dropped = {"layernorm": 2 * (2 * h + 4), "mla_up_proj": 2 * qkv, "swiglu": 2 * 3 * k * fe,
               "dense_mlp": 2 * 5 * cfg.intermediate_size,
               "shared_expert": 2 * 5 * fe * cfg.n_shared_experts}
    for name, at in dropped.items():
        layer = 0 if name == "dense_mlp" else 5
        assert none[layer] - activation_bytes_per_token(cfg, layer, MemoryOptions(recompute=(name,))) == at, name
    saved = none[5] - activation_bytes_per_token(cfg, 5, MemoryOptions(fp8_activations=True))
    assert saved == pytest.approx(k * (h + 2 * fe) * (2 - 1 - 4 / 128))  # fc1's and SwiGLU's inputs as FP8
    # our experts' offload groups (with K2's SwiGLU recompute): the FP8 copies of the fc1 input and the SwiGLU input
    # move to pinned host memory
    fp8 = MemoryOptions(fp8_activations=True, recompute=("swiglu",))
    moe_offload = MemoryOptions(fp8_activations=True, recompute=("swiglu",), cpu_offload=("expert_fc1", "moe_act"))
    fp8_inputs = k * (h + 2 * fe) * (1 + 4 / 128)
    assert (activation_bytes_per_token(cfg, 5, fp8) - activation_bytes_per_token(cfg, 5, moe_offload)
            == pytest.approx(fp8_inputs))
    assert activation_bytes_per_token(cfg, 5, moe_offload, offloaded=True) == pytest.approx(fp8_inputs)
    assert activation_bytes_per_token(cfg, 0, moe_offload, offloaded=True) == 0  # a dense layer has no experts
    offload = MemoryOptions(cpu_offload=("core_attn",))
    # q, k, v; the fp32 log-sum-exp ([tokens, H]) stays on the device under megatron's min_offloaded_tensor_size
    # (2**20 elements), which it exceeds from 16384 tokens on
    assert none[5] - activation_bytes_per_token(cfg, 5, offload, tokens=4096) == 2 * qkv
    assert none[5] - activation_bytes_per_token(cfg, 5, offload, tokens=16384) == 2 * qkv + 4 * H
    # with mla_up_proj recompute, the up-projections' recomputation saves MLA's normed q and kv latents and the kv
    # down-projection's output outside qkv_linear's offload group: they stay (measured, k2_full)
    ql, kl, dr = cfg.q_lora_rank, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    left = offload_leftover_bytes(cfg, 5, MemoryOptions(recompute=("layernorm", "mla_up_proj"),
                                                        cpu_offload=("qkv_linear",)), tokens=4096)
    assert left == {"qkv_linear": 2 * (ql + kl + kl + dr) + 4 * dr}  # ... and RoPE's fp32 tables (small)
    attention = MemoryOptions(recompute=("layernorm", "mla_up_proj"),
                              cpu_offload=("attn_norm", "qkv_linear", "core_attn", "attn_proj", "mlp_norm"))
    host = {"attn_norm": h, "qkv_linear": 2 * h + 2 * ql + 2 * kl + dr, "core_attn": qkv + H * cfg.v_head_dim,
            "attn_proj": H * cfg.v_head_dim, "mlp_norm": h}
    for layer in (0, 5):
        assert activation_bytes_per_token(cfg, layer, attention, offloaded=True) == 2 * sum(host.values()), layer


def test_dry_run_reports_the_memory_section():
    import io

    from k2_megatron.training.plan import dry_run, plan_memory

    base = load_config("examples/configs/k2_full.yaml", ["memory.fp8_activations=false", "memory.recompute=[]",
                                                        "memory.cpu_offload=[]"])
    k2 = load_config("examples/configs/k2_full.yaml", ["memory.fp8_activations=true",
                                                      "memory.recompute=[layernorm,mla_up_proj,swiglu]",
                                                      "memory.cpu_offload=[]"])
    p0, p1 = plan_memory(base, 256), plan_memory(k2, 256)
    for s0, s1 in zip(p0.stages, p1.stages):
        assert s0.activations_configured == pytest.approx(s0.activations)
        assert s1.activations_configured < s1.activations_recompute + 0.2 * (s1.activations - s1.activations_recompute)
    out = io.StringIO()
    dry_run(k2, 256, file=out)
    assert "memory section (fp8_activations=True, recompute=['layernorm', 'mla_up_proj', 'swiglu']" in out.getvalue()
    assert "CPU-offloaded activations in pinned host memory" not in out.getvalue()
    shipped = load_config("examples/configs/k2_full.yaml")  # K2's memory section: offload of the remaining inputs
    p2 = plan_memory(shipped, 256)
    for s1, s2 in zip(p1.stages, p2.stages):  # the host copies more than leaves the device (every save is copied)
        assert s1.activations_configured - s2.activations_configured < s2.offloaded, s2.stage
    out = io.StringIO()
    dry_run(shipped, 256, file=out)
    assert (f"CPU-offloaded activations in pinned host memory per rank: {p2.stages[0].offloaded / 2**30:.1f}"
            in out.getvalue())


# ----- CPU offload of the experts' inputs (needs a GPU: megatron's offload streams and pinned host memory) -----

def _experts_step(offload: bool, fp8: bool, recompute: bool):
    """One forward + backward of K2GroupedMLP on the GPU (bf16, 4 experts, 96 routed rows), optionally with megatron's
    expert_fc1 / moe_act offload of every saved tensor: output, input / routing-weight / weight gradients, and the
    bytes megatron's offload manager copied to the host."""
    import types

    import torch.nn.functional as F
    from megatron.core.pipeline_parallel.fine_grained_activation_offload import (
        FineGrainedActivationOffloadingInterface as off_interface,
        PipelineOffloadManager,
    )
    from megatron.core.transformer.transformer_config import TransformerConfig

    from k2_megatron.megatron.moe import K2GroupedMLP

    experts, hidden, ffn = 4, 256, 192
    extra = {"recompute_granularity": "selective", "recompute_modules": ["moe_act"]} if recompute else {}
    if offload:
        extra.update(fine_grained_activation_offloading=True, offload_modules=["expert_fc1", "moe_act"],
                     min_offloaded_tensor_size=0)
    cfg = TransformerConfig(num_layers=1, hidden_size=hidden, num_attention_heads=4, num_moe_experts=experts,
                            moe_ffn_hidden_size=ffn, moe_grouped_gemm=True, gated_linear_unit=True,
                            activation_func=F.silu, add_bias_linear=False, params_dtype=torch.bfloat16, bf16=True,
                            use_cpu_initialization=True, perform_initialization=False, **extra)
    mlp = K2GroupedMLP(experts, cfg, pg_collection=types.SimpleNamespace(ep=None, expt_dp=None, expt_tp=None))
    mlp.fp8_activation_storage = fp8
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for w in mlp.parameters():
            w.copy_(torch.randn(w.shape, generator=g) * 0.05)
    mlp.cuda()
    counts = torch.tensor([40, 0, 33, 23])
    x = torch.randn(int(counts.sum()), hidden, generator=g).bfloat16().cuda().requires_grad_()
    probs = torch.rand(int(counts.sum()), generator=g).cuda().requires_grad_()
    dy = torch.randn(int(counts.sum()), hidden, generator=g).bfloat16().cuda()
    PipelineOffloadManager.reset_instance()
    if offload:
        off_interface.init_chunk_handler(pp_rank=0, vp_size=None, vp_stage=None, min_offloaded_tensor_size=0,
                                         delta_offload_bytes_across_pp_ranks=0, activation_offload_fraction=1.0)
    out, _ = mlp(x, counts, probs)
    out.backward(dy)
    manager = PipelineOffloadManager.get_instance()
    offloaded = {group._name: group.total_offload_bytes for chunk in manager._cached_chunks_forward
                 for group in chunk.offload_groups}
    off_interface.reset()
    PipelineOffloadManager.OFFLOAD_MGR = None
    torch.cuda.synchronize()
    return out.detach(), x.grad, probs.grad, [w.grad for w in mlp.parameters()], offloaded


@pytest.mark.gpu
@pytest.mark.parametrize("fp8,recompute", [(False, False), (True, True)])
def test_expert_offload_keeps_the_gradients(fp8, recompute):
    """Offload copies the saved tensors out and back unchanged: outputs and gradients bit-identical to no offload.
    (Its wiring and byte counts are checked without a GPU under the rehearsal: tests/rehearsal/test_offload.py.)"""
    pytest.importorskip("transformer_engine")  # megatron's offload manager sets TE's cpu_offload flag
    ref = _experts_step(False, fp8, recompute)
    got = _experts_step(True, fp8, recompute)
    assert set(got[4]) == {"expert_fc1", "moe_act"} and all(b > 0 for b in got[4].values())
    assert torch.equal(got[0], ref[0])
    assert torch.equal(got[1], ref[1]) and torch.equal(got[2], ref[2])
    for a, b in zip(got[3], ref[3]):
        assert torch.equal(a, b)


# ----- training -----

@pytest.mark.slow
def test_cpu_training_with_fp8_storage_tracks_bf16(tmp_path):
    """20 pretraining steps of k2-tiny (bf16, CPU) with FP8 storage + recomputation vs none: train losses
    within 0.01 nats at every step. (200 steps: ``python -m benchmarks.activation_memory --train-steps 200``,
    figures in benchmarks/RESULTS.md.)"""
    from tests.helpers.model import require_no_cuda
    from benchmarks.activation_memory import FP8_RECOMPUTE, training_config

    from k2_megatron.training.pretrain import pretrain

    require_no_cuda()
    ref = pretrain(training_config(str(tmp_path / "bf16"), 20))["losses"]
    fp8 = pretrain(training_config(str(tmp_path / "fp8"), 20, *FP8_RECOMPUTE))["losses"]
    assert len(ref) == len(fp8) == 20
    assert ref[-1] < ref[0] - 0.5  # it trains
    assert max(abs(a - b) for a, b in zip(ref, fp8)) < 0.01
    assert ref != fp8  # FP8 storage changes the gradients
