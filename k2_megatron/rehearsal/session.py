"""A rehearsal session: rank R of a world of N on this CPU, with fake CUDA tensors and a fake process group that
obeys NCCL's rules; what the code does in it is recorded (collectives, host synchronisations, device memory).

    with rehearsal(world_size=256, rank=0) as r:
        ...  # the rank's real code: parallel_state, model, schedules, optimizer, checkpoint
    r.collectives.summary(); r.syncs.unexpected(); r.memory.peak

Inside the session:
- device tensors are fake (torch FakeTensorMode on the rehearsed GPU, fake_cuda.RehearsedDevice);
- host tensors are real: an operator with no fake input and no device output runs for real, so host code (data,
  bookkeeping, split sizes) computes real values;
- every operator passes through ``RehearsalMode``, which checks and records collectives (collectives.py), records
  host synchronisations (host_sync.py) and counts device storage (memory.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import (DataDependentOutputException, DynamicOutputShapeException, FakeTensor,
                                           unset_fake_temporarily)
from torch.utils._python_dispatch import TorchDispatchMode

from k2_megatron.ops._registration import REGISTERED_OPS
from k2_megatron.rehearsal import fake_cuda
from k2_megatron.rehearsal.collectives import CollectiveTrace
from k2_megatron.rehearsal.host_sync import HostSyncTrace
from k2_megatron.rehearsal.memory import MemoryTracker, storage_key
from k2_megatron.rehearsal.routing import Routing

aten = torch.ops.aten
# collectives whose tensors are not outputs written into fresh buffers (receives write activations)
_NOT_COMMUNICATION_BUFFERS = {"recv_", "recv_any_source_", "send", "barrier", "monitored_barrier_"}
# A host allocation larger than this is made fake (its values are never needed on the host in a rehearsal).
REAL_HOST_TENSOR_LIMIT = 64 * 2**20


class RehearsalError(RuntimeError):
    """Code that cannot be rehearsed (e.g. a shape that depends on device values)."""


@dataclasses.dataclass
class Rehearsal:
    world_size: int
    rank: int
    device: fake_cuda.RehearsedDevice
    routing: Routing
    collectives: CollectiveTrace = dataclasses.field(default_factory=CollectiveTrace)
    syncs: HostSyncTrace = dataclasses.field(default_factory=HostSyncTrace)
    memory: MemoryTracker = dataclasses.field(default_factory=MemoryTracker)
    phases: dict = dataclasses.field(default_factory=dict)  # phase -> CPU seconds this process spent in it

    @contextlib.contextmanager
    def phase(self, name: str, allocations: str = "other"):
        """Names what runs in the block (for the records) and the memory category of its new allocations."""
        saved = (self.collectives.phase, self.memory.allocation_category)
        self.collectives.phase = self.syncs.phase = self.memory.phase = name
        self.memory.allocation_category = allocations
        started = time.process_time()
        try:
            yield
        finally:
            self.phases[name] = self.phases.get(name, 0.0) + time.process_time() - started
            self.collectives.phase = self.syncs.phase = self.memory.phase = saved[0]
            self.memory.allocation_category = saved[1]


def _scan(values, found):
    """found[0]: any fake tensor; found[1]: any tensor not on the host."""
    for v in values:
        if isinstance(v, torch.Tensor):
            if isinstance(v, FakeTensor):
                found[0] = True
            if v.device.type != "cpu":
                found[1] = True
        elif isinstance(v, (list, tuple)):
            _scan(v, found)


def _device_arg(kwargs) -> bool:
    device = kwargs.get("device")
    return device is not None and torch.device(device).type != "cpu"


def _too_large_for_host(func, args, kwargs) -> bool:
    if not args or not isinstance(args[0], (list, tuple, torch.Size)) or not all(isinstance(s, int) for s in args[0]):
        return False
    dtype = kwargs.get("dtype") or torch.get_default_dtype()
    return math.prod(args[0]) * dtype.itemsize > REAL_HOST_TENSOR_LIMIT


def _written_by(func, args):
    """The tensors a collective writes (its outputs)."""
    name = func._opname
    if name in ("allreduce_", "allreduce_coalesced_", "broadcast_", "reduce_"):
        return list(args[0])
    first = args[0]
    out = []
    stack = [first]
    while stack:
        v = stack.pop()
        if isinstance(v, torch.Tensor):
            out.append(v)
        elif isinstance(v, (list, tuple)):
            stack.extend(v)
    return out


class RehearsalMode(TorchDispatchMode):
    """Sees every operator of the rehearsed rank (entered above the fake-tensor mode)."""

    def __init__(self, rehearsal: Rehearsal):
        super().__init__()
        self.r = rehearsal

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        r = self.r
        if func.namespace == "c10d":
            r.collectives.on_op(func, args)
            out = _fake_collective(func, args, kwargs)
            if func._opname not in _NOT_COMMUNICATION_BUFFERS:
                r.memory.claim_transient(_written_by(func, args), "communication buffers")
            return out
        if func is aten.record_stream.default:  # streams are immediate here: nothing to extend
            return None
        if func is aten._local_scalar_dense.default and isinstance(args[0], FakeTensor):
            return r.syncs.value_read(args[0], storage_key(args[0]))
        if kwargs.get("pin_memory"):  # pinned host memory (activation offloading): fake, and counted
            out = func(*args, **kwargs)
            r.memory.on_pinned(out)
            return out
        if func is aten.is_pinned.default and r.memory.is_pinned(args[0]):
            return True
        found = [False, False]
        _scan(args, found)
        _scan(kwargs.values(), found)
        if not found[0] and not found[1] and not _device_arg(kwargs) and not _too_large_for_host(func, args, kwargs):
            with unset_fake_temporarily():  # host work on host tensors: real
                return func(*args, **kwargs)
        if func is aten._to_copy.default and args[0].device.type == "cuda" and kwargs.get("device") is not None \
                and torch.device(kwargs["device"]).type == "cpu":
            r.syncs.record("device-to-host copy", f"{_describe(args[0])}"
                           f"{' (non_blocking)' if kwargs.get('non_blocking') else ''}")
        elif func is aten.copy_.default and args[0].device.type == "cpu" and args[1].device.type == "cuda":
            if r.memory.is_pinned(args[0]) and (args[2] if len(args) > 2 else kwargs.get("non_blocking", False)):
                r.memory.pinned_filled(args[0])  # asynchronous on a GPU: the host does not wait
            else:
                r.syncs.record("device-to-host copy", _describe(args[1]))
        elif func is aten.copy_.default and args[0].device.type == "cuda" and r.memory.is_pinned(args[1]):
            r.memory.pinned_drained(args[1])
        try:
            out = func(*args, **kwargs)
        except (DynamicOutputShapeException, DataDependentOutputException):
            event = r.syncs.record("data-dependent shape", f"{func} on {_describe(args[0])}")
            raise RehearsalError(f"{func} at {event.site} has an output shape that depends on device values: on a "
                                 f"GPU a host synchronisation, in a rehearsal impossible (fake tensors have no "
                                 f"values). {event.site.issuer.code}") from None
        if func.namespace == "k2_megatron":
            op = REGISTERED_OPS.get(func._opname)
            if op is not None and op.workspace is not None:
                r.memory.transient(op.workspace(*args, **kwargs))
        r.memory.on_outputs(out)
        return out


def _fake_collective(func, args, kwargs):
    """The fake process group's collective on fake tensors, without computing anything: the tensors it writes keep
    their (absent) values, and the returned Work is already completed. (The fake-tensor mode would run the meta
    kernels where they exist, slowly, and has none for the coalesced operators.)"""
    from torch._C._distributed_c10d import FakeWork

    work = FakeWork().boxed()
    returns = func._schema.returns
    if not returns:
        return None
    if len(returns) == 1:
        return work
    return args[0], work


def _describe(t: torch.Tensor) -> str:
    return f"{str(t.dtype).replace('torch.', '')} {list(t.shape)} on {t.device.type}"


def _fresh_offload_manager() -> None:
    """megatron's activation offload manager is a process-wide singleton (its streams, its warm-up state): a
    rehearsal starts with none and leaves none behind."""
    from megatron.core.pipeline_parallel.fine_grained_activation_offload import PipelineOffloadManager

    PipelineOffloadManager.OFFLOAD_MGR = None


@contextlib.contextmanager
def rehearsal(world_size: int, rank: int, *, routing: Routing | None = None,
              device: fake_cuda.RehearsedDevice = fake_cuda.H100):
    """Rank ``rank`` of a world of ``world_size`` on this CPU (see the module doc); yields the Rehearsal."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if not (isinstance(world_size, int) and isinstance(rank, int) and 0 <= rank < world_size):
        raise ValueError(f"rehearsal: rank must be in [0, world_size), got rank={rank!r}, world_size={world_size!r}")
    if dist.is_initialized():
        raise RuntimeError("rehearsal: a process group is already initialised in this process; the rehearsal "
                           "makes its own (run it in a fresh process)")
    r = Rehearsal(world_size, rank, device, routing or Routing())
    local_rank = rank % device.devices_per_node
    env = {"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(local_rank),
           "LOCAL_WORLD_SIZE": str(min(device.devices_per_node, world_size))}  # as torchrun sets them
    saved_env = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    _fresh_offload_manager()
    fake_cuda.enable(device, local_rank=local_rank)
    try:
        fake_cuda.observers.host_sync = r.syncs.record
        fake_cuda.observers.object_collective = r.collectives.on_object_collective
        fake_cuda.observers.memory = r.memory.stats
        fake_cuda.observers.storage_resized = r.memory.on_resize
        fake_cuda.observers.routing = r.routing
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
        with fake_cuda.FakeCudaTensorMode(allow_non_fake_inputs=True), RehearsalMode(r), \
                torch.autograd.set_multithreading_enabled(False):
            yield r
    finally:
        from megatron.core import parallel_state

        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        if dist.is_initialized():
            dist.destroy_process_group()
        fake_cuda.disable()
        _fresh_offload_manager()
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
