"""The one rule of the GPU tests of every op: on a CUDA GPU of compute capability 8.0 or newer with
k2_megatron._C built, the op's CUDA kernel must exist and run, and the pure-PyTorch reference must not (a silent
fallback to the reference is a failure, not a skip). Without _C, or on an older GPU, the tests skip and say why.

    require_cuda_kernel("mla_attention_fwd", q)               # skip or fail per the rule, before the op runs
    with reference_forbidden("mla_attention_fwd"):            # the op may not fall back to the reference
        out = mla_attention(q, k, v)
    names = launched_kernels(lambda: mla_attention(q, k, v))  # the CUDA kernels the call launched (profiler)
"""

import contextlib
from unittest import mock

import pytest
import torch

import k2_megatron
from k2_megatron import _extension
from k2_megatron.ops._registration import REGISTERED_OPS

MIN_COMPUTE_CAPABILITY = (8, 0)  # the kernels' documented minimum (mma.sync, cp.async)


def require_cuda_kernel(op: str, t: torch.Tensor) -> None:
    """Skips without k2_megatron._C or below compute capability 8.0; fails unless k2_megatron::<op> has a CUDA
    kernel that the op layer dispatches to for tensors on t's device."""
    if not _extension.extension_loaded():
        pytest.skip(f"k2_megatron._C is not built: no CUDA kernel of k2_megatron::{op} to test")
    capability = torch.cuda.get_device_capability(t.device)
    if capability < MIN_COMPUTE_CAPABILITY:
        pytest.skip(f"{torch.cuda.get_device_name(t.device)} has compute capability {capability}; the kernels "
                    f"need {MIN_COMPUTE_CAPABILITY} or newer")
    assert _extension.op_registered(op), f"k2_megatron._C was built without the schema k2_megatron::{op}"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"k2_megatron::{op}", "CUDA"), \
        f"no CUDA kernel is registered for k2_megatron::{op}"
    assert _extension.dispatch_to_op(op, t), \
        f"k2_megatron::{op} does not run on {t.device}: {k2_megatron.kernels_status()}"


@contextlib.contextmanager
def reference_forbidden(*ops: str):
    """Inside the block, the reference path of any of the k2_megatron ops named (the path an op layer falls back
    to when it does not dispatch to the registered operator) raises AssertionError."""
    def forbidden(name):
        def call(*args, **kwargs):
            raise AssertionError(f"k2_megatron::{name}: the op fell back to its reference although the registered "
                                 "operator (a CUDA kernel, or on the CPU the reference kernel of _C's schema) supports "
                                 "the call")
        return call

    with contextlib.ExitStack() as stack:
        for name in ops:
            stack.enter_context(mock.patch.object(REGISTERED_OPS[name], "reference", forbidden(name)))
        yield


def launched_kernels(fn) -> list[str]:
    """The names of the CUDA kernels that fn() launches (torch.profiler over CUPTI), in launch order."""
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
