"""Shared helpers of the K2 model tests (not collected): random reference models and a megatron train step."""

from __future__ import annotations

import os

from functools import partial

import torch

from k2_megatron.config import K2Config, YarnConfig, config_to_hf, get_preset

# The K2 release's RoPE at toy scale: YaRN factor 32 over k2-tiny's 128-token pretraining context.
TINY_RELEASE_YARN = YarnConfig(factor=32.0, original_max_position_embeddings=128)


def k2_like_tiny_config(**overrides) -> K2Config:
    """K2-like at toy scale, configured as the release is: dense first layer, MoE + shared expert, sigmoid routing,
    YaRN (unless ``rope_scaling`` is overridden), q/kv LoRA, q.k head dim 24 and v head dim 16 (the 192/128 ratio)."""
    cfg = get_preset("k2-tiny", **overrides)
    return cfg if "rope_scaling" in overrides else cfg.with_yarn(TINY_RELEASE_YARN)


def make_hf_model(cfg: K2Config, seed: int = 0):
    """A transformers DeepseekV3ForCausalLM of ``cfg`` with random weights (norm weights near 1) and a
    non-zero e_score_correction_bias, in float32, eager attention."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    hf_config = DeepseekV3Config(**config_to_hf(cfg, "deepseek_v3"))
    hf_config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(hf_config).float()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
    return model.eval()


def full_megatron_state_dict(cfg: K2Config, seed: int = 0) -> dict:
    from k2_megatron.checkpoint import hf_to_megatron

    return {k: v.clone() for k, v in hf_to_megatron(make_hf_model(cfg, seed).state_dict(), cfg).items()}


def saved_full_state(tmp_dir, cfg: K2Config) -> str:
    """full_megatron_state_dict(cfg) saved under ``tmp_dir`` for spawned workers to load; returns its path."""
    path = os.path.join(str(tmp_dir), "full.pt")
    torch.save(full_megatron_state_dict(cfg), path)
    return path


def loaded_k2_model(cfg: K2Config, full: dict, **build_kwargs):
    """This rank's build_k2_model(cfg, **build_kwargs) loaded with the whole state dict ``full``, router biases frozen
    (their update follows the load balance, which a reference computation does not repeat)."""
    from k2_megatron.checkpoint import load_megatron_state_dict
    from k2_megatron.megatron import build_k2_model
    from k2_megatron.megatron.moe import K2Router

    model = build_k2_model(cfg, **build_kwargs)
    load_megatron_state_dict(model, full)
    for m in model.modules():
        if isinstance(m, K2Router):
            m.freeze_bias()
    return model


def make_batches(cfg: K2Config, num: int, micro_batch: int, seq: int, seed: int = 7):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num):
        tokens = torch.randint(0, cfg.vocab_size, (micro_batch, seq + 1), generator=g)
        out.append({"tokens": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous()})
    return out


def _loss_func(loss_mask, output_tensor):
    losses = output_tensor.float()
    loss = (losses * loss_mask).sum() / loss_mask.sum()
    return loss, {"lm loss": loss.detach().clone()}  # megatron divides `loss` in place


def _forward_step(data_iterator, model, return_schedule_plan: bool = False):
    batch = next(data_iterator)
    tokens, labels = batch["tokens"], batch["labels"]
    position_ids = torch.arange(tokens.shape[1])[None].expand_as(tokens)
    loss = partial(_loss_func, torch.ones_like(labels, dtype=torch.float32))
    if return_schedule_plan:  # megatron's combined 1F1B (overlap_moe_expert_parallel_comm)
        return model.build_schedule_plan(tokens, position_ids, None, labels=labels), loss
    return model(tokens, position_ids, None, labels=labels), loss


def train_step_losses(model, batches, seq: int, micro_batch: int) -> list[float]:
    """megatron-core forward_backward_func over ``batches`` (one microbatch each); per-microbatch losses
    (on the last pipeline stage; [] elsewhere). Gradients accumulate in the parameters' .grad."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    models = model if isinstance(model, list) else [model]
    for m in models:
        m.zero_grad(set_to_none=True)
    fb = get_forward_backward_func()
    out = fb(forward_step_func=_forward_step, data_iterator=iter(batches) if len(models) == 1
             else [iter(batches) for _ in models],
             model=model, num_microbatches=len(batches), seq_length=seq, micro_batch_size=micro_batch,
             forward_only=False)
    return [float(r["lm loss"]) for r in out]


def load_tiny_model(cfg: K2Config, full: dict, layout=None, vp_stage: int | None = None):
    """This rank's fp32 model (chunk) of ``cfg`` loaded with the whole state dict ``full`` (loaded_k2_model)."""
    return loaded_k2_model(cfg, full, layout=layout, vp_stage=vp_stage, params_dtype=torch.float32)


