"""Run megatron-core on a CPU with gloo: the one place where megatron-core / torch.cuda are patched.

megatron-core 0.19 assumes CUDA in a handful of places that have nothing to do with the maths (found by
running a tiny MLA + MoE GPTModel of megatron-core 0.19.2 on a CPU with gloo): it reads and sets torch.cuda RNG
states, asks torch.cuda.current_device() for the device of new tensors, creates tensors with device="cuda" or .cuda(),
opens CUDA streams/events around the MoE all-to-all and pipeline p2p, and keeps MoE all-to-all split
sizes as tensors unless they live on a GPU (gloo's all_to_all_single then gets tensors instead of lists).

``enable()`` installs the smallest fix for each, only when CUDA is unavailable, and only for the
megatron-core versions in TESTED_MEGATRON_VERSIONS (it raises for others, since these are private
internals). ``disable()`` removes every patch. ``cpu_mode()`` scopes enable/disable to a ``with`` block.
Each patch is listed in PATCHES with the reason it exists. One fix here is not CPU-specific and is applied by
the code that needs it, on any device: ``fix_checkpoint_without_output_default`` (megatron-core 0.19.2's
selective "layernorm" recompute calls Transformer Engine's FP8 state without TE installed) and
``fix_offload_without_transformer_engine`` (its activation offloading sets a TE flag, refusing without TE).

Not patched, avoid instead: expert-tensor-parallel > 1 (megatron then all_gathers uneven splits, which
gloo refuses; K2 uses expert_tensor_parallel=1) and megatron's torch norm with sequence parallel (the K2 spec
builds its own norm). Tensor.type() answering 'torch.cuda.*' also satisfies the gradient-clipping type
assertion in optimizer/clip_grads.py.
"""

from __future__ import annotations

import contextlib
import logging
import threading

import torch
from torch.overrides import TorchFunctionMode

TESTED_MEGATRON_VERSIONS = ("0.19.2",)

_log = logging.getLogger(__name__)
_lock = threading.Lock()
_state = {"enabled": False, "saved": [], "mode": None}


# ----- fixes of megatron-core bugs that are not CPU-specific (applied by the code that needs them) -----

def fix_checkpoint_without_output_default() -> None:
    """megatron-core 0.19.2: ``CheckpointWithoutOutput(fp8=False)`` sets ``self.fp8 = fp8 is not None`` (True) and
    then calls Transformer Engine's FP8GlobalStateManager, a NameError without TE. TransformerLayer's
    "layernorm" recompute constructs it with the default; megatron passes ``config.fp8`` (None: no FP8)
    elsewhere. Make the default None, which is what it means. Idempotent; a no-op on fixed versions."""
    from megatron.core.tensor_parallel import random as mp_random

    cls = mp_random.CheckpointWithoutOutput
    if getattr(cls.__init__, "_k2_default_fixed", False):
        return
    probe = cls.__new__(cls)
    cls.__init__(probe)
    if not probe.fp8:
        return  # this megatron-core gets it right
    original = cls.__init__

    def __init__(self, fp8=None):
        original(self, fp8)

    __init__._k2_default_fixed = True
    cls.__init__ = __init__


class _TransformerEngineOffloadFlag:
    """Stands in for transformer_engine.pytorch.cpu_offload without Transformer Engine (see below)."""

    CPUOffloadEnabled = False


def fix_offload_without_transformer_engine() -> None:
    """megatron-core 0.19.2's fine-grained activation offload manager sets Transformer Engine's
    ``cpu_offload.CPUOffloadEnabled`` around each offload group and raises "TE CPU offload is not available" without
    TE, although only TE's own layers read that flag (the K2 layers are megatron's local ones and ours). Without TE,
    megatron's name for that module becomes a holder of the flag. Idempotent; a no-op with TE installed."""
    from megatron.core.extensions import transformer_engine as te_extension

    if getattr(te_extension, "cpu_offload", None) is None:
        te_extension.cpu_offload = _TransformerEngineOffloadFlag


def megatron_version() -> str:
    """megatron-core's release version, e.g. "0.19.2".

    megatron-core's ``package_info`` appends ``git rev-parse --short HEAD``, run in its own package directory, to
    ``__version__`` as a local part ("0.19.2+018b65b"): inside any git checkout (a virtualenv in the project's clone)
    that is the *enclosing* repository's commit, not megatron's. The local part never names a different release,
    so it is dropped; pre-, post- and dev-releases are kept (and refused as untested)."""
    import megatron.core
    from packaging.version import InvalidVersion, Version

    raw = str(getattr(megatron.core, "__version__", "unknown"))
    try:
        return Version(raw).public
    except InvalidVersion:
        return raw


def is_enabled() -> bool:
    return _state["enabled"]


# ----- replacements -----

class _NoStream:
    """Stands in for torch.cuda.Stream / Event on CPU: every operation is immediate, so waits are no-ops."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, *args, **kwargs):
        return _NoStream()

    def record(self, *args, **kwargs):
        pass

    def wait(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _current_stream(*args, **kwargs):
    return _NoStream()


def _stream_context(stream=None):
    return contextlib.nullcontext(stream)


def _noop(*args, **kwargs):
    return None


def _current_device():
    # Used by megatron as `device=torch.cuda.current_device()` for new tensors.
    return "cpu"


def _get_rng_state(device="cuda", clone=False, graph_safe=False):
    # megatron's "CUDA RNG state" becomes the CPU generator's state.
    return torch.get_rng_state()


def _set_rng_state(new_state, device=-1, graph_safe=False):
    torch.set_rng_state(new_state)


def _tracker_add(self, name, seed):
    """CudaRNGStatesTracker.add on the CPU generator (same bookkeeping and errors as upstream)."""
    self._is_initialized = True
    if seed in self.seeds_:
        raise Exception(f"seed {seed} already exists")
    self.seeds_.add(seed)
    if name in self.states_:
        raise Exception(f"cuda rng state {name} already exists")
    orig = torch.get_rng_state()
    torch.manual_seed(seed)
    self.states_[name] = torch.get_rng_state()
    torch.set_rng_state(orig)


@contextlib.contextmanager
def _tracker_fork(self, name="model-parallel-rng"):
    """CudaRNGStatesTracker.fork on the CPU generator. Upstream compares the CPU state before and after
    to warn about CPU draws inside a GPU fork; here every draw is a CPU draw, so that check is dropped."""
    if name not in self.states_:
        raise Exception(f"cuda rng state {name} is not added")
    orig_state = torch.get_rng_state()
    orig_name = self._current_state_name
    if orig_name != "default-rng":
        self.states_[orig_name] = orig_state
    torch.set_rng_state(self.states_[name])
    self._current_state_name = name
    try:
        yield
    finally:
        self.states_[name] = torch.get_rng_state()
        if orig_name != "default-rng":
            orig_state = self.states_[orig_name]
        torch.set_rng_state(orig_state)
        self._current_state_name = orig_name


def _make_record_stream(original):
    def record_stream(self, stream):
        # A CPU tensor's memory is not tied to a stream (aten::record_stream has no CPU kernel, and the argument
        # parser refuses the stand-in streams); CUDA tensors keep the real behaviour.
        if not self.is_cuda:
            return None
        return original(self, stream)

    return record_stream


def _make_move_to_cpu(original):
    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        # Upstream converts only CUDA tensors; CPU tensors stayed tensors, and all_to_all_single on gloo
        # rejects tensor split sizes. Convert CPU tensors the same way a CUDA tensor would be.
        if torch.is_tensor(tensor) and not tensor.is_cuda:
            return tensor.numpy() if as_numpy else tensor
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    maybe_move_tensor_to_cpu.__k2_cpu_compat__ = True
    return maybe_move_tensor_to_cpu


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.split(":")[0] == "cuda"
    return isinstance(device, int) and not isinstance(device, bool)  # a bare index means a CUDA device


class CudaToCpuMode(TorchFunctionMode):
    """Routes tensors megatron asks to create on / move to CUDA onto the CPU (thread-local while active):
    device="cuda"/index kwargs -> "cpu", Tensor.cuda() -> self, pin_memory -> False, and Tensor.type() answers
    the CUDA type name (megatron's mixed-precision and distributed optimizers dispatch on it)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # megatron's optimizers sort parameters by their type string ('torch.cuda.BFloat16Tensor', ...)
            # and reject anything else; answer the CUDA name of the same dtype.
            name = func(*args)
            return name if name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)
        if func in (torch.Tensor.cuda,):
            return args[0]
        if func is torch.Tensor.pin_memory:
            return args[0]
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = "cpu"
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


def _patch_list():
    """(owner, attribute, replacement, reason) for every patch; owners imported lazily."""
    from megatron.core.tensor_parallel import random as mrandom
    from megatron.core.transformer.moe import token_dispatcher

    return [
        (torch.cuda, "current_device", _current_device, "new tensors are created on device=current_device()"),
        (torch.cuda, "Stream", _NoStream, "MoE all-to-all and p2p open side streams"),
        (torch.cuda, "Event", _NoStream, "streams are synchronised with events"),
        (torch.cuda, "current_stream", _current_stream, "stream bookkeeping around communication"),
        (torch.cuda, "stream", _stream_context, "`with torch.cuda.stream(s)` around communication"),
        (torch.cuda, "synchronize", _noop, "explicit device synchronisation"),
        (torch.Tensor, "record_stream", _make_record_stream(torch.Tensor.record_stream),
         "the combined 1F1B schedule (EP all-to-all overlap) records tensors on its streams"),
        (torch.cuda, "get_rng_state", _get_rng_state, "RNG tracker reads CUDA RNG state"),
        (torch.cuda, "set_rng_state", _set_rng_state, "RNG tracker writes CUDA RNG state"),
        (mrandom, "_get_cuda_rng_state", _get_rng_state, "RNG tracker fork reads CUDA RNG state"),
        (mrandom, "_set_cuda_rng_state", _set_rng_state, "RNG tracker fork writes CUDA RNG state"),
        (mrandom.CudaRNGStatesTracker, "add", _tracker_add, "tracked states must be CPU generator states"),
        (mrandom.CudaRNGStatesTracker, "fork", _tracker_fork, "fork swaps CPU generator states"),
        (token_dispatcher, "maybe_move_tensor_to_cpu", _make_move_to_cpu(token_dispatcher.maybe_move_tensor_to_cpu),
         "all-to-all split sizes must be host lists for gloo"),
    ]


PATCHES = ("torch.cuda.current_device", "torch.cuda.Stream", "torch.cuda.Event", "torch.cuda.current_stream",
           "torch.cuda.stream", "torch.cuda.synchronize", "torch.cuda.get_rng_state", "torch.cuda.set_rng_state",
           "megatron.core.tensor_parallel.random._get_cuda_rng_state",
           "megatron.core.tensor_parallel.random._set_cuda_rng_state",
           "megatron.core.tensor_parallel.random.CudaRNGStatesTracker.add",
           "megatron.core.tensor_parallel.random.CudaRNGStatesTracker.fork",
           "megatron.core.transformer.moe.token_dispatcher.maybe_move_tensor_to_cpu",
           "torch.Tensor.record_stream",
           "CudaToCpuMode (device='cuda' / .cuda() / pin_memory -> CPU, Tensor.type() -> 'torch.cuda.*')")


def check_version(allow_untested: bool = False) -> str:
    version = megatron_version()
    if version not in TESTED_MEGATRON_VERSIONS and not allow_untested:
        raise RuntimeError(
            f"k2_megatron.megatron.cpu_compat patches private megatron-core internals and was tested with "
            f"megatron-core {', '.join(TESTED_MEGATRON_VERSIONS)}; found {version}. Run on a GPU, install a tested "
            f"version, or pass allow_untested=True at your own risk.")
    return version


def enable(*, allow_untested: bool = False, disable_torch_compile: bool = True) -> bool:
    """Patch megatron-core for CPU execution. Returns True if patches were installed (or already were),
    False when CUDA is available (nothing is patched then). Raises RuntimeError for an untested version.

    disable_torch_compile: megatron's jit_fuser is torch.compile, whose cold compile costs seconds per
    function on a CPU; this sets torch._dynamo.config.disable (restored by disable())."""
    if torch.cuda.is_available():
        return False
    with _lock:
        if _state["enabled"]:
            return True
        check_version(allow_untested)
        saved = []
        for owner, attr, replacement, _reason in _patch_list():
            saved.append((owner, attr, owner.__dict__.get(attr, getattr(owner, attr))))
            setattr(owner, attr, replacement)
        if disable_torch_compile:
            from torch._dynamo import config as dynamo_config

            saved.append((dynamo_config, "disable", dynamo_config.disable))
            dynamo_config.disable = True
        mode = CudaToCpuMode()
        mode.__enter__()
        _state.update(enabled=True, saved=saved, mode=mode, thread=threading.get_ident())
        _log.info("k2_megatron cpu_compat enabled for megatron-core %s", megatron_version())
        return True


def disable() -> None:
    """Remove every patch installed by enable() (must run on the thread that called enable())."""
    with _lock:
        if not _state["enabled"]:
            return
        if _state.get("thread") != threading.get_ident():
            raise RuntimeError("cpu_compat.disable() must run on the thread that called enable()")
        _state["mode"].__exit__(None, None, None)
        for owner, attr, original in reversed(_state["saved"]):
            setattr(owner, attr, original)
        _state.update(enabled=False, saved=[], mode=None)


@contextlib.contextmanager
def cpu_mode(**kwargs):
    """``with cpu_mode():`` enable() for the block (a no-op with CUDA), then disable() if it enabled."""
    was_enabled = _state["enabled"]
    installed = enable(**kwargs)
    try:
        yield installed
    finally:
        if installed and not was_enabled:
            disable()
