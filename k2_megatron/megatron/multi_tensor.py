"""Device-side replacements for megatron-core's local multi-tensor fallbacks (used when neither Transformer Engine
nor Apex is installed, as in this project), installed by ``install()`` for the gradient clipping of
``k2_megatron.megatron.optimizer.get_muonclip_optimizer``.

Without TE / Apex, megatron-core 0.19.2 (optimizer/clip_grads.py, optimizer/optimizer.py) falls back to
``megatron.core.utils``:
- ``local_multi_tensor_l2_norm`` builds ``torch.tensor([[torch.norm(t), ...]])`` from 0-dim device tensors and
  then ``float()``s the result: one host synchronisation per gradient tensor, every step;
- ``local_multi_tensor_scale`` does ``dst.copy_(src * scale)``: a temporary as large as each gradient shard (an
  expert stack's fp32 shard is GiBs at expert data-parallel size 1).
The replacements compute the same values on the device: ``torch._foreach_norm`` and one norm of the stacked
per-tensor norms (no host read), and ``torch._foreach_mul_`` in place on float32 gradients (megatron's clipping
asserts float32; ``torch.mul(src, scale, out=dst)`` for anything else): no gradient-sized temporary. They are
installed only where megatron uses its own fallback (TE's and Apex's fused kernels are left alone) and only on the
megatron-core versions of ``cpu_compat.TESTED_MEGATRON_VERSIONS`` (these are private module globals); elsewhere
megatron's fallback stays.
"""

from __future__ import annotations

import logging

import torch

from k2_megatron.megatron.cpu_compat import TESTED_MEGATRON_VERSIONS, megatron_version

log = logging.getLogger(__name__)

# megatron-core modules that bind the fallbacks as module globals, read at call time: module -> attribute names
_USERS = {
    "megatron.core.optimizer.clip_grads": ("l2_norm_impl", "multi_tensor_scale_impl"),
    "megatron.core.optimizer.optimizer": ("multi_tensor_scale_impl",),
}


def foreach_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """Drop-in for ``megatron.core.utils.local_multi_tensor_l2_norm``: the L2 norm of all tensors of
    ``tensor_lists`` as a float32 tensor of shape [1] on their device, and None (no per-tensor norms, as megatron's
    fallback). Per-tensor norms are taken in float32 (megatron's are in the tensor's dtype, then float32)."""
    tensors = [t for tensor_list in tensor_lists for t in tensor_list]
    if not tensors:
        return torch.zeros(1, dtype=torch.float32, device=noop_flag.device), None
    norms = torch._foreach_norm(tensors, 2, dtype=torch.float32)
    return torch.linalg.vector_norm(torch.stack(norms)).reshape(1), None


def foreach_scale(chunk_size, noop_flag, tensor_lists, scale):
    """Drop-in for ``megatron.core.utils.local_multi_tensor_scale``: ``dst = src * scale`` for each pair of
    ``tensor_lists[0]`` (sources) and ``tensor_lists[1]`` (destinations), in place, without a temporary."""
    in_place_fp32 = []
    for src, dst in zip(tensor_lists[0], tensor_lists[1]):
        if src is dst and dst.dtype == torch.float32:
            in_place_fp32.append(dst)
        else:  # one kernel, computed in float32 and rounded once, as megatron's src * scale
            torch.mul(src, scale, out=dst)
    if in_place_fp32:
        # float32 only: torch's CPU _foreach_mul_ rounds a Python scale to a bf16 list's dtype first
        torch._foreach_mul_(in_place_fp32, scale)


def install() -> bool:
    """Replace megatron-core's local L2-norm and scale fallbacks wherever its modules use them (see the module
    docstring). Idempotent; returns whether the replacements are in place (False: TE / Apex kernels are used, or
    this megatron-core version is untested and keeps its own fallback)."""
    import importlib

    from megatron.core import utils

    fallbacks = {utils.local_multi_tensor_l2_norm: foreach_l2_norm, utils.local_multi_tensor_scale: foreach_scale}
    modules = {name: importlib.import_module(name) for name in _USERS}
    found = [(m, attr) for name, m in modules.items() for attr in _USERS[name]
             if getattr(m, attr, None) in fallbacks]
    if not found:
        return any(getattr(m, attr, None) in fallbacks.values() for name, m in modules.items() for attr in _USERS[name])
    version = megatron_version()
    if version not in TESTED_MEGATRON_VERSIONS:
        log.warning("megatron-core %s is untested here (tested: %s): keeping its local multi-tensor fallbacks "
                    "(a host read per gradient tensor and a gradient-sized copy in clipping)",
                    version, ", ".join(TESTED_MEGATRON_VERSIONS))
        return False
    for module, attr in found:
        setattr(module, attr, fallbacks[getattr(module, attr)])
    return True
