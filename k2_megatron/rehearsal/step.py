"""One optimizer step of a pretraining config, rehearsed for rank R of a world of N, driving megatron-core directly:
parallel_state, the rank's model chunks (build_k2_model via the pretraining loop's model builder), megatron's
forward_backward_func (1F1B / interleaved) over the real micro-batch count, the ZeRO-1 MuonClip step with QK-Clip and
gradient clipping, and a checkpoint save to a dry target (megatron's dist_checkpointing with a strategy that plans
the write and writes nothing).

Tokens are synthetic (the shapes of the config's micro-batches): a rehearsal needs no data set or tokenizer file.
"""

from __future__ import annotations

import itertools
import tempfile

import torch

from k2_megatron.rehearsal.report import RehearsalReport
from k2_megatron.rehearsal.session import rehearsal


def _synthetic_batch(micro_batch_size: int, seq_length: int) -> dict:
    """A micro-batch of the loop's format as fake host tensors (made once: converting real ones costs milliseconds
    every time they reach the device)."""
    from torch._guards import detect_fake_mode

    fake = detect_fake_mode()
    tokens = fake.from_tensor(torch.zeros(micro_batch_size, seq_length, dtype=torch.int64))
    return {"tokens": tokens, "labels": tokens,
            "loss_mask": fake.from_tensor(torch.ones(micro_batch_size, seq_length)),
            "position_ids": fake.from_tensor(torch.arange(seq_length).expand(micro_batch_size, seq_length))}


def _model_state(chunks) -> tuple[list, list]:
    params, grads = [], []
    for chunk in chunks:
        params += list(chunk.parameters()) + list(torch.nn.Module.buffers(chunk))  # DDP.buffers is its list
        for buffer in (*getattr(chunk, "buffers", []), *getattr(chunk, "expert_parallel_buffers", [])):
            params.append(buffer.param_data)
            grads.append(buffer.grad_data)
    return params, grads


def _optimizer_state(opt) -> list:
    out = []
    for sub in opt.chained_optimizers:
        for group in (getattr(sub, "shard_fp32_from_float16_groups", None) or []):
            out += list(group)
        inner = getattr(sub, "optimizer", None)
        for state in (inner.state.values() if inner is not None else []):
            out += [v for v in state.values() if isinstance(v, torch.Tensor)]
    return out


def rehearse_step(cfg, *, world_size: int, rank: int, routing=None, device=None, replay: bool = True) -> RehearsalReport:
    """Rehearses one training step of PretrainConfig ``cfg`` for ``rank`` of ``world_size``; returns its report.
    replay: replay identical micro-batches from a recorded one (k2_megatron.rehearsal.replay) instead of computing
    each."""
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from k2_megatron.megatron.optimizer import MuonClipConfig, get_muonclip_optimizer
    from k2_megatron.rehearsal import fake_cuda
    from k2_megatron.rehearsal.checkpoint import dry_save
    from k2_megatron.rehearsal.replay import MicroBatchReplay
    from k2_megatron.training import pretrain as loop
    from k2_megatron.training.plan import _vocab_size

    cfg.validate()
    dp, layout = cfg.layout(world_size)
    kwargs = {"routing": routing} if routing is not None else {}
    with rehearsal(world_size, rank, device=device or fake_cuda.H100, **kwargs) as r:
        with r.phase("setup"):
            loop._initialize(cfg)
            k2cfg = cfg.k2_config(_vocab_size(cfg))
        with r.phase("model", "parameters"):
            tc, chunks = loop._build_model(cfg, k2cfg)
        with r.phase("optimizer setup", "optimizer state"):
            o = cfg.optim
            opt = get_muonclip_optimizer(
                OptimizerConfig(optimizer="adam", lr=o.peak_lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
                                adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps,
                                bf16=cfg.model.params_dtype == "bfloat16", params_dtype=tc.params_dtype,
                                use_distributed_optimizer=True, clip_grad=cfg.train.clip_grad),
                chunks, MuonClipConfig(momentum=o.momentum, qk_clip_tau=o.qk_clip_tau,
                                       ns_dtype=getattr(torch, o.ns_dtype)))
        params, grads = _model_state(chunks)
        r.memory.assign(params, "parameters")
        r.memory.assign(grads, "gradient buffers")
        r.memory.assign(_optimizer_state(opt), "optimizer state")
        tc.finalize_model_grads_func = finalize_model_grads
        if dp > 1:
            tc.no_sync_func = [c.no_sync for c in chunks] if len(chunks) > 1 else chunks[0].no_sync
        seq, mbs, n_micro = cfg.data.seq_length, cfg.train.micro_batch_size, layout.num_micro_batches
        batch = _synthetic_batch(mbs, seq)
        r.memory.begin_step()
        replayer = MicroBatchReplay(r, chunks, n_micro).install() if replay else None
        with r.phase("forward-backward", "activations"):
            for c in chunks:
                c.zero_grad_buffer()
            opt.zero_grad()
            iters = (itertools.repeat(batch, n_micro) if len(chunks) == 1
                     else [itertools.repeat(batch, n_micro) for _ in chunks])
            get_forward_backward_func()(forward_step_func=loop._forward_step, data_iterator=iters,
                                        model=chunks if len(chunks) > 1 else chunks[0], num_microbatches=n_micro,
                                        seq_length=seq, micro_batch_size=mbs, forward_only=False)
        if replayer is not None:
            replayer.remove()
        with r.phase("optimizer step", "optimizer temporaries"):
            opt.step()
        r.memory.assign(_optimizer_state(opt), "optimizer state")
        with r.phase("checkpoint save (dry)", "checkpoint temporaries"):
            with tempfile.TemporaryDirectory(prefix="k2_rehearsal_ckpt_") as target:
                checkpoint = dry_save(chunks, opt, target)
        return RehearsalReport.of(r, cfg, checkpoint=checkpoint, micro_batches=n_micro)
