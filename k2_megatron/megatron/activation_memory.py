"""Activation memory as in K2 (report section 4): FP8-stored activations, selective recomputation, CPU offload.

Three independent switches (``MemoryOptions``; the pretraining config's ``memory`` section):

- ``fp8_activations``: the inputs of the MoE up-projection (fc1, the dispatched tokens) and of SwiGLU (fc1's
  output) are kept for backward as float8_e4m3fn in 1x128 tiles with an fp32 scale per tile
  (k2_megatron.ops.fp8_tile_quantize). Only the saved copies change: a saved-tensor hook quantises a tensor
  saved for backward when it shares storage with one of those inputs and dequantises it when backward needs
  it, so the forward pass is bit-identical and the compute stays in the model's dtype. Done by
  ``K2GroupedMLP`` (our experts) through ``grouped_mlp_forward`` below.
- ``recompute``: names from RECOMPUTE_CHOICES, mapped onto megatron-core's selective recomputation
  (recompute_granularity='selective', recompute_modules): ``layernorm`` -> megatron "layernorm" (the layer's
  input and pre-MLP RMSNorms; their outputs are dropped and recomputed), ``mla_up_proj`` -> megatron
  "mla_up_proj" (MLA's q and kv up-projections and RoPE, recomputed from the normed latents, which stay
  saved: the latent RMSNorms themselves are not recomputed), ``swiglu`` -> megatron "moe_act", which
  megatron implements only in its TE experts; ours honour it in ``grouped_mlp_forward`` with megatron's
  CheckpointWithoutOutput (SwiGLU output dropped after the down-projection saved it, recomputed before the
  down-projection's backward; only SwiGLU's input is kept, in FP8 when fp8_activations is on).
  The dense layers' MLP and the shared expert: megatron's local MLP has no SwiGLU-only recompute, so
  ``dense_mlp`` -> megatron "mlp" and ``shared_expert`` -> megatron "shared_experts" recompute the whole MLP
  (fc1 included) from its input.
- ``cpu_offload``: megatron-core's fine-grained activation offloading (fine_grained_activation_offloading,
  offload_modules) for the modules megatron's own layers implement in our (local-spec) K2 layers:
  OFFLOAD_CHOICES. It needs CUDA (copy streams, pinned host memory); megatron's schedules and GPTModel drive
  it, nothing else is needed here.

``transformer_config_overrides(options)`` gives the MLATransformerConfig fields, ``apply_activation_memory``
switches the FP8 storage on in built model chunks, ``SavedActivationMeter`` measures the bytes saved for
backward per decoder layer on any device (the measurement behind tests/megatron/test_activation_memory.py), and
``activation_bytes_per_token`` is the analytic count the dry-run planner uses.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict

import torch

from k2_megatron.megatron import cpu_compat
import torch.nn.functional as F

from k2_megatron import ops
from k2_megatron.training.memory import (OFFLOAD_CHOICES, RECOMPUTE_CHOICES, MemoryOptions,
                                         activation_bytes_per_token, check_supported, transformer_config_overrides)

__all__ = ["OFFLOAD_CHOICES", "RECOMPUTE_CHOICES", "MemoryOptions", "SavedActivationMeter",
           "activation_bytes_per_token", "apply_activation_memory", "check_supported",
           "fp8_saved_tensors", "grouped_mlp_forward",
           "transformer_config_overrides", "uses_activation_memory"]


def apply_activation_memory(model_chunks, options: MemoryOptions) -> int:
    """Switch FP8 activation storage on (or off) in every K2GroupedMLP of ``model_chunks`` (modules or a list);
    fix megatron-core 0.19.2's CheckpointWithoutOutput default when recomputation is on. Returns the number of
    expert modules set."""
    from k2_megatron.megatron.moe import K2GroupedMLP

    if options.recompute:
        cpu_compat.fix_checkpoint_without_output_default()
    chunks = model_chunks if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    count = 0
    for chunk in chunks:
        for module in chunk.modules():
            if isinstance(module, K2GroupedMLP):
                module.fp8_activation_storage = options.fp8_activations
                count += 1
    return count


# ----- FP8 storage of saved tensors -----

class _FP8Saved:
    """A tensor saved for backward, kept as FP8 tiles + fp32 scales."""

    __slots__ = ("q", "scales", "shape", "dtype")

    def __init__(self, t: torch.Tensor):
        self.shape, self.dtype = t.shape, t.dtype
        self.q, self.scales = ops.fp8_tile_quantize(t, check_finite=False)


def _storage_key(t: torch.Tensor):
    return (t.device, t.untyped_storage().data_ptr())


@contextlib.contextmanager
def fp8_saved_tensors(*targets: torch.Tensor, enabled: bool = True):
    """Within the block, every tensor saved for backward that shares storage with one of ``targets`` (the
    tensor itself or a view of it) is stored as FP8 1x128 tiles and dequantised when backward unpacks it."""
    keys = {_storage_key(t) for t in targets if t is not None and t.numel()} if enabled else set()
    if not keys or not torch.is_grad_enabled():
        yield
        return

    def pack(t):
        if t.numel() and t.is_floating_point() and t.dtype.itemsize > 1 and _storage_key(t) in keys:
            saved = _FP8Saved(t)
            _record_saved(saved.q, saved.scales)
            return saved
        _record_saved(t)
        return t

    def unpack(obj):
        if isinstance(obj, _FP8Saved):
            return ops.fp8_tile_dequantize(obj.q, obj.scales, obj.dtype).view(obj.shape)
        return obj

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


def _swiglu_probs(h: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, times the routing weight: K2GroupedMLP's forward, op for op (same bits)."""
    gate, up = torch.chunk(h, 2, dim=-1)
    a = F.silu(gate) * up
    return (a * probs.unsqueeze(-1)).to(h.dtype)


