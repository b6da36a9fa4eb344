"""The table at the end of gpu_lab/gpu_check.sh: every kernel's GPU tests and benchmark figures against the issue-9
targets, read from the files gpu_check.sh leaves in its work folder (steps.tsv, pytest_gpu.xml, <bench>.json,
<step>.log). Anything missing reads "did not run" with the reason the step log gives.

    python gpu_lab/gpu_summary.py --work /tmp/k2_gpu_check --out "$OUT/summary.md"
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

# Targets on an H100 (issue 9)
NS_VS_LOOP = 1.5
ATTN_VS_SDPA = 0.8
ATTN_MAX_LOGIT_OVERHEAD = 0.03
GG_VS_GROUPED_MM = 1.1
STEP_VS_LOCAL = 2.0

# test file -> the kernel its CUDA tests check
TEST_FILES = {"test_newton_schulz": "newton_schulz", "test_attention": "mla_attention",
              "test_grouped_gemm": "grouped_gemm", "test_fp8_activation": "fp8_tile_quantize",
              "test_activation_memory": "activation_memory"}


def read_steps(work: Path) -> dict[str, dict]:
    steps = {}
    path = work / "steps.tsv"
    if path.exists():
        for line in path.read_text().splitlines():
            name, status, rc, seconds, note = (line.split("\t") + [""] * 5)[:5]
            steps[name] = {"status": status, "rc": rc, "seconds": seconds, "note": note}
    return steps


def read_json(work: Path, name: str) -> dict | None:
    path = work / f"{name}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_junit(work: Path) -> dict[str, dict[str, int]]:
    """{test module: {passed, failed, skipped}} from pytest's junit XML ({} when absent or unreadable)."""
    try:
        root = ET.parse(work / "pytest_gpu.xml").getroot()
    except (OSError, ET.ParseError):
        return {}
    counts: dict[str, dict[str, int]] = {}
    for case in root.iter("testcase"):
        module = next((p for p in case.get("classname", "").split(".") if p.startswith("test_")), "?")
        c = counts.setdefault(module, {"passed": 0, "failed": 0, "skipped": 0})
        if case.find("failure") is not None or case.find("error") is not None:
            c["failed"] += 1
        elif case.find("skipped") is not None:
            c["skipped"] += 1
        else:
            c["passed"] += 1
    return counts


def not_run(work: Path, steps: dict, step: str) -> str:
    """Why a benchmark left no JSON."""
    s = steps.get(step)
    if s is None:
        return "did not run (step not reached)"
    log = work / f"{step}.log"
    text = log.read_text(errors="replace") if log.exists() else ""
    if "needs a CUDA GPU" in text:
        return "did not run: needs a CUDA GPU"
    if s["status"] == "no-time":
        return "did not run (the time budget was spent)"
    if s["status"] == "skipped":
        return f"did not run (skipped: {s['note']})"
    if s["status"] == "timeout":
        return f"did not run (timeout after {s['seconds']} s)"
    if s["status"] == "fail":
        return f"did not run (failed, rc {s['rc']}; see {step}.log)"
    return "did not run (no JSON written)"


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("meets" if ok else "MISSES")


def _x(v: float) -> str:
    return f"{v:.2f}x" if v is not None and math.isfinite(v) else "n/a"


def newton_schulz(data: dict) -> tuple[str, bool | None, list[str]]:
    experts = [r for r in data["rows"] if r["shape"].startswith("experts")]
    details = [f"{r['shape']}: k2 {r['k2 ms']:.2f} ms, {_x(r['vs loop'])} loop, {_x(r['vs bmm'])} bmm, "
               f"{r['k2 TFLOP/s']:.0f} TFLOP/s" for r in data["rows"]]
    if not experts:
        return "no expert-batch rows", None, details
    worst = min(r["vs loop"] for r in experts)
    return f"expert batches: worst {_x(worst)} the per-matrix loop", worst >= NS_VS_LOOP, details


