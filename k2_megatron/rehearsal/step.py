"""One optimizer step of a pretraining config, rehearsed for rank R of a world of N through k2-pretrain's own Trainer
(k2_megatron.training.trainer): parallel_state, the rank's model chunks, megatron's forward_backward_func (1F1B /
interleaved) over the real micro-batch count, the ZeRO-1 MuonClip step with QK-Clip and gradient clipping, the step's
metrics (the loss mean, the max logits, the expert loads over ranks), and a checkpoint save to a dry target
(megatron's dist_checkpointing with a strategy that plans the write and writes nothing).

Tokens are synthetic (the shapes of the config's micro-batches): a rehearsal needs no data set or tokenizer file.
"""

from __future__ import annotations

import tempfile

import torch

from k2_megatron.rehearsal.checkpoint import dry_save
from k2_megatron.rehearsal.replay import MicroBatchReplay
from k2_megatron.rehearsal.report import RehearsalReport
from k2_megatron.rehearsal.session import rehearsal
from k2_megatron.training.trainer import Trainer


COMBINED_1F1B_PHASE = "forward-backward (combined 1F1B)"


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


def _as_after_a_first_step(chunks) -> None:
    """megatron DDP with overlap_grad_reduce learns in a run's first step how often each parameter's gradient hook
    fires in the last micro-batch's backward, and issues that step's bucket reduce-scatters only at its end
    (finish_grad_sync); from the second step on, each bucket's reduce-scatter starts from the hook that completes it,
    during the backward. The rehearsed step is such a step: every parameter's hook once per step."""
    for chunk in chunks:
        for group in (*getattr(chunk, "bucket_groups", ()), *getattr(chunk, "expert_parallel_bucket_groups", ())):
            if group.ddp_config.overlap_grad_reduce and group.is_first_batch:
                group.golden_per_param_grad_ready_counts = dict.fromkeys(group.params, 1)
                group.is_first_batch = False


class SyntheticData:
    """CorpusData's interface (k2_megatron.training.trainer) without a data set or tokenizer file: every micro-batch
    is the config's shape of fake host tokens."""

    tokenizer_name = "synthetic (rehearsal)"

    def __init__(self, cfg, layout, dp: int, dp_rank: int):
        from k2_megatron.training.plan import _vocab_size

        self.vocab_size = _vocab_size(cfg)
        self.train_samples = cfg.train.iters * layout.global_batch_size
        self.eval_micro_batches = cfg.train.eval_micro_batches or 1
        self.batch = _synthetic_batch(cfg.train.micro_batch_size, cfg.data.seq_length)

    def next_batch(self, fields: tuple[str, ...]) -> dict:
        return {k: self.batch[k] for k in fields}

    def validation_batches(self, fields: tuple[str, ...]) -> list:
        return [self.next_batch(fields)] * self.eval_micro_batches

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def unigram_baseline(self) -> float:
        return float("nan")