def ddp_chunks_and_muonclip(cfg: K2Config, full: dict, layout=None, virtual_stages: int | None = None, *,
                            clip_grad: float = 1.0, muonclip=None):
    """This rank's fp32 chunks wrapped as k2-pretrain wraps them (megatron DDP, ZeRO-1 buffers, finalize_model_grads
    after forward_backward_func) and their MuonClip optimizer (lr 1e-2, weight decay 0.1, ``clip_grad``;
    Newton-Schulz in float32 unless ``muonclip`` says otherwise)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig

    from k2_megatron.megatron.optimizer import MuonClipConfig, get_muonclip_optimizer

    models = [load_tiny_model(cfg, full, layout, v) for v in (range(virtual_stages) if virtual_stages else [None])]
    models[0].config.finalize_model_grads_func = finalize_model_grads
    ddp_config = DistributedDataParallelConfig(use_distributed_optimizer=True, grad_reduce_in_fp32=True,
                                               overlap_grad_reduce=False, bucket_size=None)
    chunks = [DistributedDataParallel(m.config, ddp_config, m, disable_bucketing=i > 0) for i, m in enumerate(models)]
    opt = get_muonclip_optimizer(OptimizerConfig(optimizer="adam", lr=1e-2, weight_decay=0.1, bf16=False,
                                                 use_distributed_optimizer=True, clip_grad=clip_grad),
                                 chunks, muonclip or MuonClipConfig(ns_dtype=torch.float32))
    return chunks, opt


def require_no_cuda() -> None:
    """The in-process model tests run megatron on the CPU (cpu_compat), which applies only without CUDA."""
    import pytest

    if torch.cuda.is_available():
        pytest.skip("CPU test of megatron-core (cpu_compat is inactive when CUDA is available); the gloo tests in "
                    "test_model_distributed.py hide the GPU from their worker processes and still run")


def teardown_megatron() -> None:
    """Undo init_distributed_cpu (so test modules that run after ours see a plain torch)."""
    from k2_megatron.megatron import teardown_distributed_cpu

    teardown_distributed_cpu()


def report_to_parent(body, result_path: str, *args) -> None:
    """A spawned worker's entry (see run_gloo_bodies): ``body(*args)`` with TorchDynamo off and one thread, its result
    dict (or the error it raised) saved to ``result_path`` for the parent."""
    os.environ["TORCHDYNAMO_DISABLE"] = "1"  # this process only: megatron's jit_fuser would compile on the CPU
    torch.set_num_threads(1)
    try:
        out = body(*args)
    except BaseException as exc:  # the parent fails the test with it
        import traceback

        out = {"error": "".join(traceback.format_exception(exc))}
    torch.save(out, result_path)
    # As k2-pretrain does at its end: a process group left to the interpreter's exit can abort it ("terminate
    # called without an active exception", exit -6) while gloo's threads are torn down.
    if torch.distributed.is_initialized():
        teardown_megatron()


def run_gloo_bodies(body, world: int, args_for_rank, *, timeout: float = 300) -> list[dict]:
    """run_gloo_workers for a ``body(*args_for_rank(rank))`` that returns its rank's result dict (a module-level
    function: spawned processes import it)."""
    return run_gloo_workers(report_to_parent, world, lambda r, path: (body, path, *args_for_rank(r)),
                            timeout=timeout)


def run_gloo_workers(target, world: int, args_for_rank, *, timeout: float = 300) -> list[dict]:
    """Runs ``target(*args_for_rank(rank, result_path))`` in ``world`` spawned processes on the CPU (CUDA hidden:
    gloo + cpu_compat even on a GPU machine) and returns each rank's result dict, which the target saves to
    ``result_path`` (with torch.save; an "error" entry reports a failure).

    Fails fast: as soon as any rank reports an error or exits without a result or with a non-zero code, or once
    ``timeout`` seconds have passed since the start (one deadline for the whole group), every rank still running
    is killed and the test fails naming the rank(s) and why. The others would otherwise wait in a collective for
    the failed rank until their own timeouts."""
    import multiprocessing
    import multiprocessing.connection
    import shutil
    import tempfile
    import time

    ctx = multiprocessing.get_context("spawn")
    tmp = tempfile.mkdtemp(prefix="k2_gloo_results_")
    paths = [os.path.join(tmp, f"rank{r}.pt") for r in range(world)]
    procs = [ctx.Process(target=target, args=args_for_rank(r, paths[r])) for r in range(world)]
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    deadline = time.monotonic() + timeout
    results: list[dict | None] = [None] * world
    failures: list[str] = []
    try:
        try:
            for p in procs:
                p.start()
        finally:
            if hidden is None:
                del os.environ["CUDA_VISIBLE_DEVICES"]
            else:
                os.environ["CUDA_VISIBLE_DEVICES"] = hidden
        running = set(range(world))
        while running and not failures:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                failures.append(f"timed out after {timeout:g} s with rank(s) {sorted(running)} still running "
                                "(a deadlock?); killed them")
                break
            multiprocessing.connection.wait([procs[r].sentinel for r in running], timeout=remaining)
            for r in sorted(running):
                if procs[r].exitcode is None:
                    continue
                running.discard(r)
                results[r], problem = _rank_result(paths[r], procs[r].exitcode)
                if problem is not None:
                    failures.append(f"rank {r}: {problem}")
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        for p in procs:
            p.join()
        shutil.rmtree(tmp, ignore_errors=True)  # the results are read (torch.load copies them)
    assert not failures, "\n".join(failures)
    return results


def run_tiny_gloo_workers(run, world: int, tmp, *, timeout: float) -> list[dict]:
    """The usual gloo test: k2-tiny's whole state dict (make_hf_model's random weights) saved in the folder ``tmp``,
    then ``run(rank, world, init_file, state_path)`` -> result dict on ``world`` spawned ranks (run_gloo_bodies)."""
    state_path = saved_full_state(tmp, k2_like_tiny_config())
    init_file = str(tmp / "init")
    return run_gloo_bodies(run, world, lambda rank: (rank, world, init_file, state_path), timeout=timeout)


def _rank_result(path: str, exitcode: int) -> tuple[dict | None, str | None]:
    """(the result a rank saved, what went wrong with it or None)."""
    if not os.path.exists(path):
        return None, f"exited with code {exitcode} without a result (its traceback, if any, is on stderr)"
    result = torch.load(path, weights_only=False)
    if "error" in result:
        return result, str(result["error"])
    if exitcode != 0:
        return result, f"exit code {exitcode} after saving its result"
    return result, None
