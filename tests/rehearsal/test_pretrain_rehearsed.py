"""The pretraining loop (k2_megatron.training.pretrain) under the rehearsal: a GPU rank of a multi-rank job, with the
real data pipeline (k2-tiny on the bundled corpus) and fake CUDA tensors. The loop built host tensors and all-reduced
them on NCCL groups in three places (parameter counts, the global loss mean, the max logits without QK-Clip); each one
fails the rehearsal with NCCL's error, naming where it was issued. (The max logits' reduction now goes through the
max-logit protocol of k2_megatron.megatron.attention, on the group's device: with QK-Clip off the run gets past it.)"""

from __future__ import annotations

import os

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import pytest

from tests.helpers.rehearsal import run

pytestmark = pytest.mark.slow  # each scenario runs a rehearsal in a fresh process


@pytest.mark.parametrize("overrides, function, group", [
    (["parallel.pipeline=2"], "_parameter_counts", "PIPELINE_MODEL_PARALLEL_GROUP"),        # at startup, PP > 1
    ([], "global_mean", "WORLD"),                                                            # every step, world > 1
    (["optim.qk_clip_tau=null"], "global_mean", "WORLD"),  # QK-Clip off, DP > 1: max logits pass, the mean fails
], ids=["parameter_counts", "global_mean", "max_logits_without_qk_clip"])
def test_host_tensor_collectives_of_the_loop_fail_like_nccl(overrides, function, group):
    out = run("pretrain_step", "2", "0", *overrides)
    error = out["error"]
    assert error["type"] == "NCCLRuleError", error
    assert f"torch.distributed.all_reduce on {group} (2 ranks): a cpu tensor" in error["message"]
    assert f"k2_megatron/training/pretrain.py:" in error["message"] and f" in {function}: " in error["message"]
