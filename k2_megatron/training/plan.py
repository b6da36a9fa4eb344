"""The dry run: per-rank parameter counts and memory of a pretraining config on a simulated world.

    python examples/pretrain_k2.py --config examples/configs/k2_full.yaml --dry-run [--world-size 256]

Computed analytically from the K2Config and the parallel layout (nothing is built and no process group is
made): building each rank's stage on the meta device was tried, but megatron-core's CPU initialisation
materialises some weights (the 163,840 x 7,168 embedding alone is 4.7 GB in fp32), so it is neither free nor
fast. The per-layer parameter formulas below are checked against real megatron-core K2 models in
tests/training/test_pretrain_plan.py (every parameter of k2-tiny and of a 2-stage / 2-expert-rank split).

Layout: the run's k2_megatron.config.ParallelLayout (megatron-core's: world = TP x PP x DP; experts split over
EP ranks taken inside DP x TP; expert data-parallel size = world / (PP x EP)) and its split of the layers into
PP x V chunks (V virtual stages, chunk c on pipeline stage c mod PP); the embedding sits in chunk 0, the final
norm and output layer in the last chunk.

Memory per rank (bytes per parameter):
- weights: 2 (bf16) or 4 (fp32) for every parameter the rank holds;
- gradient buffers: 4 (fp32 accumulation, grad_reduce_in_fp32);
- ZeRO-1 optimizer state, sharded over the dense / expert data-parallel group: fp32 master copy 4 (bf16 runs only)
  + MuonClip state: Muon momentum 4 (hidden matrices and expert stacks), AdamW moments 8 (embeddings, output
  layer, router, norms);
- activations: what each (micro-batch, model chunk) forward alive at the stage's peak keeps for backward
  (``chunk_activation_bytes``: per module and token, ``activation_bytes_by_module``, as measured under the rehearsal,
  less what CPU offload moves to the host, ``offload_leftover_bytes`` staying; on the last chunk its output, the final
  norm's output and the loss's fp32 logits), the passes alive taken from megatron's schedule order
  (``in_flight_chunks``: 1F1B PP - stage, interleaved its warm-up count in get_schedule_table's order, one more with
  the EP all-to-all overlap), plus the working set of the backward running then (``chunk_backward_bytes``: the
  experts' dispatched rows, the embedding's or the logits' gradient) or of the last chunk's forward (the output
  layer's logits); bf16, without and with K2's selective recomputation (norms, SwiGLU, MLA up-projections
  recomputed), and with the config's ``memory`` section (recompute, FP8 storage, CPU offload); each chunk's two parts
  are checked against the rehearsal's measurement (tests/rehearsal/test_recipes_rehearsed.py);
  with ``memory.optimizer_state_on_host`` the optimizer state (master copy included) is in host memory instead
  (``optimizer_host``; 0 on the device);
- optimizer temporaries: the peak of one MuonClip step (``optimizer_temporary_bytes``): Muon's gather span and one
  Newton-Schulz call (the CUDA kernel's workspace included), each within ``memory.muon_buffer_mib``, or the
  finiteness check's piece (gradient clipping scales in place: k2_megatron.megatron.multi_tensor);
- communication buffers outside the activations: the EP all-to-all's outputs (``communication_bytes``; the
  pipeline's received tensors are the chunks' inputs, counted with the activations).
The total per rank (states, temporaries, buffers, activations with the memory section) is compared with the
device's memory (``memory.device_memory_gib``, default an H100 80GB's 79.6 GiB): the dry run exits 2, naming the bytes per category,
when the largest stage does not fit.
Not modelled: NCCL's and the CUDA caching allocator's own memory (workspace, fragmentation), the CUDA context.
K2 report (section 4): bf16 weights + fp32 gradient buffers ~6 TB over a 256-GPU model-parallel group (~30 GB
per GPU).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from k2_megatron.config import ConfigError, K2Config, MemoryOptions, ParallelLayout, PretrainConfig, get_preset
from k2_megatron.config.memory import (H100_80GB_MEMORY_BYTES, STREAMED_BYTES_PER_ELEMENT,
                                       finite_check_bytes_per_element, finite_check_piece, muon_temporary_bytes,
                                       streamed_piece_elements)
from k2_megatron.config.schedule import BatchLayout, batch_layout

GIB = 1024**3
PAPER_WEIGHTS_GRADS_TB = 6.0
PAPER_PER_GPU_GB = 30.0


@dataclass
class LayerParams:
    """Parameters of one decoder layer, split by kind (whole layer, all experts)."""

    dense: int        # attention + norms + dense MLP / shared expert: replicated over EP and DP
    dense_muon: int   # of which hidden matrices (Muon)
    router: int       # router weight (AdamW)
    experts: int      # all routed experts (Muon), split over EP


def layer_params(cfg, layer: int) -> LayerParams:
    """Parameter counts of decoder layer ``layer`` of a K2Config (megatron-core's MLA + MoE modules)."""
    h, H = cfg.hidden_size, cfg.num_attention_heads
    dn, dr, dv = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    if cfg.q_lora_rank is not None:
        q_mats = h * cfg.q_lora_rank + cfg.q_lora_rank * H * (dn + dr)   # linear_q_down_proj, linear_q_up_proj
        q_norm = cfg.q_lora_rank                                         # q_layernorm
    else:
        q_mats, q_norm = h * H * (dn + dr), 0
    attn_mats = (q_mats + h * (cfg.kv_lora_rank + dr)                    # linear_kv_down_proj (c_kv | k_R)
                 + cfg.kv_lora_rank * H * (dn + dv)                      # linear_kv_up_proj (k_C | v)
                 + H * dv * h)                                           # linear_proj
    norms = h + q_norm + cfg.kv_lora_rank + h                            # input, q, kv, pre-MLP norms
    if layer < cfg.first_k_dense_replace:
        mlp = 3 * h * cfg.intermediate_size                              # SwiGLU fc1 (gate | up) + fc2
        return LayerParams(attn_mats + norms + mlp, attn_mats + mlp, 0, 0)
    shared = 3 * h * cfg.moe_intermediate_size * cfg.n_shared_experts
    experts = 3 * h * cfg.moe_intermediate_size * cfg.n_routed_experts
    return LayerParams(attn_mats + norms + shared, attn_mats + shared, cfg.n_routed_experts * h, experts)


@dataclass(frozen=True)
class LayerLargest:
    """The largest parameter and the largest Muon matrix (elements, whole: before TP or EP splits) of a layer, dense
    and expert (0: none). A gradient bucket holds whole parameters; Newton-Schulz runs on whole matrices."""

    dense_param: int
    dense_matrix: int
    expert_param: int   # one expert stack [E, n, m] of all routed experts (split over EP)
    expert_matrix: int


def layer_largest(cfg, layer: int) -> LayerLargest:
    """LayerLargest of decoder layer ``layer`` of a K2Config (the matrices of layer_params)."""
    h, H = cfg.hidden_size, cfg.num_attention_heads
    dn, dr, dv = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    ql, kl = cfg.q_lora_rank, cfg.kv_lora_rank
    q = [h * ql, ql * H * (dn + dr)] if ql is not None else [h * H * (dn + dr)]
    attn = [*q, h * (kl + dr), kl * H * (dn + dv), H * dv * h]
    f = cfg.intermediate_size if layer < cfg.first_k_dense_replace else cfg.moe_intermediate_size * cfg.n_shared_experts
    # SwiGLU's fc1 is one parameter [gate; up] and two Muon matrices
    dense_param, dense_matrix = max(*attn, 2 * f * h), max(*attn, f * h)
    if layer < cfg.first_k_dense_replace:
        return LayerLargest(dense_param, dense_matrix, 0, 0)
    fe = cfg.moe_intermediate_size
    return LayerLargest(max(dense_param, cfg.n_routed_experts * h), dense_matrix, cfg.n_routed_experts * 2 * fe * h,
                        fe * h)


def activation_bytes_by_module(cfg: K2Config, layer: int, options: MemoryOptions, dtype_bytes: int = 2) -> dict:
    """Device bytes kept for backward per token by decoder layer ``layer`` of K2Config ``cfg`` (activations in
    ``dtype_bytes``, megatron's local modules with ours inside), by module, with ``options``: recompute drops what
    the listed modules recompute, FP8 stores the MoE fc1 and SwiGLU inputs in 1 byte + 4 bytes per 128, and CPU
    offload moves the listed modules' saved tensors off the device (``activation_bytes_per_token`` sums what stays).

    Keys are megatron-core's ``offload_modules`` names where a module is one (attn_norm, qkv_linear, core_attn,
    attn_proj, mlp_norm, expert_fc1, moe_act: the tensors saved inside that module's offload context); the others
    are ours. Measured per module under the rehearsal's fake CUDA (the live allocations of one micro-batch's forward
    that its backward frees, K2 sizes): a layer keeps its input (the norm's) and its mid-layer residual, fp32
    reciprocal RMS per norm, MLA's latents and normed latents, the q / k / v handed to attention (its up-projection
    outputs themselves are freed: RoPE and the concatenation copy them), attention's output and fp32 log-sum-exp,
    the router's fp32 logits and scores, the dispatched tokens (fc1's input), fc1's output and the two SwiGLU
    intermediates and output our weighted SwiGLU saves (k2_megatron.megatron.moe._weighted_swiglu); the combine
    keeps nothing (the routing weights are applied inside SwiGLU, the un-permutation has no weights)."""
    rc, d = set(options.recompute), dtype_bytes
    h, H = cfg.hidden_size, cfg.num_attention_heads
    dn, dr, dv = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    ql, kl = cfg.q_lora_rank or 0, cfg.kv_lora_rank
    fp8 = 1 + 4 / 128  # FP8 bytes per element (1x128 tiles, an fp32 scale each)
    norm, rstd = "layernorm" in rc, 4  # recomputed norms keep only their input; fp32 1/RMS per token otherwise
    e = {}
    e["attn_norm"] = h * d + (0 if norm else rstd)                    # the layer's input, saved by its norm
    # the norm's output (the down-projections' input), the q and kv latents (k_R included), their normed copies
    # (the up-projections' input; kept with mla_up_proj recompute) with their norms' 1/RMS, RoPE's fp32 cos/sin
    e["qkv_linear"] = ((0 if norm else h) + ql + kl + dr + ql + kl) * d + (2 * rstd if ql else rstd) + dr * 4
    qkv = 2 * H * (dn + dr) + H * dv                                   # q, k (RoPE applied), v into attention
    e["core_attn"] = (0 if "mla_up_proj" in rc else qkv * d) + H * 4  # ... and the fp32 log-sum-exp per head
    e["attn_proj"] = H * dv * d                                        # attention's output (linear_proj's input)
    e["mlp_norm"] = h * d + (0 if norm else rstd)                      # the mid-layer residual, saved by the norm
    e["mlp_input"] = 0 if norm else h * d                              # the norm's output (router, fc1 inputs)
    if layer < cfg.first_k_dense_replace:
        f = cfg.intermediate_size                                      # fc1 out (2f), SwiGLU's saved tensors (3f)
        e["dense_mlp"] = 0 if "dense_mlp" in rc else 5 * f * d
        return e
    k, E, fe = cfg.num_experts_per_tok, cfg.n_routed_experts, cfg.moe_intermediate_size
    fs = fe * cfg.n_shared_experts
    swiglu = "swiglu" in rc
    stored = fp8 if options.fp8_activations else d
    # fp32 logits and scores, the bool routing map; top-k ids (int64) and weights (fp32), the dispatcher's row map
    # (int64), ids and weights of the dispatched rows
    e["router"] = 9 * E + 32 * k
    e["expert_fc1"] = k * h * stored                                   # the dispatched tokens (fc1's input)
    # fc1's output (SwiGLU's input; the checkpoint's input with swiglu recompute) and silu(gate), silu(gate) * up
    e["moe_act"] = 2 * k * fe * stored + (0 if swiglu else 2 * k * fe * d)
    e["expert_fc2"] = 0 if swiglu else k * fe * d                      # the weighted SwiGLU output (fc2's input)
    e["shared_expert"] = 0 if "shared_expert" in rc else 5 * fs * d    # as the dense MLP's, whole recompute
    return e


def offloaded_bytes_by_module(cfg: K2Config, layer: int, options: MemoryOptions, dtype_bytes: int = 2) -> dict:
    """Pinned host bytes per token that megatron-core's fine-grained offloading copies for each offload group of
    decoder layer ``layer`` (keys as ``activation_bytes_by_module``'s), whether or not it is in
    ``options.cpu_offload``. A group copies every tensor saved inside it, once per save and before recomputation
    discards anything (ChunkOffloadHandler.bulk_offload_group), so it can copy more than the device would keep:
    the attention norm's output is saved by both MLA down-projections (two copies, recomputed norm or not), and
    core_attn copies q, k, v and attention's output (saved again by attn_proj) although mla_up_proj recomputes
    q, k, v. Tensors under its min_offloaded_tensor_size (2**20 elements: K2's fp32 1/RMS, RoPE tables and
    log-sum-exp at 4096 tokens) stay on the device. Measured under the rehearsal (k2_full, 4096 tokens: the groups'
    tensors); the experts' FP8 copies are a few rows larger there (megatron pads each expert's rows), not counted."""
    d = dtype_bytes
    h, H = cfg.hidden_size, cfg.num_attention_heads
    dn, dr, dv = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    ql, kl = cfg.q_lora_rank or 0, cfg.kv_lora_rank
    on_device = activation_bytes_by_module(cfg, layer, options, dtype_bytes)
    out = {"attn_norm": h * d, "qkv_linear": (2 * h + 2 * ql + 2 * kl + dr) * d,
           "core_attn": (2 * H * (dn + dr) + 2 * H * dv) * d, "attn_proj": H * dv * d, "mlp_norm": h * d}
    for name in ("expert_fc1", "moe_act"):  # the experts' offload groups hold exactly what the device would keep
        if name in on_device:
            out[name] = on_device[name]
    return out


MIN_OFFLOADED_ELEMENTS = 2**20  # megatron-core's min_offloaded_tensor_size: smaller saved tensors stay on the device


def offload_leftover_bytes(cfg: K2Config, layer: int, options: MemoryOptions, dtype_bytes: int = 2,
                           tokens: int | None = None) -> dict:
    """Device bytes per token that each CPU-offloaded module of decoder layer ``layer`` (``options.cpu_offload``)
    still keeps: its saved tensors under megatron's min_offloaded_tensor_size (fp32 1/RMS per norm, RoPE's fp32
    tables, attention's fp32 log-sum-exp; with ``tokens`` None all of them) and, with mla_up_proj recompute, what the
    up-projections' recomputation saves outside qkv_linear's offload group: the normed q and kv latents and the kv
    down-projection's output (the RoPE key k_R is a view of it). Measured under the rehearsal (k2_full)."""
    rc, d = set(options.recompute), dtype_bytes
    H, dr = cfg.num_attention_heads, cfg.qk_rope_head_dim
    ql, kl = cfg.q_lora_rank or 0, cfg.kv_lora_rank

    def small(width: int, nbytes: float) -> float:  # a [tokens, width] tensor
        return nbytes if tokens is None or tokens * width < MIN_OFFLOADED_ELEMENTS else 0.0

    rstd = 0.0 if "layernorm" in rc else small(1, 4)
    latents = (ql + kl + kl + dr) * d if "mla_up_proj" in rc else 0
    left = {"attn_norm": rstd, "qkv_linear": (2 if ql else 1) * rstd + small(dr, dr * 4) + latents,
            "core_attn": small(H, H * 4), "attn_proj": 0.0, "mlp_norm": rstd, "expert_fc1": 0.0, "moe_act": 0.0}
    return {name: b for name, b in left.items() if name in options.cpu_offload}


def activation_bytes_per_token(cfg: K2Config, layer: int, options: MemoryOptions, dtype_bytes: int = 2,
                               offloaded: bool = False, tokens: int | None = None) -> float:
    """Bytes kept on the device for backward per token by decoder layer ``layer`` with ``options``: the modules of
    ``activation_bytes_by_module`` that ``options.cpu_offload`` leaves on the device and what the offloaded ones
    still keep there (``offload_leftover_bytes``, at ``tokens`` per micro-batch); offloaded=True: the pinned host
    bytes megatron copies for those it offloads (``offloaded_bytes_by_module``)."""
    off = set(options.cpu_offload)
    if offloaded:
        return float(sum(b for name, b in offloaded_bytes_by_module(cfg, layer, options, dtype_bytes).items()
                         if name in off))
    kept = sum(b for name, b in activation_bytes_by_module(cfg, layer, options, dtype_bytes).items() if name not in off)
    return float(kept + sum(offload_leftover_bytes(cfg, layer, options, dtype_bytes, tokens).values()))


def chunk_activation_bytes(cfg: K2Config, layers: range, last: bool, options: MemoryOptions, tokens: int,
                           tp: int = 1, dtype_bytes: int = 2, *, layer_nodes: bool = False) -> float:
    """Device bytes one micro-batch's forward through a model chunk keeps until its backward: its decoder layers'
    (``activation_bytes_per_token``; the first one's norm saves the chunk's input, received from the previous
    pipeline stage or the embedding's output; with attn_norm offloaded megatron frees it, the schedule's reference
    included, once copied); ``layer_nodes``: megatron's combined 1F1B schedule (EP all-to-all overlap) runs the
    layers as schedule nodes, which hold a hidden state per MoE layer (its shared expert's output) until the backward
    has run and the plan is dropped; on the last chunk its output (the final norm's input; the other chunks' outputs
    are freed once sent: deallocate_pipeline_outputs), the final norm's output with its 1/RMS and the loss's fp32
    logits."""
    h, d = cfg.hidden_size, dtype_bytes
    per_token = sum(activation_bytes_per_token(cfg, layer, options, d, tokens=tokens // tp) for layer in layers)
    if layer_nodes:
        per_token += h * d * sum(layer >= cfg.first_k_dense_replace for layer in layers)
    if last:
        per_token += h * d + h * d + 4 + cfg.vocab_size * 4
    return per_token * tokens / tp


def layer_backward_bytes(cfg: K2Config, layer: int, options: MemoryOptions, tokens: int, tp: int = 1,
                         dtype_bytes: int = 2, *, local_experts: int = 0, delayed_wgrad: bool = False) -> float:
    """The high-water mark of decoder layer ``layer``'s backward above what the micro-batch held when it started
    (one micro-batch of ``tokens``), as measured under the rehearsal (k2_full's MoE layer with FP8, recompute and
    delayed expert wgrad within 3% with CPU offload, 4% without): the residual stream's gradients in flight (2 hidden
    states, plus the recomputed norm's output, plus 4 with CPU offload: the groups reloaded ahead with their
    gradients); a dense layer's fc1 output gradient and fc1's weight gradient in the model's dtype (megatron adds it to
    the fp32 buffer after: no gradient-accumulation fusion without TE or apex); an MoE layer's dispatched rows (tokens x top-k per rank under balanced routing) held
    at once in the experts' backward: the gradients through the combine and the dispatch all-to-alls with their
    sorted copies and fc1's input gradient (4), fc1's input dequantized from FP8 storage (FP8) and fc2's output
    gradient kept for the delayed weight gradient, fc1's output gradient, SwiGLU's recomputed output, less the FP8
    copies of fc1's input and output that the layer kept on the device (freed once dequantized); without delayed
    wgrad fc1's weight gradient of the ``local_experts`` (backward_dw computes one weight's at a time)."""
    rc, d, h = set(options.recompute), dtype_bytes, cfg.hidden_size
    t = tokens / tp
    stream = (2 + ("layernorm" in rc) + 4 * bool(options.cpu_offload)) * t * h * d
    if layer < cfg.first_k_dense_replace:
        f = cfg.intermediate_size / tp
        return stream + t * 2 * f * d + 2 * f * h * d
    rows, fe = t * cfg.num_experts_per_tok, cfg.moe_intermediate_size
    held_rows = 4 + options.fp8_activations + delayed_wgrad
    work = stream + rows * (held_rows * h + 2 * fe + ("swiglu" in rc) * fe) * d
    if options.fp8_activations:
        kept = activation_bytes_by_module(cfg, layer, options, dtype_bytes)
        work -= sum(kept[name] for name in ("expert_fc1", "moe_act") if name not in options.cpu_offload) * t
    return work + (0 if delayed_wgrad else local_experts * 2 * fe * h * d)


def chunk_backward_bytes(cfg: K2Config, layers: range, first: bool, last: bool, options: MemoryOptions, tokens: int,
                         tp: int = 1, dtype_bytes: int = 2, *, local_experts: int = 0,
                         delayed_wgrad: bool = False) -> float:
    """The high-water mark of one micro-batch's backward through a model chunk above what was held when it started:
    the largest of its steps, each less what the steps before it freed. On the last chunk the loss's backward first
    (the logits' gradient in the model's dtype beside the fp32 one, which is freed with the final norm's output
    next), then the layers last to first (``layer_backward_bytes``, each freeing what its forward kept), then on the
    first chunk the embedding's weight gradient in the model's dtype."""
    h, d, t = cfg.hidden_size, dtype_bytes, tokens / tp
    V = cfg.vocab_size / tp
    high = freed = 0.0
    if last:
        high = t * V * d
        freed = t * (V * 4 + h * d + 4)
    for layer in reversed(layers):
        high = max(high, layer_backward_bytes(cfg, layer, options, tokens, tp, d, local_experts=local_experts,
                                              delayed_wgrad=delayed_wgrad) - freed)
        freed += activation_bytes_per_token(cfg, layer, options, d, tokens=int(t)) * t
    if first:
        high = max(high, V * h * d + 2 * t * h * d - freed)
    return high


def output_working_bytes(cfg: K2Config, tokens: int, tp: int = 1, dtype_bytes: int = 2) -> float:
    """The last chunk's forward working set above what it keeps, at its peak: the output layer's logits in the model's
    dtype while the loss makes its fp32 copy."""
    return cfg.vocab_size * dtype_bytes * tokens / tp


def in_flight_chunks(pp: int, vpp: int, stage: int, n_micro: int, chunk_bytes: list[float],
                     extra_warmup: int = 0, backward_bytes: list[float] | None = None,
                     forward_bytes: list[float] | None = None, combined: bool = False) -> tuple[float, list[int]]:
    """(peak bytes, passes per local chunk alive then) of the (micro-batch, model chunk) passes of pipeline stage
    ``stage``: chunk_bytes[v] is what one forward through its virtual stage v keeps for its backward,
    backward_bytes[v] / forward_bytes[v] the high-water mark of one backward / forward above that (default 0).
    megatron-core 0.19.2's schedules (pipeline_parallel/schedules.py): without pipelining one at a time; 1F1B PP -
    stage - 1 warm-up forwards; interleaved 1F1B (PP - stage - 1) * 2 + (V - 1) * PP warm-up forwards in the order of
    get_schedule_table (groups of PP micro-batches per virtual stage) and the backwards in the same order with the
    virtual stages reversed; ``extra_warmup``: one more with the EP all-to-all overlap. Then a forward, then a
    backward; ``combined``: megatron's combined 1F1B (the EP all-to-all overlap) runs them together, layer by layer,
    so that the backward's largest step (its first layer, the chunk's last) meets only the forward's first layer:
    counted as the backward first (what the rehearsal runs; lower by up to one layer's kept bytes). The peak is the
    largest of (held + the running forward's or backward's high-water mark)."""
    backward_bytes = backward_bytes or [0.0] * vpp
    forward_bytes = forward_bytes or [0.0] * vpp
    total = n_micro * vpp
    if pp == 1:
        warmup = min(extra_warmup, total)
    elif vpp == 1:
        warmup = min(pp - stage - 1 + extra_warmup, total)
    else:
        warmup = min((pp - stage - 1) * 2 + (vpp - 1) * pp + extra_warmup, total)
    groups = [(start, min(start + pp, n_micro)) for start in range(0, n_micro, pp)] if vpp > 1 else [(0, n_micro)]
    order = [v for a, b in groups for v in range(vpp) for _ in range(a, b)]
    alive = [0] * vpp
    best = (-1.0, list(alive))

    def note(extra: float) -> None:
        nonlocal best
        held = sum(n * b for n, b in zip(alive, chunk_bytes)) + extra
        if held > best[0]:
            best = (held, list(alive))

    for v in order[:warmup]:
        note(forward_bytes[v])
        alive[v] += 1
    for i in range(total - warmup):
        forward, backward = order[warmup + i], vpp - 1 - order[i]
        if combined:  # the backward's largest step (its first layer's) meets the forward's first layer only
            note(backward_bytes[backward])
            alive[backward] -= 1
            note(forward_bytes[forward])
            alive[forward] += 1
        else:
            note(forward_bytes[forward])
            alive[forward] += 1
            note(backward_bytes[backward])
            alive[backward] -= 1
    for i in range(total - warmup, total):  # the cool-down's backwards
        backward = vpp - 1 - order[i]
        note(backward_bytes[backward])
        alive[backward] -= 1
    return best


@dataclass
class StagePlan:
    stage: int
    layers: list[int]            # global layer indices on this stage
    chunk_layers: list[int]      # layers per virtual chunk
    params: int                  # parameters held by one rank of this stage
    expert_params: int
    muon_params: int
    adamw_params: int
    weights: float               # bytes
    grads: float
    optimizer: float             # fp32 master (bf16 runs) + MuonClip state, sharded over DP
    activations: float           # no recomputation
    activations_recompute: float
    in_flight: int               # micro-batch x chunk passes alive at the peak
    activations_configured: float = 0.0  # with the config's memory section (activation_bytes_per_token)
    optimizer_temps: float = 0.0         # peak temporaries of the optimizer step (optimizer_temporary_bytes)
    comm: float = 0.0                    # communication buffers (communication_bytes)
    offloaded: float = 0.0               # pinned host bytes of the CPU-offloaded activations (memory.cpu_offload)
    optimizer_host: float = 0.0          # optimizer state in host memory (memory.optimizer_state_on_host)
    # per local chunk, with the memory section: what one pass keeps (chunk_activation_bytes) and its backward's
    # working set (chunk_backward_bytes)
    chunk_kept: list[float] = field(default_factory=list)
    chunk_backward: list[float] = field(default_factory=list)

    @property
    def states(self) -> float:
        return self.weights + self.grads + self.optimizer

    def categories(self) -> dict[str, float]:
        """Bytes per rank by category, activations as the config's memory section keeps them on the device."""
        return {"bf16/fp32 weights": self.weights, "fp32 gradient buffers": self.grads,
                "optimizer state": self.optimizer, "optimizer temporaries": self.optimizer_temps,
                "communication buffers": self.comm, "activations": self.activations_configured}

    @property
    def total(self) -> float:
        return sum(self.categories().values())


@dataclass
class Plan:
    layout: ParallelLayout       # on the planned world (data_parallel known)
    total_params: int
    active_params: int
    stages: list[StagePlan] = field(default_factory=list)
    device_memory: float = H100_80GB_MEMORY_BYTES  # bytes of one device (the config's memory.device_memory_gib)

    def largest(self) -> StagePlan:
        """The stage whose ranks need the most memory."""
        return max(self.stages, key=lambda s: s.total)

    def misfit(self) -> str | None:
        """Why the largest stage does not fit the device, with the bytes per category; None when it fits."""
        s = self.largest()
        if s.total <= self.device_memory:
            return None
        parts = ", ".join(f"{name} {b / GIB:.1f}" for name, b in s.categories().items())
        over = (s.total - self.device_memory) / GIB
        return (f"stage {s.stage} needs {s.total / GIB:.1f} GiB per rank, more than the device's "
                f"{self.device_memory / GIB:.1f} GiB (memory.device_memory_gib) by {over:.1f} GiB: {parts} GiB")

    @property
    def expert_dp(self) -> int:
        return self.layout.expert_data_parallel

    @property
    def model_parallel_group(self) -> int:
        """Ranks holding one full copy of the model: TP x PP x EP."""
        return self.layout.tensor_parallel * self.layout.pipeline_parallel * self.layout.expert_parallel

    def weights_and_grads_per_model_copy(self) -> float:
        """Bytes of weights + gradient buffers summed over one TP x PP x EP group (the paper's accounting)."""
        return sum((s.weights + s.grads) * self.layout.tensor_parallel * self.layout.expert_parallel
                   for s in self.stages)


def _planned_layout(cfg: PretrainConfig, world_size: int, k2: K2Config) -> tuple[ParallelLayout, list[int]]:
    """(the config's ParallelLayout on ``world_size`` ranks, decoder layers per chunk); ConfigError when the
    world or the model does not split into it."""
    layout = cfg.parallel.layout(world_size)
    try:
        chunk_layers = layout.chunk_layers(k2.num_hidden_layers)
    except ValueError as e:
        raise ConfigError(f"{'parallel.pipeline_layout' if layout.pipeline_layout else 'parallel'}: {e}") from None
    try:
        layout.check_model(k2)
    except ValueError as e:
        raise ConfigError(f"parallel: {e}") from None
    return layout, chunk_layers


K2_RECOMPUTE = MemoryOptions(recompute=("layernorm", "mla_up_proj", "swiglu"))  # the dry run's "act rc" column


def _stage_activation_bytes(k2, chunks, starts, chunk_layers, layout, stage, n_micro, options, tokens,
                            overlap_ep: bool) -> tuple[float, int, float, list[float], list[float]]:
    """(peak activation bytes, forwards in flight then, pinned host bytes of their CPU-offloaded activations, per
    chunk what a pass keeps, per chunk its backward's working set) of one rank of pipeline stage ``stage`` whose
    model chunks are ``chunks``: in_flight_chunks of what each chunk's pass
    keeps (chunk_activation_bytes), its backward's working set (chunk_backward_bytes) and, on the last chunk, the
    output layer's working set in the forward. ``overlap_ep``: megatron's EP all-to-all overlap (combined 1F1B,
    delayed expert weight gradients, one more warm-up forward)."""
    tp, pp, vpp = layout.tensor_parallel, layout.pipeline_parallel, layout.virtual_stages
    local_experts = k2.n_routed_experts // layout.expert_parallel
    last = pp * vpp - 1
    ranges = [range(starts[c], starts[c] + chunk_layers[c]) for c in chunks]
    kept = [chunk_activation_bytes(k2, layers, c == last, options, tokens, tp, layer_nodes=overlap_ep)
            for c, layers in zip(chunks, ranges)]
    backward = [chunk_backward_bytes(k2, layers, c == 0, c == last, options, tokens, tp, local_experts=local_experts,
                                     delayed_wgrad=overlap_ep) for c, layers in zip(chunks, ranges)]
    forward = [output_working_bytes(k2, tokens, tp) if c == last else 0.0 for c in chunks]
    held, alive = in_flight_chunks(pp, vpp, stage, n_micro, kept, int(overlap_ep), backward, forward,
                                   combined=overlap_ep)
    host = sum(n * sum(activation_bytes_per_token(k2, layer, options, offloaded=True) for layer in layers)
               * tokens / tp for n, layers in zip(alive, ranges))
    return held, sum(alive), host, kept, backward


def plan_memory(cfg: PretrainConfig, world_size: int) -> Plan:
    """The per-stage plan of PretrainConfig ``cfg`` on ``world_size`` ranks (analytic, no allocation)."""
    k2 = cfg.k2_config(_vocab_size(cfg))
    layout, chunk_layers = _planned_layout(cfg, world_size, k2)
    tp, pp, vpp, ep = (layout.tensor_parallel, layout.pipeline_parallel, layout.virtual_stages,
                       layout.expert_parallel)
    dp, expert_dp = layout.data_parallel, layout.expert_data_parallel
    starts = [sum(chunk_layers[:c]) for c in range(len(chunk_layers))]
    wbytes = 2 if cfg.model.params_dtype == "bfloat16" else 4
    master = 4 if wbytes == 2 else 0
    seq, mbs = cfg.data.seq_length, cfg.train.micro_batch_size
    tokens = seq * mbs
    batches = _batch_layout_or_none(cfg, dp)
    n_micro = batches.num_micro_batches if batches else pp * vpp
    h, V = k2.hidden_size, k2.vocab_size
    plan = Plan(layout, 0, 0)
    total = active = 0
    for s in range(pp):
        chunks = [c for c in range(pp * vpp) if c % pp == s]
        layers = [layer for c in chunks for layer in range(starts[c], starts[c] + chunk_layers[c])]
        dense = dense_muon = router = experts = 0
        for layer in layers:
            lp = layer_params(k2, layer)
            dense, dense_muon, router, experts = (dense + lp.dense, dense_muon + lp.dense_muon, router + lp.router,
                                                  experts + lp.experts)
        if 0 in chunks:
            dense += V * h                                   # embedding (AdamW)
        if pp * vpp - 1 in chunks:
            dense += h + (0 if k2.tie_word_embeddings else V * h)   # final norm + output layer (AdamW)
        local_experts = experts // ep
        params = dense // tp + router + local_experts        # TP shards the dense matrices (approximately)
        muon = dense_muon // tp + local_experts
        adamw = params - muon
        # the (micro-batch, chunk) forwards alive at this stage's activation peak (megatron's EP all-to-all overlap
        # runs one more micro-batch's forward first), without and with K2's selective recomputation
        overlap_ep = bool(cfg.parallel.overlap_moe_expert_parallel_comm)
        (act, passes, *_), (act_rc, *_), (act_cfg, _, act_host, chunk_kept, chunk_backward) = (
            _stage_activation_bytes(k2, chunks, starts, chunk_layers, layout, s, n_micro, options, tokens, overlap_ep)
            for options in (MemoryOptions(), K2_RECOMPUTE, cfg.memory.options()))
        # ZeRO-1: dense states over DP, expert states over expert-DP
        dense_local = params - local_experts
        dense_muon_local = dense_muon // tp
        opt = ((dense_local * master + dense_muon_local * 4 + (dense_local - dense_muon_local) * 8) / dp
               + local_experts * (master + 4) / expert_dp)
        # megatron buckets the first virtual stage's chunk only (k2-pretrain: disable_bucketing for the others)
        buffers = [b for c in chunks for b in _chunk_buffers(k2, range(starts[c], starts[c] + chunk_layers[c]),
                                                              c == 0, c == pp * vpp - 1, layout,
                                                              cfg.parallel.ddp_bucket_size if c < pp else None)]
        on_host = cfg.memory.optimizer_state_on_host
        plan.stages.append(StagePlan(s, layers, [chunk_layers[c] for c in chunks], params, local_experts, muon, adamw,
                                     params * wbytes, params * 4.0, 0.0 if on_host else opt, act, act_rc, passes,
                                     act_cfg, optimizer_temporary_bytes(buffers, tp, cfg.memory.muon_buffer_mib * 2**20,
                                                                        state_on_host=on_host),
                                     communication_bytes(k2, tokens, layers, cfg.parallel, layout), act_host,
                                     opt if on_host else 0.0, chunk_kept, chunk_backward))
        total += dense + router + experts
        frac = k2.num_experts_per_tok / max(k2.n_routed_experts, 1)
        active += dense + router + experts * frac
    plan.total_params, plan.active_params = int(total), int(active)
    plan.device_memory = cfg.memory.device_memory_gib * GIB
    return plan


@dataclass(frozen=True)
class GradBuffer:
    """One gradient buffer of one model chunk on one rank (megatron's DDP: dense and expert parameters apart)."""

    numel: int           # elements
    shards: int          # ZeRO-1 shards it over this many ranks (data-parallel or expert-data-parallel size)
    largest_param: int   # elements of its largest parameter on this rank (a bucket holds whole parameters)
    largest_matrix: int  # elements of its largest whole (TP-gathered) Muon matrix
    bucket_size: int | None = None  # megatron's DDP bucket size for this buffer (None: one bucket)

    @property
    def largest_bucket(self) -> int:
        """Elements of its largest bucket: megatron closes a bucket once it holds bucket_size elements, so a bucket
        is at most bucket_size - 1 elements plus one whole parameter."""
        if self.bucket_size is None:
            return self.numel
        return min(self.numel, self.bucket_size - 1 + self.largest_param)


def _chunk_buffers(k2: K2Config, layers: range, embedding: bool, output: bool, layout: ParallelLayout,
                   bucket_size: int | None) -> list[GradBuffer]:
    """The gradient buffers of one model chunk holding decoder ``layers`` (and the embedding / the output layer),
    in buckets of ``bucket_size`` elements (None: one bucket per buffer)."""
    tp, ep = layout.tensor_parallel, layout.expert_parallel
    vocab = k2.vocab_size * k2.hidden_size
    dense = experts = largest_dense = largest_expert = dense_matrix = expert_matrix = 0
    for layer in layers:
        lp, big = layer_params(k2, layer), layer_largest(k2, layer)
        dense += (lp.dense - lp.router) // tp + lp.router
        experts += lp.experts // ep
        largest_dense, dense_matrix = max(largest_dense, big.dense_param // tp), max(dense_matrix, big.dense_matrix)
        largest_expert, expert_matrix = max(largest_expert, big.expert_param // ep), max(expert_matrix,
                                                                                         big.expert_matrix)
    for held in (embedding, output and not k2.tie_word_embeddings):
        if held:
            dense, largest_dense = dense + vocab // tp, max(largest_dense, vocab // tp)
    if output:
        dense += k2.hidden_size  # final norm
    buffers = [GradBuffer(dense, layout.data_parallel, largest_dense, dense_matrix, bucket_size)]
    if experts:
        buffers.append(GradBuffer(experts, layout.expert_data_parallel, largest_expert, expert_matrix, bucket_size))
    return buffers


def optimizer_temporary_bytes(buffers: list[GradBuffer], tp: int, budget_bytes: int, *,
                              state_on_host: bool = False) -> float:
    """Peak temporaries of one MuonClip step on a rank with these gradient buffers (one thing at a time): the
    finiteness check of MuonClipChainedOptimizer.step, in pieces within ``budget_bytes``
    (config.memory.finite_check_piece); per bucket Muon's gather -> Newton-Schulz -> scatter streamed within
    ``budget_bytes`` (config.memory.muon_temporary_bytes). Gradient clipping adds nothing: it scales the gradients
    in place (Transformer Engine's or Apex's kernel, else k2_megatron.megatron.multi_tensor's replacement of
    megatron-core's fallback, which copied each gradient shard). AdamW's temporary (one fp32 copy of a parameter's
    shard) is no larger. With the state on the host (``state_on_host``), the pieces streamed through the device
    (config.memory.streamed_piece_elements of a parameter's shard, at most STREAMED_BYTES_PER_ELEMENT each)."""
    peak = 0.0
    for b in buffers:
        finite = finite_check_bytes_per_element(4) * min(b.numel, finite_check_piece(4, budget_bytes))
        streamed = 0.0
        if state_on_host:
            shard = min(b.largest_param, -(-b.numel // b.shards))
            streamed = STREAMED_BYTES_PER_ELEMENT * min(shard, streamed_piece_elements(budget_bytes))
        peak = max(peak, finite, streamed, muon_temporary_bytes(b.largest_bucket, b.shards, b.largest_matrix // tp,
                                                                budget_bytes, tp))
    return peak


def communication_bytes(k2: K2Config, tokens: int, layers: list[int], parallel, layout: ParallelLayout) -> float:
    """Communication buffers of a rank outside the activations (bf16): the EP all-to-all's output buffers of one
    micro-batch's routed tokens, two alive at once (measured in the rehearsal: a MoE layer's forward still holds the
    dispatch's output when the combine's arrives; the dispatched tokens kept for backward are the dispatcher's
    regrouped copy, an activation), three with the EP overlap (megatron's combined 1F1B: the other micro-batch's
    all-to-all output beside them; measured computing every micro-batch of k2_full's first, middle and last stages).
    The pipeline's received tensors are the chunks' inputs, counted with the activations; ZeRO-1's gradient
    reduce-scatter and parameter all-gather work in place in the gradient and parameter buffers; NCCL's own workspace
    is not counted."""
    moe = any(layer >= k2.first_k_dense_replace for layer in layers)
    if not moe or layout.expert_parallel == 1:
        return 0.0
    buffer = tokens * k2.num_experts_per_tok * k2.hidden_size * 2
    return buffer * (3 if parallel.overlap_moe_expert_parallel_comm else 2)


def _vocab_size(cfg: PretrainConfig) -> int:
    """The model's vocabulary: model.overrides.vocab_size, else N of a 'default:N' tokenizer, else the preset's
    (no tokenizer file is read)."""
    if "vocab_size" in cfg.model.overrides:
        return cfg.model.overrides["vocab_size"]
    kind, _, arg = cfg.data.tokenizer.partition(":")
    if kind == "default" and arg.isdigit():
        return int(arg)
    return get_preset(cfg.model.preset).vocab_size


def _batch_layout_or_none(cfg: PretrainConfig, dp: int) -> BatchLayout | None:
    try:
        return batch_layout(cfg.train.global_batch_tokens, cfg.data.seq_length, cfg.train.micro_batch_size, dp)
    except ValueError:
        return None


def format_plan(plan: Plan, cfg: PretrainConfig) -> str:
    gb = lambda b: b / GIB  # noqa: E731
    lay = plan.layout
    lines = [f"dry run: {cfg.model.preset}, {plan.total_params / 1e9:.2f}B parameters "
             f"({plan.active_params / 1e9:.2f}B activated per token), analytic (nothing built or allocated)",
             f"world {lay.world_size} = TP{lay.tensor_parallel} x PP{lay.pipeline_parallel}"
             f"{f' x {lay.virtual_stages} virtual stages' if lay.virtual_stages > 1 else ''} x DP{lay.data_parallel}; "
             f"EP{lay.expert_parallel} inside DP; ZeRO-1 over DP{lay.data_parallel} (dense) and DP{plan.expert_dp} "
             "(experts); "
             f"model-parallel group TP x PP x EP = {plan.model_parallel_group} ranks",
             f"every rank of a pipeline stage holds the same amounts (experts: "
             f"{cfg.k2_config(_vocab_size(cfg)).n_routed_experts // lay.expert_parallel} local per MoE layer); "
             "per rank, memory in GiB:",
             f"{'stage':>5} {'layers':>14} {'params':>9} {'experts':>9} {'bf16 w':>7} {'fp32 g':>7} {'optim':>7} "
             f"{'states':>7} {'act':>7} {'act rc':>7} {'in-flight':>9}"]
    for s in plan.stages:
        parts, i = [], 0
        for n in s.chunk_layers:  # layer ranges of the stage's chunks, "a-b|c-d"
            parts.append("-" if n == 0 else str(s.layers[i]) if n == 1 else f"{s.layers[i]}-{s.layers[i + n - 1]}")
            i += n
        span = "|".join(parts)
        lines.append(f"{s.stage:>5} {span:>14} {s.params / 1e9:>8.2f}B {s.expert_params / 1e9:>8.2f}B "
                     f"{gb(s.weights):>7.1f} {gb(s.grads):>7.1f} {gb(s.optimizer):>7.1f} {gb(s.states):>7.1f} "
                     f"{gb(s.activations):>7.1f} {gb(s.activations_recompute):>7.1f} {s.in_flight:>9}")
    wg = plan.weights_and_grads_per_model_copy()
    per_gpu = wg / plan.model_parallel_group
    lines += [
        "columns: params per rank; bf16 weights; fp32 gradient buffers; optim = fp32 master + MuonClip state "
        "(Muon momentum / AdamW moments) sharded by ZeRO-1; states = the three; act = activations of the in-flight "
        "micro-batches without recomputation, act rc = with K2's selective recomputation (both without FP8 storage or "
        "CPU offload; the config's memory section, below, may add them)",
        f"bf16 weights + fp32 gradient buffers over the {plan.model_parallel_group}-rank model-parallel group: "
        f"{wg / 1e12:.2f} TB ({per_gpu / 1e9:.1f} GB per GPU on average, max "
        f"{max((s.weights + s.grads) for s in plan.stages) / 1e9:.1f} GB)"
        + (f"; K2 report: ~{PAPER_WEIGHTS_GRADS_TB:g} TB, ~{PAPER_PER_GPU_GB:g} GB per GPU (ratio "
           f"{wg / 1e12 / PAPER_WEIGHTS_GRADS_TB:.2f})" if cfg.model.preset == "k2" else ""),
        f"largest per-rank total (states + activations with recomputation): "
        f"{max(gb(s.states + s.activations_recompute) for s in plan.stages):.1f} GiB",
    ]
    lines.append(f"with the config's memory section ({_memory_summary(cfg)}): activations per rank "
                 f"{', '.join(f'{gb(s.activations_configured):.1f}' for s in plan.stages)} GiB by stage (CPU-offloaded "
                 "activations excluded); optimizer temporaries (Muon's gather -> Newton-Schulz -> scatter, the "
                 f"finiteness check) {', '.join(f'{gb(s.optimizer_temps):.1f}' for s in plan.stages)} GiB; "
                 f"communication buffers (EP all-to-all outputs) "
                 f"{', '.join(f'{gb(s.comm):.1f}' for s in plan.stages)} GiB")
    if cfg.memory.cpu_offload:
        lines.append(f"CPU-offloaded activations in pinned host memory per rank: "
                     f"{', '.join(f'{gb(s.offloaded):.1f}' for s in plan.stages)} GiB by stage")
    if cfg.memory.optimizer_state_on_host:
        host = max(s.optimizer_host for s in plan.stages)
        lines.append(f"optimizer state in pinned host memory (memory.optimizer_state_on_host; fp32 master + MuonClip "
                     f"state, streamed through the device in the step): "
                     f"{', '.join(f'{gb(s.optimizer_host):.1f}' for s in plan.stages)} GiB per rank by stage, at most "
                     f"{gb(8 * host):.0f} GiB per 8-GPU node")
    big = plan.largest()
    lines.append(f"largest per-rank total (states + optimizer temporaries + communication buffers + activations "
                 f"with the memory section): {gb(big.total):.1f} GiB on stage {big.stage} ("
                 + ", ".join(f"{name} {gb(b):.1f}" for name, b in big.categories().items())
                 + f"); device memory {gb(plan.device_memory):.1f} GiB")
    return "\n".join(lines)


def _memory_summary(cfg) -> str:
    m = cfg.memory
    parts = [f"fp8_activations={m.fp8_activations}", f"recompute={list(m.recompute)}",
             f"cpu_offload={list(m.cpu_offload)}", f"optimizer_state_on_host={m.optimizer_state_on_host}"]
    return ", ".join(parts)


def dry_run(cfg, world_size: int | None = None, file=None) -> int:
    """Prints the plan; returns the ``--dry-run`` exit code: 0, or 2 (the reason on stderr) when the largest
    stage's ranks need more than the device's memory (``memory.device_memory_gib``). world_size: default the
    config's data-parallel layout at 256 ranks for pipeline x expert layouts that need it, else WORLD_SIZE or
    TP x PP x EP."""
    import os

    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", 0)) or max(
            cfg.parallel.tensor * cfg.parallel.pipeline * cfg.parallel.expert, 1)
    plan = plan_memory(cfg, world_size)
    print(format_plan(plan, cfg), file=file or sys.stdout, flush=True)
    misfit = plan.misfit()
    if misfit is not None:
        print(f"k2-pretrain: does not fit: {misfit}", file=sys.stderr, flush=True)
        return 2
    return 0


__all__ = ["GradBuffer", "K2_RECOMPUTE", "LayerLargest", "LayerParams", "Plan", "StagePlan",
           "activation_bytes_by_module", "activation_bytes_per_token", "chunk_activation_bytes", "communication_bytes",
           "in_flight_chunks", "offloaded_bytes_by_module", "offload_leftover_bytes", "layer_backward_bytes",
           "chunk_backward_bytes", "output_working_bytes", "dry_run", "format_plan",
           "layer_largest", "layer_params", "optimizer_temporary_bytes", "plan_memory"]
