"""The pretraining loop (k2_megatron.training.pretrain) under the rehearsal: a GPU rank of a multi-rank job, with the
real data pipeline (k2-tiny on the bundled corpus) and fake CUDA tensors. The loop builds host tensors and all-reduces
them on NCCL groups in three places; each one fails the rehearsal with NCCL's error, naming where it was issued."""

from __future__ import annotations

import os

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import pytest

from tests._rehearsal_scenarios import run


@pytest.mark.parametrize("overrides, function, group", [
    (["parallel.pipeline=2"], "_parameter_counts", "PIPELINE_MODEL_PARALLEL_GROUP"),        # at startup, PP > 1
    ([], "global_mean", "WORLD"),                                                            # every step, world > 1
    (["optim.qk_clip_tau=null"], "_read_max_logits", "DATA_PARALLEL_GROUP_WITH_CP"),          # QK-Clip off, DP > 1
], ids=["parameter_counts", "global_mean", "read_max_logits"])
def test_host_tensor_collectives_of_the_loop_fail_like_nccl(overrides, function, group):
    out = run("pretrain_step", "2", "0", *overrides)
    error = out["error"]
    assert error["type"] == "NCCLRuleError", error
    assert f"torch.distributed.all_reduce on {group} (2 ranks): a cpu tensor" in error["message"]
    assert f"k2_megatron/training/pretrain.py:" in error["message"] and f" in {function}: " in error["message"]
