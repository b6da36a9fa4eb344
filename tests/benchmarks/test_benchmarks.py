"""The benchmark scripts run end to end on a CPU (tiny configs): benchmarks/train_step.py here; the GPU figures
come from gpu_lab/gpu_check.sh on a GPU machine (its tests: tests/gpu_lab/)."""

import json
import math
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO_ROOT

pytestmark = pytest.mark.slow  # runs the benchmark scripts


def test_train_step_benchmark_cpu_smoke(tmp_path):
    out = tmp_path / "train_step.json"
    # CUDA hidden: megatron runs on the CPU through cpu_compat, which is inactive when a GPU is visible.
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.train_step", "--preset", "k2-tiny", "--device", "cpu",
                           "--seq", "32", "--micro-batch", "2", "--warmup", "0", "--steps", "2", "--json", str(out)],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "NOT GPU figures" in proc.stdout
    result = json.loads(out.read_text())
    assert result["benchmark"] == "train_step" and result["measured_on"] == "cpu" and not result["gpu_figures"]
    rows = {r["spec"]: r for r in result["rows"]}
    assert set(rows) == {"k2 spec", "megatron local"}
    for spec, row in rows.items():
        for key in ("step_ms", "fwd_bwd_ms", "optimizer_ms", "loss"):
            assert math.isfinite(row[key]) and row[key] > 0, (spec, key, row[key])
        # random tokens over a 1024 vocabulary: the loss of a freshly initialised model is near ln(1024)
        assert abs(row["loss"] - math.log(1024)) < 0.5, (spec, row["loss"])
    assert rows["k2 spec"]["params_M"] == rows["megatron local"]["params_M"]
    assert result["speedup_vs_megatron_local"] > 0


def test_train_step_benchmark_without_gpu_says_so():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.train_step"], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "needs a CUDA GPU" in proc.stdout


def test_train_step_baseline_attention_equals_ours():
    """The megatron-local baseline's core attention (megatron's DotProductAttention taking MLA's arguments)
    computes the same causal attention as K2MLACoreAttention: the step benchmark compares equal work."""
    import torch

    from tests.helpers.model import require_no_cuda, teardown_megatron

    require_no_cuda()
    from megatron.core.transformer.enums import AttnMaskType

    from benchmarks.train_step import local_mla_core_attention
    from k2_megatron.megatron import K2MLACoreAttention, init_distributed_cpu, to_transformer_config
    from k2_megatron.config import get_preset

    init_distributed_cpu()
    try:
        cfg = get_preset("k2-tiny")
        tc = to_transformer_config(cfg)
        d_qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        args = dict(softmax_scale=0.3, k_channels=d_qk, v_channels=cfg.v_head_dim)
        local = local_mla_core_attention()(tc, 1, AttnMaskType.causal, "self", **args)
        ours = K2MLACoreAttention(tc, 1, AttnMaskType.causal, "self", **args)
        g = torch.Generator().manual_seed(0)
        s, b, h = 17, 2, cfg.num_attention_heads
        q, k = (torch.randn(s, b, h, d_qk, generator=g) for _ in range(2))
        v = torch.randn(s, b, h, cfg.v_head_dim, generator=g)
        want = ours(q, k, v, None, attn_mask_type=AttnMaskType.causal)
        got = local(q, k, v, None, attn_mask_type=AttnMaskType.causal)
        assert got.shape == want.shape == (s, b, h * cfg.v_head_dim)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    finally:
        teardown_megatron()
