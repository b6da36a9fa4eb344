"""A k2-pretrain-like training state in a test process (not collected): bf16 k2-tiny built as k2-pretrain builds it
(Float16Module, megatron DDP, ZeRO-1 MuonClip) on a given layout, one training step of it, and (one process) its
whole state."""

from __future__ import annotations

import os

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import torch

SEQ, MICRO_BATCH, MICROBATCHES = 16, 2, 4


def build_zero1_bf16(layout, rank: int, world: int, init_file: str, seed: int, **muonclip):
    """(k2-tiny config, [DDP chunk], MuonClip optimizer) of this rank; initialises gloo + megatron for ``layout``.
    muonclip: MuonClipConfig fields (Newton-Schulz in float32 by default)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.transformer.module import Float16Module

    from tests.helpers.model import k2_like_tiny_config
    from k2_megatron.megatron import build_k2_model, init_distributed_cpu, to_transformer_config
    from k2_megatron.megatron.optimizer import MuonClipConfig, get_muonclip_optimizer

    init_distributed_cpu(layout, seed=seed, rank=rank, world_size=world, init_method=f"file://{init_file}")
    cfg = k2_like_tiny_config()
    tc = to_transformer_config(cfg, layout, params_dtype=torch.bfloat16)
    tc.finalize_model_grads_func = finalize_model_grads
    ddp_config = DistributedDataParallelConfig(use_distributed_optimizer=True, grad_reduce_in_fp32=True,
                                               overlap_grad_reduce=False, bucket_size=None)
    chunks = [DistributedDataParallel(tc, ddp_config, Float16Module(tc, build_k2_model(cfg, tc)))]
    opt = get_muonclip_optimizer(OptimizerConfig(optimizer="adam", lr=1e-2, weight_decay=0.1, bf16=True,
                                                 params_dtype=torch.bfloat16, use_distributed_optimizer=True,
                                                 clip_grad=0.0), chunks,
                                 MuonClipConfig(**{"ns_dtype": torch.float32, **muonclip}))
    return cfg, chunks, opt


def train_step(cfg, chunks, opt, seed: int = 5) -> None:
    """One optimizer step on random tokens (each data-parallel rank its own micro-batches)."""
    from megatron.core import parallel_state

    from tests.helpers.model import make_batches, train_step_losses

    dp_rank, dp = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    for c in chunks:
        c.zero_grad_buffer()
    opt.zero_grad()
    batches = make_batches(cfg, MICROBATCHES * dp, MICRO_BATCH, SEQ, seed=seed)[dp_rank::dp]
    train_step_losses(chunks[0], batches, SEQ, MICRO_BATCH)
    ok, _, _ = opt.step()
    assert ok


def whole_state(chunks, opt) -> dict:
    """One process: every state tensor by (kind, parameter name), read from the model and the optimizer's own
    structures (each parameter is whole here, so local names and shapes are global): model tensors, fp32 master
    weights, exp_avg / exp_avg_sq, and the step count under ("step", "")."""
    from k2_megatron.megatron.optimizer_state import step_count

    gpt = chunks[0].module.module
    names = {p: n for n, p in gpt.named_parameters()}
    out = {("model", n): t.detach().clone() for n, t in gpt.state_dict().items() if not n.endswith("_extra_state")}
    for sub in opt.chained_optimizers:
        for main, param in sub.main_to_model.items():
            assert main.numel() == param.numel()
            state = sub.optimizer.state[main]
            out[("fp32_param", names[param])] = main.detach().view(param.shape).clone()
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    out[(key, names[param])] = state[key].view(param.shape).clone()
    out[("step", "")] = torch.tensor(step_count(opt.chained_optimizers))
    return out
