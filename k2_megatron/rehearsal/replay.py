"""Micro-batch replay: the step's schedule runs every micro-batch, but the model chunks compute only a few of them.

K2's recipe runs 1024 micro-batches per rank and step; with fake tensors every micro-batch of a model chunk performs
the same operators on the same shapes (the routing is declared, not data-dependent), yet each costs about a second of
CPU in fake mode. So megatron's schedule (1F1B / interleaved, pipeline sends and receives, gradient accumulation and
the finalize hooks) runs with the real micro-batch count, and each chunk's forward runs for real for micro-batches
0, 1 and 2 and for the last one; micro-batch 1 is recorded and the ones in between are replayed from that record.
What a forward keeps for backward is what of its allocations its backward frees; until micro-batch 1's backward has
run (the pipeline's warm-up runs many forwards first) it is estimated by what of them is still alive after
micro-batch 2's forward.

- forward: the chunk's output (same shape and dtype, connected to its input for autograd), the bytes the recorded
  forward kept for backward on the device (one allocation of the same size, freed when the replayed backward is done;
  with megatron's activation offloading, what it copied to pinned host memory is not among them: the replayed forward
  holds the same pinned host bytes until its backward, ``MemoryTracker.hold_pinned``; what a
  forward leaves behind until the next forward replaces it, e.g. the MoE dispatcher's copy of the routing map, is not
  replayed: one copy is alive at any time either way), the forward's high-water mark (allocated and freed at once),
  and the collectives and host synchronisations it made;
- backward: the high-water mark of the recorded backward, its collectives and synchronisations, the input gradient.

So the memory peak, the collectives and the synchronisations of the step are those of the real micro-batches, counted
as many times as the schedule runs them; operator-level order inside a replayed micro-batch is not reproduced. One
known excess: a forward leaves state on its modules (the MoE dispatcher keeps the routing probabilities, which hold
that micro-batch's autograd graph and its received input) until the next forward replaces it; replayed forwards do
not, so micro-batch 2's leftovers stay alive until the last micro-batch, up to about two hidden states per model
chunk more than a GPU holds (K2: ~0.1 GiB per chunk, ~0.1% of its activations; measured +0.1% on k2_full's stage 8
with 64 micro-batches). ``replay=False`` runs every micro-batch for real (the tests compare both).
"""

from __future__ import annotations

import copy
import dataclasses

import torch

from k2_megatron.rehearsal import fake_cuda

RECORDED = 1  # index of the micro-batch whose record is replayed (micro-batch 0 makes first-use allocations)
MEASURED = RECORDED + 1  # its forward tells which of the recorded forward's allocations are kept for backward


@dataclasses.dataclass
class _Record:
    output_shape: tuple
    output_dtype: torch.dtype
    output_bytes: int
    allocated: dict = dataclasses.field(default_factory=dict)  # (storage key, serial) -> bytes, recorded forward's
    output_entry: tuple = ()
    kept: int = 0             # of those, bytes the backward frees (saved for backward); estimated before it ran
    output_kept: bool = True  # whether the output is among them
    forward_high: int = 0     # high-water mark above the start of the forward
    backward_high: int = 0    # high-water mark above the start of the backward
    forward_events: tuple = ((), ())   # (collectives, host syncs)
    backward_events: tuple = ((), ())
    backward_done: bool = False
    pinned_kept: int = 0      # pinned host bytes the forward left holding its offloaded activations


class _Replayed(torch.autograd.Function):
    @staticmethod
    def forward(ctx, anchor, replay, record):
        high = torch.empty(max(record.forward_high, 0), dtype=torch.uint8, device="cuda")
        del high
        ballast = record.kept - (record.output_bytes if record.output_kept else 0)
        ctx.kept = torch.empty(max(ballast, 0), dtype=torch.uint8, device="cuda")
        replay.r.memory.hold_pinned(record.pinned_kept)
        ctx.replay, ctx.record, ctx.anchor_shape = replay, record, anchor.shape
        ctx.anchor_is_input = replay.anchor_is_input
        replay.events(record.forward_events)
        return torch.empty(record.output_shape, dtype=record.output_dtype, device="cuda")

    @staticmethod
    def backward(ctx, grad):
        record = ctx.record
        high = torch.empty(max(record.backward_high, 0), dtype=torch.uint8, device="cuda")
        del high
        ctx.replay.events(record.backward_events)
        ctx.kept = None
        ctx.replay.r.memory.hold_pinned(-record.pinned_kept)
        grad_in = torch.empty(ctx.anchor_shape, dtype=grad.dtype, device="cuda") if ctx.anchor_is_input else None
        return grad_in, None, None