def attention(data: dict) -> tuple[str, bool | None, list[str]]:
    by_cfg: dict[tuple, dict] = {}
    for r in data["results"]:
        by_cfg.setdefault((r["b"], r["s"], r["h"]), {})[(r["method"], r["pass"])] = r
    overheads = {(c["b"], c["s"], c["h"]): c.get("max_logit_overhead_fwd") for c in data.get("checks", [])}
    ratios, details, impls = [], [], set()
    for cfg, rows in by_cfg.items():
        ours, sdpa = rows.get(("mla_attention", "fwd+bwd")), rows.get(("sdpa", "fwd+bwd"))
        if not ours or not sdpa:
            continue
        ratio = sdpa["median_ms"] / ours["median_ms"]
        ratios.append(ratio)
        impls.add(ours["mla_implementation"])
        ov = overheads.get(cfg)
        details.append(f"b={cfg[0]} s={cfg[1]} h={cfg[2]}: fwd+bwd {ours['median_ms']:.2f} ms "
                       f"({ours['mla_implementation']}) vs SDPA {sdpa['sdpa_backend']} {sdpa['median_ms']:.2f} ms = {_x(ratio)}; max-logit overhead "
                       + (f"{100 * ov:.1f}%" if ov is not None else "n/a"))
    if not ratios:
        return "no fwd+bwd rows", None, details
    known = [v for v in overheads.values() if v is not None]
    worst_ov = max(known) if known else None
    figure = (f"worst fwd+bwd {_x(min(ratios))} best SDPA ({', '.join(sorted(impls))}); max-logit overhead "
              + (f"{100 * worst_ov:.1f}%" if worst_ov is not None else "n/a (no CUDA kernel variant ran)"))
    ok = min(ratios) >= ATTN_VS_SDPA and worst_ov is not None and worst_ov <= ATTN_MAX_LOGIT_OVERHEAD
    return figure, ok, details


def grouped_gemm(data: dict) -> tuple[str, bool | None, list[str]]:
    by_case: dict[str, dict] = {}
    for r in data["rows"]:
        by_case.setdefault(r["case"], {})[r["impl"]] = r
    ratios, details, paths = [], [], set()
    for case, impls in by_case.items():
        ours, ref = impls.get("k2 grouped_gemm", {}), impls.get("torch._grouped_mm", {})
        paths.add(ours.get("path", "?"))
        if "error" in ours:
            details.append(f"{case}: k2 failed: {ours['error']}")
            ratios.append(0.0)
            continue
        parts = []
        for key in ("fwd_ms", "bwd_ms"):
            if key in ours and key in ref:
                ratios.append(ref[key] / ours[key])
                parts.append(f"{key[:3]} {_x(ref[key] / ours[key])}")
        details.append(f"{case} [{ours.get('path', '?')}]: vs torch._grouped_mm " + (", ".join(parts) or
                       f"n/a ({ref.get('error', 'no baseline')})"))
    if not ratios:
        return "no comparable rows", None, details
    return (f"worst {_x(min(ratios))} torch._grouped_mm (fwd and bwd, {len(by_case)} cases; path "
            f"{', '.join(sorted(paths))})", min(ratios) >= GG_VS_GROUPED_MM, details)


def activation_memory(data: dict) -> tuple[str, bool | None, list[str]]:
    rows = data["rows"]
    if data.get("device") != "cuda":
        return f"CPU saved-bytes count only ({data.get('preset')}, seq {data.get('seq')}): not a GPU run", None, []
    details = [f"{r['options']}: peak activations {r['peak act GiB']:.2f} GiB (planner {r['planner GiB']:.2f}), "
               f"step {r['step ms']:.1f} ms" for r in rows]
    by = {r["options"]: r for r in rows}
    figure = f"{data.get('preset')} seq {data.get('seq')}"
    if "none" in by and "fp8" in by:
        figure += f": fp8 peak {by['fp8']['peak act GiB'] / by['none']['peak act GiB']:.2f}x of none"
    return figure, None, details


def train_step(data: dict) -> tuple[str, bool | None, list[str]]:
    details = [f"{r['spec']}: step {r['step_ms']:.1f} ms (fwd+bwd {r['fwd_bwd_ms']:.1f}, optimizer "
               f"{r['optimizer_ms']:.1f}), loss {r['loss']:.3f}" for r in data["rows"]]
    speedup = data.get("speedup_vs_megatron_local")
    shape = (f"{data['preset']} vocab {data['vocab_size']}, {data['micro_batch']} x {data['seq']} tokens, "
             f"{data['dtype']}")
    if not data.get("gpu_figures"):
        return f"CPU figures only ({shape}): not a GPU run", None, details
    return f"{shape}: {_x(speedup)} megatron local", speedup is not None and speedup >= STEP_VS_LOCAL, details


