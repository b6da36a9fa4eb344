"""Activation memory of K2 layers with each option of k2_megatron.megatron.activation_memory, and all together.

GPU (the issue's benchmark): k2-mini, one micro-batch of --seq tokens (default 4096), bf16, one GPU: peak
memory above the model's own (weights + gradients) during forward + backward, and the median step time, for
none / fp8 / recompute / offload / all; beside each, the dry-run planner's prediction
(k2_megatron.training.plan.activation_bytes_per_token summed over the layers; logits and loss excluded).
CPU (no GPU needed; what the tests measure): bytes saved for backward per decoder layer, counted with
saved-tensor hooks (the tests' SavedActivationMeter, tests/helpers/activation_meter.py), k2-tiny by default; CPU
offload is not available there.

    python -m benchmarks.activation_memory                       # GPU if there is one, else the CPU count
    python -m benchmarks.activation_memory --cpu --preset k2-tiny --seq 256
    python -m benchmarks.activation_memory --json results.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import torch

from benchmarks.common import print_table, run_metadata, write_json
from k2_megatron.config import MemoryOptions
from k2_megatron.megatron.activation_memory import transformer_config_overrides
from k2_megatron.training.plan import activation_bytes_per_token

RECOMPUTE = ("layernorm", "mla_up_proj", "swiglu")
OFFLOAD = ("core_attn", "attn_proj")
OPTION_SETS = {
    "none": MemoryOptions(),
    "fp8": MemoryOptions(fp8_activations=True),
    "recompute": MemoryOptions(recompute=RECOMPUTE),
    "offload": MemoryOptions(cpu_offload=OFFLOAD),
    "fp8+recompute": MemoryOptions(fp8_activations=True, recompute=RECOMPUTE),
    "fp8+recompute+mlp": MemoryOptions(fp8_activations=True, recompute=RECOMPUTE + ("dense_mlp", "shared_expert")),
    "all": MemoryOptions(fp8_activations=True, recompute=RECOMPUTE, cpu_offload=OFFLOAD),
}


def _init(device: str) -> None:
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    if device == "cpu":
        from k2_megatron.megatron import init_distributed_cpu

        init_distributed_cpu()
        return
    if not torch.distributed.is_initialized():
        import tempfile

        torch.distributed.init_process_group("nccl", rank=0, world_size=1,
                                             init_method=f"file://{tempfile.mkstemp(prefix='k2_bench_')[1]}")
    torch.cuda.set_device(0)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel()
    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(0)


def predicted_bytes(cfg, options: MemoryOptions, tokens: int) -> float:
    return sum(activation_bytes_per_token(cfg, layer, options) for layer in range(cfg.num_hidden_layers)) * tokens


def _build(cfg, options: MemoryOptions, device: str):
    from k2_megatron.megatron import build_k2_model
    from k2_megatron.megatron import apply_activation_memory

    model = build_k2_model(cfg, params_dtype=torch.bfloat16, **transformer_config_overrides(options))
    apply_activation_memory(model, options)
    return model.to(device)


def _batch(cfg, seq: int, device: str):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (1, seq), generator=g).to(device)
    return tokens, torch.arange(seq, device=device)[None]


def run_gpu(cfg, seq: int, iters: int, sets: list[str]) -> list[dict]:
    rows = []
    tokens, pos = _batch(cfg, seq, "cuda")
    for name in sets:
        options = OPTION_SETS[name]
        torch.cuda.empty_cache()
        model = _build(cfg, options, "cuda")
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        times = []
        torch.cuda.reset_peak_memory_stats()
        for i in range(iters + 1):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = model(tokens, pos, None, labels=tokens)
            out.float().mean().backward()
            torch.cuda.synchronize()
            if i:  # the first step warms up
                times.append((time.perf_counter() - t0) * 1e3)
        peak = torch.cuda.max_memory_allocated() - base
        rows.append({"options": name, "peak act GiB": peak / 2**30, "step ms": statistics.median(times),
                     "planner GiB": predicted_bytes(cfg, options, seq) / 2**30})
        del model, out
    return rows


def run_cpu(cfg, seq: int, sets: list[str]) -> list[dict]:
    from tests.helpers.activation_meter import SavedActivationMeter  # run from the repository root

    rows = []
    tokens, pos = _batch(cfg, seq, "cpu")
    for name in sets:
        options = OPTION_SETS[name]
        if options.cpu_offload:
            continue  # CUDA only
        model = _build(cfg, options, "cpu")
        with SavedActivationMeter(model) as meter:
            out = model(tokens, pos, None, labels=tokens)
        per_layer = meter.bytes_per_layer()
        out.float().mean().backward()
        row = {"options": name}
        for n in sorted(k for k in per_layer if k):
            row[f"L{n} KiB"] = per_layer[n] / 1024
            row[f"L{n} plan KiB"] = activation_bytes_per_token(cfg, n - 1, options) * seq / 1024
        rows.append(row)
    return rows


def main(argv=None) -> int:
    from k2_megatron.config import get_preset

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu", action="store_true", help="count saved bytes on the CPU even with a GPU")
    parser.add_argument("--preset", default=None, help="model preset (default: k2-mini on GPU, k2-tiny on CPU)")
    parser.add_argument("--seq", type=int, default=None, help="tokens per micro-batch (default 4096 GPU, 128 CPU)")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--options", nargs="+", default=list(OPTION_SETS), choices=list(OPTION_SETS))
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    preset = args.preset or ("k2-mini" if device == "cuda" else "k2-tiny")
    seq = args.seq or (4096 if device == "cuda" else 128)
    cfg = get_preset(preset)
    _init(device)
    if device == "cuda":
        rows = run_gpu(cfg, seq, args.iters, args.options)
        columns = ["options", "peak act GiB", "planner GiB", "step ms"]
    else:
        print("no GPU (or --cpu): bytes saved for backward per decoder layer, measured with saved-tensor hooks "
              "(the CPU reference attention keeps fp32 intermediates the planner does not count)")
        rows = run_cpu(cfg, seq, args.options)
        columns = list(rows[0]) if rows else ["options"]
    print(f"{preset}, {seq} tokens, bf16, {device}")
    print_table(rows, columns)
    write_json(args.json, {"meta": run_metadata(), "preset": preset, "seq": seq, "device": device, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
