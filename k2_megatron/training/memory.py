"""The activation-memory options (the pretraining config's ``memory`` section) and their analytic cost.

Kept free of megatron imports so that config validation and the dry-run planner stay light; the mechanisms
live in k2_megatron/megatron/activation_memory.py (which re-exports these names).
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict

import torch

# our name -> megatron-core's recompute_modules entry. dense_mlp / shared_expert recompute the whole dense MLP /
# shared expert (megatron's local MLP has no SwiGLU-only recompute), fc1 included.
RECOMPUTE_CHOICES = {"layernorm": "layernorm", "mla_up_proj": "mla_up_proj", "swiglu": "moe_act", "dense_mlp": "mlp",
                     "shared_expert": "shared_experts"}
OFFLOAD_CHOICES = ("attn_norm", "qkv_linear", "core_attn", "attn_proj", "mlp_norm")


@dataclasses.dataclass(frozen=True)
class MemoryOptions:
    fp8_activations: bool = False
    recompute: tuple = ()
    cpu_offload: tuple = ()

    def __post_init__(self):
        if not isinstance(self.fp8_activations, bool):
            raise TypeError(f"memory.fp8_activations must be a bool, got {self.fp8_activations!r}")
        for name, value, choices in (("recompute", self.recompute, tuple(RECOMPUTE_CHOICES)),
                                     ("cpu_offload", self.cpu_offload, OFFLOAD_CHOICES)):
            if isinstance(value, str) or not isinstance(value, (list, tuple)):
                raise TypeError(f"memory.{name} must be a list of names from {list(choices)}, got {value!r}")
            bad = [v for v in value if v not in choices]
            if bad or len(set(value)) != len(value):
                raise ValueError(f"memory.{name}: {list(value)} has unknown or repeated entries {bad or value}; "
                                 f"choices: {list(choices)}")
            object.__setattr__(self, name, tuple(value))

    @property
    def any(self) -> bool:
        return self.fp8_activations or bool(self.recompute) or bool(self.cpu_offload)


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
    """Raise ValueError for options this machine cannot run (CPU offload without CUDA)."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if options.cpu_offload and not cuda:
        raise ValueError(f"memory.cpu_offload={list(options.cpu_offload)} needs CUDA: megatron-core's activation "
                         f"offloading copies to pinned host memory on side streams (set memory.cpu_offload=[] on CPU)")


def activation_bytes_per_token(cfg, layer: int, options: MemoryOptions, dtype_bytes: int = 2) -> float:
    """Bytes kept for backward per token by decoder layer ``layer`` of K2Config ``cfg`` (rough count of the
    megatron local modules, as the dry-run planner's; activations in ``dtype_bytes``), with ``options``:
    recompute drops the outputs of the listed modules, FP8 stores the MoE fc1 and SwiGLU inputs in
    1 byte + 4 bytes per 128, CPU offload moves the listed modules' saved inputs off the GPU."""
    rc, off = set(options.recompute), set(options.cpu_offload)
    h, H = cfg.hidden_size, cfg.num_attention_heads
    dn, dr, dv = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    ql, kl = cfg.q_lora_rank or 0, cfg.kv_lora_rank
    fp8 = (1 + 4 / 128) / dtype_bytes  # FP8 bytes per element, in units of dtype_bytes
    norm = "layernorm" in rc
    up = "mla_up_proj" in rc
    e = defaultdict(float)  # elements per token, by module
    e["attn_norm"] = h + (0 if norm else h)                       # residual in (norm input), norm out
    e["qkv_linear"] = (ql + kl + dr)                              # q / kv latents (down-projection outputs)
    # normed latents (kept: megatron's "mla_up_proj" recomputes from them), q and kv up-projection outputs
    e["mla_up"] = ql + kl + (0 if up else H * (dn + dr) + H * (dn + dv))
    e["core_attn"] = 2 * H * (dn + dr) + H * dv                   # q, k (with rope), v into attention
    e["attn_proj"] = H * dv                                       # attention output (projection input)
    e["mlp_norm"] = h + (0 if norm else h)
    if layer < cfg.first_k_dense_replace:
        f = cfg.intermediate_size
        e["mlp"] = 0 if "dense_mlp" in rc else 2 * f + f         # fc1 out (SwiGLU in), SwiGLU out
    else:
        k, fe, fs = cfg.num_experts_per_tok, cfg.moe_intermediate_size, cfg.moe_intermediate_size * cfg.n_shared_experts
        swiglu_rc = "swiglu" in rc
        fc1_in = k * h * (fp8 if options.fp8_activations else 1)
        swiglu_in = k * 2 * fe * (fp8 if options.fp8_activations else 1)
        e["router"] = 2 * cfg.n_routed_experts                    # fp32 logits
        e["experts"] = fc1_in + swiglu_in + (0 if swiglu_rc else k * fe) + k * h  # ... SwiGLU out, combine in
        e["shared"] = 0 if "shared_expert" in rc else 2 * fs + fs
    total = sum(v for name, v in e.items() if name not in off)
    return total * dtype_bytes
