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
    (["parallel.overlap_param_gather=true"], "parallel.overlap_param_gather: needs parallel.overlap_grad_reduce"),
    (["parallel.ddp_bucket_size=0"], "parallel.ddp_bucket_size: must be an int >= 1, got 0"),
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


@pytest.mark.parametrize("recipe, on", [("k2_full.yaml", True), ("k2_long_context.yaml", True),
                                        ("k2_mini_1gpu.yaml", False), ("k2_tiny_cpu.yaml", False)])
def test_gpu_recipes_overlap_the_gradient_buffers(recipe, on):
    """Bucketed gradient buffers with the ZeRO-1 reduce-scatter and all-gather overlapped in the data-parallel GPU
    recipes; k2-mini runs on one GPU (nothing to reduce), k2-tiny on a CPU."""
    p = load_config(CONFIGS / recipe).parallel
    assert (p.overlap_grad_reduce, p.overlap_param_gather, p.ddp_bucket_size is not None) == (on, on, on)


def test_planner_buckets_the_first_virtual_stage():
    """megatron buckets the first virtual stage's chunk only: a bucket is at most ddp_bucket_size - 1 elements plus
    one whole parameter."""
    from k2_megatron.training.plan import GradBuffer

    assert GradBuffer(1000, 1, 300, 100, bucket_size=200).largest_bucket == 499
    assert GradBuffer(1000, 1, 300, 100, bucket_size=900).largest_bucket == 1000
    assert GradBuffer(1000, 1, 300, 100).largest_bucket == 1000
    small = load_config(CONFIGS / "k2_full.yaml", ["parallel.ddp_bucket_size=1", "memory.muon_buffer_mib=100000"])
    whole = load_config(CONFIGS / "k2_full.yaml", ["parallel.ddp_bucket_size=null", "memory.muon_buffer_mib=100000"])
    # with a budget that gathers whole buckets, bucketing shrinks the temporaries of a stage whose largest buffer is
    # in its first chunk (stage 15: MoE layers 29-30, then layer 60) but not of one whose second chunk has as large
    # a buffer (stage 1: MoE layers 1-2 and 33-34)
    a, b = plan_memory(small, 256), plan_memory(whole, 256)
    assert a.stages[15].optimizer_temps < b.stages[15].optimizer_temps
    assert a.stages[1].optimizer_temps == b.stages[1].optimizer_temps


def test_training_loop_builds_ddp_with_the_config():
    """The parallel section's DDP fields reach megatron's DistributedDataParallel (several buckets, overlap on)."""
    from tests.helpers.model import require_no_cuda, teardown_megatron

    require_no_cuda()
    from k2_megatron.megatron import init_distributed_cpu
    from k2_megatron.training.trainer import build_model

    cfg = load_config(None, ["parallel.ddp_bucket_size=20000", "parallel.overlap_grad_reduce=true",
                             "parallel.overlap_param_gather=true", "model.overrides.vocab_size=1024"])
    init_distributed_cpu()
    try:
        _, chunks = build_model(cfg, cfg.k2_config(1024))
        ddp = chunks[0].ddp_config
        assert (ddp.bucket_size, ddp.overlap_grad_reduce, ddp.overlap_param_gather) == (20000, True, True)
        assert len(chunks[0].buffers[0].buckets) > 1
    finally:
        teardown_megatron()


@pytest.mark.parametrize("recipe, overrides", [
    ("k2_full.yaml", []),  # interleaved 1F1B: one more warm-up micro-batch
    ("k2_tiny_cpu.yaml", ON + ["parallel.expert=2", "model.params_dtype=bfloat16"]),  # no pipeline: 2 in flight
])
def test_planner_counts_the_extra_micro_batch_in_flight(recipe, overrides):
    """With the EP overlap megatron runs one more warm-up forward, then each steady-state forward beside a backward
    (combined 1F1B); without it a forward then a backward. So the backward's peak meets as many held passes either
    way (plan.in_flight_chunks); what differs is what a pass keeps (the schedule nodes' hidden state per MoE layer)
    and the backward's working set (fc2's output gradient kept for the delayed weight gradient, instead of fc1's
    weight gradient)."""
    cfg = load_config(CONFIGS / recipe, overrides)
    off = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, overlap_moe_expert_parallel_comm=False,
                                                                 delay_wgrad_compute=False))
    world = 256 if recipe == "k2_full.yaml" else 2
    with_overlap, without = plan_memory(cfg, world), plan_memory(off, world)
    for a, b in zip(with_overlap.stages, without.stages):
        assert a.in_flight == b.in_flight
        assert all(x > y for x, y in zip(a.chunk_kept, b.chunk_kept) if x != y)  # only MoE chunks gain
        assert a.chunk_kept != b.chunk_kept
        assert abs(a.activations - b.activations) < 0.2 * b.activations


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
    from tests.helpers.model import require_no_cuda
    from tests.helpers.torchrun import run_torchrun, train_rows

    require_no_cuda()
    common = ["parallel.expert=2", "model.params_dtype=bfloat16", "train.iters=2", "data.seq_length=64",
              "train.global_batch_tokens=512", "train.micro_batch_size=4", "train.eval_interval=0",
              "train.eval_micro_batches=1", "optim.warmup_steps=1", "checkpoint.save_at_end=false", "output.plot=false",
              "output.progress_bar=false", "output.tensorboard=false"]
    run_torchrun(tmp_path / "plain", *common)
    run_torchrun(tmp_path / "overlap", *common, *ON)
    plain, overlapped = ([r["loss"] for r in train_rows(tmp_path / run)] for run in ("plain", "overlap"))
    assert len(plain) == 2 and overlapped == plain


@pytest.mark.slow
@pytest.mark.distributed
def test_pretrain_with_overlapped_gradient_buffers_gives_the_same_losses(tmp_path):
    """k2-pretrain under torchrun, ZeRO-1 DP2 in bf16 on gloo, with bucketed gradient buffers and the reduce-scatter
    and all-gather overlapped: the same losses as without, bit for bit; a checkpoint taken while the parameter
    all-gather is pending (after a step) holds the updated parameters: resuming from it gives the same next loss."""
    from tests.helpers.model import require_no_cuda
    from tests.helpers.torchrun import run_torchrun, train_rows

    require_no_cuda()
    common = ["model.params_dtype=bfloat16", "train.iters=3", "data.seq_length=64", "train.global_batch_tokens=512",
              "train.micro_batch_size=4", "train.eval_interval=0", "train.eval_micro_batches=1",
              "optim.warmup_steps=1", "checkpoint.save_at_end=false", "output.plot=false",
              "output.progress_bar=false", "output.tensorboard=false"]
    buckets = ["parallel.ddp_bucket_size=20000", "parallel.overlap_grad_reduce=true",
               "parallel.overlap_param_gather=true"]
    run_torchrun(tmp_path / "plain", *common)
    run_torchrun(tmp_path / "overlap", *common, *buckets, "checkpoint.save_interval=2")
    run_torchrun(tmp_path / "resumed", *common, *buckets, f"checkpoint.load={tmp_path / 'overlap' / 'checkpoints'}")
    plain, overlapped, resumed = ([r["loss"] for r in train_rows(tmp_path / run)]
                                  for run in ("plain", "overlap", "resumed"))
    assert len(plain) == 3 and overlapped == plain
    assert resumed[-1] == plain[-1]
