"""Activation memory as in K2 (report section 4): FP8-stored activations, selective recomputation, CPU offload.

Three independent switches (``k2_megatron.config.MemoryOptions``; the pretraining config's ``memory`` section):

- ``fp8_activations``: the inputs of the MoE up-projection (fc1, the dispatched tokens) and of SwiGLU (fc1's
  output) are kept for backward as float8_e4m3fn in 1x128 tiles with an fp32 scale per tile
  (k2_megatron.ops.fp8_tile_quantize). Only the saved copies change: ``fp8_saved_tensors`` quantises a tensor
  saved for backward when it shares storage with one of those inputs and dequantises it when backward needs
  it, so the forward pass is bit-identical and the compute stays in the model's dtype. ``K2GroupedMLP`` (our
  experts, k2_megatron.megatron.moe) uses it when its ``fp8_activation_storage`` switch is on
  (``apply_activation_memory``).
- ``recompute``: names from RECOMPUTE_CHOICES, mapped onto megatron-core's selective recomputation
  (recompute_granularity='selective', recompute_modules): ``layernorm`` -> megatron "layernorm" (the layer's
  input and pre-MLP RMSNorms; their outputs are dropped and recomputed), ``mla_up_proj`` -> megatron
  "mla_up_proj" (MLA's q and kv up-projections and RoPE, recomputed from the normed latents, which stay
  saved: the latent RMSNorms themselves are not recomputed), ``swiglu`` -> megatron "moe_act", which
  megatron implements only in its TE experts; ours honour it (``swiglu_recompute_enabled``) with megatron's
  CheckpointWithoutOutput (SwiGLU output dropped after the down-projection saved it, recomputed before the
  down-projection's backward; only SwiGLU's input is kept, in FP8 when fp8_activations is on).
  The dense layers' MLP and the shared expert: megatron's local MLP has no SwiGLU-only recompute, so
  ``dense_mlp`` -> megatron "mlp" and ``shared_expert`` -> megatron "shared_experts" recompute the whole MLP
  (fc1 included) from its input.
- ``cpu_offload``: megatron-core's fine-grained activation offloading (fine_grained_activation_offloading,
  offload_modules; megatron/core/pipeline_parallel/fine_grained_activation_offload.py): the tensors a module saves
  for backward are copied to pinned host memory on a side stream when its group commits and copied back when
  backward reaches it, overlapped with the 1F1B schedule. OFFLOAD_CHOICES: attn_norm, qkv_linear, core_attn,
  attn_proj, mlp_norm, which megatron's own layers implement in our (local-spec) K2 layers, and expert_fc1 (the
  routed experts' fc1 input, i.e. the dispatched tokens) and moe_act (the SwiGLU input, i.e. fc1's output), which
  our experts implement as megatron's TEGroupedMLP does (K2GroupedMLP.forward). With fp8_activations the FP8 tiles
  and scales are what is offloaded (``fp8_saved_tensors`` passes what it stores through the offload hooks); with
  the swiglu recompute, moe_act's group commits after the down-projection, so the SwiGLU input is reloaded before
  it is recomputed. Megatron asks for attn_proj only with core_attn (the output of core attention is attn_proj's
  input). It needs CUDA (copy streams, pinned host memory: ``check_supported``), not Transformer Engine (megatron's
  offload manager sets a TE flag that only TE's layers read: cpu_compat.fix_offload_without_transformer_engine);
  megatron's schedules and GPTModel drive it.

``transformer_config_overrides(options)`` gives the MLATransformerConfig fields, ``apply_activation_memory``
switches the FP8 storage on in built model chunks. The planner's analytic count of each option is
k2_megatron.training.plan.activation_bytes_per_token.
"""

from __future__ import annotations

import contextlib

import torch

from k2_megatron import ops
from k2_megatron.config.memory import RECOMPUTE_CHOICES, MemoryOptions
from k2_megatron.megatron.cpu_compat import (fix_checkpoint_without_output_default,
                                              fix_offload_without_transformer_engine)

__all__ = ["apply_activation_memory", "check_supported", "fp8_saved_tensors", "swiglu_recompute_enabled",
           "transformer_config_overrides"]


