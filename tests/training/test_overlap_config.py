"""The EP all-to-all overlap in the run config: parallel.overlap_moe_expert_parallel_comm and
parallel.delay_wgrad_compute, what megatron-core requires with them, the GPU recipes that turn them on, the planner's
extra warm-up micro-batch and megatron's acceptance of the full recipe's transformer config."""

from __future__ import annotations

import dataclasses

import pytest

from k2_megatron.config import ConfigError, load_config
from k2_megatron.training.plan import plan_memory
from tests.helpers import REPO_ROOT

CONFIGS = REPO_ROOT / "examples" / "configs"
ON = ["parallel.overlap_moe_expert_parallel_comm=true", "parallel.delay_wgrad_compute=true"]


@pytest.mark.parametrize("overrides, match", [
    (["parallel.delay_wgrad_compute=true"], "parallel.delay_wgrad_compute: needs parallel.overlap_moe_expert"),
    (ON, r"parallel.expert=1 \(needs >= 2"),
    (ON + ["parallel.expert=2"], r"model.params_dtype='float32' \(megatron requires 'bfloat16'\)"),
    (ON + ["parallel.expert=2", "model.params_dtype=bfloat16", "parallel.pipeline=2"],
     "parallel.pipeline=2 without parallel.virtual_stages"),
])
def test_overlap_settings_refuse_what_megatron_cannot_run(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_overlap_settings_accepted():
    cfg = load_config(None, ON + ["parallel.expert=2", "model.params_dtype=bfloat16", "parallel.pipeline=2",
                                  "parallel.virtual_stages=2"])
    assert cfg.parallel.overlap_moe_expert_parallel_comm and cfg.parallel.delay_wgrad_compute


@pytest.mark.parametrize("recipe, on", [("k2_full.yaml", True), ("k2_long_context.yaml", True),
                                        ("k2_mini_1gpu.yaml", False), ("k2_tiny_cpu.yaml", False)])
def test_gpu_recipes_overlap_the_expert_all_to_all(recipe, on):
    """On in the expert-parallel GPU recipes; k2-mini runs on one GPU (no all-to-all), k2-tiny on a CPU."""
    p = load_config(CONFIGS / recipe).parallel
    assert (p.overlap_moe_expert_parallel_comm, p.delay_wgrad_compute) == (on, on)


@pytest.mark.parametrize("recipe, overrides", [
    ("k2_full.yaml", []),  # interleaved 1F1B: one more warm-up micro-batch
    ("k2_tiny_cpu.yaml", ON + ["parallel.expert=2", "model.params_dtype=bfloat16"]),  # no pipeline: 2 in flight
])
def test_planner_counts_the_extra_micro_batch_in_flight(recipe, overrides):
    cfg = load_config(CONFIGS / recipe, overrides)
    off = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, overlap_moe_expert_parallel_comm=False,
                                                                 delay_wgrad_compute=False))
    world = 256 if recipe == "k2_full.yaml" else 2
    with_overlap, without = plan_memory(cfg, world), plan_memory(off, world)
    for a, b in zip(with_overlap.stages, without.stages):
        assert a.in_flight == b.in_flight + 1
        assert a.activations == pytest.approx(b.activations * (b.in_flight + 1) / b.in_flight, rel=1e-12)


def test_megatron_accepts_the_full_recipe():
    """The full recipe's transformer config, as the training loop builds it, passes megatron-core's own checks of the
    EP overlap (interleaved pipeline, expert parallel, bf16, alltoall dispatcher, no full recompute)."""
    import torch

    from k2_megatron.megatron import to_transformer_config

    cfg = load_config(CONFIGS / "k2_full.yaml")
    tc = to_transformer_config(cfg.k2_config(vocab_size=None), cfg.parallel.layout(256), params_dtype=torch.bfloat16,
                               overlap_moe_expert_parallel_comm=True, delay_wgrad_compute=True)
    assert tc.overlap_moe_expert_parallel_comm and tc.delay_wgrad_compute and tc.moe_token_dispatcher_type == "alltoall"


@pytest.mark.slow
@pytest.mark.distributed
def test_pretrain_with_overlap_gives_the_same_losses(tmp_path):
    """k2-pretrain under torchrun, EP2 in bf16 on gloo, with and without the EP all-to-all overlap (the config fields
    through the training loop's transformer, DDP and schedule): the same losses, bit for bit."""
    from tests.helpers.model import require_no_cuda, torchrun_pretrain

    require_no_cuda()
    common = ["parallel.expert=2", "model.params_dtype=bfloat16", "train.iters=2", "data.seq_length=64",
              "train.global_batch_tokens=512", "train.micro_batch_size=4", "train.eval_interval=0",
              "train.eval_micro_batches=1", "optim.warmup_steps=1", "checkpoint.save_at_end=false", "output.plot=false",
              "output.progress_bar=false", "output.tensorboard=false"]
    _, plain = torchrun_pretrain(tmp_path / "plain", 2, common)
    _, overlapped = torchrun_pretrain(tmp_path / "overlap", 2, common + ON)
    assert len(plain) == 2 and overlapped == plain
