"""Shared helpers of the K2 model tests (not collected): random reference models and a megatron train step."""

from __future__ import annotations

import os

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # megatron's jit_fuser is torch.compile: seconds on a CPU

from functools import partial

import torch

from k2_megatron.config import K2Config, config_to_hf, get_preset


def k2_like_tiny_config(**overrides) -> K2Config:
    """K2-like at toy scale: dense first layer, MoE + shared expert, sigmoid routing, YaRN, q/kv LoRA,
    q.k head dim 24 and v head dim 16 (the 192/128 ratio)."""
    return get_preset("k2-tiny", **overrides)


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


def _forward_step(data_iterator, model):
    batch = next(data_iterator)
    tokens, labels = batch["tokens"], batch["labels"]
    position_ids = torch.arange(tokens.shape[1])[None].expand_as(tokens)
    output = model(tokens, position_ids, None, labels=labels)
    return output, partial(_loss_func, torch.ones_like(labels, dtype=torch.float32))


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


def run_gloo_workers(target, world: int, args_for_rank, *, timeout: float = 300) -> list[dict]:
    """Runs ``target(*args_for_rank(rank, result_path))`` in ``world`` spawned processes on the CPU (CUDA hidden:
    gloo + cpu_compat even on a GPU machine), waits for them and returns each rank's result dict, which the
    target saves to ``result_path``; fails the test on a missing result, a reported "error" or a bad exit code."""
    import multiprocessing
    import tempfile

    ctx = multiprocessing.get_context("spawn")
    tmp = tempfile.mkdtemp(prefix="k2_gloo_results_")
    paths = [os.path.join(tmp, f"rank{r}.pt") for r in range(world)]
    procs = [ctx.Process(target=target, args=args_for_rank(r, paths[r])) for r in range(world)]
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    try:
        for p in procs:
            p.start()
    finally:
        if hidden is None:
            del os.environ["CUDA_VISIBLE_DEVICES"]
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = hidden
    for p in procs:
        p.join(timeout=timeout)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    results = [torch.load(p, weights_only=False) if os.path.exists(p) else {"error": "no result file"} for p in paths]
    for r, res in enumerate(results):
        assert "error" not in res, f"rank {r}: {res['error']}"
        assert procs[r].exitcode == 0, f"rank {r} exit code {procs[r].exitcode}"
    return results
