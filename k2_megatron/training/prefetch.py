"""The training data of the loop's steps, off the critical path: the micro-batches of step k+1 are read by a
background thread while step k runs (``StepBatches``), in pinned host memory when CUDA is available (so that
forward_step's ``.to(device, non_blocking=True)`` is a real asynchronous copy), and a pipeline stage reads only the
fields its model chunks consume (``stage_batch_fields``).

The data position saved in a checkpoint is the one after the steps the loop has taken: a step read ahead but not
taken is not counted (``StepBatches.state_dict``), so a resumed run reads that step again and reproduces the
uninterrupted run exactly.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import torch

BATCH_FIELDS = ("tokens", "position_ids", "labels", "loss_mask")


def stage_batch_fields(first_stage: bool, last_stage: bool) -> tuple[str, ...]:
    """The micro-batch fields a pipeline stage's forward_step uses: the first stage embeds the tokens at their
    positions, the last computes the loss from the labels and the loss mask; a middle stage gets its input from the
    previous stage and reads nothing (megatron's GPTModel ignores input_ids and position_ids off the first stage: MLA's
    rotary embedding depends on the sequence length only; K2 has no multi-token prediction)."""
    return (("tokens", "position_ids") if first_stage else ()) + (("labels", "loss_mask") if last_stage else ())


def pin(batch: dict) -> dict:
    return {k: v.pin_memory() for k, v in batch.items()}


class _Pending:
    """A step being read ahead: the data position before it, and the future of its micro-batches."""

    def __init__(self, state_before: dict, future: Future):
        self.state_before, self.future = state_before, future


class StepBatches:
    """The micro-batches of the loop's steps from ``data`` (CorpusData's interface): ``take()`` returns the next
    step's, read ahead by ``prefetch()`` (a background thread) or read now; ``state_dict()`` is the data position
    after the steps taken. One step is read ahead at most; only this object reads ``data``'s training stream.

    fields: what this stage reads (stage_batch_fields); pin_device: the rank's CUDA device, whose context pins the
    batches (None: not pinned; the thread sets it as its current device, else pinning would create a context on
    device 0, as torch's DataLoader avoids too); background: read ahead on a thread (False: ``prefetch`` does
    nothing, every step is read by ``take``)."""

    def __init__(self, data, num_micro_batches: int, fields: tuple[str, ...], *, pin_device: int | None,
                 background: bool = True):
        self.data, self.num_micro_batches, self.fields = data, num_micro_batches, fields
        self.pin_device = pin_device
        self._executor = None
        if background:
            on_device = {} if pin_device is None else {"initializer": torch.cuda.set_device, "initargs": (pin_device,)}
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="k2-data-prefetch", **on_device)
        self._pending: _Pending | None = None

    def _read_step(self) -> list:
        batches = [self.data.next_batch(self.fields) for _ in range(self.num_micro_batches)]
        return [pin(b) for b in batches] if self.pin_device is not None else batches

    def prefetch(self) -> None:
        """Starts reading the next step's micro-batches in the background (once; no-op without a thread)."""
        if self._executor is None or self._pending is not None:
            return
        state_before = self.data.state_dict()  # no read is in flight: the position is this thread's to read
        self._pending = _Pending(state_before, self._executor.submit(self._read_step))

    def take(self) -> list:
        """The next step's micro-batches (waiting for the read ahead, if one is in flight); the step counts as
        taken from here on. A read error is raised here, for the step that needed it."""
        pending, self._pending = self._pending, None
        if pending is None:
            return self._read_step()
        return pending.future.result()

    def state_dict(self) -> dict:
        """The data position after the steps taken (a step read ahead is not counted)."""
        if self._pending is not None:
            return self._pending.state_before
        return self.data.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Back to the position ``state`` (a ``state_dict()``): a read ahead in flight is waited for and dropped."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.future.exception()  # waits; what it read, or failed to read, is dropped with it
        self.data.load_state_dict(state)

    def close(self) -> None:
        """Waits for a read in flight (kept, not taken: ``state_dict`` still excludes it) and stops the thread."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)


__all__ = ["BATCH_FIELDS", "StepBatches", "stage_batch_fields"]
