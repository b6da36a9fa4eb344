"""A run is never lost (k2_megatron.training.trainer.Trainer.run, k2_megatron.training.pretrain.main), on CPU in this
process, k2-tiny for a few steps:

- asynchronous checkpoints: the step after a save runs while its writer is held at a gate (a synchronous save would
  wait at the gate and fail); a stop signal whose grace period ends while the save is held abandons it cleanly, and
  ``latest`` names the previous checkpoint, from which the run resumes; a run that fails kills its writer;
- a SIGTERM during the final validation or the final checkpoint still leaves the final checkpoint (the handler is
  installed until the end; the checkpoint is started before the validation);
- directories that cannot be written and a validation set too small for train.eval_micro_batches are one line,
  exit 2, before the model is built;
- non-finite gradients: the run stops with exit 4 naming the step and the parameter, after saving the state before
  that step (a resume reproduces the uninterrupted run bit for bit); with optim.nonfinite=skip, steps are skipped
  up to optim.max_skipped_steps;
- a stopped run exits 3 and prints the command that resumes it, which does.
"""

from __future__ import annotations

import os
import shlex
import signal

import pytest

from tests.helpers.checkpoint import gated_writer
from tests.helpers.model import require_no_cuda
from tests.helpers.torchrun import TINY_RUN

from k2_megatron.config import load_config

pytestmark = pytest.mark.slow  # every test builds k2-tiny and most train it for a few steps

QUIET = ("output.plot=false", "output.tensorboard=false")


def _overrides(out_dir, *extra) -> list[str]:
    return [f"output.dir={out_dir}", *TINY_RUN, *QUIET, *extra]


def _cfg(out_dir, *extra):
    return load_config(None, _overrides(out_dir, *extra))


@pytest.fixture(autouse=True)
def _cpu_only():
    require_no_cuda()


def _children() -> set[int]:
    import psutil

    return {p.pid for p in psutil.Process().children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE}


@pytest.fixture
def new_children():
    """The test's own live child processes: what earlier tests of the session started and keep (multiprocessing's
    resource_tracker of the spawn context, for one) is not the run's."""
    before = _children()
    return lambda: sorted(_children() - before)


def _run(trainer) -> dict:
    try:
        trainer.setup()
        return trainer.run()
    finally:
        trainer.close()


def _latest(out_dir) -> str | None:
    from k2_megatron.checkpoint.megatron import latest_checkpoint

    return latest_checkpoint(str(out_dir / "checkpoints"))


def _iter_dir(out_dir, step: int) -> str:
    return str(out_dir / "checkpoints" / f"iter_{step:07d}")


# ----- asynchronous checkpoints -----

def test_the_next_step_runs_while_the_checkpoint_is_written(tmp_path, monkeypatch, new_children):
    from k2_megatron.checkpoint import writer
    from k2_megatron.training.trainer import Trainer

    gate = tmp_path / "gate"  # the writer of step 1 waits for it; step 2 opens it
    monkeypatch.setattr(writer, "_write_then_hash", gated_writer(str(gate), only="0000001", timeout=60))
    events, during = [], {}

    def on_step(step, metrics):
        events.append(("step", step))
        if step == 2:
            during.update(pending=trainer.checkpointer.pending_step, latest=_latest(tmp_path / "run"),
                          writers=len(trainer.checkpointer.writer_pids()))
            gate.touch()

    trainer = Trainer(_cfg(tmp_path / "run", "train.iters=3", "checkpoint.save_interval=1"), step_callback=on_step,
                      _before_publish=lambda tmp_dir: events.append(("publish", int(tmp_dir[-7:]))))
    result = _run(trainer)
    assert during == {"pending": 1, "latest": None, "writers": 1}  # step 2 ran with step 1's writer at work
    assert events.index(("publish", 1)) > events.index(("step", 2))
    assert [e for e in events if e[0] == "publish"] == [("publish", 1), ("publish", 2), ("publish", 3)]
    assert result["stopped_by"] is None and result["checkpoint"] == _iter_dir(tmp_path / "run", 3)
    assert new_children() == []  # the run waited for its last save


def test_sigterm_with_a_grace_too_short_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys, new_children):
    from k2_megatron.checkpoint import writer
    from k2_megatron.training.pretrain import pretrain
    from k2_megatron.training.trainer import Trainer

    out = tmp_path / "run"
    args = ("train.iters=4", "checkpoint.save_interval=2", "data.train_samples=32")
    monkeypatch.setattr(writer, "_write_then_hash", gated_writer(str(tmp_path / "never"), only="0000003"))

    def terminate_at_3(step, metrics):
        if step == 3:
            trainer.finish_saves()  # step 2's checkpoint published: the one SIGTERM must keep
            os.kill(os.getpid(), signal.SIGTERM)

    trainer = Trainer(_cfg(out, *args, "checkpoint.sigterm_grace_seconds=0.5"), step_callback=terminate_at_3)
    result = _run(trainer)
    assert result["stopped_by"] == "SIGTERM" and result["final_step"] == 3
    assert "the checkpoint of step 3 was not written within checkpoint.sigterm_grace_seconds=0.5" in \
        capsys.readouterr().out
    assert result["checkpoint"] == _latest(out) == _iter_dir(out, 2)
    assert sorted(os.listdir(out / "checkpoints")) == ["iter_0000002", "latest"]  # nothing of step 3's save
    assert new_children() == []  # its writer killed
    monkeypatch.undo()
    resumed = pretrain(_cfg(out, *args))  # `latest` is complete: the run goes on from step 2
    assert len(resumed["losses"]) == 2 and resumed["final_step"] == 4


def test_a_run_that_fails_with_a_save_in_flight_leaves_no_writer(tmp_path, monkeypatch, new_children):
    from k2_megatron.checkpoint import writer
    from k2_megatron.training.pretrain import pretrain

    # the gate never opens; the timeout only ends a writer that was not killed (else pytest would wait for it)
    monkeypatch.setattr(writer, "_write_then_hash", gated_writer(str(tmp_path / "never"), timeout=60))

    def fail_at_2(step, metrics):
        if step == 2:
            raise RuntimeError("a failure while step 1's checkpoint is written")

    with pytest.raises(RuntimeError, match="a failure while"):
        pretrain(_cfg(tmp_path / "run", "train.iters=3", "checkpoint.save_interval=1"), step_callback=fail_at_2)
    assert new_children() == []  # killed, not waited for (its gate never opens)
    assert _latest(tmp_path / "run") is None  # never published; the next save removes its temporary directory


# ----- a signal after the last step -----

class _Killed(Exception):
    """What SIGTERM's default action would do to the process, made visible."""


@pytest.fixture
def fatal_sigterm():
    """SIGTERM kills (raises _Killed) unless the run handles it."""
    def fatal(signum, frame):
        raise _Killed(signal.Signals(signum).name)

    previous = signal.signal(signal.SIGTERM, fatal)
    yield
    signal.signal(signal.SIGTERM, previous)


@pytest.mark.parametrize("during", ["final validation", "final checkpoint"])
def test_sigterm_after_the_last_step_leaves_the_final_checkpoint(tmp_path, monkeypatch, fatal_sigterm, during):
    from k2_megatron.training.pretrain import pretrain
    from k2_megatron.training.trainer import Trainer

    out, hook = tmp_path / "run", None
    if during == "final validation":
        evaluate = Trainer.evaluate

        def evaluate_terminated(self):
            os.kill(os.getpid(), signal.SIGTERM)
            return evaluate(self)

        monkeypatch.setattr(Trainer, "evaluate", evaluate_terminated)
        extra = ()
    else:  # a synchronous save: the signal comes before it is published, the validation is still to come
        hook, extra = (lambda tmp_dir: os.kill(os.getpid(), signal.SIGTERM)), ("checkpoint.async_save=false",)
    result = pretrain(_cfg(out, "train.iters=2", *extra), _before_publish=hook)
    assert _latest(out) == result["checkpoint"] == _iter_dir(out, 2)
    if during == "final validation":  # begun before the signal: it ends, and so does the run
        assert result["stopped_by"] is None and [s for s, _ in result["valid"]] == [2]
    else:  # skipped: the run is stopped, a resume does the validation
        assert result["stopped_by"] == "SIGTERM" and result["valid"] == []
        resumed = pretrain(_cfg(out, "train.iters=2"))
        assert resumed["losses"] == [] and [s for s, _ in resumed["valid"]] == [2]


# ----- startup checks -----

def _file(tmp_path):
    path = tmp_path / "a_file"
    path.write_text("not a directory")
    return path


@pytest.mark.parametrize("case", ["checkpoint.dir", "output.dir", "data.cache_dir", "train.eval_micro_batches",
                                  "checkpoint.load"])
def test_paths_and_sizes_are_checked_before_the_model_is_built(tmp_path, monkeypatch, capsys, case):
    from k2_megatron.training import pretrain as cli
    from k2_megatron.training.trainer import Trainer

    def build_model(self):
        raise AssertionError("the model was built before the check")

    monkeypatch.setattr(Trainer, "build_model", build_model)
    out = tmp_path / "run"
    bad = {"checkpoint.dir": f"checkpoint.dir={_file(tmp_path) / 'ckpt'}",
           "output.dir": f"output.dir={_file(tmp_path) / 'run'}",
           "data.cache_dir": f"data.cache_dir={_file(tmp_path) / 'cache'}",
           "train.eval_micro_batches": "train.eval_micro_batches=100000",
           "checkpoint.load": f"checkpoint.load={tmp_path / 'nowhere'}"}[case]
    assert cli.main(_overrides(out, "train.iters=2", bad)) == cli.EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"config error: {case}=" in err, err
    if case == "train.eval_micro_batches":
        assert "the validation set holds" in err
    elif case != "checkpoint.load":
        assert "not a writable directory (Not a directory" in err


# ----- non-finite gradients -----

POISONED = "decoder.layers.1.self_attention.linear_proj.weight"


def _poison_steps(monkeypatch, steps: set[int]) -> None:
    """The gradient of POISONED gets a NaN in the given steps (1-based)."""
    from k2_megatron.training.trainer import Trainer

    forward_backward = Trainer.forward_backward

    def poisoned(self, batches):
        out = forward_backward(self, batches)
        if self.iteration + 1 in steps:
            dict(self.chunks[0].module.named_parameters())[POISONED].main_grad.view(-1)[5] = float("nan")
        return out

    monkeypatch.setattr(Trainer, "forward_backward", poisoned)


def test_a_nonfinite_step_stops_the_run_after_saving_the_state_before_it(tmp_path, monkeypatch, capsys):
    from k2_megatron.training import pretrain as cli

    reference = cli.pretrain(_cfg(tmp_path / "ref", "train.iters=3", "checkpoint.save_at_end=false"))["losses"]
    out = tmp_path / "run"
    _poison_steps(monkeypatch, {3})
    assert cli.main(_overrides(out, "train.iters=3")) == cli.EXIT_NONFINITE
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"k2-pretrain: step 3: MuonClip: non-finite gradients on at least one rank (first on this "
                          f"rank: {POISONED}); nothing was updated. The state before it is saved: "
                          f"{_iter_dir(out, 2)} (step 2)") and "optim.nonfinite=skip" in err, err
    monkeypatch.undo()
    resumed = cli.pretrain(_cfg(out, "train.iters=3"))  # model, optimizer, data, expert biases of step 2
    assert resumed["losses"] == reference[2:]


def test_nonfinite_steps_are_skipped_up_to_the_limit(tmp_path, monkeypatch, capsys):
    from k2_megatron.optim import NonFiniteGradientError
    from k2_megatron.training.pretrain import pretrain

    out = tmp_path / "run"
    _poison_steps(monkeypatch, {2, 3})
    with pytest.raises(NonFiniteGradientError, match=r"^step 3: 2 steps skipped for non-finite gradients, more than "
                       rf"optim.max_skipped_steps=1 \(this one: first on this rank: {POISONED}\)\. The state before "
                       rf"it is saved: {_iter_dir(out, 3)} \(step 3\)"):
        pretrain(_cfg(out, "train.iters=4", "optim.nonfinite=skip", "optim.max_skipped_steps=1"))
    assert (f"step 2: non-finite gradients (first on this rank: {POISONED}); 1 step(s) skipped since the run "
            "started, at most optim.max_skipped_steps=1") in capsys.readouterr().out
    assert _latest(out) == _iter_dir(out, 3)


# ----- the exit status of a stopped run -----

def test_a_stopped_run_exits_3_and_prints_the_command_that_resumes_it(tmp_path, monkeypatch, capsys):
    from k2_megatron.training import pretrain as cli

    out = tmp_path / "run"
    monkeypatch.setattr("sys.argv", ["/somewhere/k2_megatron/training/pretrain.py"])  # as `python -m` sets it
    argv = _overrides(out, "train.iters=3", "checkpoint.resume=false", "train.max_wall_seconds=0.001")
    assert cli.main(argv) == cli.EXIT_STOPPED  # after step 1: setup alone outlasts 1 ms
    line = capsys.readouterr().out.strip().splitlines()[-1]
    prefix = (f"k2-pretrain: stopped by max_wall_seconds after step 1 of 3; checkpoint {_iter_dir(out, 1)}; "
              "resume with: ")
    assert line.startswith(prefix), line
    words = shlex.split(line[len(prefix):])
    assert words == ["python", "-m", "k2_megatron.training.pretrain", *argv, "checkpoint.resume=true"]
    resume = [w for w in words[3:] if not w.startswith("train.max_wall_seconds=")]  # else it stops again
    assert cli.main(resume) == 0
    assert f"resumed from {_iter_dir(out, 1)} at step 1" in capsys.readouterr().out
