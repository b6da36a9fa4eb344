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
  forward kept for backward on the device (one allocation per memory category, e.g. activations and the all-to-all
  buffers kept as communication buffers, freed when the replayed backward is done; with megatron's activation
  offloading, what it copied to pinned host memory is not among them: the replayed forward holds the same pinned
  host bytes until its backward, ``MemoryTracker.hold_pinned``, and frees its received input's storage when the
  recorded forward did (megatron's attn_norm offload releases the layer's input once copied); what a
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

A replayed backward produces no parameter gradients, so megatron DDP's gradient hooks do not fire for it (its
autograd anchor, when the chunk has no input, is a leaf of its own, not a parameter); under ``no_sync`` they would
only have accumulated, and the last micro-batch, computed, fires them all: with ``overlap_grad_reduce`` each bucket's
reduce-scatter starts from its hook in that backward, as on a GPU.

megatron's combined 1F1B schedule (``overlap_moe_expert_parallel_comm``, with ``delay_wgrad_compute``) does not call
the model chunks: each schedule step runs one micro-batch's forward of a chunk and another's backward of a chunk
from schedule plans (``TransformerModelChunkSchedulePlan.run``), layer by layer interleaved so that one's EP
all-to-alls overlap the other's computation, the experts' weight gradients (``backward_dw``, which calls DDP's hooks)
placed between. Replay intercepts those runs: the forward half is counted, recorded and replayed per chunk as above,
and a replayed backward half frees what its forward kept and gives its input its gradient. When either half is
replayed or recorded the two halves run one after the other (the backward first, then the forward; megatron's
pipeline hooks in its order); two computed halves run megatron's own interleaved step. Not reproduced: the real step
holds part of the forward's allocations (its first layer's, and transients) while the backward still holds its own,
so the rehearsed peak can be lower by up to what one layer of one micro-batch keeps plus that layer's transients:
on k2-tiny with one layer per chunk and five micro-batches in flight 7% of the activations (tests/rehearsal/
test_step.py). On k2_full as shipped (offload: 0.33 GiB kept per pass of a 2-layer MoE chunk, its backward working
in 3.3 GiB above that) computing every micro-batch of a 32-micro-batch step measured 31.6, 13.9 and 9.8 GiB of
activations on the first, middle and last stages, replay 31.8, 14.1 and 9.8 at 1024 (within 2%), the all-to-all
buffers 1.32 GiB on each, replay 0.89-1.32. What a recorded pass keeps is read at the next schedule step (the
combined schedule frees the last layer's node outputs when it drops the plan, after the backward's own run).
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
    kept: dict = dataclasses.field(default_factory=dict)  # of those, category -> bytes the backward frees (saved for
    # backward; the all-to-all outputs are communication buffers); estimated until the recorded backward has run
    output_kept: bool = True  # whether the output is among them
    forward_high: int = 0     # high-water mark above the start of the forward
    backward_high: int = 0    # high-water mark above the start of the backward
    forward_events: tuple = ((), ())   # (collectives, host syncs)
    backward_events: tuple = ((), ())
    backward_done: bool = False
    pinned_kept: int = 0      # pinned host bytes the forward left holding its offloaded activations
    input_bytes: int = 0      # the chunk's received input (allocated before the forward), as the forward left it
    input_released: bool = False  # the forward freed its received input's storage (megatron's attn_norm offload)


def _replay_forward(replay, record) -> list:
    """What a replayed forward does besides its output: allocates its high-water mark (freed at once) and issues its
    collectives and synchronisations; returns the bytes it keeps for backward (one allocation per memory category)."""
    high = torch.empty(max(record.forward_high, 0), dtype=torch.uint8, device="cuda")
    del high
    replay.events(record.forward_events)
    replay.r.memory.hold_pinned(record.pinned_kept)
    kept = dict(record.kept)
    if record.output_kept:  # the replayed output stands for it
        kept["activations"] = kept.get("activations", 0) - record.output_bytes
    return [_allocate(replay.r.memory, n, category) for category, n in kept.items() if n > 0]


def _allocate(memory, nbytes: int, category: str) -> torch.Tensor:
    """One device allocation of ``nbytes`` counted in memory ``category``."""
    saved, memory.allocation_category = memory.allocation_category, category
    try:
        return torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    finally:
        memory.allocation_category = saved


