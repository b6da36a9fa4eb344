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
- activations of the in-flight micro-batches of the rank's stage (1F1B: PP - stage micro-batches; interleaved:
  megatron's warm-up count, one more with the EP all-to-all overlap), bf16, without and with K2's selective
  recomputation (norms, SwiGLU, MLA up-projections recomputed); and with the config's ``memory`` section (recompute,
  FP8 storage, CPU offload: ``activation_bytes_per_token``);
  With ``memory.optimizer_state_on_host`` the optimizer state (master copy included) is in host memory instead
  (``optimizer_host``; 0 on the device);
- optimizer temporaries: the peak of one MuonClip step (``optimizer_temporary_bytes``): Muon's gather span and one
  Newton-Schulz call (the CUDA kernel's workspace included), each within ``memory.muon_buffer_mib``, or the
  finiteness check's piece (gradient clipping scales in place: k2_megatron.megatron.multi_tensor);
- communication buffers outside the activations: EP all-to-all and pipeline send/receive (``communication_bytes``).
The total per rank (states, temporaries, buffers, activations with the memory section) is compared with the
device's memory (``memory.device_memory_gib``, default 80): the dry run exits 2, naming the bytes per category,
when the largest stage does not fit.
Not modelled: NCCL's and the CUDA caching allocator's own memory (workspace, fragmentation), the CUDA context.
K2 report (section 4): bf16 weights + fp32 gradient buffers ~6 TB over a 256-GPU model-parallel group (~30 GB
per GPU).
"""

from __future__ import annotations

import sys
from collections import defaultdict
from dataclasses import dataclass, field

from k2_megatron.config import ConfigError, K2Config, MemoryOptions, ParallelLayout, PretrainConfig, get_preset
from k2_megatron.config.memory import (STREAMED_BYTES_PER_ELEMENT, finite_check_bytes_per_element, finite_check_piece,
                                       muon_temporary_bytes, streamed_piece_elements)
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


def _activation_elements_per_token(cfg, layer: int, recompute: bool) -> int:
    """bf16 elements kept for backward per token in one decoder layer (rough, megatron local modules)."""
    h, H = cfg.hidden_size, cfg.num_attention_heads
    dn, dr, dv = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    ql, kl = cfg.q_lora_rank or 0, cfg.kv_lora_rank
    # residual in, norm out, q latent (+ normed), kv latent (+ normed), q and k per head (pre/post rope),
    # v, attention output, projection input
    attn = h + (0 if recompute else h) + ql * (1 if recompute else 2) + (kl + dr) + (0 if recompute else kl) \
        + (0 if recompute else H * (dn + dr) + H * (dn + dv)) + 2 * H * (dn + dr) + H * dv + H * dv
    if layer < cfg.first_k_dense_replace:
        f = cfg.intermediate_size
        mlp = h + (0 if recompute else h) + 2 * f + (0 if recompute else f)
    else:
        k, fe, fs = cfg.num_experts_per_tok, cfg.moe_intermediate_size, cfg.moe_intermediate_size * cfg.n_shared_experts
        mlp = (h + (0 if recompute else h) + 2 * cfg.n_routed_experts       # residual, norm out, router fp32
               + k * h + k * 2 * fe + (0 if recompute else k * fe)         # dispatched tokens, fc1 out, SwiGLU out
               + 2 * fs + (0 if recompute else fs) + k * h)                 # shared expert, combine input
    return attn + mlp


def activation_bytes_per_token(cfg: K2Config, layer: int, options: MemoryOptions, dtype_bytes: int = 2) -> float:
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
    optimizer_host: float = 0.0          # optimizer state in host memory (memory.optimizer_state_on_host)

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
    device_memory: float = 80 * GIB  # bytes of one device (the config's memory.device_memory_gib)

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
        act, act_rc = 0.0, 0.0
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
        # in-flight (micro-batch, chunk) passes at the activation peak of this stage; megatron's EP all-to-all
        # overlap runs one more micro-batch's forward first (interleaved: one more warm-up micro-batch,
        # schedules.get_pp_rank_microbatches; without pipelining: the next forward before this backward)
        extra = 1 if cfg.parallel.overlap_moe_expert_parallel_comm else 0
        if vpp > 1:
            passes = min((pp - s - 1) * 2 + (vpp - 1) * pp + 1 + extra, n_micro * vpp)
        else:
            passes = min(pp - s + extra, n_micro)
        per_chunk = [sum(_activation_elements_per_token(k2, layer, rc) for layer in range(starts[c], starts[c] +
                                                                                        chunk_layers[c]))
                     for rc in (False, True) for c in chunks]
        mean_chunk = [sum(per_chunk[:len(chunks)]) / len(chunks), sum(per_chunk[len(chunks):]) / len(chunks)]
        act = passes * mean_chunk[0] * tokens * 2 / tp
        act_rc = passes * mean_chunk[1] * tokens * 2 / tp
        # ZeRO-1: dense states over DP, expert states over expert-DP
        dense_local = params - local_experts
        dense_muon_local = dense_muon // tp
        opt = ((dense_local * master + dense_muon_local * 4 + (dense_local - dense_muon_local) * 8) / dp
               + local_experts * (master + 4) / expert_dp)
        memory = cfg.memory.options()
        act_cfg = (passes * sum(activation_bytes_per_token(k2, layer, memory) for c in chunks
                                for layer in range(starts[c], starts[c] + chunk_layers[c])) / len(chunks)
                   * tokens / tp)
        # megatron buckets the first virtual stage's chunk only (k2-pretrain: disable_bucketing for the others)
        buffers = [b for c in chunks for b in _chunk_buffers(k2, range(starts[c], starts[c] + chunk_layers[c]),
                                                              c == 0, c == pp * vpp - 1, layout,
                                                              cfg.parallel.ddp_bucket_size if c < pp else None)]
        on_host = cfg.memory.optimizer_state_on_host
        plan.stages.append(StagePlan(s, layers, [chunk_layers[c] for c in chunks], params, local_experts, muon, adamw,
                                     params * wbytes, params * 4.0, 0.0 if on_host else opt, act, act_rc, passes,
                                     act_cfg, optimizer_temporary_bytes(buffers, tp, cfg.memory.muon_buffer_mib * 2**20,
                                                                        state_on_host=on_host),
                                     communication_bytes(k2, tokens, layers, cfg.parallel, layout),
                                     opt if on_host else 0.0))
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
    """Communication buffers of a rank outside the activations (bf16): the EP all-to-all's send buffer of one
    micro-batch's routed tokens (two micro-batches with the EP overlap), and the pipeline's send and receive
    buffers of one activation each way. ZeRO-1's gradient reduce-scatter and parameter all-gather work in place
    in the gradient and parameter buffers; NCCL's own workspace is not counted."""
    h, tp = k2.hidden_size, layout.tensor_parallel
    moe = any(layer >= k2.first_k_dense_replace for layer in layers)
    a2a = 0.0
    if moe and layout.expert_parallel > 1:
        a2a = tokens * k2.num_experts_per_tok * h * 2 * (2 if parallel.overlap_moe_expert_parallel_comm else 1)
    p2p = 4 * tokens * h * 2 / tp if layout.pipeline_parallel > 1 else 0.0
    return a2a + p2p


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
                 f"communication buffers (EP all-to-all, pipeline send/receive) "
                 f"{', '.join(f'{gb(s.comm):.1f}' for s in plan.stages)} GiB")
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


__all__ = ["GradBuffer", "LayerLargest", "LayerParams", "Plan", "StagePlan", "activation_bytes_per_token",
           "communication_bytes", "dry_run", "format_plan", "layer_largest", "layer_params",
           "optimizer_temporary_bytes", "plan_memory"]
