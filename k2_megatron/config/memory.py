"""The activation-memory options: the pretraining config's ``memory`` section as one value.

The mechanisms (FP8-stored activations, recomputation, CPU offload) are k2_megatron.megatron.activation_memory;
the planner's analytic cost of each option is k2_megatron.training.plan.activation_bytes_per_token.
"""

from __future__ import annotations

import dataclasses

# our name -> megatron-core's recompute_modules entry. dense_mlp / shared_expert recompute the whole dense MLP /
# shared expert (megatron's local MLP has no SwiGLU-only recompute), fc1 included.
RECOMPUTE_CHOICES = {"layernorm": "layernorm", "mla_up_proj": "mla_up_proj", "swiglu": "moe_act", "dense_mlp": "mlp",
                     "shared_expert": "shared_experts"}
OFFLOAD_CHOICES = ("attn_norm", "qkv_linear", "core_attn", "attn_proj", "mlp_norm")


@dataclasses.dataclass(frozen=True)
class MemoryOptions:
    """fp8_activations: MoE fc1 and SwiGLU inputs saved for backward as FP8 1x128 tiles; recompute: names from
    RECOMPUTE_CHOICES; cpu_offload: names from OFFLOAD_CHOICES (megatron's offload_modules, CUDA only)."""

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
