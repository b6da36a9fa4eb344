"""Benchmark of k2_megatron.ops.grouped_gemm on Kimi K2 expert shapes (one EP16 rank), GPU only.

Shapes (K2 report section 1): 384 experts / EP16 = 24 local experts, hidden 7168, expert FFN 2048:
  fc1  x [T, 7168] @ w [E, 7168, 4096]   (gate + up projections fused)
  fc2  x [T, 2048] @ w [E, 2048, 7168]
Loads: balanced (512, 2048, 4096 tokens per expert) and Zipf-skewed (same total as 2048 per expert).
Implementations, same process, same inputs: k2_megatron's grouped_gemm (its CUDA kernel when one runs on
this GPU, else the reference; the table names the path: sm90 CUTLASS 3, sm80 CUTLASS 2 or reference), a
per-expert loop of matmuls (megatron-core's SequentialMLP way; sizes on the host) and torch._grouped_mm.
Forward, and backward (dx and dw). Times are medians over CUDA-event-timed iterations; TFLOP/s count
2*T*K*N per forward, twice that for the backward.

    python -m benchmarks.grouped_gemm [--json results.json] [--iters 20] [--warmup 5]

Without a CUDA device it prints that it needs one and exits 0.
"""

import argparse
import importlib
import math
import sys

import torch

from benchmarks.common import cuda_median_ms, has_cuda_kernel, require_cuda, run_metadata, write_json

EXPERTS = 24
HIDDEN = 7168
FFN = 2048
PROJECTIONS = {"fc1": (HIDDEN, 2 * FFN), "fc2": (FFN, HIDDEN)}  # (K, N)
BALANCED = (512, 2048, 4096)
ZIPF_EXPONENT = 1.2
ZIPF_TOKENS_PER_EXPERT = 2048
DEVICE = "cuda"


def zipf_sizes(experts: int, total: int, exponent: float, seed: int = 0) -> list[int]:
    """Tokens per expert proportional to 1/rank^exponent (ranks shuffled over the experts), summing to total."""
    weights = [1.0 / (rank + 1) ** exponent for rank in range(experts)]
    scale = total / sum(weights)
    sizes = [int(w * scale) for w in weights]
    sizes[0] += total - sum(sizes)
    order = torch.randperm(experts, generator=torch.Generator().manual_seed(seed)).tolist()
    return [sizes[i] for i in order]


def loop_forward(x, w, sizes):
    outs, start = [], 0
    for e, size in enumerate(sizes):
        outs.append(x[start:start + size] @ w[e])
        start += size
    return torch.cat(outs)


def make_impls(sizes):
    from k2_megatron.ops import grouped_gemm

    device_sizes = torch.tensor(sizes, device=DEVICE, dtype=torch.int64)
    offsets = torch.cumsum(device_sizes, 0).to(torch.int32)
    return {
        "k2 grouped_gemm": lambda x, w: grouped_gemm(x, w, device_sizes),
        "per-expert loop": lambda x, w: loop_forward(x, w, sizes),
        "torch._grouped_mm": lambda x, w: torch._grouped_mm(x, w, offs=offsets),
    }


def rel_err(y, want) -> float:
    return float((y.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-30))


def bench_case(name, k, n, sizes, iters, warmup):
    total = sum(sizes)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(total, k, device=DEVICE, generator=gen).to(torch.bfloat16).requires_grad_()
    w = (torch.randn(EXPERTS, k, n, device=DEVICE, generator=gen) / math.sqrt(k)).to(torch.bfloat16).requires_grad_()
    dy = torch.randn(total, n, device=DEVICE, generator=gen).to(torch.bfloat16)
    flops = 2.0 * total * k * n
    rows = []
    want = None
    for impl, fn in make_impls(sizes).items():
        row = {"case": name, "K": k, "N": n, "tokens": total, "max_tokens_per_expert": max(sizes), "impl": impl}
        if impl == "k2 grouped_gemm":
            row["path"] = importlib.import_module("k2_megatron.ops.grouped_gemm").grouped_gemm_path(x, w)
        try:
            with torch.no_grad():
                out = fn(x, w)
            if want is None:
                want = out
            row["rel_err_vs_first"] = rel_err(out, want)
            row["fwd_ms"] = cuda_median_ms(lambda: fn(x, w), iters=iters, warmup=warmup)
            row["fwd_tflops"] = flops / row["fwd_ms"] / 1e9
            out = fn(x, w)
            row["bwd_ms"] = cuda_median_ms(lambda: torch.autograd.grad(out, (x, w), dy, retain_graph=True), iters=iters,
                                           warmup=warmup)
            row["bwd_tflops"] = 2 * flops / row["bwd_ms"] / 1e9
            del out
        except Exception as exc:  # e.g. torch._grouped_mm unsupported on this GPU/shape: recorded, not fatal
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        rows.append(row)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the rows (and the environment) to this file")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args(argv)
    if not require_cuda("benchmarks.grouped_gemm"):
        return 0

    env = {**run_metadata(), "k2_grouped_gemm_cuda_kernel": has_cuda_kernel("grouped_gemm")}
    print(f"# {env['device']}, torch {env['torch']}, CUDA {env['cuda']}, commit {env['commit']}")
    print(f"# k2: {env['kernels']}; grouped_gemm CUDA kernel registered: {env['k2_grouped_gemm_cuda_kernel']}")
    loads = [(f"balanced {t}/expert", [t] * EXPERTS) for t in BALANCED]
    loads.append((f"zipf s={ZIPF_EXPONENT}", zipf_sizes(EXPERTS, EXPERTS * ZIPF_TOKENS_PER_EXPERT, ZIPF_EXPONENT)))
    rows = []
    for proj, (k, n) in PROJECTIONS.items():
        for load, sizes in loads:
            rows += bench_case(f"{proj} {load}", k, n, sizes, args.iters, args.warmup)
            torch.cuda.empty_cache()

    paths = sorted({r["path"] for r in rows if "path" in r})
    print(f"# k2 grouped_gemm path: {', '.join(paths)}")
    print("| case | impl | fwd ms | fwd TFLOP/s | bwd ms | bwd TFLOP/s | rel err |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        impl = f"{r['impl']} [{r['path']}]" if "path" in r else r["impl"]
        if "error" in r:
            print(f"| {r['case']} | {impl} | {r['error']} | | | | |")
            continue
        print(f"| {r['case']} | {impl} | {r['fwd_ms']:.3f} | {r['fwd_tflops']:.0f} | {r['bwd_ms']:.3f} | "
              f"{r['bwd_tflops']:.0f} | {r['rel_err_vs_first']:.1e} |")
    by_case = {}
    for r in rows:
        by_case.setdefault(r["case"], {})[r["impl"]] = r
    print("\n| case | fwd vs loop | fwd vs _grouped_mm | bwd vs loop | bwd vs _grouped_mm |")
    print("|---|---|---|---|---|")
    for case, impls in by_case.items():
        ours = impls.get("k2 grouped_gemm", {})

        def ratio(other, key):
            o = impls.get(other, {})
            return f"{o[key] / ours[key]:.2f}x" if key in o and key in ours else "n/a"

        print(f"| {case} | {ratio('per-expert loop', 'fwd_ms')} | {ratio('torch._grouped_mm', 'fwd_ms')} | "
              f"{ratio('per-expert loop', 'bwd_ms')} | {ratio('torch._grouped_mm', 'bwd_ms')} |")
    write_json(args.json, {"benchmark": "grouped_gemm", **env, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
