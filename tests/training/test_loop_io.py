"""What the training loop (k2_megatron.training.trainer) does besides computing, kept off the critical path and bounded
as runs grow (k2-tiny on the CPU; order of events and counts, never timings):

- the next step's micro-batches are read on a background thread while the current step runs, and a pipeline stage
  reads only the fields it consumes (a middle stage nothing);
- per step: one reduction and one host read of the loss, the per-layer figures only at logged steps (one table
  reduced over the pipeline group, no pickled objects), one host read for MuonClip's finiteness checks;
- k2_meta.json does not grow with the step; a resumed run cuts metrics.jsonl back to its checkpoint (no step twice)
  and rebuilds its history from it; TensorBoard gets the per-layer scalars at logged steps only;
- a save returns while the checkpoints it pruned are still being deleted.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import threading
from collections import Counter

import pytest

from tests.helpers.model import require_no_cuda
from tests.helpers.torchrun import TINY_RUN

pytestmark = pytest.mark.slow  # every test trains k2-tiny for a few steps

GUARD_SECONDS = 120  # a wait only a broken implementation runs into (not a timing assertion)
GLOBAL_BATCH = 8  # TINY_RUN: 512 tokens per step of 64-token samples
_QUIET = ("output.plot=false", "output.tensorboard=false", "checkpoint.save_at_end=false")


def _cfg(out_dir, *extra):
    from k2_megatron.config import load_config

    return load_config(None, [f"output.dir={out_dir}", *TINY_RUN, *extra])


@pytest.fixture(autouse=True)
def _cpu_only():
    require_no_cuda()


def _rows(out_dir, kind: str) -> list[dict]:
    with open(os.path.join(out_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [r for r in map(json.loads, f) if r["kind"] == kind]


# ----- data off the critical path -----

def test_the_next_steps_batches_are_read_while_a_step_runs(tmp_path):
    from k2_megatron.training.prefetch import BATCH_FIELDS
    from k2_megatron.training.trainer import CorpusData, Trainer

    main = threading.current_thread()
    next_step_read = threading.Event()
    reads = []

    class Recording(CorpusData):
        def next_batch(self, fields=BATCH_FIELDS):
            consumed = self.stream.consumed_samples
            reads.append((consumed, threading.current_thread() is main))
            if consumed >= GLOBAL_BATCH and threading.current_thread() is not main:
                next_step_read.set()
            return super().next_batch(fields)

    trainer = Trainer(_cfg(tmp_path, "train.iters=3", *_QUIET), data=Recording)
    overlapped = []
    try:
        trainer.setup()
        forward_backward = trainer.forward_backward

        def step_running(batches):
            if trainer.iteration == 0:  # step 1 runs: step 2's read must begin meanwhile, on another thread
                overlapped.append(next_step_read.wait(GUARD_SECONDS))
            return forward_backward(batches)

        trainer.forward_backward = step_running
        losses = [trainer.step()["loss"] for _ in range(3)]
    finally:
        trainer.close()
    assert overlapped == [True], "step 2's micro-batches were not read while step 1 ran"
    # each micro-batch read once, in order; only step 1's on the loop's own thread; nothing past the last step
    assert [c for c, _ in reads] == [i * 4 for i in range(6)]
    assert [on_main for _, on_main in reads] == [True, True] + [False] * 4
    assert len(losses) == 3


# ----- per-step collectives and host reads; the stages' reads (PP3, gloo) -----

ITERS, LOG_INTERVAL = 4, 2
HOST_READS = ("item", "tolist", "__float__", "__bool__", "__int__")
COUNTED_FILES = ("k2_megatron/training/trainer.py", "k2_megatron/megatron/optimizer.py")


def _pipeline_steps(rank: int, world: int, port: int, out_dir: str) -> dict:
    """One rank of PP3 (a layer per stage): ITERS steps and a validation; what it read and, per step, its
    collectives (in step_metrics, and pickled objects anywhere in the step) and host reads by our loop's code."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    from k2_megatron.training.prefetch import BATCH_FIELDS
    from k2_megatron.training.trainer import CorpusData, Trainer

    read = {"train": set(), "valid": set()}

    class Recording(CorpusData):
        def next_batch(self, fields=BATCH_FIELDS):
            batch = super().next_batch(fields)
            read["train"].add(tuple(sorted(batch)))
            return batch

        def validation_batches(self, fields=BATCH_FIELDS):
            batches = super().validation_batches(fields)
            read["valid"].update(tuple(sorted(b)) for b in batches)
            return batches

    cfg = _cfg(out_dir, "parallel.pipeline=3", "model.overrides.num_hidden_layers=3", "train.micro_batch_size=2",
               f"train.iters={ITERS}", f"train.log_interval={LOG_INTERVAL}", *_QUIET)
    trainer = Trainer(cfg, data=Recording)
    counts = Counter()
    where = {"phase": None}
    try:
        trainer.setup()
        pipeline = parallel_state.get_pipeline_model_parallel_group()

        def counting(name, fn):
            def call(*args, **kwargs):
                group = kwargs.get("group")
                label = "world" if group is None else "pipeline" if group is pipeline else "other"
                if where["phase"] == "step_metrics" or (where["phase"] and name == "all_gather_object"):
                    counts[(where["phase"], name, label)] += 1
                return fn(*args, **kwargs)
            return call

        def host_read(name, fn):
            def read(tensor, *args, **kwargs):
                caller = sys._getframe(1).f_code.co_filename.replace(os.sep, "/")
                if where["phase"] is not None and caller.endswith(COUNTED_FILES):
                    counts[("step", "host read", caller.rsplit("/", 1)[-1])] += 1
                return fn(tensor, *args, **kwargs)
            return read

        for name in ("all_reduce", "all_gather_object"):
            setattr(dist, name, counting(name, getattr(dist, name)))
        for name in HOST_READS:
            setattr(torch.Tensor, name, host_read(name, getattr(torch.Tensor, name)))
        step_metrics = trainer.step_metrics

        def in_metrics(*args):
            where["phase"] = "step_metrics"
            try:
                return step_metrics(*args)
            finally:
                where["phase"] = "step"

        trainer.step_metrics = in_metrics
        metrics = []
        for _ in range(ITERS):
            where["phase"] = "step"
            metrics.append(trainer.step())
            where["phase"] = None
        valid = trainer.evaluate()
    finally:
        trainer.close()
    return {"read": read, "counts": dict(counts), "metrics": metrics, "valid": valid}


