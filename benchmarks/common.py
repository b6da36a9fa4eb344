"""Timing and reporting shared by the benchmark scripts: CUDA-event medians, device/commit metadata, JSON."""

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch


def has_cuda_kernel(op: str) -> bool:
    """Whether k2_megatron._C registers a CUDA implementation of torch.ops.k2_megatron.<op>."""
    from k2_megatron import _extension

    return _extension.op_registered(op) and torch._C._dispatch_has_kernel_for_dispatch_key(f"k2_megatron::{op}", "CUDA")


def require_cuda(name: str) -> bool:
    """False (after saying so) when there is no GPU: the benchmarks measure kernels, never the CPU path."""
    if torch.cuda.is_available():
        return True
    print(f"{name}: needs a CUDA GPU (none visible); nothing measured.")
    return False


def cuda_median_ms(fn, *, warmup: int = 3, iters: int = 10) -> float:
    """Median wall time of fn() in milliseconds, timed with CUDA events after warm-up."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def run_metadata() -> dict:
    """Device, versions and commit to record with every figure."""
    # gpu_lab/gpu_check.sh exports the commit (with "+dirty" for a modified tree); the GPU machine's copy has no .git
    commit = os.environ.get("K2_COMMIT")
    if not commit:
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                    cwd=Path(__file__).parent, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            commit = "unknown"
    import k2_megatron

    return {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "commit": commit,
        "kernels": k2_megatron.kernels_status(),
    }


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns))


def _fmt(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def write_json(path: str | None, payload: dict) -> None:
    if path:
        Path(path).write_text(json.dumps(payload, indent=2))
        print(f"wrote {path}", file=sys.stderr)
