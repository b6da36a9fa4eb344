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



# Muon under ZeRO-1 (k2_megatron.megatron.optimizer.MuonClipDistributedOptimizer.orthogonalize) streams each
# gradient bucket through fp32 gather buffers of at most a budget's bytes (MuonClipConfig.buffer_bytes, the
# config's memory.muon_buffer_mib). Per element of the matrices a rank orthogonalises itself come on top: their
# fp32 stack (4), its copy in the Newton-Schulz dtype and the kernel's iterate and result (3 x 2, bf16), the fp32
# result (4).
MUON_BYTES_PER_OWNED_ELEMENT = 14
DEFAULT_MUON_BUFFER_MIB = 512


def muon_gather_spans(matrices: list[tuple[int, int]], bucket_numel: int, dp_size: int,
                      budget_bytes: int) -> tuple[bool, list[tuple[int, int, int]]]:
    """How Muon gathers one gradient bucket of ``bucket_numel`` elements, sharded over ``dp_size`` ranks, whose Muon
    matrices are ``matrices`` ((offset, numel) in bucket order): (whole, [(start, end, matrix count)]), each span
    gathered, orthogonalised and scattered before the next. ``whole``: the bucket at once (all-gather and
    reduce-scatter of the shards), when its gathered copy and this rank's shard fit ``budget_bytes`` in fp32; else
    runs of consecutive matrices whose span (first start to last end) fits, a larger matrix alone (all-reduce of
    the span, each rank contributing its piece)."""
    if 4 * (bucket_numel + bucket_numel // dp_size) <= budget_bytes:
        return True, [(0, bucket_numel, len(matrices))]
    spans: list[tuple[int, int, int]] = []
    start = end = count = 0
    for offset, numel in matrices:
        if count and 4 * (offset + numel - start) > budget_bytes:
            spans.append((start, end, count))
            count = 0
        if not count:
            start = offset
        end, count = offset + numel, count + 1
    if count:
        spans.append((start, end, count))
    return False, spans


def muon_temporary_bytes(bucket_numel: int, dp_size: int, largest_matrix: int, budget_bytes: int,
                         tp_size: int = 1) -> float:
    """Peak bytes of Muon's gather -> Newton-Schulz -> scatter temporaries for one gradient bucket (as
    muon_gather_spans streams it; ``largest_matrix``: elements of its largest TP-local Muon matrix): the gather
    buffers plus the Newton-Schulz workspace of this rank's share of the whole (TP-gathered) matrices in them,
    dealt evenly but for one matrix."""
    shard = bucket_numel / dp_size
    if 4 * (bucket_numel + shard) <= budget_bytes:
        gathered, span = 4 * (bucket_numel + shard), bucket_numel
    else:
        span = max(budget_bytes // 4, largest_matrix)
        gathered = 4 * span
    owned = min(span, span / dp_size + largest_matrix) * tp_size
    return gathered + MUON_BYTES_PER_OWNED_ELEMENT * owned