def transformer_config_overrides(options: MemoryOptions) -> dict:
    """MLATransformerConfig fields for ``options`` (to_transformer_config(..., **overrides))."""
    out = {}
    if options.recompute:
        out["recompute_granularity"] = "selective"
        out["recompute_modules"] = [RECOMPUTE_CHOICES[name] for name in options.recompute]
    if options.cpu_offload:
        out["fine_grained_activation_offloading"] = True
        out["offload_modules"] = list(options.cpu_offload)
    return out


def check_supported(options: MemoryOptions, *, cuda: bool | None = None) -> None:
    """Raise ValueError for options this machine cannot run: CPU offload without CUDA."""
    if not options.cpu_offload:
        return
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if not cuda:
        raise ValueError(f"memory.cpu_offload={list(options.cpu_offload)} needs CUDA: megatron-core's activation "
                         f"offloading copies to pinned host memory on side streams (set memory.cpu_offload=[] on CPU)")


def apply_activation_memory(model_chunks, options: MemoryOptions) -> int:
    """Switch FP8 activation storage on (or off) in every module of ``model_chunks`` (modules or a list) that has
    the switch (``fp8_activation_storage``: K2GroupedMLP); fix megatron-core 0.19.2's CheckpointWithoutOutput
    default when recomputation is on and its offload manager's need of Transformer Engine when offload is on. Returns
    the number of modules set."""
    if options.recompute:
        fix_checkpoint_without_output_default()
    if options.cpu_offload:
        fix_offload_without_transformer_engine()
    chunks = model_chunks if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    count = 0
    for chunk in chunks:
        for module in chunk.modules():
            if hasattr(module, "fp8_activation_storage"):
                module.fp8_activation_storage = options.fp8_activations
                count += 1
    return count


def swiglu_recompute_enabled(config) -> bool:
    """Whether megatron's selective recomputation of "moe_act" (our experts' SwiGLU) is on in ``config``."""
    return config.recompute_granularity == "selective" and "moe_act" in (config.recompute_modules or ())


# ----- FP8 storage of saved tensors -----

class _FP8Saved:
    """A tensor saved for backward, kept as FP8 tiles + fp32 scales (each as the enclosing hooks packed it)."""

    __slots__ = ("q", "scales", "shape", "dtype")

    def __init__(self, q, scales, shape: torch.Size, dtype: torch.dtype):
        self.q, self.scales, self.shape, self.dtype = q, scales, shape, dtype


def _storage_key(t: torch.Tensor):
    # the storage object's address, not its data pointer: views and detached copies share it, and fake tensors (the
    # rehearsal's), whose data pointers are all 0, keep distinct ones
    return t.untyped_storage()._cdata


def _identity(x):
    return x


def _enclosing_saved_tensors_hooks():
    """(pack, unpack) of the saved-tensor hooks active here, or identities. torch applies only the innermost pair,
    so hooks pushed inside would hide the enclosing ones (a memory meter, megatron's activation offloading)
    unless they pass what they store through them."""
    hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
    return hooks if hooks is not None else (_identity, _identity)


@contextlib.contextmanager
def fp8_saved_tensors(*targets: torch.Tensor, enabled: bool = True):
    """Within the block, every tensor saved for backward that shares storage with one of ``targets`` (the
    tensor itself or a view of it) is stored as FP8 1x128 tiles and dequantised when backward unpacks it.
    What the block stores (tiles, scales and the other saved tensors) goes through the enclosing saved-tensor
    hooks, if any."""
    keys = {_storage_key(t) for t in targets if t is not None and t.numel()} if enabled else set()
    if not keys or not torch.is_grad_enabled():
        yield
        return
    outer_pack, outer_unpack = _enclosing_saved_tensors_hooks()

    def pack(t):
        if t.numel() and t.is_floating_point() and t.dtype.itemsize > 1 and _storage_key(t) in keys:
            q, scales = ops.fp8_tile_quantize(t, check_finite=False)
            return _FP8Saved(outer_pack(q), outer_pack(scales), t.shape, t.dtype)
        return outer_pack(t)

    def unpack(obj):
        if isinstance(obj, _FP8Saved):
            q, scales = outer_unpack(obj.q), outer_unpack(obj.scales)
            return ops.fp8_tile_dequantize(q, scales, obj.dtype).view(obj.shape)
        return outer_unpack(obj)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield
