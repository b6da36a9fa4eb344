"""The pretraining entry point under ``torchrun --nproc-per-node 2`` (gloo, CPU), stopped by a real SIGTERM in the
middle of a run and resumed: every rank stops after the same step and saves one checkpoint, and the resumed run
reproduces the uninterrupted run's losses and grad norms bit for bit over the several steps after the resume.

PP2: SIGTERM to torchrun itself (what a scheduler does; torchrun passes it on to every worker). EP2 (experts split
over the two data-parallel ranks): SIGTERM to the rank-1 worker only; rank 0 learns of it from the stop flag the
ranks agree on after each step. Tested through the public entry point only (examples/pretrain_k2.py = k2-pretrain).
"""

from __future__ import annotations

import signal
import time

import pytest

from tests.helpers.torchrun import run_torchrun, torchrun_job, train_rows

from k2_megatron.checkpoint.megatron import latest_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

ITERS = 10
SIGNAL_AFTER = 2  # the signal goes out once this many steps are logged; the run stops a step or two later
LAYOUTS = {"PP2": ("parallel.pipeline=2",), "EP2": ("parallel.expert=2",)}


def _wait_for_steps(job, out_dir, steps: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while len(train_rows(out_dir)) < steps:
        if job.proc.poll() is not None:
            out, err = job.output()
            pytest.fail(f"the run ended (code {job.proc.returncode}) before step {steps}:\n{out[-3000:]}{err[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"no step {steps} after {timeout} s")
        time.sleep(0.1)


def _rank1_worker(job):
    """The worker process of rank 1 of the torchrun job."""
    import psutil

    workers = [p for p in psutil.Process(job.proc.pid).children(recursive=True) if p.environ().get("RANK") == "1"]
    assert len(workers) == 1, workers
    return workers[0]


def _stop_and_resume(tmp_path, layout: str, deliver) -> tuple[int, str]:
    """Reference run; a run that ``deliver`` signals after step SIGNAL_AFTER; its resumption to the end. Returns the
    step the run stopped after and its stdout."""
    overrides = (*LAYOUTS[layout], f"train.iters={ITERS}", "output.plot=false", "output.tensorboard=false")
    run_torchrun(tmp_path / "reference", *overrides, "checkpoint.save_at_end=false")
    reference = train_rows(tmp_path / "reference")
    assert [r["step"] for r in reference] == list(range(1, ITERS + 1))

    out_dir = tmp_path / "run"
    with torchrun_job(out_dir, *overrides) as job:
        _wait_for_steps(job, out_dir, SIGNAL_AFTER)
        deliver(job)
        stdout, stderr = job.finish()
    stopped = len(train_rows(out_dir))
    assert SIGNAL_AFTER <= stopped < ITERS, (stopped, stdout[-2000:], stderr[-2000:])
    # one checkpoint, after the step every rank stopped at (a rank that went on would hang the others' save)
    checkpoint = out_dir / "checkpoints" / f"iter_{stopped:07d}"
    assert latest_checkpoint(str(out_dir / "checkpoints")) == str(checkpoint), stdout[-2000:] + stderr[-2000:]

    resumed = run_torchrun(out_dir, *overrides)
    assert f"resumed from {checkpoint} at step {stopped}" in resumed
    rows = train_rows(out_dir)
    assert [r["step"] for r in rows] == list(range(1, ITERS + 1))
    for key in ("loss", "grad_norm", "lr"):  # bit for bit, over every step after the resume
        differ = [r["step"] for r, want in zip(rows, reference) if r[key] != want[key]]
        assert not differ, f"{key} differs from the uninterrupted run at steps {differ} (stopped after {stopped})"
    return stopped, stdout


def test_sigterm_to_torchrun_under_pipeline_parallel(tmp_path):
    stopped, stdout = _stop_and_resume(tmp_path, "PP2", lambda job: job.proc.send_signal(signal.SIGTERM))
    assert f"stopped by SIGTERM after step {stopped}" in stdout


def test_sigterm_to_one_rank_under_expert_parallel(tmp_path):
    def terminate_rank1(job):
        _rank1_worker(job).send_signal(signal.SIGTERM)

    stopped, stdout = _stop_and_resume(tmp_path, "EP2", terminate_rank1)
    # rank 0 (which prints) was not signalled: it stopped because rank 1 was
    assert f"stopped by another rank after step {stopped}" in stdout