def swiglu_recompute_enabled(config) -> bool:
    return config.recompute_granularity == "selective" and "moe_act" in (config.recompute_modules or ())


def uses_activation_memory(mlp) -> bool:
    """Whether K2GroupedMLP ``mlp`` runs through grouped_mlp_forward (FP8 storage or SwiGLU recompute on)."""
    return bool(getattr(mlp, "fp8_activation_storage", False)) or swiglu_recompute_enabled(mlp.config)


def grouped_mlp_forward(mlp, x: torch.Tensor, batch_sizes: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """K2GroupedMLP's expert computation with FP8 storage of the fc1 and SwiGLU inputs and/or SwiGLU
    recomputation; the output is bit-identical to the plain forward."""
    fp8 = bool(getattr(mlp, "fp8_activation_storage", False))
    with fp8_saved_tensors(x, enabled=fp8):
        h = ops.grouped_gemm(x, mlp.linear_fc1_weight, batch_sizes, trans_b=True)
    if swiglu_recompute_enabled(mlp.config) and torch.is_grad_enabled():
        from megatron.core.tensor_parallel.random import CheckpointWithoutOutput

        ckpt = CheckpointWithoutOutput(fp8=None)
        with fp8_saved_tensors(h, enabled=fp8):  # the checkpoint keeps only its inputs: h (FP8) and probs
            a = ckpt.checkpoint(_swiglu_probs, h, probs)
        out = ops.grouped_gemm(a, mlp.linear_fc2_weight, batch_sizes, trans_b=True)
        ckpt.discard_output_and_register_recompute(out)  # a is freed; recomputed before fc2's backward
        return out
    with fp8_saved_tensors(h, enabled=fp8):
        a = _swiglu_probs(h, probs)
    return ops.grouped_gemm(a, mlp.linear_fc2_weight, batch_sizes, trans_b=True)


# ----- measurement -----

_METERS: list["SavedActivationMeter"] = []


def _record_saved(*tensors: torch.Tensor) -> None:
    for meter in _METERS:
        meter._add(tensors)


class SavedActivationMeter:
    """Bytes saved for backward per decoder layer during the forward passes run inside ``with meter:``.

    Counts every tensor autograd saves (through a saved-tensor hook, and the FP8 copies made by
    fp8_saved_tensors), once per storage, excluding parameters; the bytes are read when asked, so outputs
    that megatron's recomputation frees after the forward (CheckpointWithoutOutput) count as 0.
    Layers are TransformerLayer modules, keyed by layer_number; tensors saved outside any layer go to key 0.
    """

    def __init__(self, model_chunks):
        from megatron.core.transformer.transformer_layer import TransformerLayer

        self._chunks = model_chunks if isinstance(model_chunks, (list, tuple)) else [model_chunks]
        self._layers = [m for c in self._chunks for m in c.modules() if isinstance(m, TransformerLayer)]
        self._params = {_storage_key(p) for c in self._chunks for p in c.parameters()}
        self._seen: dict = {}
        self._saved: dict[int, list[torch.Tensor]] = defaultdict(list)
        self._current = [0]
        self._handles = []
        self._hooks = None

    def _add(self, tensors) -> None:
        for t in tensors:
            key = _storage_key(t)
            if key in self._params:
                continue
            seen = self._seen.get(key)
            # same address and still that storage: already counted (a freed-and-reused address is new)
            if seen is not None and seen.untyped_storage().data_ptr() == key[1]:
                continue
            self._seen[key] = t
            self._saved[self._current[-1]].append(t)

    def __enter__(self):
        for layer in self._layers:
            self._handles.append(layer.register_forward_pre_hook(self._enter_layer))
            self._handles.append(layer.register_forward_hook(self._exit_layer))
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        _METERS.append(self)
        return self

    def _enter_layer(self, layer, args) -> None:
        self._current.append(layer.layer_number)

    def _exit_layer(self, layer, args, output) -> None:
        self._current.pop()

    def _pack(self, t):
        self._add((t,))
        return t

    def __exit__(self, *exc):
        _METERS.remove(self)
        self._hooks.__exit__(*exc)
        for h in self._handles:
            h.remove()
        self._handles.clear()
        return False

    def bytes_per_layer(self) -> dict[int, int]:
        """{layer_number: bytes} (key 0: outside the decoder layers), counted now."""
        return {k: sum(t.untyped_storage().nbytes() for t in v) for k, v in sorted(self._saved.items())}

    def dtypes_per_layer(self) -> dict[int, dict[str, int]]:
        """{layer_number: {dtype name: bytes}}."""
        out = {}
        for k, v in sorted(self._saved.items()):
            d = defaultdict(int)
            for t in v:
                d[str(t.dtype).replace("torch.", "")] += t.untyped_storage().nbytes()
            out[k] = dict(d)
        return out
