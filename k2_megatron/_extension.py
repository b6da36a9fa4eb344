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
    """SM architectures the extension has machine code (SASS) for, e.g. ["80", "90a"]; [] when it is not built."""
    return _C.cuda_archs().split("_") if _C is not None else []


def ptx_arch() -> str | None:
    """The virtual architecture whose PTX the extension embeds, e.g. "80" (JIT-compiled by the CUDA driver on GPUs
    without matching SASS); None when it embeds none or is not built."""
    return (_C.cuda_ptx_arch() or None) if _C is not None else None


def _arch_runs_on(arch: str, major: int, minor: int) -> bool:
    # SASS for an 'a' (architecture-specific) target runs only on that exact SM; plain SASS runs on any
    # later minor revision of the same major (sm_80 code on sm_86/sm_89).
    number = int(arch.rstrip("a"))
    if arch.endswith("a"):
        return number == major * 10 + minor
    return number // 10 == major and number % 10 <= minor


def kernel_image(major: int, minor: int) -> str | None:
    """What the CUDA driver loads the kernels from on a GPU of compute capability major.minor: "sm_80 SASS",
    "compute_80 PTX, JIT-compiled" (any GPU at least as new as the PTX, e.g. Blackwell) or None (nothing runs).
    SASS is preferred over PTX, as the driver does."""
    sass = [a for a in compiled_archs() if _arch_runs_on(a, major, minor)]
    if sass:
        return f"sm_{max(sass, key=lambda a: int(a.rstrip('a')))} SASS"
    ptx = ptx_arch()
    if ptx is not None and major * 10 + minor >= int(ptx):
        return f"compute_{ptx} PTX, JIT-compiled by the driver at first use"
    return None


@functools.lru_cache(maxsize=None)
def _device_supported(index: int) -> bool:
    return kernel_image(*torch.cuda.get_device_capability(index)) is not None


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


# Kernel families with an sm_90a variant: name -> (their sm_90a kernels, their sm_80 kernels, the environment
# variable that selects the sm_80 ones on sm_90). The choice is csrc/common/arch.cpp's (k2_megatron._C.choose_kernels).
SM90A_FAMILIES = {
    "attention": ("wgmma", "mma.sync", "K2_ATTENTION_KERNEL"),
    "grouped GEMM": ("CUTLASS 3 TMA + wgmma", "CUTLASS 2 mma.sync", "K2_GROUPED_GEMM_KERNEL"),
}
SAME_EVERYWHERE = "Newton-Schulz mma.sync; permute, unpermute, FP8 tiles on CUDA cores"
# One compute capability per GPU generation the report covers, with examples.
GENERATIONS = ((8, 0, "A100"), (8, 6, "A10, RTX 30xx"), (8, 9, "L4, L40S, RTX 40xx"), (9, 0, "H100, H200"),
               (10, 0, "B200, B300"), (12, 0, "RTX 50xx, RTX PRO 6000"))


def built_for() -> str:
    """What code k2_megatron._C holds, e.g. "SASS sm_80, sm_90a; compute_80 PTX"."""
    ptx = f"compute_{ptx_arch()} PTX" if ptx_arch() else "no PTX"
    return f"SASS {', '.join(f'sm_{a}' for a in compiled_archs())}; {ptx}"


def kernel_path(major: int, minor: int) -> str:
    """Which kernels the ops run on a GPU of compute capability major.minor with this build, and why."""
    if _C is None:
        return "reference (pure PyTorch): k2_megatron._C is not built"
    image = kernel_image(major, minor)
    if image is None:
        return f"reference (pure PyTorch): no code for sm_{major}{minor} in k2_megatron._C ({built_for()})"
    by_reason: dict[str, list[str]] = {}
    for family, (on_sm90a, elsewhere, env) in SM90A_FAMILIES.items():
        sm90a, why = _C.choose_kernels(major, minor, env)
        by_reason.setdefault(why, []).append(f"{family} {on_sm90a if sm90a else elsewhere}")
    families = "; ".join(f"{', '.join(names)} ({why})" for why, names in by_reason.items())
    return f"{image}: {families}; {SAME_EVERYWHERE}"


def kernel_paths_report() -> list[str]:
    """kernel_path() for every GPU generation of GENERATIONS, one line each."""
    return [f"sm_{major}{minor} ({examples}): {kernel_path(major, minor)}" for major, minor, examples in GENERATIONS]


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
        fix = ("the kernels need compute capability 8.0 or newer" if major < 8 else
               f"rebuild with K2_CUDA_ARCHS including {major}{minor}, or 80 (its PTX runs on any newer GPU)")
        return (f"reference (pure PyTorch) for every op: {name} is sm_{major}{minor}, k2_megatron._C has "
                f"{built_for()}; {fix}")
    return (f"CUDA kernels on {name} (sm_{major}{minor}) from {kernel_path(major, minor)}; k2_megatron._C built for "
            f"{archs}, CUDA {torch.version.cuda}")