def _replay_backward(replay, record) -> None:
    """What a replayed backward does besides its input gradient and freeing what the forward kept."""
    high = torch.empty(max(record.backward_high, 0), dtype=torch.uint8, device="cuda")
    del high
    replay.events(record.backward_events)
    replay.r.memory.hold_pinned(-record.pinned_kept)


class _Replayed(torch.autograd.Function):
    @staticmethod
    def forward(ctx, anchor, replay, record):
        ctx.kept = _replay_forward(replay, record)
        ctx.replay, ctx.record, ctx.anchor_shape = replay, record, anchor.shape
        ctx.anchor_is_input = replay.anchor_is_input
        return torch.empty(record.output_shape, dtype=record.output_dtype, device="cuda")

    @staticmethod
    def backward(ctx, grad):
        _replay_backward(ctx.replay, ctx.record)
        ctx.kept = None
        grad_in = torch.empty(ctx.anchor_shape, dtype=grad.dtype, device="cuda") if ctx.anchor_is_input else None
        return grad_in, None, None


class MicroBatchReplay:
    """Wraps the forward of each model chunk (DDP-wrapped megatron models) for ``num_microbatches`` per step, and
    megatron's combined 1F1B schedule-plan runs (``TransformerModelChunkSchedulePlan.run``) that replace those calls
    when ``overlap_moe_expert_parallel_comm`` is on."""

    def __init__(self, rehearsal, chunks, num_microbatches: int):
        self.r = rehearsal
        self.chunks = chunks
        self.n = num_microbatches
        self.forwards = [0] * len(chunks)
        self.records: list[_Record | None] = [None] * len(chunks)
        self.anchor_is_input = False
        self.replayed = 0
        self._backward = None  # (record, start bytes, collectives index, syncs index) while one is being recorded
        self._unsettled = None  # (record, its allocations alive when its backward started) until _settle_kept
        self._originals = []
        self._anchors = {}
        self._chunk_of_model = {}  # id of each module in a chunk's wrapper chain -> chunk index

    def install(self) -> "MicroBatchReplay":
        for index, chunk in enumerate(self.chunks):
            original = chunk.forward
            self._originals.append((chunk, original))
            chunk.forward = self._wrap(index, original)
            module = chunk
            while module is not None:
                self._chunk_of_model[id(module)] = index
                module = getattr(module, "module", None)
        fake_cuda.observers.backward_step = self._around_backward
        fake_cuda.observers.schedule_plan_run = self._around_plan_run
        return self

    def remove(self) -> None:
        self._settle_kept()
        for chunk, _ in self._originals:
            chunk.__dict__.pop("forward", None)
        self._originals = []
        fake_cuda.observers.backward_step = None
        fake_cuda.observers.schedule_plan_run = None

    def events(self, recorded) -> None:
        collectives, syncs = recorded
        phase = self.r.collectives.phase
        self.r.collectives.records.extend(dataclasses.replace(c, phase=phase) for c in collectives)
        self.r.syncs.events.extend(dataclasses.replace(copy.copy(s), phase=phase) for s in syncs)

    def _marks(self):
        return len(self.r.collectives.records), len(self.r.syncs.events)

    def _since(self, marks):
        return (tuple(self.r.collectives.records[marks[0]:]), tuple(self.r.syncs.events[marks[1]:]))

    def _forward_kind(self, index) -> str:
        """Counts a forward of chunk ``index``: "replay", "record" (micro-batch RECORDED), "measure" (MEASURED, while
        the recorded backward has not run) or "compute"."""
        i = self.forwards[index]
        self.forwards[index] += 1
        record = self.records[index]
        if record is not None and MEASURED < i < self.n - 1:
            return "replay"  # its backward comes after the recorded one's
        if i == MEASURED and record is not None and not record.backward_done:
            return "measure"
        return "record" if i == RECORDED else "compute"

    def _wrap(self, index, original):
        def forward(*args, **kwargs):
            kind = self._forward_kind(index)
            if kind == "replay":
                return self._replay(index, self.records[index])
            if kind != "record":
                return self._measured(index, lambda: original(*args, **kwargs), kind)
            out = self._recorded(index, lambda: original(*args, **kwargs))
            record = self.records[index]
            out.grad_fn.register_prehook(lambda grads: self._start_backward(record))
            return out

        return forward

    def _measured(self, index, forward, kind):
        out = forward()
        if kind == "measure":
            self._estimate_kept(index)
        return out

    def _estimate_kept(self, index):
        """After micro-batch MEASURED's forward: what of the recorded forward's allocations is still alive stands for
        what a replayed forward keeps until the recorded backward says what it frees (which in combined 1F1B may have
        run in the same schedule step, just before this forward)."""
        record, mem = self.records[index], self.r.memory
        if not record.backward_done and (self._unsettled is None or self._unsettled[0] is not record):
            record.kept = _by_category(_alive(mem, record.allocated).values())
            record.output_kept = mem.is_live(record.output_entry)

    def _recorded(self, index, forward):
        mem = self.r.memory
        received = self._decoder_input(index)
        received_before = _storage_bytes(received)
        start, marks, pinned = mem.total, self._marks(), mem.pinned
        mem.region_max = start
        allocated = mem.watch()
        try:
            out = forward()
        finally:
            mem.unwatch()
        received_after = _storage_bytes(received)
        self.records[index] = _Record(tuple(out.shape), out.dtype, out.numel() * out.element_size(), allocated,
                                      mem.entry_of(out), forward_high=mem.region_max - start,
                                      forward_events=self._since(marks), pinned_kept=mem.pinned - pinned,
                                      input_bytes=received_after,
                                      input_released=received_before > 0 and received_after == 0)
        return out

    def chunk_passes(self) -> list[dict]:
        """Per model chunk, what one of its passes holds on the device (measured by the recorded micro-batch):
        ``kept``, what its forward kept for its backward plus its received input; ``backward_high``, its backward's
        high-water mark above what was held when it started; ``forward_high`` the same for its forward."""
        return [{"kept": sum(r.kept.values()) + r.input_bytes, "backward_high": r.backward_high,
                 "forward_high": r.forward_high} if r is not None and r.backward_done else None
                for r in self.records]

    def _decoder_input(self, index):
        return getattr(getattr(_innermost(self.chunks[index]), "decoder", None), "input_tensor", None)

    def _replay(self, index, record):
        self.replayed += 1
        decoder_input = self._decoder_input(index)
        self.anchor_is_input = decoder_input is not None and decoder_input.requires_grad
        if self.anchor_is_input:
            anchor = decoder_input
        else:  # a leaf of our own, not a parameter: megatron DDP's hooks must not see a gradient-less parameter
            anchor = self._anchors.setdefault(index, torch.empty(0, device="cuda", requires_grad=True))
        out = _Replayed.apply(anchor, self, record)
        _release_input(record, decoder_input)
        return out

    def _start_backward(self, record):
        mem = self.r.memory
        mem.region_max = mem.total
        alive = _alive(mem, record.allocated)
        self._backward = (record, mem.total, self._marks(), alive)

    def _finish_backward(self, settle_later: bool = False):
        """The recorded backward is done: its high-water mark and events now; what its forward kept (its allocations
        that the backward freed) now, or with ``settle_later`` at the next schedule step (``_settle_kept``): megatron's
        combined 1F1B frees part of them (the last layer's node outputs) when it drops the schedule plan, after the
        backward's own run."""
        record, start, marks, alive = self._backward
        mem = self.r.memory
        record.backward_high = mem.region_max - start
        record.backward_events = self._since(marks)
        self._backward = None
        self._unsettled = (record, alive)
        if not settle_later:
            self._settle_kept()

    def _settle_kept(self):
        if self._unsettled is None:
            return
        record, alive = self._unsettled
        mem = self.r.memory
        record.kept = _by_category((n - (mem.live(entry) or (0,))[0], category)
                                   for entry, (n, category) in alive.items())
        record.output_kept = record.output_entry in alive and not mem.is_live(record.output_entry)
        record.backward_done = True
        self._unsettled = None

    def _around_backward(self, original, *args, **kwargs):
        out = original(*args, **kwargs)
        if self._backward is not None:
            self._finish_backward()
        return out

    # ----- megatron's combined 1F1B (overlap_moe_expert_parallel_comm) -----

    def _around_plan_run(self, original, f_plan, b_plan, b_grad=None, pre_forward=None, pre_backward=None,
                         post_forward=None, post_backward=None):
        """One step of the combined schedule: micro-batch f's forward of one chunk, layer by layer interleaved with
        micro-batch b's backward of a chunk, between megatron's pipeline hooks. When either is replayed or recorded
        the two run one after the other, b's backward first, then f's forward (the module docstring says what that
        approximates), with the hooks in megatron's order; otherwise megatron's own interleaved run."""
        self._settle_kept()
        f_index = self._chunk_of_model[id(f_plan.state.model)] if f_plan is not None else None
        f_kind = self._forward_kind(f_index) if f_plan is not None else None
        if f_kind in (None, "compute", "measure") and getattr(b_plan, "_replay_tag", None) is None:
            out = original(f_plan, b_plan, b_grad=b_grad, pre_forward=pre_forward, pre_backward=pre_backward,
                           post_forward=post_forward, post_backward=post_backward)
            if f_kind == "measure":
                self._estimate_kept(f_index)
            return out
        if f_plan is not None and pre_forward is not None:
            pre_forward(f_plan.vp_stage)
        if b_plan is not None and pre_backward is not None:
            pre_backward(b_plan.vp_stage)
        input_grad = self._plan_backward(original, b_plan, b_grad) if b_plan is not None else None
        output = self._plan_forward(original, f_plan, f_kind) if f_plan is not None else None
        if f_plan is not None and post_forward is not None:
            post_forward(output, f_plan.vp_stage)  # (the last stage's output, which megatron does not send)
        if b_plan is not None and post_backward is not None:
            post_backward(input_grad, b_plan.vp_stage)
        return output

    def _plan_forward(self, original, plan, kind):
        index = self._chunk_of_model[id(plan.state.model)]
        forward = lambda: original(plan, None)  # noqa: E731 - pre_process, the layers, post_process
        if kind != "replay":
            if kind != "record":
                return self._measured(index, forward, kind)
            out = self._recorded(index, forward)
            plan._replay_tag = ("record", self.records[index])
            return out
        self.replayed += 1
        record = self.records[index]
        plan._replay_kept = _replay_forward(self, record)
        plan._replay_input = self._decoder_input(index)
        plan._replay_tag = ("replay", record)
        _release_input(record, plan._replay_input)
        return torch.empty(record.output_shape, dtype=record.output_dtype, device="cuda", requires_grad=True)

    def _plan_backward(self, original, plan, grad):
        """Runs (or replays) ``plan``'s backward; returns the gradient of its input, which megatron sends back."""
        kind, record = plan.__dict__.pop("_replay_tag", None) or ("compute", None)
        if kind == "replay":
            _replay_backward(self, record)
            plan._replay_kept = None  # what the forward kept
            decoder_input = plan.__dict__.pop("_replay_input")
            if decoder_input is None or not decoder_input.requires_grad:
                return None
            decoder_input.grad = torch.empty_like(decoder_input)
            return decoder_input.grad
        sent = []
        if kind == "record":
            self._start_backward(record)
        original(None, plan, b_grad=grad, post_backward=lambda g, vp_stage=None: sent.append(g))
        if kind == "record":
            self._finish_backward(settle_later=True)
        return sent[0] if sent else None


def _storage_bytes(t) -> int:
    return 0 if t is None else t.untyped_storage().nbytes()


def _release_input(record, received) -> None:
    """A replayed forward frees its received input's storage as the recorded one did: megatron's attn_norm offload
    releases the layer's input (its residual) once copied to the host, although the schedule keeps the tensor."""
    if record.input_released and received is not None:
        received.untyped_storage().resize_(0)


def _alive(memory, entries) -> dict:
    """{entry: (bytes, category)} of those of ``entries`` (storages) still allocated."""
    return {entry: memory.live(entry) for entry in entries if memory.live(entry) is not None}


def _by_category(sizes) -> dict:
    """(bytes, category) pairs -> {category: bytes}."""
    out = {}
    for n, category in sizes:
        out[category] = out.get(category, 0) + n
    return out


def _innermost(chunk):
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk
