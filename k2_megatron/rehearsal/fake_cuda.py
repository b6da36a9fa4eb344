"""Fake CUDA for the rehearsal: the one place where torch.cuda / torch.distributed / megatron-core are patched so
that a GPU rank's code runs on a CPU with fake CUDA tensors (torch's FakeTensorMode: shapes, dtypes and devices,
no data, no memory).

What stands in the way on a CPU-only machine with torch 2.13 (CUDA build) and megatron-core 0.19.2, and the fix:

| obstacle | fix |
|---|---|
| torch.cuda answers "no GPU" (is_available, device count, properties, current device) | answer for the rehearsed device (``RehearsedDevice``, an H100 by default) |
| indexing a fake CUDA tensor enters a CUDA device guard; autograd's backward stashes the stream of every device with a primary context (asks the driver) | ``fake_cuda_runtime.cpp``: a no-op CUDA device guard on device 0 and a "yes" to hasPrimaryContext(0), built on first use; ``FakeCudaTensorMode`` keeps torch from swapping the guard back |
| megatron's CUDA RNG tracker, CUDA streams and events | cpu_compat's patches (the same fix: the CPU generator, no-op streams), with stream/event/device synchronisation reported as host synchronisations |
| megatron's gloo groups (ProcessGroupGloo needs a real store) | a group asked for with backend "gloo" becomes a fake group, remembered as gloo (host tensors allowed in its collectives); ``get_backend`` answers gloo for those and NCCL for the others |
| rotary / YaRN caches built eagerly at construction | built on fake CUDA tensors like any other op (they went through the CUDA device guard above) |
| MoE all-to-all split sizes read on the host (megatron's device-to-host copy of the token counts) | the counts of the declared routing (``k2_megatron.rehearsal.routing``), reported as the host synchronisation it is |
| ``Module.cuda()`` / ``.to()`` / ``.bfloat16()`` swap tensor subclasses (FakeTensor) into parameters in place, which fails with weak references | host parameters are replaced by fake device parameters with the same attributes; fake parameters take converted tensors as their data |
| ``torch.tensor(list of device scalars)`` reads each value below the dispatcher (megatron's l2-norm fallback without Apex / Transformer Engine does, one read per gradient tensor) | the reads are reported and the result is stacked from the fake values |
| object collectives (all_gather_object, ...) pickle through the device and read the bytes back | recorded as a collective + host synchronisation; every rank's object is taken to be this rank's |
| megatron frees memory with ``untyped_storage().resize_(0)`` (recomputed outputs, combined 1F1B's all-to-all buffers, offloaded activations), which no operator dispatch shows | ``UntypedStorage.resize_`` tells the memory count (``observers.storage_resized``) |
| pinning host memory (``Tensor.pin_memory``: the loop's micro-batches, k2_megatron.training.prefetch) needs the driver | the tensor itself (pageable host memory: its copy to a fake device tensor moves no data anyway) |
| megatron's fine-grained activation offloading manages only real CUDA tensors (it skips fake ones, as under torch.compile tracing) | ``ChunkOffloadHandler._can_manage_tensor_for_offload`` takes fake CUDA tensors (its pinned host copies are fake host tensors, counted by the session) |

``enable()`` installs everything (refusing untested torch / megatron-core releases, and refusing while cpu_compat
is enabled, which routes CUDA to the CPU); ``disable()`` removes the Python patches. The C++ runtime stand-in cannot be
removed once installed (it changes nothing for CPU work; the rehearsal runs in its own process anyway).
``observers`` receives the host synchronisations these patches stand for (``k2_megatron.rehearsal.host_sync``)."""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import os
import threading

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from k2_megatron.config.memory import H100_80GB_MEMORY_BYTES
from k2_megatron.megatron import cpu_compat

TESTED_TORCH_VERSIONS = ("2.13",)

_lock = threading.Lock()
_state = {"enabled": False, "saved": [], "runtime": None}


@dataclasses.dataclass(frozen=True)
class RehearsedDevice:
    """The GPU each rank is rehearsed on (what torch.cuda answers about it)."""

    name: str = "NVIDIA H100 80GB HBM3"
    total_memory: int = H100_80GB_MEMORY_BYTES  # bytes, as torch.cuda.get_device_properties(...).total_memory reports
    capability: tuple[int, int] = (9, 0)
    multi_processor_count: int = 132
    devices_per_node: int = 8


H100 = RehearsedDevice()


class _Observers:
    """Callbacks the rehearsal installs: ``host_sync(kind, detail, count)``, ``backward_step`` and ``schedule_plan_run``
    (around megatron's), ``object_collective(name, group, obj)``, ``memory()`` -> dict of torch.cuda.memory_*
    answers; ``routing`` (a k2_megatron.rehearsal.routing.Routing); ``storage_resized(storage)`` after a storage's
    ``resize_`` (megatron frees recomputed outputs, all-to-all buffers and offloaded activations so)."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.backward_step = None  # wraps megatron's schedules.backward_step: (original, *args, **kwargs) -> result
        self.schedule_plan_run = None  # wraps TransformerModelChunkSchedulePlan.run (combined 1F1B), the same way
        self.storage_resized = None  # (storage) after UntypedStorage.resize_ (megatron frees buffers with resize_(0))
        self.host_sync = None
        self.object_collective = None
        self.memory = None
        self.routing = None


observers = _Observers()


def _report_sync(kind: str, detail: str = "", count: int = 1) -> None:
    if observers.host_sync is not None:
        observers.host_sync(kind, detail, count)


# ----- the C++ runtime stand-in -----

def install_runtime() -> str:
    """Builds (once per source, torch and Python) and installs fake_cuda_runtime.cpp; returns the library's path.
    Raises RuntimeError when it cannot be built or its vtable slot cannot be located."""
    if _state["runtime"] is not None:
        return _state["runtime"]
    path = _built_runtime()
    code = ctypes.CDLL(path).k2_rehearsal_install_fake_cuda_runtime()
    if code < 0:
        raise RuntimeError(f"{path}: the CUDA hooks' hasPrimaryContext slot could not be located (code {code}); "
                           f"this torch ({torch.__version__}) is not one the rehearsal was tested with")
    _state["runtime"] = path
    return path


_RUNTIME_NAME = "k2_rehearsal_fake_cuda_runtime"
_RUNTIME_CFLAGS = ["-O1"]


def _built_runtime() -> str:
    """The runtime stand-in's library in the cache (K2_REHEARSAL_CACHE, default ~/.cache/k2_megatron), named by a
    hash of what it is built from. Built in a private directory and renamed into place: torch's extension builder
    locks its build directory with a file that a killed build leaves behind, and every later rehearsal would wait
    on it forever; here a killed build leaves only an unused directory, and concurrent builds cannot collide."""
    import hashlib
    import shutil
    import sys
    import tempfile

    from torch.utils import cpp_extension

    source = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fake_cuda_runtime.cpp")
    with open(source, "rb") as f:
        key = hashlib.sha256(f.read() + repr((torch.__version__, sys.version, _RUNTIME_CFLAGS)).encode())
    cache = os.path.expanduser(os.environ.get("K2_REHEARSAL_CACHE", "~/.cache/k2_megatron"))
    final = os.path.join(cache, f"rehearsal-runtime-{key.hexdigest()[:16]}.so")
    if os.path.exists(final):
        return final
    os.makedirs(cache, exist_ok=True)
    build_dir = tempfile.mkdtemp(prefix=".rehearsal-build-", dir=cache)
    try:
        cpp_extension.load(_RUNTIME_NAME, [source], build_directory=build_dir, with_cuda=False,
                           is_python_module=False, extra_cflags=_RUNTIME_CFLAGS)
        os.replace(os.path.join(build_dir, f"{_RUNTIME_NAME}.so"), final)
    except Exception as e:  # a missing compiler or headers
        raise RuntimeError(f"the rehearsal's CUDA runtime stand-in ({source}) could not be built with torch's "
                           f"C++ extension builder: {e}") from e
    finally:
        shutil.rmtree(build_dir, ignore_errors=True)
    return final


class FakeCudaTensorMode(FakeTensorMode):
    """FakeTensorMode for a machine without a GPU while torch.cuda.is_available() answers True: keeps torch from
    initialising a device (``avoid_device_init``). Its entry would swap in torch's no-op CUDA device guard only over
    a guard that reports no device; the runtime stand-in's reports the node's devices, so it stays."""

    @property
    def avoid_device_init(self) -> bool:
        return True


# ----- torch.cuda answers -----

class _DeviceProperties:
    def __init__(self, device: RehearsedDevice):
        self.name = device.name
        self.total_memory = device.total_memory
        self.major, self.minor = device.capability
        self.multi_processor_count = device.multi_processor_count
        self.is_integrated = False
        self.is_multi_gpu_board = False

    def __repr__(self):
        return f"_CudaDeviceProperties(name='{self.name}', major={self.major}, minor={self.minor}, " \
               f"total_memory={self.total_memory // 2**20}MB, rehearsed)"


class _Event(cpu_compat._NoStream):
    """A CUDA event that does nothing, except that waiting for it on the host is a host synchronisation."""

    def synchronize(self):
        _report_sync("stream/event synchronize", type(self).__name__)

    def query(self):
        return True

    def record_event(self, *args, **kwargs):
        return _Event()


class _Stream(torch.Stream):
    """A CUDA stream on the rehearsed device: a real torch.Stream (of the runtime stand-in's device guard, so that
    ``Tensor.record_stream`` takes it) whose work is immediate; waiting for it on the host is a host
    synchronisation."""

    def __new__(cls, *args, **kwargs):
        return super().__new__(cls, device="cuda")

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, stream):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        return event if event is not None else _Event()

    def synchronize(self):
        _report_sync("stream/event synchronize", "Stream")

    def query(self):
        return True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _make_cuda_answers(device: RehearsedDevice, local_rank: int) -> dict:
    properties = _DeviceProperties(device)

    def current_device():
        return local_rank

    def set_device(index):
        index = index.index if isinstance(index, torch.device) else index
        if index is not None and int(index) != local_rank:
            raise RuntimeError(f"rehearsal: rank rehearsed on cuda:{local_rank}, set_device({index}) asked for another")

    def synchronize(device=None):
        _report_sync("torch.cuda.synchronize")

    def memory(key):
        def answer(device=None):
            stats = observers.memory() if observers.memory is not None else {}
            return int(stats.get(key, 0))
        return answer

    def mem_get_info(index=None):
        used = memory("allocated_bytes.all.current")()
        return properties.total_memory - used, properties.total_memory

    return {"is_available": lambda: True, "is_initialized": lambda: True,
            "device_count": lambda: device.devices_per_node,
            "current_device": current_device, "set_device": set_device,
            "get_device_capability": lambda device=None: (properties.major, properties.minor),
            "get_device_properties": lambda device=None: properties,
            "get_device_name": lambda device=None: properties.name,
            "synchronize": synchronize, "Stream": _Stream, "Event": _Event,
            "current_stream": lambda device=None: _Stream(), "default_stream": lambda device=None: _Stream(),
            "stream": cpu_compat._stream_context,
            "manual_seed": cpu_compat._noop, "manual_seed_all": cpu_compat._noop,
            "get_rng_state": cpu_compat._get_rng_state, "set_rng_state": cpu_compat._set_rng_state,
            "memory_allocated": memory("allocated_bytes.all.current"),
            "max_memory_allocated": memory("allocated_bytes.all.peak"),
            "memory_reserved": memory("allocated_bytes.all.current"),
            "max_memory_reserved": memory("allocated_bytes.all.peak"),
            "memory_stats": lambda device=None: dict(observers.memory() if observers.memory else {}),
            "reset_peak_memory_stats": cpu_compat._noop, "empty_cache": cpu_compat._noop,
            "mem_get_info": mem_get_info}


# ----- process groups -----

_GLOO_GROUPS: set[str] = set()


def is_gloo_group(group) -> bool:
    """Whether ``group`` was asked for with backend "gloo" (its collectives take host tensors)."""
    return group is not None and group.group_name in _GLOO_GROUPS


def _make_new_group(original):
    def new_group(ranks=None, timeout=None, backend=None, pg_options=None, use_local_synchronization=False,
                  group_desc=None, device_id=None):
        gloo = isinstance(backend, str) and backend.lower() == "gloo"
        group = original(ranks=ranks, timeout=timeout, backend="fake" if gloo else backend, pg_options=None,
                         use_local_synchronization=use_local_synchronization, group_desc=group_desc,
                         device_id=device_id)
        if gloo and isinstance(group, dist.ProcessGroup):
            _GLOO_GROUPS.add(group.group_name)
        return group

    return new_group


def _object_coll_device(group=None):
    return "cpu" if is_gloo_group(group) else "cuda"


def _make_get_backend(original):
    def get_backend(group=None):
        """The backend the group stands for: gloo for the groups asked for as gloo, NCCL for every other one."""
        backend = original(group)
        if str(backend) != "fake":
            return backend
        return dist.Backend.GLOO if is_gloo_group(group or dist.group.WORLD) else dist.Backend.NCCL

    return get_backend


def _make_object_collectives() -> dict:
    """all_gather_object / broadcast_object_list / gather_object / scatter_object_list stand-ins: pickled objects
    go through the device and come back to the host (two collectives and a host synchronisation on NCCL); fake
    tensors carry no bytes, so every rank's object is taken to be this rank's."""

    def report(name, group, obj):
        if observers.object_collective is not None:
            observers.object_collective(name, group, obj)
        _report_sync("object collective", name)

    def all_gather_object(object_list, obj, group=None):
        report("all_gather_object", group, obj)
        for i in range(len(object_list)):
            object_list[i] = obj

    def broadcast_object_list(object_list, src=None, group=None, device=None, group_src=None):
        report("broadcast_object_list", group, object_list)

    def gather_object(obj, object_gather_list=None, dst=None, group=None, group_dst=None):
        report("gather_object", group, obj)
        if object_gather_list is not None:
            for i in range(len(object_gather_list)):
                object_gather_list[i] = obj

    def scatter_object_list(scatter_object_output_list, scatter_object_input_list=None, src=None, group=None,
                            group_src=None):
        report("scatter_object_list", group, scatter_object_input_list)
        if scatter_object_input_list:
            scatter_object_output_list[0] = scatter_object_input_list[0]

    return {"all_gather_object": all_gather_object, "broadcast_object_list": broadcast_object_list,
            "gather_object": gather_object, "scatter_object_list": scatter_object_list}


# ----- megatron-core -----

def _moe_dtoh_and_synchronize(self, point, tokens_per_expert=None):
    """megatron's MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize with the counts of the declared routing:
    at the device-to-host point the split sizes become host values, at the sync point the host waits for them."""
    if self.drop_and_pad:
        return tokens_per_expert
    if point == self.cuda_dtoh_point:
        if observers.routing is None:
            raise RuntimeError("rehearsal: the MoE all-to-all needs its split sizes on the host, and fake tensors "
                               "carry no values; declare a routing (k2_megatron.rehearsal.routing.Routing)")
        counts = observers.routing.dispatch_counts(self)
        with _real_host_tensors():
            tokens_per_expert = torch.tensor(counts.tokens_per_local_expert, dtype=torch.int64)
            if self.num_local_experts > 1 and not self.config.moe_permute_fusion:
                self.num_global_tokens_per_local_expert = torch.tensor(counts.global_tokens_per_local_expert,
                                                                       dtype=torch.int64)
        if self.ep_size > 1 or self.tp_size > 1:
            self.input_splits = counts.input_splits
            self.output_splits = counts.output_splits
            self.output_splits_tp = counts.output_splits_tp
        _report_sync("device-to-host copy", "MoE all-to-all token counts (megatron's dtoh point)")
        self.d2h_event = _Event()
    if point == self.cuda_sync_point:
        _report_sync("stream/event synchronize", "MoE all-to-all token counts (megatron's sync point)")
    return tokens_per_expert


@contextlib.contextmanager
def _real_host_tensors():
    """Host values built here are real tensors (the fake mode is suspended)."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily():
        yield


def _module_cuda(self, device=None):
    """Module.cuda() for fake devices: host parameters (megatron builds a few on the host, e.g. the router's, and
    relies on .cuda() to move them) become fake device parameters with the same attributes; parameters already on
    the device stay. torch's own Module._apply swaps tensor subclasses such as FakeTensor in place, which fails for
    tensors with weak references."""
    with torch.no_grad():
        for module in self.modules():
            for name, param in module._parameters.items():
                if param is not None and not param.is_cuda:
                    moved = torch.nn.Parameter(param.data.cuda(device), requires_grad=param.requires_grad)
                    moved.__dict__.update(param.__dict__)
                    module._parameters[name] = moved
            for name, buffer in module._buffers.items():
                if buffer is not None and not buffer.is_cuda:
                    module._buffers[name] = buffer.cuda(device)
    return self


def _device_values(data, found):
    if isinstance(data, torch.Tensor):
        if data.device.type == "cuda":
            found.append(data)
    elif isinstance(data, (list, tuple)):
        for d in data:
            _device_values(d, found)
    return found


def _stack_nested(data):
    if isinstance(data, torch.Tensor):
        return data
    return torch.stack([_stack_nested(d) for d in data])


def _make_tensor(original):
    def tensor(data, *args, dtype=None, device=None, **kwargs):
        """torch.tensor(): reading device values into a new tensor (e.g. megatron's l2-norm fallback without Apex or
        Transformer Engine) happens below the dispatcher, one host read per value; here the reads are reported and
        the result is built from the (fake) values without reading them."""
        values = _device_values(data, [])
        if not values:
            return original(data, *args, dtype=dtype, device=device, **kwargs)
        _report_sync("value read", f"torch.tensor() of {len(values)} device values", count=len(values))
        if dtype is None:
            kinds = {v.dtype.is_floating_point for v in values}
            dtype = torch.get_default_dtype() if True in kinds else values[0].dtype
        # a fake tensor on the target device: the values are the device's, unknown here (no copy is recorded twice)
        return torch.empty_like(_stack_nested(data), dtype=dtype, device=device or "cpu")

    return tensor


def _make_storage_resize(original):
    def resize_(self, size):
        """UntypedStorage.resize_: megatron frees memory with ``resize_(0)``, below the dispatcher (a recomputed
        output in CheckpointWithoutOutput, the combined 1F1B schedule's all-to-all buffers, offloaded activations);
        the rehearsal's memory count is told."""
        out = original(self, size)
        if observers.storage_resized is not None:
            observers.storage_resized(self)
        return out

    return resize_


def _make_backward_step(original):
    def backward_step(*args, **kwargs):
        if observers.backward_step is not None:
            return observers.backward_step(original, *args, **kwargs)
        return original(*args, **kwargs)

    return backward_step


def _make_schedule_plan_run(original):
    def run(*args, **kwargs):
        if observers.schedule_plan_run is not None:
            return observers.schedule_plan_run(original, *args, **kwargs)
        return original(*args, **kwargs)

    return staticmethod(run)


def _make_module_apply(original):
    def _apply(self, fn, recurse=True):
        """Module._apply (.to(), .bfloat16(), ...) on fake parameters: torch swaps tensor subclasses such as
        FakeTensor in place even when nothing changes, which fails for tensors with weak references; here a
        parameter whose conversion returns a new tensor gets it as its data, one that is unchanged stays."""
        modules = list(self.modules()) if recurse else [self]
        if not any(isinstance(t, FakeTensor) for m in modules for t in (*m._parameters.values(),
                                                                        *m._buffers.values())):
            return original(self, fn, recurse)
        with torch.no_grad():
            for m in modules:
                for name, param in m._parameters.items():
                    if param is not None:
                        converted = fn(param)
                        if converted is not param:
                            param.data = converted
                for name, buffer in m._buffers.items():
                    if buffer is not None:
                        m._buffers[name] = fn(buffer)
        return self

    return _apply


# ----- install / remove -----

def check_versions(allow_untested: bool = False) -> None:
    cpu_compat.check_version(allow_untested)
    release = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    if release not in TESTED_TORCH_VERSIONS and not allow_untested:
        raise RuntimeError(f"k2_megatron.rehearsal.fake_cuda patches private torch internals and was tested with torch "
                           f"{', '.join(TESTED_TORCH_VERSIONS)}; found {torch.__version__}")


def _patch_list(device: RehearsedDevice, local_rank: int):
    from megatron.core.models.common.model_chunk_schedule_plan import TransformerModelChunkSchedulePlan as ChunkPlan
    from megatron.core.pipeline_parallel import fine_grained_activation_offload as offload
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.tensor_parallel import random as mrandom
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher
    from torch.distributed import distributed_c10d as c10d

    patches = [(torch.cuda, name, value) for name, value in _make_cuda_answers(device, local_rank).items()]
    patches.append((torch, "tensor", _make_tensor(torch.tensor)))
    patches += [(mrandom, "_get_cuda_rng_state", cpu_compat._get_rng_state),
                (mrandom, "_set_cuda_rng_state", cpu_compat._set_rng_state),
                (mrandom.CudaRNGStatesTracker, "add", cpu_compat._tracker_add),
                (mrandom.CudaRNGStatesTracker, "fork", cpu_compat._tracker_fork),
                (torch.nn.Module, "cuda", _module_cuda),
                (torch.nn.Module, "_apply", _make_module_apply(torch.nn.Module._apply)),
                (dist, "new_group", _make_new_group(dist.new_group)),
                (c10d, "_get_object_coll_device", _object_coll_device),
                (dist, "get_backend", _make_get_backend(dist.get_backend)),
                (MoEAlltoAllTokenDispatcher, "_maybe_dtoh_and_synchronize", _moe_dtoh_and_synchronize),
                (schedules, "backward_step", _make_backward_step(schedules.backward_step)),
                (ChunkPlan, "run", _make_schedule_plan_run(ChunkPlan.run)),
                (torch.UntypedStorage, "resize_", _make_storage_resize(torch.UntypedStorage.resize_))]
    patches += [(dist, name, value) for name, value in _make_object_collectives().items()]
    patches.append((torch.Tensor, "pin_memory", _pin_memory))
    patches.append((offload.ChunkOffloadHandler, "_can_manage_tensor_for_offload", staticmethod(_offloadable)))
    return patches


def _pin_memory(tensor, device=None):
    return tensor


def _offloadable(tensor) -> bool:
    """megatron's ChunkOffloadHandler._can_manage_tensor_for_offload, fake CUDA tensors included."""
    return not isinstance(tensor, torch.nn.Parameter) and tensor.device.type == "cuda"


def is_enabled() -> bool:
    return _state["enabled"]


def enable(device: RehearsedDevice = H100, *, local_rank: int = 0, allow_untested: bool = False) -> None:
    """Installs the fake-CUDA patches (idempotent). Raises RuntimeError on a machine with a real GPU, for untested
    torch / megatron-core releases, or while cpu_compat is enabled."""
    with _lock:
        if _state["enabled"]:
            return
        if torch.cuda.is_available():
            raise RuntimeError("the rehearsal fakes the GPU; this machine has a real one (run on it instead)")
        if cpu_compat.is_enabled():
            raise RuntimeError("cpu_compat is enabled (it routes CUDA tensors to the CPU); disable it first")
        check_versions(allow_untested)
        ctypes.CDLL(install_runtime()).k2_rehearsal_set_devices(device.devices_per_node, local_rank)
        saved = []
        for owner, attr, value in _patch_list(device, local_rank):
            saved.append((owner, attr, owner.__dict__.get(attr, getattr(owner, attr, None))))
            setattr(owner, attr, value)
        from torch._dynamo import config as dynamo_config

        saved.append((dynamo_config, "disable", dynamo_config.disable))
        dynamo_config.disable = True
        from k2_megatron import _extension

        _extension._device_supported.cache_clear()
        _state.update(enabled=True, saved=saved)


def disable() -> None:
    """Removes every Python patch of enable() (the C++ runtime stand-in stays)."""
    with _lock:
        if not _state["enabled"]:
            return
        for owner, attr, original in reversed(_state["saved"]):
            setattr(owner, attr, original)
        from k2_megatron import _extension

        _extension._device_supported.cache_clear()
        observers.reset()
        _GLOO_GROUPS.clear()
        _state.update(enabled=False, saved=[])


@contextlib.contextmanager
def fake_cuda(device: RehearsedDevice = H100, **kwargs):
    """``with fake_cuda():`` enable() for the block, then disable()."""
    enable(device, **kwargs)
    try:
        yield
    finally:
        disable()


PATCHES = ("torch.tensor (device values inside the data)",
           "torch.cuda.{is_available, is_initialized, device_count, current_device, set_device, get_device_capability, "
           "get_device_properties, get_device_name, synchronize, Stream, Event, current_stream, default_stream, stream, "
           "manual_seed(_all), get/set_rng_state, memory_*, mem_get_info, empty_cache}",
           "megatron.core.tensor_parallel.random.{_get,_set}_cuda_rng_state, CudaRNGStatesTracker.{add,fork}",
           "torch.nn.Module.cuda (host parameters replaced by fake device parameters), torch.nn.Module._apply",
           "torch.distributed.new_group (gloo -> fake, remembered)",
           "torch.distributed.distributed_c10d._get_object_coll_device", "torch.distributed.get_backend",
           "torch.distributed.{all_gather_object, broadcast_object_list, gather_object, scatter_object_list}",
           "megatron.core.transformer.moe.token_dispatcher.MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize",
           "megatron.core.pipeline_parallel.schedules.backward_step, "
           "megatron.core.models.common.model_chunk_schedule_plan.TransformerModelChunkSchedulePlan.run (observer hooks, "
           "for micro-batch replay)",
           "megatron.core.pipeline_parallel.fine_grained_activation_offload.ChunkOffloadHandler."
           "_can_manage_tensor_for_offload (fake CUDA tensors offloaded)",
           "torch.UntypedStorage.resize_ (an observer hook: megatron frees buffers with resize_(0), memory counts it)",
           "C++: CUDA device guard, CUDAHooks::hasPrimaryContext (fake_cuda_runtime.cpp)")