@pytest.mark.distributed
def test_pipeline_stages_read_their_fields_and_a_step_reduces_and_reads_once(tmp_path):
    from tests.helpers.model import run_gloo_bodies

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    world = 3
    results = run_gloo_bodies(_pipeline_steps, world, lambda rank: (rank, world, port, str(tmp_path)), timeout=600)
    first, middle, last = (r["read"] for r in results)
    assert first == {"train": {("position_ids", "tokens")}, "valid": {("position_ids", "tokens")}}
    assert middle == {"train": {()}, "valid": {()}}  # the middle stage reads nothing
    assert last == {"train": {("labels", "loss_mask")}, "valid": {("labels", "loss_mask")}}
    logged = ITERS // LOG_INTERVAL
    for rank, r in enumerate(results):
        counts = r["counts"]
        assert not [k for k in counts if k[1] == "all_gather_object"], (rank, counts)  # no pickles in a step
        assert counts[("step_metrics", "all_reduce", "world")] == ITERS, (rank, counts)  # the loss
        assert counts[("step_metrics", "all_reduce", "pipeline")] == logged, (rank, counts)  # the layer table
        assert counts[("step", "host read", "trainer.py")] == ITERS, (rank, counts)
        assert counts[("step", "host read", "optimizer.py")] == ITERS, (rank, counts)
        assert len(counts) == 4, (rank, counts)
    # the figures are global and the same on every rank; the per-layer ones at logged steps only
    reference = results[-1]["metrics"]
    for r in results:
        assert r["valid"] == results[-1]["valid"]
        for got, want in zip(r["metrics"], reference):
            assert {k: v for k, v in got.items() if k != "tokens_per_s"} == \
                {k: v for k, v in want.items() if k != "tokens_per_s"}
    for m in reference:
        has_layers = m["step"] % LOG_INTERVAL == 0
        assert set(m["max_logits"]) == ({f"layers.{i}.self_attention" for i in range(3)} if has_layers else set())
        assert set(m["expert_load"]) == ({"layers.1", "layers.2"} if has_layers else set())
        assert (m["max_logit"] is not None) == has_layers and all(v >= 1.0 for v in m["expert_load"].values())


