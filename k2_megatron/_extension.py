"""Loading of the compiled extension ``k2_megatron._C`` and the answer to "which path is live, and why".

The op layer (k2_megatron/ops/) is the only user: ``dispatch_to_op(op, tensor)`` decides whether a call goes
through the registered operator (CUDA kernel, or the reference registered as its CPU kernel) or straight to
the pure-PyTorch reference.
"""

import functools

import torch

try:
    from k2_megatron import _C  # noqa: F401  (registers torch.ops.k2_megatron.*)

    _LOAD_ERROR = None
except ImportError as exc:  # not built (CPU torch, no nvcc, K2_SKIP_CUDA_BUILD=1) or broken
    _C = None
    _LOAD_ERROR = exc


def extension_loaded() -> bool:
    """True when k2_megatron._C imported, i.e. the op schemas exist under torch.ops.k2_megatron."""
    return _C is not None


def compiled_archs() -> list[str]:
    """SM architectures the extension was built for, e.g. ["80", "90a"]; [] when it is not built."""
    return _C.cuda_archs().split("_") if _C is not None else []


def _arch_runs_on(arch: str, major: int, minor: int) -> bool:
    # SASS for an 'a' (architecture-specific) target runs only on that exact SM; plain SASS runs on any
    # later minor revision of the same major (sm_80 code on sm_86/sm_89). No PTX is embedded.
    number = int(arch.rstrip("a"))
    if arch.endswith("a"):
        return number == major * 10 + minor
    return number // 10 == major and number % 10 <= minor


@functools.lru_cache(maxsize=None)
def _device_supported(index: int) -> bool:
    major, minor = torch.cuda.get_device_capability(index)
    return any(_arch_runs_on(a, major, minor) for a in compiled_archs())


def use_kernels(t: torch.Tensor) -> bool:
    """Whether an op on tensor ``t`` runs the CUDA kernel (else the reference)."""
    if _C is None or t.device.type != "cuda":
        return False
    return _device_supported(t.device.index if t.device.index is not None else torch.cuda.current_device())


def op_registered(op: str) -> bool:
    """Whether torch.ops.k2_megatron.<op> exists (the extension is loaded and was built with its schema)."""
    return _C is not None and hasattr(torch.ops.k2_megatron, op)


def dispatch_to_op(op: str, t: torch.Tensor) -> bool:
    """Whether an op layer call on tensor ``t`` goes through torch.ops.k2_megatron.<op> (else it calls the
    reference directly). On CPU and meta: whenever the schema exists (its CPU kernel is the reference, meta
    its fake). On CUDA: only where a CUDA kernel of the op is registered and was built for t's device."""
    if not op_registered(op):
        return False
    if t.device.type in ("cpu", "meta"):
        return True
    return use_kernels(t) and torch._C._dispatch_has_kernel_for_dispatch_key(f"k2_megatron::{op}", "CUDA")


def sm90a_kernels(t: torch.Tensor, force_sm80_env: str) -> bool:
    """Whether a kernel family with an sm_90a variant runs it for CUDA tensor ``t`` (the choice the C++ ops
    make: a compute capability 9.0 device, a 90a build, and ``force_sm80_env`` not set to "sm80")."""
    if not use_kernels(t):
        return False
    index = t.device.index if t.device.index is not None else torch.cuda.current_device()
    return _C.use_sm90a_kernels(index, force_sm80_env)


def kernels_available() -> bool:
    """True when the CUDA kernels run on the current CUDA device."""
    return _C is not None and torch.cuda.is_available() and _device_supported(torch.cuda.current_device())


def kernels_status() -> str:
    """One line saying which implementation the ops use here, and why."""
    if _C is None:
        if torch.version.cuda is None:
            why = f"torch {torch.__version__} is a CPU build"
        else:
            why = f"k2_megatron._C is not built or failed to import ({_LOAD_ERROR})"
        return f"reference (pure PyTorch) for every op: {why}"
    archs = ", ".join(f"sm_{a}" for a in compiled_archs())
    if not torch.cuda.is_available():
        return (f"reference (pure PyTorch) for every op: k2_megatron._C is built ({archs}, CUDA {torch.version.cuda}) "
                "but no CUDA device is visible")
    index = torch.cuda.current_device()
    name = torch.cuda.get_device_name(index)
    major, minor = torch.cuda.get_device_capability(index)
    if not _device_supported(index):
        return (f"reference (pure PyTorch) for every op: {name} is sm_{major}{minor}, k2_megatron._C was built for "
                f"{archs}; rebuild with K2_CUDA_ARCHS including {major}{minor}{'a' if major >= 9 else ''}")
    return f"CUDA kernels on {name} (sm_{major}{minor}); k2_megatron._C built for {archs}, CUDA {torch.version.cuda}"
