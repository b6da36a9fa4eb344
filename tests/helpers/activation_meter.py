"""A measuring instrument of the activation-memory tests and benchmarks (not collected): the bytes that autograd
keeps for backward, per decoder layer, on any device."""

from __future__ import annotations

from collections import defaultdict

import torch


def _storage_key(t: torch.Tensor):
    return (t.device, t.untyped_storage().data_ptr())


class SavedActivationMeter:
    """Bytes saved for backward per decoder layer during the forward passes run inside ``with meter:``.

    Counts every tensor autograd saves (through a saved-tensor hook; k2_megatron's fp8_saved_tensors passes its
    FP8 tiles and scales through the enclosing hooks, so they are counted too), once per storage, excluding
    parameters; the bytes are read when asked, so outputs that megatron's recomputation frees after the forward
    (CheckpointWithoutOutput) count as 0.
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
        return self

    def _enter_layer(self, layer, args) -> None:
        self._current.append(layer.layer_number)

    def _exit_layer(self, layer, args, output) -> None:
        self._current.pop()

    def _pack(self, t):
        self._add((t,))
        return t

    def __exit__(self, *exc):
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
