"""Newton-Schulz on K2's matrix shapes: our batched kernel vs a per-matrix PyTorch loop vs batched torch.bmm.

    python benchmarks/newton_schulz.py [--json out.json] [--iters 10]

All three run the same 5-step bf16 iteration; the baselines are plain PyTorch (cuBLAS) matmuls. Medians of
CUDA-event timings in one process. Targets on an H100 (issue 2): >= 1.5x the loop and >= 1.2x bmm on the
expert batches.
"""

import argparse

import torch

from benchmarks.common import cuda_median_ms, print_table, require_cuda, run_metadata, write_json
from k2_megatron.ops import DEFAULT_COEFFICIENTS, newton_schulz
from k2_megatron.ops.reference import newton_schulz as reference
from k2_megatron.ops.newton_schulz import flatten_coefficients

# name -> [batch, rows, cols]; the expert batches are an EP16 rank's 24 local experts.
SHAPES = {
    "experts gate+up [24, 4096, 7168]": (24, 4096, 7168),
    "experts down [24, 7168, 2048]": (24, 7168, 2048),
    "attn q_up [12288, 1536]": (1, 12288, 1536),
    "attn kv_up [16384, 512]": (1, 16384, 512),
    "attn o [7168, 8192]": (1, 7168, 8192),
    "dense [18432, 7168]": (1, 18432, 7168),
}
STEPS = 5


def flops(batch: int, m: int, n: int) -> float:
    """Dense FLOPs of the iteration (no symmetry credit): X X^T, A A and B X per step."""
    r, c = min(m, n), max(m, n)
    return batch * STEPS * (2 * r * r * c + 2 * r**3 + 2 * r * r * c)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--only", help="substring of the shape names to run")
    args = parser.parse_args()
    if not require_cuda("benchmarks/newton_schulz.py"):
        return
    coeffs = flatten_coefficients(STEPS, DEFAULT_COEFFICIENTS)
    rows = []
    for name, (b, m, n) in SHAPES.items():
        if args.only and args.only not in name:
            continue
        x = torch.randn(b, m, n, device="cuda", dtype=torch.bfloat16)
        impls = {
            "k2 kernel": lambda: newton_schulz(x, steps=STEPS),
            "torch bmm": lambda: reference.newton_schulz(x, coeffs, 1e-7),
            "torch loop": lambda: [reference.newton_schulz(x[i], coeffs, 1e-7) for i in range(b)],
        }
        ms = {k: cuda_median_ms(f, iters=args.iters) for k, f in impls.items()}
        f = flops(b, m, n)
        rows.append({
            "shape": name,
            "k2 ms": ms["k2 kernel"], "bmm ms": ms["torch bmm"], "loop ms": ms["torch loop"],
            "k2 TFLOP/s": f / ms["k2 kernel"] / 1e9,
            "vs loop": ms["torch loop"] / ms["k2 kernel"], "vs bmm": ms["torch bmm"] / ms["k2 kernel"],
        })
        torch.cuda.empty_cache()
    meta = run_metadata()
    print(f"Newton-Schulz, {STEPS} steps bf16 -- {meta['device']}, torch {meta['torch']}, commit {meta['commit']}")
    print_table(rows, ["shape", "k2 ms", "bmm ms", "loop ms", "k2 TFLOP/s", "vs loop", "vs bmm"])
    print("targets (H100, expert batches): vs loop >= 1.5, vs bmm >= 1.2")
    write_json(args.json, {"benchmark": "newton_schulz", **meta, "rows": rows})


if __name__ == "__main__":
    main()
