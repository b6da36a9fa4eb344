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
# megatron-core's offload_modules names: its layers implement the first five, our experts (K2GroupedMLP) the last two
# (expert_fc1: the fc1 input, i.e. the dispatched tokens; moe_act: the SwiGLU input, i.e. fc1's output).
OFFLOAD_CHOICES = ("attn_norm", "qkv_linear", "core_attn", "attn_proj", "mlp_norm", "expert_fc1", "moe_act")


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



# One H100 SXM 80GB as torch.cuda.get_device_properties(0).total_memory reports it (81559 MiB, ~79.6 GiB: the card's
# 80 GiB of HBM3 less what the driver reserves): the dry run's default device memory (memory.device_memory_gib) and
# the GPU the rehearsal answers for (k2_megatron.rehearsal.fake_cuda.H100).
H100_80GB_MEMORY_BYTES = 81559 * 2**20
DEFAULT_DEVICE_MEMORY_GIB = H100_80GB_MEMORY_BYTES / 2**30


# Muon under ZeRO-1 (k2_megatron.megatron.optimizer.MuonClipDistributedOptimizer.orthogonalize) streams each
# gradient bucket through fp32 gather buffers of at most a budget's bytes (MuonClipConfig.buffer_bytes, the
# config's memory.muon_buffer_mib), and orthogonalises the matrices a rank owns in Newton-Schulz calls whose working
# set fits the same budget. The working set per element of the whole matrices of one call (bf16 iteration, K2's):
# their fp32 stack (4), its bf16 copy (2) and the CUDA kernel's peak, while it normalises: an fp32 copy, the
# normalised quotient, the bf16 iterate and, for a tall matrix, its transposed copy (4 + 4 + 2 + 2;
# k2_megatron.ops.newton_schulz.cuda_workspace_bytes).
NEWTON_SCHULZ_BYTES_PER_ELEMENT = 18
DEFAULT_MUON_BUFFER_MIB = 512


# With the optimizer state in host memory (memory.optimizer_state_on_host, k2_megatron.megatron.host_state), the step
# streams each parameter's master weights and state through the device in pieces of the same budget; the largest
# piece per element is AdamW's: its master, two moments and the temporary of its denominator (fp32). Muon's pieces
# (momentum, then master) need less.
STREAMED_BYTES_PER_ELEMENT = 16


def streamed_piece_elements(budget_bytes: int) -> int:
    """Elements of one piece of optimizer state streamed through the device within ``budget_bytes``."""
    return max(1, budget_bytes // STREAMED_BYTES_PER_ELEMENT)


def finite_check_bytes_per_element(itemsize: int) -> int:
    """Device bytes per element that ``torch.isfinite`` holds at once for a floating tensor of ``itemsize``-byte
    elements: ATen computes ``(x == x) * (x.abs() != inf)`` (aten/src/ATen/native/TensorCompare.cpp), so three bool
    tensors and the absolute values are alive together (7 bytes for the fp32 gradient buffers)."""
    return 3 + itemsize


def finite_check_piece(itemsize: int, budget_bytes: int) -> int:
    """Elements checked at a time so that the finiteness check of a gradient buffer holds at most ``budget_bytes``
    (MuonClipConfig.buffer_bytes, the same budget as Muon's gather buffers)."""
    return max(1, budget_bytes // finite_check_bytes_per_element(itemsize))


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


def newton_schulz_batches(numels: list[int], budget_bytes: int) -> list[int]:
    """How many of the consecutive whole matrices of ``numels`` elements each Newton-Schulz call takes, in order, so
    that its working set (NEWTON_SCHULZ_BYTES_PER_ELEMENT per element) fits ``budget_bytes``; a larger matrix alone."""
    counts: list[int] = []
    filled = count = 0
    for numel in numels:
        if count and NEWTON_SCHULZ_BYTES_PER_ELEMENT * (filled + numel) > budget_bytes:
            counts.append(count)
            filled = count = 0
        filled, count = filled + numel, count + 1
    if count:
        counts.append(count)
    return counts


def muon_temporary_bytes(bucket_numel: int, dp_size: int, largest_matrix: int, budget_bytes: int,
                         tp_size: int = 1) -> float:
    """Peak bytes of Muon's gather -> Newton-Schulz -> scatter temporaries for one gradient bucket (as
    muon_gather_spans and newton_schulz_batches stream it; ``largest_matrix``: elements of its largest TP-local Muon
    matrix): the gathered span, plus the larger of this rank's reduce-scatter output (whole bucket at once) and the
    working set of one Newton-Schulz call over this rank's share of the whole (TP-gathered) matrices in the span
    (dealt evenly but for one matrix), filled up to the budget."""
    shard = bucket_numel / dp_size
    whole = 4 * (bucket_numel + shard) <= budget_bytes
    span = bucket_numel if whole else max(budget_bytes // 4, largest_matrix)
    owned = min(span, span / dp_size + largest_matrix) * tp_size
    batch = min(owned, max(budget_bytes // NEWTON_SCHULZ_BYTES_PER_ELEMENT, largest_matrix * tp_size))
    return 4 * span + max(4 * shard if whole else 0, NEWTON_SCHULZ_BYTES_PER_ELEMENT * batch)
