"""Benchmark of k2_megatron.ops.mla_attention against torch SDPA (GPU only).

    python -m benchmarks.attention [--json results.json] [--seqlens 4096 8192] [--heads 8 16 64]

Per configuration (b * s = --tokens, K2's head dims d_qk = 192, d_v = 128, causal, bf16), forward and
forward + backward, the median time over --iters runs (CUDA events) and TFLOP/s of:
  mla_attention        our op (out + per-head max logits); the line says whether the CUDA kernel or the
                       reference ran;
  sdpa                 torch.nn.functional.scaled_dot_product_attention with its fastest backend among
                       cuDNN, flash and memory-efficient (math if none of them runs); no max logit;
  sdpa+max_logit_pass  that SDPA plus a separate pass computing the max logits (blocked q k^T, masked max);
  mla_attention_no_max_logits  (forward, CUDA kernel only) the same kernel with the max-logit tracking off:
                       the overhead of the fused max is mla_attention / this - 1;
  mla_attention_sm80   (H100/H200 only) our op on the mma.sync kernels instead of the wgmma ones.
FLOPs count the matmuls only: forward 2 s^2 (d_qk + d_v), backward 2 s^2 (3 d_qk + 2 d_v) per (batch, head),
halved for causal. On a machine without CUDA it prints that it needs a GPU and exits with status 0.
"""

import argparse
import json
import math
import os
import sys
import warnings

import torch

from benchmarks.common import cuda_median_ms, require_cuda, run_metadata, write_json


def _flops(b, s, h, d_qk, d_v, causal, backward):
    fwd = 2.0 * b * h * s * s * (d_qk + d_v)
    bwd = 2.0 * b * h * s * s * (3 * d_qk + 2 * d_v)
    total = fwd + (bwd if backward else 0.0)
    return total / 2 if causal else total


def _sdpa(backend, q, k, v, causal, scale):
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel([backend]):
        # SDPA wants [b, h, s, d]; the transposes are views of our [b, s, h, d] tensors.
        out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                               v.transpose(1, 2), is_causal=causal, scale=scale)
    return out.transpose(1, 2)


