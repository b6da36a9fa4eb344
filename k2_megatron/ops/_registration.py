"""One registration for every operator of k2_megatron._C (the pattern of pytorch/extension-cpp).

Each op's schema is in csrc/ops.cpp (TORCH_LIBRARY) and its CUDA kernel in csrc/<family>/. ``register_op`` gives
the op the rest, once, from Python: its pure-PyTorch reference as the CPU kernel, a fake implementation (output
shapes and dtypes, for meta tensors and torch.compile) and, for a differentiable op, its autograd formula
(torch.library.register_autograd). The same reference and formula also make the op's other path, taken when the
registered operator is not used (extension not built, or a CUDA case without a kernel): a torch.autograd.Function.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from k2_megatron import _extension

NAMESPACE = "k2_megatron"
# Every op by name, as registered below (the GPU tests forbid their reference paths through it).
REGISTERED_OPS: dict[str, "RegisteredOp"] = {}


class RegisteredOp:
    """An operator of the k2_megatron namespace, seen from the op layer.

    ``op(*args)`` calls torch.ops.k2_megatron.<name> (the CUDA kernel, or the reference registered as its CPU
    kernel; fake on meta tensors); ``op.reference(*args)`` runs the reference directly, with the same autograd
    formula; ``op.dispatches(t)`` says whether a call on tensor ``t`` may take the registered operator;
    ``op.workspace(*args)`` (or None) the device bytes its CUDA kernel holds at once besides its inputs, output
    included, which the fake implementation does not allocate (the rehearsal counts them, k2_megatron.rehearsal).
    """

    def __init__(self, name: str, reference: Callable, backward: Callable | None, setup_context: Callable | None,
                 workspace: Callable | None = None):
        self.name = name
        self.qualname = f"{NAMESPACE}::{name}"
        self.workspace = workspace
        if backward is None:
            self.reference = reference
        else:
            self.reference = _reference_function(name, reference, backward, setup_context).apply

    def dispatches(self, t: torch.Tensor) -> bool:
        return _extension.dispatch_to_op(self.name, t)

    def __call__(self, *args):
        return getattr(torch.ops.k2_megatron, self.name)(*args)


def register_op(name: str, *, reference: Callable, fake: Callable, backward: Callable | None = None,
                setup_context: Callable | None = None, workspace: Callable | None = None) -> RegisteredOp:
    """The op ``k2_megatron::<name>``: where k2_megatron._C defines its schema, ``reference`` becomes its CPU
    kernel, ``fake`` its fake implementation and ``backward`` / ``setup_context`` (both or neither, with the
    signatures of torch.library.register_autograd) its autograd formula; ``workspace``: RegisteredOp.workspace."""
    if (backward is None) != (setup_context is None):
        raise TypeError(f"register_op({name!r}): give both backward and setup_context, or neither")
    op = RegisteredOp(name, reference, backward, setup_context, workspace)
    REGISTERED_OPS[name] = op
    if _extension.op_registered(name):
        torch.library.register_fake(op.qualname, fake)
        torch.library.register_kernel(op.qualname, "cpu", reference)
        if backward is not None:
            torch.library.register_autograd(op.qualname, backward, setup_context=setup_context)
    return op


def _reference_function(name: str, reference: Callable, backward: Callable,
                        setup_context: Callable) -> type[torch.autograd.Function]:
    """A torch.autograd.Function running ``reference`` forward with the registered op's autograd formula."""
    # Renamed: a class body that assigns a name reads it from the class namespace, not from this function.
    formula, setup = backward, setup_context

    class Reference(torch.autograd.Function):
        @staticmethod
        def forward(*args):
            return reference(*args)

        setup_context = staticmethod(setup)
        backward = staticmethod(formula)

    Reference.__name__ = Reference.__qualname__ = f"{name}_reference"
    return Reference
