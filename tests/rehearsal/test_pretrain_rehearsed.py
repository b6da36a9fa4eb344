"""The pretraining loop (k2_megatron.training.pretrain.pretrain, the Trainer) under the rehearsal: a GPU rank of a
multi-rank job, with the real data pipeline (k2-tiny on the bundled corpus) and fake CUDA tensors, a whole run of one
step (validation included). The loop used to build host tensors and all-reduce them on NCCL groups in three places
(parameter counts at startup with PP > 1, the global loss mean every step with world > 1, the max logits with QK-Clip
off and DP > 1), each of which failed this rehearsal with NCCL's error naming where it was issued; they now go
through ``all_reduce_on_backend`` (k2_megatron.megatron.layout), on the device of the group's backend."""

from __future__ import annotations

import os

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import pytest

from tests.helpers.rehearsal import run

pytestmark = pytest.mark.slow  # each scenario runs a rehearsal in a fresh process

REDUCE_HELPER = "k2_megatron/megatron/layout.py"


@pytest.mark.parametrize("overrides, group", [
    (["parallel.pipeline=2"], "PIPELINE_MODEL_PARALLEL_GROUP"),   # the parameter counts, at startup
    ([], "WORLD"),                                                 # the loss mean, every step
    (["optim.qk_clip_tau=null"], "DATA_PARALLEL_GROUP_WITH_CP"),  # the max logits, QK-Clip off, DP 2
], ids=["parameter_counts", "global_mean", "max_logits_without_qk_clip"])
def test_the_loop_reduces_its_own_values_on_the_device(overrides, group):
    out = run("pretrain_step", "2", "0", *overrides)
    assert out["error"]["type"] is None, out["error"]
    reductions = [c for c in out["collectives"] if c["op"] == "all_reduce" and c["group"] == group
                  and REDUCE_HELPER in c["site"]]
    assert reductions, [c for c in out["collectives"] if c["group"] == group]
    tensor_collectives = [c for c in out["collectives"] if not c["op"].endswith("_object")]
    assert all(c["device"] == "cuda" for c in tensor_collectives), tensor_collectives


def test_k2_pretrain_rehearse_prints_the_rank_report():
    """``k2-pretrain --rehearse --world-size N --rank R``: rank R's step through the Trainer, and its report."""
    import subprocess
    import sys

    from tests.helpers import REPO_ROOT

    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-m", "k2_megatron.training.pretrain", "--rehearse", "--world-size", "2",
                           "--rank", "1", "parallel.pipeline=2"], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode in (0, 1), done.stderr[-3000:]  # 1: host synchronisations outside the allowed list
    out = done.stdout
    assert "rank 1 of 2 (pipeline stage 1; TP1 x PP2 x DP1, EP1)" in out, out
    for category in ("parameters", "gradient buffers", "optimizer state", "activations"):
        assert f"  {category}" in out
    assert "collectives of the step (rank 1)" in out and "recv" in out and "PIPELINE_MODEL_PARALLEL_GROUP" in out
    assert "host synchronisations (rank 1)" in out and "[allowed: step figures]" in out
    assert "checkpoint (dry):" in out
    if done.returncode == 1:
        assert "host synchronisations in the step outside the allowed list" in done.stderr


def test_k2_pretrain_rehearse_needs_a_world_size(capsys):
    from k2_megatron.training.pretrain import main

    assert main(["--rehearse", "--rank", "3"]) == 2
    assert "--rehearse needs --world-size N" in capsys.readouterr().err
