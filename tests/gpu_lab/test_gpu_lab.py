"""The device-lab scripts without a GPU: gpu_lab/gpu_summary.py's table from files shaped like the benchmarks'
GPU output, and gpu_lab/gpu_check.sh's choice of a prebuilt library (--cpu-smoke)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT


def _write(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload))


def test_gpu_summary_reads_every_benchmark_json(tmp_path):
    """gpu_lab/gpu_summary.py on files shaped like the benchmarks' GPU output (field names as they write them)."""
    meta = {"device": "NVIDIA H100 80GB HBM3", "torch": "2.11.0+cu130", "cuda": "13.0", "commit": "abc1234",
            "kernels": "CUDA kernels"}
    (tmp_path / "steps.tsv").write_text("env\tok\t0\t3\t\nbuild\tok\t0\t200\t\ntests\tfail\t1\t60\t1 failed\n"
                                        "bench_grouped_gemm\ttimeout\t124\t90\t\n")
    _write(tmp_path / "bench_newton_schulz.json", {"benchmark": "newton_schulz", **meta, "rows": [
        {"shape": "experts gate+up [24, 4096, 7168]", "k2 ms": 10.0, "bmm ms": 13.0, "loop ms": 17.0,
         "k2 TFLOP/s": 400.0, "vs loop": 1.7, "vs bmm": 1.3},
        {"shape": "experts down [24, 7168, 2048]", "k2 ms": 5.0, "bmm ms": 6.0, "loop ms": 7.0, "k2 TFLOP/s": 300.0,
         "vs loop": 1.4, "vs bmm": 1.2}]})
    row = {"b": 4, "s": 4096, "h": 16, "sdpa_backend": "CUDNN_ATTENTION", "mla_implementation": "cuda kernel"}
    _write(tmp_path / "bench_attention.json", {"benchmark": "attention", **meta, "results": [
        {**row, "method": "mla_attention", "pass": "fwd+bwd", "median_ms": 10.0},
        {**row, "method": "sdpa", "pass": "fwd+bwd", "median_ms": 9.0}],
        "checks": [{"b": 4, "s": 4096, "h": 16, "max_logit_overhead_fwd": 0.02}]})
    _write(tmp_path / "bench_train_step.json", {
        "benchmark": "train_step", **meta, "gpu_figures": True, "preset": "k2-mini", "vocab_size": 16384, "seq": 1024,
        "micro_batch": 8, "dtype": "bfloat16", "speedup_vs_megatron_local": 2.5, "rows": [
            {"spec": s, "step_ms": 100.0, "fwd_bwd_ms": 80.0, "optimizer_ms": 20.0, "loss": 9.7}
            for s in ("k2 spec", "megatron local")]})
    memory_rows = [{"options": o, "peak act GiB": g, "planner GiB": g, "step ms": 50.0}
                   for o, g in (("none", 8.0), ("fp8", 6.0))]
    _write(tmp_path / "bench_activation_memory.json", {"meta": meta, "preset": "k2-mini", "seq": 4096,
                                                       "device": "cuda", "rows": memory_rows})
    (tmp_path / "pytest_gpu.xml").write_text(
        '<testsuites><testsuite><testcase classname="tests.test_newton_schulz" name="test_cuda_a"/>'
        '<testcase classname="tests.test_grouped_gemm.TestOp" name="test_cuda_b"><failure message="x"/></testcase>'
        '</testsuite></testsuites>')
    proc = subprocess.run([sys.executable, "gpu_lab/gpu_summary.py", "--work", str(tmp_path), "--out",
                           str(tmp_path / "summary.md")], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    table = {line.split("|")[1].strip(): line for line in proc.stdout.splitlines() if line.startswith("| ")}
    assert "1.40x the per-matrix loop" in table["newton_schulz"] and "MISSES" in table["newton_schulz"]
    assert "1 passed, 0 failed" in table["newton_schulz"]
    assert "0.90x best SDPA" in table["mla_attention"] and "2.0%" in table["mla_attention"]
    assert "meets" in table["mla_attention"]
    assert "timeout" in table["grouped_gemm"] and "0 passed, 1 failed" in table["grouped_gemm"]
    assert "2.50x megatron local" in table["k2-mini train step"] and "meets" in table["k2-mini train step"]
    assert "fp8 peak 0.75x of none" in proc.stdout
    assert "overall: FAIL" in proc.stdout and "targets met: 2 of 3" in proc.stdout
    assert json.loads((tmp_path / "summary.json").read_text())["overall"] == "FAIL"


def test_gpu_summary_without_any_results(tmp_path):
    proc = subprocess.run([sys.executable, "gpu_lab/gpu_summary.py", "--work", str(tmp_path)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("did not run") == 5


def test_gpu_check_script_parses():
    proc = subprocess.run(["bash", "-n", "gpu_lab/gpu_check.sh"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def _gpu_check_copy(tmp_path, torch_version=None):
    """A copy of what gpu_check.sh reads (its own library: a stand-in file) with a prebuilt/ whose build-info names
    these csrc/ sources, this Python and `torch_version` (default: this torch); the library is a stand-in too."""
    import shutil
    import sysconfig

    import torch

    repo = tmp_path / "repo"
    skip = shutil.ignore_patterns("*.so", "__pycache__")
    for name in ("gpu_lab", "csrc", "k2_megatron"):
        shutil.copytree(REPO_ROOT / name, repo / name, ignore=skip)
    shutil.copy(REPO_ROOT / "setup.py", repo / "setup.py")
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    (repo / "k2_megatron" / f"_C{suffix}").write_text("own library")
    csrc_hash = subprocess.run("find csrc setup.py -type f | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -c1-16",
                               shell=True, cwd=repo, capture_output=True, text=True, check=True).stdout.strip()
    (repo / "prebuilt").mkdir()
    (repo / "prebuilt" / f"_C{suffix}").write_text("prebuilt library")
    (repo / "prebuilt" / "_C.build-info.txt").write_text(
        f"commit=abc\ncsrc_hash={csrc_hash}\ntorch={torch_version or torch.__version__}\next_suffix={suffix}\n")
    return repo, repo / "k2_megatron" / f"_C{suffix}"


def _run_gpu_check_smoke(repo, tmp_path):
    (tmp_path / "no_wheels").mkdir(exist_ok=True)
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "out"), "K2_GPU_WORK": str(tmp_path / "work"),
           "K2_WHEELS": str(tmp_path / "no_wheels"), "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(["bash", "gpu_lab/gpu_check.sh", "--cpu-smoke", "--skip-tests", "--skip-bench"], cwd=repo,
                          env=env, capture_output=True, text=True, timeout=300)
    steps = {line.split("\t")[0]: line.split("\t") for line in (tmp_path / "work" / "steps.tsv").read_text().splitlines()}
    return proc, steps


@pytest.mark.slow
def test_gpu_check_uses_a_matching_prebuilt_library_and_gives_the_tree_its_own_back(tmp_path):
    repo, own = _gpu_check_copy(tmp_path)
    proc, steps = _run_gpu_check_smoke(repo, tmp_path)
    assert steps["build"][1] == "prebuilt", (steps, proc.stdout[-3000:])
    assert "commit=abc" in steps["build"][4]
    assert own.read_text() == "own library"
    assert [p.name for p in own.parent.glob("_C*.so")] == [own.name]


@pytest.mark.slow
def test_gpu_check_refuses_a_prebuilt_library_of_another_torch(tmp_path):
    repo, own = _gpu_check_copy(tmp_path, torch_version="2.0.0+cu000")
    proc, steps = _run_gpu_check_smoke(repo, tmp_path)
    assert steps["build"][1] == "skipped", (steps, proc.stdout[-3000:])
    assert "was built for torch 2.0.0+cu000" in steps["build"][4]
    assert own.read_text() == "own library"
