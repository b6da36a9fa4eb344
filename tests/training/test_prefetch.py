"""The loop's data off the critical path (k2_megatron.training.prefetch): the next step's micro-batches are read on a
background thread while the current step runs, the saved data position counts only the steps taken, and a pipeline
stage reads only the fields it consumes. Pure Python with a stand-in data source (the loop itself: test_loop.py)."""

from __future__ import annotations

import threading

import pytest
import torch

from k2_megatron.training.prefetch import BATCH_FIELDS, StepBatches, stage_batch_fields

GUARD_SECONDS = 60  # a wait that only a broken implementation reaches (not a timing assertion)


class SlowData:
    """CorpusData's training interface over a counter; the read of ``hold_read`` waits for ``release`` after
    announcing itself with ``reading``. ``log`` records (what, micro-batch, thread name) in order."""

    def __init__(self, hold_read: int | None = None):
        self.position = 0
        self.hold_read = hold_read
        self.reading, self.release = threading.Event(), threading.Event()
        self.log = []

    def next_batch(self, fields=BATCH_FIELDS) -> dict:
        index = self.position
        self.log.append(("read", index, threading.current_thread().name))
        if index == self.hold_read:
            self.reading.set()
            assert self.release.wait(GUARD_SECONDS)
        self.position += 1
        return {k: torch.full((2,), index) for k in fields}

    def state_dict(self) -> dict:
        return {"consumed": self.position}


def test_the_next_step_is_read_while_the_current_step_runs():
    data = SlowData(hold_read=2)  # the first micro-batch of step 2 (2 micro-batches per step)
    batches = StepBatches(data, 2, BATCH_FIELDS, pin_device=None)
    try:
        step1 = batches.take()
        batches.prefetch()
        # "step 1 runs": the read of step 2 has begun on the prefetch thread and is still in flight
        assert data.reading.wait(GUARD_SECONDS), "the next step's read did not start while the step ran"
        assert data.log[2][2].startswith("k2-data-prefetch") and data.log[2][2] != threading.current_thread().name
        assert batches.state_dict() == {"consumed": 2}  # the step read ahead is not counted
        data.release.set()
        step2 = batches.take()
        assert batches.state_dict() == {"consumed": 4}
    finally:
        data.release.set()
        batches.close()
    assert [int(b["tokens"][0]) for b in step1 + step2] == [0, 1, 2, 3]
    assert [r[1] for r in data.log] == [0, 1, 2, 3]  # every micro-batch read once, in order


def test_a_step_read_ahead_but_not_taken_is_not_saved():
    data = SlowData()
    batches = StepBatches(data, 3, BATCH_FIELDS, pin_device=None)
    batches.take()
    batches.prefetch()
    batches.close()  # the run stops after step 1 (its checkpoint is written after this)
    assert data.position == 6 and batches.state_dict() == {"consumed": 3}
    assert [int(b["labels"][0]) for b in batches.take()] == [3, 4, 5]  # what was read ahead is the next step's


def test_without_a_thread_every_step_is_read_on_take():
    data = SlowData()
    batches = StepBatches(data, 2, ("labels",), pin_device=None, background=False)
    batches.prefetch()
    assert data.log == []
    assert [sorted(b) for b in batches.take()] == [["labels"], ["labels"]]
    assert {r[2] for r in data.log} == {threading.current_thread().name}


def test_a_read_error_is_raised_by_the_step_that_needs_it():
    class Exhausted(SlowData):
        def next_batch(self, fields=BATCH_FIELDS):
            if self.position >= 2:
                raise RuntimeError("dataset exhausted")
            return super().next_batch(fields)

    batches = StepBatches(Exhausted(), 2, BATCH_FIELDS, pin_device=None)
    batches.take()
    batches.prefetch()
    with pytest.raises(RuntimeError, match="dataset exhausted"):
        batches.take()
    batches.close()


def test_batches_are_pinned_when_asked(monkeypatch):
    pinned = []  # stand-ins for the pinned copies (pinning needs a CUDA driver)

    def pin_memory(t):
        pinned.append(t.clone())
        return pinned[-1]

    devices = []  # the prefetch thread's current device, set before it pins anything
    monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: devices.append((d, threading.current_thread().name)))
    batches = StepBatches(SlowData(), 2, ("tokens", "labels"), pin_device=3)
    out = batches.take()  # read on this thread
    batches.prefetch()
    out += batches.take()  # read on the prefetch thread
    batches.close()
    assert len(pinned) == 8 and all(any(b[k] is p for p in pinned) for b in out for k in b)
    assert len(devices) == 1 and devices[0][0] == 3 and devices[0][1].startswith("k2-data-prefetch")


@pytest.mark.parametrize("first,last,fields", [
    (True, True, ("tokens", "position_ids", "labels", "loss_mask")),
    (True, False, ("tokens", "position_ids")),
    (False, True, ("labels", "loss_mask")),
    (False, False, ()),
])
def test_each_pipeline_stage_reads_what_it_consumes(first, last, fields):
    assert stage_batch_fields(first, last) == fields