def max_logit_pass(q, k, causal, scale, block_bytes=1 << 30):
    """Per-head max of softmax_scale * q.k over unmasked positions, as a separate pass: q k^T block by block
    of queries (each block's logits <= block_bytes), causal blocks stop at their last visible key."""
    b, s, h, _ = q.shape
    qh, kh = q.transpose(1, 2), k.transpose(1, 2)
    block = max(16, min(s, block_bytes // max(1, b * h * s * q.element_size())))
    result = torch.full((h,), float("-inf"), device=q.device, dtype=torch.float32)
    for i0 in range(0, s, block):
        i1 = min(i0 + block, s)
        keys = i1 if causal else s
        logits = torch.matmul(qh[:, :, i0:i1], kh[:, :, :keys].transpose(-1, -2)).float() * scale
        if causal:
            rows = torch.arange(i0, i1, device=q.device).unsqueeze(1)
            cols = torch.arange(keys, device=q.device).unsqueeze(0)
            logits.masked_fill_(cols > rows, float("-inf"))
        result = torch.maximum(result, logits.amax(dim=(0, 2, 3)))
    return result


def _pick_sdpa_backend(q, k, v, causal, scale, warmup, iters):
    """The fastest SDPA backend (forward + backward) that accepts these inputs, and all measured times."""
    from torch.nn.attention import SDPBackend

    timings, by_name = {}, {}
    fused = (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION)
    for candidates in (fused, (SDPBackend.MATH,)):  # the unfused math backend only if no fused one runs
        for backend in candidates:
            def step(backend=backend):
                out = _sdpa(backend, q, k, v, causal, scale)
                out.backward(torch.ones_like(out))
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # "kernel not used because ..." from rejected backends
                    step()
                    torch.cuda.synchronize()
            except RuntimeError:  # backend not available for these head dims / dtype / GPU, or out of memory
                continue
            timings[backend.name] = cuda_median_ms(step, warmup=warmup, iters=iters)
            by_name[backend.name] = backend
        if timings:
            return by_name[min(timings, key=timings.get)], timings
    raise RuntimeError("no SDPA backend accepts these inputs")


def _with_env(name, value, fn):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        return fn()
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


def run_config(b, s, h, d_qk, d_v, dtype, causal, warmup, iters):
    from k2_megatron import _extension
    from k2_megatron.ops import mla_attention
    from k2_megatron.ops import attention as attention_op

    scale = 1.0 / math.sqrt(d_qk)
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k = (torch.randn(b, s, h, d_qk, device="cuda", dtype=dtype, generator=gen).requires_grad_() for _ in range(2))
    v = torch.randn(b, s, h, d_v, device="cuda", dtype=dtype, generator=gen).requires_grad_()
    grad = torch.randn(b, s, h, d_v, device="cuda", dtype=dtype, generator=gen)

    best, sdpa_times = _pick_sdpa_backend(q, k, v, causal, scale, 1, 3)
    best_name = best.name
    kernel = attention_op._use_registered_op(q, v) and q.is_cuda
    wgmma = kernel and _extension.sm90a_kernels(q, "K2_ATTENTION_KERNEL")
    implementation = ("cuda kernel, wgmma" if wgmma else "cuda kernel, mma.sync") if kernel else "reference"

    def clear():
        q.grad = k.grad = v.grad = None

    methods = {
        "mla_attention": lambda: mla_attention(q, k, v, causal=causal)[0],
        "sdpa": lambda: _sdpa(best, q, k, v, causal, scale),
        "sdpa+max_logit_pass": lambda: (_sdpa(best, q, k, v, causal, scale),
                                        max_logit_pass(q.detach(), k.detach(), causal, scale))[0],
    }
    if wgmma:  # on Hopper, also the mma.sync kernels (K2_ATTENTION_KERNEL=sm80)
        methods["mla_attention_sm80"] = lambda: _with_env("K2_ATTENTION_KERNEL", "sm80",
                                                                  lambda: mla_attention(q, k, v, causal=causal)[0])
    if kernel:  # the same kernel with the max-logit tracking off: the cost of the fused max (forward only)
        methods["mla_attention_no_max_logits"] = lambda: _extension._C._attention_forward_without_max_logits(
            q, k, v, causal, scale)[0]
    # Correctness sanity check before timing: our out against SDPA's, our max logits against the pass.
    with torch.no_grad():
        out, ml = mla_attention(q, k, v, causal=causal)
        out_sdpa = _sdpa(best, q, k, v, causal, scale)
        ml_pass = max_logit_pass(q, k, causal, scale)
    check = {"max_abs_diff_out_vs_sdpa": (out.float() - out_sdpa.float()).abs().max().item(),
             "max_abs_diff_max_logits_vs_pass": (ml - ml_pass).abs().max().item()}
    del out, out_sdpa

    rows = []
    for name, fn in methods.items():
        for backward in (False, True) if name != "mla_attention_no_max_logits" else (False,):
            if backward:
                def step(fn=fn):
                    clear()
                    fn().backward(grad)
            else:
                def step(fn=fn):
                    with torch.no_grad():
                        fn()
            ms = cuda_median_ms(step, warmup=warmup, iters=iters)
            rows.append({"method": name, "pass": "fwd+bwd" if backward else "fwd", "b": b, "s": s, "h": h,
                         "d_qk": d_qk, "d_v": d_v, "dtype": str(dtype).replace("torch.", ""), "causal": causal,
                         "median_ms": ms, "tflops": _flops(b, s, h, d_qk, d_v, causal, backward) / ms / 1e9,
                         "sdpa_backend": best_name, "mla_implementation": implementation})
    clear()
    return rows, {"sdpa_fwd_bwd_ms_per_backend": sdpa_times, **check}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=16384, help="b * s per step (default 16384)")
    parser.add_argument("--seqlens", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--heads", type=int, nargs="+", default=[8, 16, 64])
    parser.add_argument("--d-qk", type=int, default=192)
    parser.add_argument("--d-v", type=int, default=128)
    parser.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    parser.add_argument("--no-causal", action="store_true")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--json", metavar="PATH", help="also write every measurement as JSON to PATH")
    args = parser.parse_args(argv)

    if not require_cuda("benchmarks.attention"):
        return 0

    dtype = getattr(torch, args.dtype)
    causal = not args.no_causal
    header = {**run_metadata(), "cudnn": torch.backends.cudnn.version()}
    print(json.dumps(header))
    results, checks = [], []
    print("| s | b | h | pass | method | median ms | TFLOP/s | speed vs sdpa |")
    print("|---|---|---|---|---|---|---|---|")
    for s in args.seqlens:
        b = max(1, args.tokens // s)
        for h in args.heads:
            rows, check = run_config(b, s, h, args.d_qk, args.d_v, dtype, causal, args.warmup, args.iters)
            checks.append({"b": b, "s": s, "h": h, **check})
            sdpa_ms = {r["pass"]: r["median_ms"] for r in rows if r["method"] == "sdpa"}
            for r in rows:
                method = r["method"] + (f" ({r['mla_implementation']})" if r["method"].startswith("mla_attention") else
                                        f" ({r['sdpa_backend']})")
                print(f"| {s} | {b} | {h} | {r['pass']} | {method} | {r['median_ms']:.3f} | {r['tflops']:.1f} | "
                      f"{sdpa_ms[r['pass']] / r['median_ms']:.2f}x |", flush=True)
            fwd_ms = {r["method"]: r["median_ms"] for r in rows if r["pass"] == "fwd"}
            if "mla_attention_no_max_logits" in fwd_ms:
                check["max_logit_overhead_fwd"] = fwd_ms["mla_attention"] / fwd_ms["mla_attention_no_max_logits"] - 1
            print(f"<!-- check b={b} s={s} h={h}: {json.dumps(check)} -->", flush=True)
            results.extend(rows)
            torch.cuda.empty_cache()
    write_json(args.json, {"benchmark": "attention", **header, "results": results, "checks": checks})
    return 0


if __name__ == "__main__":
    sys.exit(main())
