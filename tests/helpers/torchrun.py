"""Runs of the pretraining entry point as users launch it (not collected): ``torchrun --nproc-per-node N
examples/pretrain_k2.py overrides...`` on the CPU (gloo), started or run to the end, and what a run leaves behind
(its ``metrics.jsonl`` rows)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile

import pytest

from tests.helpers import REPO_ROOT

# A tiny pretraining run: k2-tiny at seq 64, 512 tokens (8 samples) per step, no periodic validation.
TINY_RUN = ("data.seq_length=64", "train.global_batch_tokens=512", "train.micro_batch_size=4",
            "train.eval_micro_batches=2", "train.eval_interval=0", "optim.warmup_steps=2", "output.progress_bar=false")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command(out_dir, *overrides: str, nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
            "127.0.0.1", "--master-port", str(_free_port()), str(REPO_ROOT / "examples" / "pretrain_k2.py"),
            f"output.dir={out_dir}", *TINY_RUN, *overrides]


def _environment() -> dict:
    # CUDA hidden: gloo and the CPU path even on a GPU machine; one thread per rank on a 2-core machine
    return dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", TORCHDYNAMO_DISABLE="1")


class TorchrunJob:
    """A torchrun job running in the background, its output going to two files (not pipes, which a chatty job
    would fill and block on while a test waits for something else)."""

    def __init__(self, out_dir, overrides, nproc: int, *, command: list[str] | None = None, env: dict | None = None):
        self._logs = [tempfile.TemporaryFile("w+", encoding="utf-8") for _ in range(2)]
        self.proc = subprocess.Popen(command or _command(out_dir, *overrides, nproc=nproc),
                                     env=dict(_environment(), **(env or {})), stdout=self._logs[0],
                                     stderr=self._logs[1])

    def output(self) -> tuple[str, str]:
        """(stdout, stderr) so far."""
        texts = []
        for log in self._logs:
            log.flush()
            log.seek(0)
            texts.append(log.read())
        return texts[0], texts[1]

    def finish(self, timeout: float = 300) -> tuple[str, str]:
        """(stdout, stderr) once the job has ended; fails the test if it runs past ``timeout``."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            out, err = self.output()
            pytest.fail(f"the torchrun job did not end within {timeout} s (a deadlock?):\n{out[-2000:]}{err[-2000:]}")
        return self.output()

    def close(self) -> None:
        """Kills whatever is left of the job (its workers, which torchrun starts in sessions of their own, then the
        agent) and closes the logs."""
        import psutil

        try:
            workers = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            workers = []
        for worker in workers:
            with contextlib.suppress(psutil.NoSuchProcess):
                worker.kill()
        psutil.wait_procs(workers, timeout=30)
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for log in self._logs:
            log.close()


@contextlib.contextmanager
def torchrun_job(out_dir, *overrides: str, nproc: int = 2):
    """A TorchrunJob for the block; nothing of it is left running after the block, whatever happened in it."""
    job = TorchrunJob(out_dir, overrides, nproc)
    try:
        yield job
    finally:
        job.close()


@contextlib.contextmanager
def pretrain_process(out_dir, *overrides: str, env: dict | None = None):
    """``k2-pretrain`` as one process (``python -m k2_megatron.training.pretrain``, no torchrun) running a tiny run in
    the background for the block (a TorchrunJob's interface); ``env``: added to its environment."""
    command = [sys.executable, "-m", "k2_megatron.training.pretrain", f"output.dir={out_dir}", *TINY_RUN, *overrides]
    job = TorchrunJob(out_dir, overrides, 1, command=command, env=env)
    try:
        yield job
    finally:
        job.close()


def run_torchrun(out_dir, *overrides: str, nproc: int = 2, timeout: float = 300) -> str:
    """A torchrun job run to its end; its stdout. Fails the test, with the job's output, unless it exits with 0."""
    with torchrun_job(out_dir, *overrides, nproc=nproc) as job:
        stdout, stderr = job.finish(timeout)
    assert job.proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    return stdout


def train_rows(out_dir) -> list[dict]:
    """The per-step rows a run (and any run resumed in the same output directory) appended to metrics.jsonl."""
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.endswith("\n")]  # a line being written is left out
    return [r for r in rows if r["kind"] == "train"]