def _innermost(chunk):
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


class MicroBatchReplay:
    """Wraps the forward of each model chunk (DDP-wrapped megatron models) for ``num_microbatches`` per step."""

    def __init__(self, rehearsal, chunks, num_microbatches: int):
        self.r = rehearsal
        self.chunks = chunks
        self.n = num_microbatches
        self.forwards = [0] * len(chunks)
        self.records: list[_Record | None] = [None] * len(chunks)
        self.anchor_is_input = False
        self.replayed = 0
        self._backward = None  # (record, start bytes, collectives index, syncs index) while one is being recorded
        self._originals = []
        self._parameter_anchor = {}

    def install(self) -> "MicroBatchReplay":
        for index, chunk in enumerate(self.chunks):
            original = chunk.forward
            self._originals.append((chunk, original))
            chunk.forward = self._wrap(index, original)
        fake_cuda.observers.backward_step = self._around_backward
        return self

    def remove(self) -> None:
        for chunk, _ in self._originals:
            chunk.__dict__.pop("forward", None)
        self._originals = []
        fake_cuda.observers.backward_step = None

    def events(self, recorded) -> None:
        collectives, syncs = recorded
        phase = self.r.collectives.phase
        self.r.collectives.records.extend(dataclasses.replace(c, phase=phase) for c in collectives)
        self.r.syncs.events.extend(dataclasses.replace(copy.copy(s), phase=phase) for s in syncs)

    def _marks(self):
        return len(self.r.collectives.records), len(self.r.syncs.events)

    def _since(self, marks):
        return (tuple(self.r.collectives.records[marks[0]:]), tuple(self.r.syncs.events[marks[1]:]))

    def _wrap(self, index, original):
        def forward(*args, **kwargs):
            i = self.forwards[index]
            self.forwards[index] += 1
            record = self.records[index]
            if record is not None and MEASURED < i < self.n - 1:
                return self._replay(index, record)  # its backward comes after the recorded one's
            if i == MEASURED and record is not None:
                out = original(*args, **kwargs)
                if not record.backward_done:  # the estimate until the recorded backward says what it frees
                    mem = self.r.memory
                    record.kept = sum(n for entry, n in record.allocated.items() if mem.is_live(entry))
                    record.output_kept = mem.is_live(record.output_entry)
                return out
            if i != RECORDED:
                return original(*args, **kwargs)
            mem = self.r.memory
            start, marks, pinned = mem.total, self._marks(), mem.pinned
            mem.region_max = start
            allocated = mem.watch()
            try:
                out = original(*args, **kwargs)
            finally:
                mem.unwatch()
            record = _Record(tuple(out.shape), out.dtype, out.numel() * out.element_size(), allocated,
                             mem.entry_of(out), forward_high=mem.region_max - start,
                             forward_events=self._since(marks), pinned_kept=mem.pinned - pinned)
            self.records[index] = record
            out.grad_fn.register_prehook(lambda grads: self._start_backward(record))
            return out

        return forward

    def _replay(self, index, record):
        self.replayed += 1
        decoder_input = getattr(getattr(_innermost(self.chunks[index]), "decoder", None), "input_tensor", None)
        self.anchor_is_input = decoder_input is not None and decoder_input.requires_grad
        if self.anchor_is_input:
            anchor = decoder_input
        else:
            if index not in self._parameter_anchor:
                self._parameter_anchor[index] = next(p for p in self.chunks[index].parameters() if p.requires_grad)
            anchor = self._parameter_anchor[index]
        return _Replayed.apply(anchor, self, record)

    def _start_backward(self, record):
        mem = self.r.memory
        mem.region_max = mem.total
        alive = {entry: n for entry, n in record.allocated.items() if mem.is_live(entry)}
        self._backward = (record, mem.total, self._marks(), alive)

    def _around_backward(self, original, *args, **kwargs):
        out = original(*args, **kwargs)
        if self._backward is not None:
            record, start, marks, alive = self._backward
            mem = self.r.memory
            record.backward_high = mem.region_max - start
            record.backward_events = self._since(marks)
            # what the forward kept for backward: its allocations that the backward freed
            record.kept = sum(n for entry, n in alive.items() if not mem.is_live(entry))
            record.output_kept = record.output_entry in alive and not mem.is_live(record.output_entry)
            record.backward_done = True
            self._backward = None
        return out
