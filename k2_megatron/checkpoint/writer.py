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
the writer. A failed write (a full disk) is handed back as a ``CheckpointSaveError`` naming the rank, the errno and
the file, through megatron's results queue, so that megatron's finalization raises it on every rank together (a
synchronous save keeps its queue in memory: a full disk cannot also lose the error).

Two things megatron-core 0.19.2 would leave behind are avoided: its writer hands its results back through a queue
served by a spawned ``multiprocessing`` Manager (a ~560 MB process that outlives a killed trainer, with a
resource_tracker) -- here a file per rank next to the checkpoint (``ResultFile``), or memory for a synchronous save
(``ResultSlot``); and a forked writer survives its parent -- here it asks the kernel (prctl PR_SET_PDEATHSIG) to be
killed when the trainer dies.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import pickle
import queue
import signal

from k2_megatron.checkpoint import integrity
from k2_megatron.checkpoint.errors import CheckpointSaveError

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


class ResultSlot:
    """The results queue of a synchronous save: the write runs in this process, so the item stays in memory."""

    def __init__(self):
        self._item, self._full = None, False

    def put(self, item) -> None:
        self._item, self._full = item, True

    def get_nowait(self):
        if not self._full:
            raise queue.Empty
        return self._item


@contextlib.contextmanager
def results_through(results):
    """While a save is planned (``dist_checkpointing.save``), makes megatron's FileSystemWriterAsync take
    ``results`` (a ``ResultFile`` across a fork, a ``ResultSlot`` in this process) as the queue its writer hands
    results back through: megatron-core 0.19.2 creates that queue lazily in a module global
    (``get_write_results_queue``) as a spawned Manager's queue, and each writer keeps the queue it was planned
    with, so setting the global around the planning is the only way to supply another. The global is restored
    afterwards: other saves in the process (the converter's) keep megatron's."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    previous = filesystem_async._results_queue
    filesystem_async._results_queue = results
    try:
        yield
    finally:
        filesystem_async._results_queue = previous


class _LoggedErrors(logging.Handler):
    def __init__(self):
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def _megatron_write_errors():
    """The errors megatron's writer logs while it writes. It catches a failed file write (OSError: errno, file)
    and hands back only a RuntimeError naming the exception's type; the exception itself is in the ERROR record it
    logs. Collected here (and kept off the console: the save's error reports it)."""
    log = logging.getLogger("megatron.core.dist_checkpointing.strategies.filesystem_async")
    handler, saved = _LoggedErrors(), (log.level, log.propagate)
    log.addHandler(handler)
    log.setLevel(logging.ERROR)
    log.propagate = False
    try:
        yield handler.messages
    finally:
        log.removeHandler(handler)
        log.setLevel(saved[0])
        log.propagate = saved[1]


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
    of the files it wrote; a failure of either goes back through the results queue as a CheckpointSaveError."""
    if os.getpid() != trainer_pid:
        _die_with(trainer_pid)
    _, buckets, results = args  # buckets: (file path, file name relative to the directory, data) per file
    with _megatron_write_errors() as logged:
        try:
            write(*args)
            failure = _write_failure(results, logged, buckets)
        except Exception as e:  # noqa: BLE001 -- megatron re-raises a worker's failure as an AssertionError
            failure = _write_failure(ResultSlot(), logged, buckets) or f"{type(e).__name__}: {e}"
    if failure is None:
        try:
            integrity.write_rank_manifest(directory, rank, [name for _, name, _ in buckets])
        except OSError as e:
            failure = f"{e} (writing the integrity manifest {e.filename or directory})"
    if failure is not None:
        results.put(CheckpointSaveError(f"rank {rank}: {failure}"))


def _write_failure(results, logged: list[str], buckets) -> str | None:
    """What went wrong in megatron's write of ``buckets`` (None: nothing): the errors it logged, with the files."""
    try:
        outcome = results.get_nowait()
    except queue.Empty:
        outcome = None
    if not logged and not isinstance(outcome, Exception):
        return None
    marker = "encountered an error: "  # megatron's message with the exception; its others name only its type
    detail = "; ".join(m.partition(marker)[2] for m in logged if marker in m) or "; ".join(logged) or str(outcome)
    return f"{detail} (writing {', '.join(path for path, _, _ in buckets)})"


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


__all__ = ["AsyncWriter", "ResultFile", "ResultSlot", "results_through", "with_hashing"]