class RehearsedTrainer(Trainer):
    """k2-pretrain's Trainer with the rehearsal's bookkeeping around its parts: the memory category of what each
    part allocates, micro-batch replay, and a dry checkpoint save. Nothing is loaded (a rehearsal starts fresh) and
    nothing is logged."""

    def __init__(self, cfg, session, *, replay: bool = True):
        super().__init__(cfg, data=SyntheticData)
        self.r, self.replay = session, replay
        self.checkpoint_plan = None
        self.replayed = 0  # model-chunk micro-batches replayed in the last step
        self.chunk_passes: list = []  # MicroBatchReplay.chunk_passes() of the last step

    def setup(self) -> None:
        with self.r.phase("setup"):
            super().setup()

    def build_model(self) -> None:
        with self.r.phase("model", "parameters"):
            super().build_model()
        params, grads = _model_state(self.chunks)
        self.r.memory.assign(params, "parameters")
        self.r.memory.assign(grads, "gradient buffers")

    def build_optimizer(self) -> None:
        with self.r.phase("optimizer setup", "optimizer state"):
            super().build_optimizer()
        self.r.memory.assign(_optimizer_state(self.opt), "optimizer state")

    def check_paths(self) -> None:
        pass  # a rehearsal writes nothing (its config's directories are the cluster's)

    def _lock_directories(self):  # nor takes their lock
        return None

    def _step_batches(self):
        from k2_megatron.training.prefetch import StepBatches

        # read in the step's own thread: fake tensors belong to the rehearsal's mode, which is per thread
        return StepBatches(self.data, self.layout.num_micro_batches, self.batch_fields, pin_device=None,
                           background=False)

    def _resume(self):
        return None, "resume"

    def _start_logger(self) -> None:
        from k2_megatron.training.logging import RunLogger

        self.logger = RunLogger(self.cfg.output.dir, total_steps=self.cfg.train.iters, enabled=False)

    def forward_backward(self, batches: list) -> list:
        from k2_megatron.rehearsal import fake_cuda

        self.r.memory.begin_step()
        _as_after_a_first_step(self.chunks)
        replayer = MicroBatchReplay(self.r, self.chunks, len(batches)).install() if self.replay else None
        fake_cuda.observers.schedule_plan_run = self._in_combined_phase(fake_cuda.observers.schedule_plan_run)
        try:
            with self.r.phase("forward-backward", "activations"):
                return super().forward_backward(batches)
        finally:
            fake_cuda.observers.schedule_plan_run = None
            if replayer is not None:
                replayer.remove()
                self.replayed, self.chunk_passes = replayer.replayed, replayer.chunk_passes()

    def _in_combined_phase(self, inner):
        """megatron's combined 1F1B schedule-plan runs (overlap_moe_expert_parallel_comm) in their own phase,
        COMBINED_1F1B_PHASE: what they issue (the EP all-to-alls from the dispatch and combine nodes, which megatron
        overlaps with the other micro-batch's computation, the pipeline sends and receives of its hooks, the DDP
        hooks' reduce-scatters) is told apart in the records; ``inner``: micro-batch replay's observer or None."""
        def run(original, *args, **kwargs):
            with self.r.phase(COMBINED_1F1B_PHASE, "activations"):
                return inner(original, *args, **kwargs) if inner is not None else original(*args, **kwargs)

        return run

    def optimizer_step(self):
        with self.r.phase("optimizer step", "optimizer temporaries"):
            result = super().optimizer_step()
        self.r.memory.assign(_optimizer_state(self.opt), "optimizer state")
        return result

    def step_metrics(self, *args) -> dict:
        with self.r.phase("step metrics"):
            return super().step_metrics(*args)

    def save(self) -> str:
        with self.r.phase("checkpoint save (dry)", "checkpoint temporaries"):
            with tempfile.TemporaryDirectory(prefix="k2_rehearsal_ckpt_") as target:
                self.checkpoint_plan = dry_save(self.chunks, self.opt, target)
        return target


def rehearse_step(cfg, *, world_size: int, rank: int, routing=None, device=None, replay: bool = True) -> RehearsalReport:
    """Rehearses one training step of PretrainConfig ``cfg`` for ``rank`` of ``world_size`` through k2-pretrain's
    Trainer (setup, step, save); returns its report. replay: replay identical micro-batches from a recorded one
    (k2_megatron.rehearsal.replay) instead of computing each."""
    from k2_megatron.rehearsal import fake_cuda

    kwargs = {"routing": routing} if routing is not None else {}
    with rehearsal(world_size, rank, device=device or fake_cuda.H100, **kwargs) as r:
        trainer = RehearsedTrainer(cfg, r, replay=replay)
        try:
            trainer.setup()
            trainer.step()
            trainer.save()
            return RehearsalReport.of(r, cfg, checkpoint=trainer.checkpoint_plan,
                                      micro_batches=trainer.layout.num_micro_batches, replayed=trainer.replayed,
                                      chunk_passes=trainer.chunk_passes,
                                      host_optimizer_state=trainer.opt.host_state_bytes())
        finally:
            trainer.close()
