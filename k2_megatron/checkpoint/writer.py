"""Running megatron dist_checkpointing's save request: in this process, or in a forked writer process while
training goes on, with nothing of ours outliving the trainer.

``dist_checkpointing.save(..., async_sharded_save=True)`` plans the save on every rank (collectively) and returns
an AsyncRequest: a write function (each rank writes its own files), megatron's copy of device tensors to host
memory, and finalize functions to run on every rank once every rank's write is done (gather the write results,
rank 0 writes DCP's ``.metadata`` and megatron's ``metadata.json``; then ours, which publishes). ``start`` runs it:

- synchronously: megatron's ``execute_sync`` (copy, write, barrier, finalize) in this process;
- asynchronously: megatron's AsyncCallsQueue with its TemporalAsyncCaller, which copies device tensors to host
  memory, forks a writer process and returns; ``poll`` (collective: one all-reduce) finalizes once every rank's
  writer has exited; ``abandon`` kills the writers.

In both, each rank's write is followed by SHA-256s of the files it wrote (k2_megatron.checkpoint.integrity), in
the writer. Two things megatron-core 0.19.2 would leave behind are avoided: its writer hands its results back
through a queue served by a spawned ``multiprocessing`` Manager (a ~560 MB process that outlives a killed trainer,
with a resource_tracker) -- here a file per rank next to the checkpoint (``ResultFile``); and a forked writer
survives its parent -- here it asks the kernel (prctl PR_SET_PDEATHSIG) to be killed when the trainer dies.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pickle
import queue
import signal

from k2_megatron.checkpoint import integrity

_PR_SET_PDEATHSIG = 1


class ResultFile:
    """The queue megatron's writer puts its results in (one item per save and rank), as a file: works across the
    fork and leaves no process behind. The file is our own, written moments before it is read."""

    def __init__(self, path: str):
        self.path = path

    def put(self, item) -> None:
        tmp = f"{self.path}.tmp"
        with open(tmp, "wb") as f:
            pickle.dump(item, f)
        os.replace(tmp, self.path)

    def get_nowait(self):
        try:
            with open(self.path, "rb") as f:
                return pickle.load(f)
        except FileNotFoundError:
            raise queue.Empty from None


@contextlib.contextmanager
def results_through_file(path: str):
    """While a save is planned (``dist_checkpointing.save``), makes megatron's FileSystemWriterAsync take
    ``ResultFile(path)`` as the queue its writer hands results back through: megatron-core 0.19.2 creates that
    queue lazily in a module global (``get_write_results_queue``) as a spawned Manager's queue, and each writer
    keeps the queue it was planned with, so setting the global around the planning is the only way to supply
    another. The global is restored afterwards: other saves in the process (the converter's) keep megatron's."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    previous = filesystem_async._results_queue
    filesystem_async._results_queue = ResultFile(path)
    try:
        yield
    finally:
        filesystem_async._results_queue = previous


def _die_with(parent_pid: int) -> None:
    """In a forked writer: be killed when the trainer dies, however it dies (Linux; elsewhere a no-op)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the trainer died before prctl took effect
        os._exit(1)


def _write_then_hash(write, directory: str, rank: int, trainer_pid: int, *args) -> None:
    """The rank's write (megatron's write function; args: rank, write buckets, results queue), then the SHA-256s
    of the files it wrote."""
    if os.getpid() != trainer_pid:
        _die_with(trainer_pid)
    write(*args)
    buckets = args[1]  # (file path, file name relative to the directory, data) per file
    integrity.write_rank_manifest(directory, rank, [name for _, name, _ in buckets])


def with_hashing(request, directory: str, rank: int):
    """``request`` (megatron's AsyncRequest) whose write also hashes what it wrote; a rank with nothing to write
    has no write function, and no manifest."""
    if request.async_fn is None:
        return request
    from functools import partial

    return request._replace(async_fn=partial(_write_then_hash, request.async_fn, directory, rank, os.getpid()))


class AsyncWriter:
    """At most one save in flight at a time, written by a forked process per rank (megatron's TemporalAsyncCaller
    via its AsyncCallsQueue)."""

    def __init__(self):
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        self._queue = AsyncCallsQueue(persistent=False)

    @property
    def busy(self) -> bool:
        return self._queue.get_num_unfinalized_calls() > 0

    def start(self, request) -> None:
        if self.busy:
            raise RuntimeError("AsyncWriter: a save is already in flight")
        self._queue.schedule_async_request(request)

    def poll(self, blocking: bool = False) -> bool:
        """Collective. Runs the finalize functions (on every rank) if every rank's writer is done; True then, or
        when nothing is in flight."""
        self._queue.maybe_finalize_async_calls(blocking=blocking)
        return not self.busy

    def writer_pids(self) -> list[int]:
        return [call.async_caller.process.pid for call in self._queue.async_calls
                if getattr(call.async_caller, "process", None) is not None]

    def abandon(self) -> None:
        """Kills this rank's writer (not collective); the finalize functions never run."""
        while self._queue.async_calls:
            caller = self._queue.async_calls.popleft().async_caller
            process = getattr(caller, "process", None)
            caller.close(abort=True)  # megatron kills it
            if process is not None:
                process.join()  # and reaps it here


__all__ = ["AsyncWriter", "ResultFile", "results_through_file", "with_hashing"]