# ----- metrics and checkpoint metadata -----

def test_checkpoint_meta_is_constant_size_and_a_resumed_run_logs_each_step_once(tmp_path, capsys):
    from k2_megatron.training.pretrain import pretrain

    reference = pretrain(_cfg(tmp_path / "ref", "train.iters=6", "train.log_interval=3", "output.plot=false",
                              "checkpoint.save_at_end=false"))
    # TensorBoard: the step's scalars every step, the per-layer ones (4 layers, 3 of them MoE) at logged steps only
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "ref" / "tensorboard"))
    events.Reload()
    steps = {tag: [e.step for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    per_layer = {tag: s for tag, s in steps.items() if tag.count("/") == 2}
    assert len(per_layer) == 4 + 4 + 3 and all(s == [3, 6] for s in per_layer.values()), per_layer
    assert steps["train/loss"] == list(range(1, 7)) and steps["qk/max_logit"] == [3, 6]

    class Crash(RuntimeError):
        pass

    def crash_after_3(step, metrics):
        if step == 3:  # step 3 is logged, not saved
            raise Crash

    run = ("train.iters=6", "checkpoint.save_interval=2", "checkpoint.keep=3", "output.tensorboard=false")
    with pytest.raises(Crash):
        pretrain(_cfg(tmp_path / "run", *run), step_callback=crash_after_3)
    assert [r["step"] for r in _rows(tmp_path / "run", "train")] == [1, 2, 3]
    resumed = pretrain(_cfg(tmp_path / "run", *run))
    root = tmp_path / "run" / "checkpoints"
    assert f"resumed from {root / 'iter_0000002'} at step 2" in capsys.readouterr().out
    train = _rows(tmp_path / "run", "train")
    assert [r["step"] for r in train] == list(range(1, 7))  # step 3 once: cut back to the checkpoint, then retrained
    assert [r["loss"] for r in train] == reference["losses"]
    assert [r["loss"] for r in resumed["history"]["train"]] == reference["losses"]  # rebuilt from metrics.jsonl
    assert [(r["step"], r["loss"]) for r in _rows(tmp_path / "run", "valid")] == reference["valid"]
    assert os.path.isfile(resumed["plot"])
    metas = {step: root / f"iter_{step:07d}" / "k2_meta.json" for step in (2, 4, 6)}
    sizes = {step: os.path.getsize(path) for step, path in metas.items()}
    assert max(sizes.values()) - min(sizes.values()) <= 4, sizes
    assert "history" not in json.loads(metas[6].read_text())


# ----- pruning -----

def test_a_save_returns_before_the_checkpoints_it_pruned_are_deleted(tmp_path, monkeypatch):
    from k2_megatron.checkpoint import trash
    from k2_megatron.checkpoint.megatron import latest_checkpoint
    from k2_megatron.training.pretrain import pretrain

    release, deleting = threading.Event(), []

    def held_rmtree(path):
        deleting.append(os.path.basename(path))
        assert release.wait(GUARD_SECONDS)
        shutil.rmtree(path)

    monkeypatch.setattr(trash, "_rmtree", held_rmtree)
    root = tmp_path / "checkpoints"
    try:
        pretrain(_cfg(tmp_path, "train.iters=3", "checkpoint.save_interval=1", "checkpoint.keep=1", *_QUIET))
        # every save returned (and the run ended) while the deletions of the pruned checkpoints were held
        names = sorted(os.listdir(root))
        assert latest_checkpoint(str(root)) == str(root / "iter_0000003")
        assert [n for n in names if n.startswith("iter_")] == ["iter_0000003"]
        trashed = [n for n in names if n.startswith(trash.TRASH_PREFIX)]
        assert sorted(n.split("-")[1] for n in trashed) == ["iter_0000001", "iter_0000002"]
    finally:
        release.set()
        assert trash.wait(GUARD_SECONDS)
    assert sorted(os.listdir(root)) == ["iter_0000003", "latest"]
    assert sorted(n.split("-")[1] for n in deleting) == ["iter_0000001", "iter_0000002"]