BENCHMARKS = [  # (step name = JSON name, kernel, reader, target text, test module)
    ("bench_newton_schulz", "newton_schulz", newton_schulz, f">= {NS_VS_LOOP}x per-matrix loop (K2 expert batches)",
     "test_newton_schulz"),
    ("bench_attention", "mla_attention", attention,
     f"fwd+bwd >= {ATTN_VS_SDPA}x best SDPA, max-logit overhead <= {100 * ATTN_MAX_LOGIT_OVERHEAD:.0f}%",
     "test_attention"),
    ("bench_grouped_gemm", "grouped_gemm", grouped_gemm, f">= {GG_VS_GROUPED_MM}x torch._grouped_mm",
     "test_grouped_gemm"),
    ("bench_train_step", "k2-mini train step", train_step, f">= {STEP_VS_LOCAL}x megatron-core local spec", None),
    ("bench_activation_memory", "activation memory (fp8 tiles, recompute, offload)", activation_memory,
     "(figures only)", "test_fp8_activation"),
]


def summarize(work: Path) -> tuple[str, dict]:
    steps = read_steps(work)
    junit = read_junit(work)
    metas = [d for d in (read_json(work, b[0]) for b in BENCHMARKS) if d]
    meta = next((d.get("meta", d) for d in metas), {})
    gpu = (work / "gpu.txt").read_text().strip() if (work / "gpu.txt").exists() else ""
    device = gpu or meta.get("device") or "no GPU seen"
    if device == "cpu":
        device = "no GPU (CPU run)"
    lines = [f"# GPU check: {device}",
             "",
             f"commit {os.environ.get('K2_COMMIT', meta.get('commit', 'unknown'))} "
             f"(from {os.environ.get('K2_COMMIT_SOURCE', 'benchmark metadata')}); torch {meta.get('torch', '?')} "
             f"CUDA {meta.get('cuda', '?')}; mode {os.environ.get('K2_GPU_CHECK_MODE', '?')}",
             f"k2 ops: {meta.get('kernels', 'unknown (no benchmark JSON)')}",
             "",
             "| step | status | s | note |", "|---|---|---|---|"]
    for name, s in steps.items():
        lines.append(f"| {name} | {s['status']} | {s['seconds']} | {s['note']} |")

    def tests_of(module: str | None) -> str:
        if module is None:
            return "-"
        c = junit.get(module)
        if c is None:
            return "not run" if not junit else "none selected"
        return f"{c['passed']} passed, {c['failed']} failed, {c['skipped']} skipped"

    table = ["", "| kernel / benchmark | GPU tests | figures | target (H100) | verdict |", "|---|---|---|---|---|"]
    record, details_all, met, measured = {}, [], 0, 0
    for step, kernel, reader, target, module in BENCHMARKS:
        data = read_json(work, step)
        if data is None:
            figure, ok, details = not_run(work, steps, step), None, []
        else:
            try:
                figure, ok, details = reader(data)
            except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
                figure, ok, details = f"unreadable JSON ({type(exc).__name__}: {exc})", None, []
        if ok is not None:
            measured += 1
            met += bool(ok)
        table.append(f"| {kernel} | {tests_of(module)} | {figure} | {target} | {verdict(ok)} |")
        record[kernel] = {"tests": tests_of(module), "figure": figure, "target": target, "meets": ok,
                          "details": details}
        if details:
            details_all += ["", f"{kernel}:"] + [f"- {d}" for d in details]
    other = {m: c for m, c in junit.items() if m not in TEST_FILES}
    for m, c in other.items():
        table.append(f"| ({m}) | {c['passed']} passed, {c['failed']} failed, {c['skipped']} skipped | | | |")
    failed_steps = [n for n, s in steps.items() if s["status"] in ("fail", "timeout", "no-time")]
    failed_tests = sum(c["failed"] for c in junit.values())
    lines += details_all + table  # the table last: the end of the device call's output shows it
    overall = "FAIL" if failed_steps or failed_tests else "PASS"
    lines += ["", f"overall: {overall} (steps failed: {', '.join(failed_steps) or 'none'}; GPU tests failed: "
              f"{failed_tests}; targets met: {met} of {measured} measured on a GPU, of {len(BENCHMARKS) - 1} "
              "with a target)"]
    return "\n".join(lines) + "\n", {"device": device, "meta": meta, "steps": steps, "tests": junit,
                                     "benchmarks": record, "overall": overall}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", required=True, help="gpu_check.sh's work folder")
    parser.add_argument("--out", help="also write the markdown here (and summary.json beside the work files)")
    args = parser.parse_args(argv)
    work = Path(args.work)
    if not work.is_dir():
        parser.error(f"--work {args.work}: not a directory")
    text, record = summarize(work)
    if args.out:
        Path(args.out).write_text(text)
        (work / "summary.json").write_text(json.dumps(record, indent=2, default=str))
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
