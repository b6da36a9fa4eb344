"""Build the K2 model on megatron-core: K2Config + ParallelLayout -> MLATransformerConfig -> GPTModel.

``build_k2_model`` is the model provider: call it on every rank after megatron's parallel_state is
initialised (``initialize_model_parallel``); it builds this rank's pipeline stage with the K2 spec
(k2_megatron.megatron.spec). On a machine without CUDA, enable k2_megatron.megatron.cpu_compat first
(``init_distributed_cpu`` in this module does both for tests and CPU runs).
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.nn.functional as F

from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.transformer_config import MLATransformerConfig

from k2_megatron.config.model import K2Config, get_preset
from k2_megatron.config.parallel import ParallelLayout
from k2_megatron.megatron.initialization import initialize_parameters
from k2_megatron.megatron.layout import initialize_model_parallel, initialized_layout
from k2_megatron.megatron.moe import K2GroupedMLP
from k2_megatron.megatron.spec import get_k2_decoder_block_spec
from k2_megatron.optim.muon import set_row_matrices


def to_transformer_config(cfg: K2Config, layout: ParallelLayout = ParallelLayout(), *,
                          sequence_parallel: bool | None = None, params_dtype: torch.dtype = torch.float32,
                          bias_update_rate: float = 1e-3, token_dispatcher: str = "alltoall",
                          use_cpu_initialization: bool | None = None, **overrides) -> MLATransformerConfig:
    """megatron-core's MLATransformerConfig for ``cfg`` on ``layout`` (raises ValueError for a layout the model
    cannot be split into). The layout's pipeline_layout ("auto" or a megatron layout string) becomes megatron's
    pipeline_model_parallel_layout, so any layer count works with virtual stages (61 layers on PP16 x VPP2).
    bias_update_rate: the aux-loss-free expert-bias step (expert_bias += rate * sign(mean load - load) per
    global batch, applied by megatron's finalize_model_grads); 0 freezes the bias.
    Any other MLATransformerConfig field can be passed through ``overrides``.
    """
    layout.check_model(cfg)
    if cfg.q_lora_rank is None:
        raise ValueError("q_lora_rank=None (a single query projection) cannot be built with megatron-core 0.19's "
                         "MLA: with the latent norms on (qk_layernorm) it requires a Transformer-Engine fused "
                         "norm+linear query projection. K2 uses q_lora_rank=1536.")
    if sequence_parallel is None:
        sequence_parallel = layout.tensor_parallel > 1  # megatron requires it for TP > 1 with MoE
    if use_cpu_initialization is None:
        use_cpu_initialization = not torch.cuda.is_available()
    rope = {}
    if cfg.rope_scaling is not None:
        rs = cfg.rope_scaling
        rope = dict(rope_type="yarn", rotary_scaling_factor=float(rs["factor"]),
                    original_max_position_embeddings=int(rs["original_max_position_embeddings"]),
                    beta_fast=float(rs.get("beta_fast", 32.0)), beta_slow=float(rs.get("beta_slow", 1.0)),
                    mscale=float(rs.get("mscale", 1.0)), mscale_all_dim=float(rs.get("mscale_all_dim", 0.0) or 0.0))
    else:
        # megatron's MLA softmax scale uses _yarn_get_mscale(rotary_scaling_factor, mscale_all_dim), which is
        # 1 for a factor <= 1: plain RoPE gets exactly 1/sqrt(d_qk).
        rope = dict(rope_type="rope", rotary_scaling_factor=1.0, mscale=1.0, mscale_all_dim=0.0)
    groups = {}
    if cfg.n_group > 1:
        groups = dict(moe_router_num_groups=cfg.n_group, moe_router_group_topk=cfg.topk_group)
    pattern = [0] * cfg.first_k_dense_replace + [1] * cfg.num_moe_layers
    kwargs = dict(
        num_layers=cfg.num_hidden_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.intermediate_size,
        num_attention_heads=cfg.num_attention_heads,
        kv_channels=cfg.v_head_dim,
        multi_latent_attention=True,
        q_lora_rank=cfg.q_lora_rank,
        kv_lora_rank=cfg.kv_lora_rank,
        qk_head_dim=cfg.qk_nope_head_dim,
        qk_pos_emb_head_dim=cfg.qk_rope_head_dim,
        v_head_dim=cfg.v_head_dim,
        qk_layernorm=True,  # MLA: RMSNorm of the q and kv latents (q_a_layernorm, kv_a_layernorm)
        rotary_base=cfg.rope_theta,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        apply_rope_fusion=False,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        init_method_std=cfg.initializer_range,
        num_moe_experts=cfg.n_routed_experts,
        moe_layer_freq=pattern,
        moe_ffn_hidden_size=cfg.moe_intermediate_size,
        moe_shared_expert_intermediate_size=(cfg.moe_intermediate_size * cfg.n_shared_experts
                                             if cfg.n_shared_experts else None),
        moe_router_topk=cfg.num_experts_per_tok,
        moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        moe_router_bias_update_rate=bias_update_rate,
        moe_router_topk_scaling_factor=cfg.routed_scaling_factor,
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
        moe_router_dtype="fp32",
        moe_grouped_gemm=True,
        moe_token_dispatcher_type=token_dispatcher,
        tensor_model_parallel_size=layout.tensor_parallel,
        pipeline_model_parallel_size=layout.pipeline_parallel,
        virtual_pipeline_model_parallel_size=layout.virtual_pipeline_stages,
        num_layers_in_first_pipeline_stage=layout.first_stage_layers,
        num_layers_in_last_pipeline_stage=layout.last_stage_layers,
        pipeline_model_parallel_layout=layout.megatron_pipeline_layout(cfg.num_hidden_layers),
        expert_model_parallel_size=layout.expert_parallel,
        expert_tensor_parallel_size=layout.expert_tensor_parallel,
        context_parallel_size=layout.context_parallel,
        sequence_parallel=sequence_parallel,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        use_cpu_initialization=use_cpu_initialization,
        transformer_impl="local",
        **rope,
        **groups,
    )
    if cfg.n_routed_experts and not cfg.norm_topk_prob:
        raise ValueError("norm_topk_prob=False is not supported: megatron normalises sigmoid top-k weights")
    kwargs.update(pipeline_communication(layout))
    kwargs.update(overrides)
    return MLATransformerConfig(**kwargs)


def pipeline_communication(layout: ParallelLayout) -> dict:
    """megatron's pipeline send/receive settings (ModelParallelConfig fields) for ``layout``, the same on GPUs and on
    a CPU. Unbatched sends and receives: megatron's batched path (batch_p2p_comm) synchronises the whole device after
    every batch_isend_irecv (batch_p2p_sync; ~2000 host waits per step on k2_full, found by the rehearsal), and under
    gloo, when the previous and the next stage are one rank, it pairs equal-shaped activations and gradients wrongly
    (later micro-batches' losses change; megatron's unbatched path posts in an even/odd order that pairs them). With
    virtual stages, sends and receives overlap the computation (overlap_p2p_comm, Megatron-LM's default for the
    interleaved schedule). A stage's output is freed once sent, keeping its autograd node for the backward
    (deallocate_pipeline_outputs, Megatron-LM's default): one hidden state less per micro-batch in flight."""
    if layout.pipeline_parallel == 1:
        return {}
    return dict(batch_p2p_comm=False, overlap_p2p_comm=layout.virtual_stages > 1,
                deallocate_pipeline_outputs=True)


def build_k2_model(cfg: K2Config | str, transformer_config: MLATransformerConfig | None = None, *,
                   layout: ParallelLayout | None = None, pre_process: bool | None = None,
                   post_process: bool | None = None, vp_stage: int | None = None, init_seed: int | None = None,
                   **config_kwargs) -> GPTModel:
    """This rank's (pipeline stage of the) K2 model as a megatron-core GPTModel with the K2 spec.

    Its initial weights are a function of ``init_seed`` (default: ``torch.initial_seed()``, the seed of the last
    ``torch.manual_seed``) and the model alone, the same on every parallel layout
    (k2_megatron.megatron.initialization); none are drawn when ``transformer_config.perform_initialization`` is off.

    cfg: a K2Config or a preset name. transformer_config: built with ``to_transformer_config(cfg, layout,
    **config_kwargs)`` when not given, ``layout`` defaulting to the initialised parallel_state's (layers split
    evenly); the parallel sizes must match the initialised parallel_state.
    """
    if isinstance(cfg, str):
        cfg = get_preset(cfg)
    if transformer_config is None:
        if layout is None:
            layout = initialized_layout() if parallel_state.model_parallel_is_initialized() else ParallelLayout()
        transformer_config = to_transformer_config(cfg, layout, **config_kwargs)
    elif config_kwargs or layout is not None:
        raise ValueError(f"pass either transformer_config or a layout and config kwargs, not both (got layout="
                         f"{layout}, {sorted(config_kwargs)})")
    if not parallel_state.model_parallel_is_initialized():
        raise RuntimeError("build_k2_model: megatron parallel_state is not initialised; call "
                           "megatron.core.parallel_state.initialize_model_parallel(...) first "
                           "(or k2_megatron.megatron.model.init_distributed_cpu on a CPU)")
    tc = transformer_config
    sizes = {"tensor": (tc.tensor_model_parallel_size, parallel_state.get_tensor_model_parallel_world_size()),
             "pipeline": (tc.pipeline_model_parallel_size, parallel_state.get_pipeline_model_parallel_world_size()),
             "expert": (tc.expert_model_parallel_size, parallel_state.get_expert_model_parallel_world_size())}
    for name, (want, have) in sizes.items():
        if want != have:
            raise ValueError(f"build_k2_model: config {name}-parallel size {want} != initialised size {have}")
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    block_spec = get_k2_decoder_block_spec(tc, vp_stage=vp_stage)
    initialize = tc.perform_initialization
    tc.perform_initialization = False  # megatron's draws depend on the layout; ours replace them below
    try:
        model = GPTModel(config=tc, transformer_layer_spec=block_spec, vocab_size=cfg.vocab_size,
                         max_sequence_length=cfg.max_position_embeddings, pre_process=pre_process,
                         post_process=post_process, share_embeddings_and_output_weights=cfg.tie_word_embeddings,
                         position_embedding_type="none", vp_stage=vp_stage)
    finally:
        tc.perform_initialization = initialize
    if initialize:
        initialize_parameters(model, torch.initial_seed() if init_seed is None else init_seed)
    mark_swiglu_matrices(model)
    return model


def mark_swiglu_matrices(model: torch.nn.Module) -> int:
    """Marks every SwiGLU fc1 weight of ``model`` as two matrices stacked along its rows, [gate; up] (on TP rank r
    its shard [gate_r; up_r]), so that Muon orthogonalises gate and up one by one, as K2 does (the release stores
    gate_proj and up_proj). The fused weights are megatron's MLP ``linear_fc1`` (the dense layers and the shared
    expert) and our routed experts' ``linear_fc1_weight`` [E, 2F, H]; every other K2 weight is one matrix, as in
    the release (kv_a_proj_with_mqa = megatron's linear_kv_down_proj [c_kv; k_R] and kv_b_proj =
    linear_kv_up_proj are single tensors there too). Returns the number of weights marked."""
    marked = 0
    for module in model.modules():
        if isinstance(module, MLP) and module.config.gated_linear_unit:
            set_row_matrices(module.linear_fc1.weight, 2)
            marked += 1
        elif isinstance(module, K2GroupedMLP):
            set_row_matrices(module.linear_fc1_weight, 2)
            marked += 1
    return marked


def init_distributed_cpu(layout: ParallelLayout = ParallelLayout(), *, seed: int = 1234, rank: int | None = None,
                         world_size: int | None = None, init_method: str | None = None,
                         timeout_minutes: int | None = None) -> None:
    """gloo process group + megatron parallel_state for ``layout`` + RNG seeds on a CPU (cpu_compat enabled).

    rank/world_size/init_method default to the torchrun environment (RANK, WORLD_SIZE, MASTER_ADDR/PORT);
    a single process without them gets an in-memory store (nothing on disk to leave behind). ``timeout_minutes``:
    of every process group (None: torch's and megatron-core's defaults). When the layout does not fit the world
    (ValueError naming the sizes) or megatron refuses it, what this call set up is torn down before it raises.
    """
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from k2_megatron.megatron import cpu_compat

    patched_here = not cpu_compat.is_enabled()
    cpu_compat.enable()
    created_group = not torch.distributed.is_initialized()
    try:
        if created_group:
            _init_gloo_group(rank, world_size, init_method, timeout_minutes)
        layout.for_world(torch.distributed.get_world_size())  # a clear error before megatron's assertions
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        initialize_model_parallel(layout, timeout_minutes=timeout_minutes)
    except BaseException:
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        if created_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        if patched_here:
            cpu_compat.disable()
        raise
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def _init_gloo_group(rank: int | None, world_size: int | None, init_method: str | None,
                     timeout_minutes: int | None) -> None:
    """The default gloo process group: torchrun's (env://), the given init_method's, or for a lone process an
    in-memory HashStore (a file store's file in /tmp outlives the run: torch never removes it)."""
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    timeout = {} if timeout_minutes is None else {"timeout": datetime.timedelta(minutes=timeout_minutes)}
    if init_method is None and "MASTER_ADDR" in os.environ:
        init_method = "env://"
    if init_method is not None:
        torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size, init_method=init_method,
                                             **timeout)
        return
    if world_size != 1:
        raise ValueError(f"world_size={world_size} without MASTER_ADDR or init_method: the processes have no "
                         "rendezvous (launch them with torchrun)")
    torch.distributed.init_process_group("gloo", rank=0, world_size=1, store=torch.distributed.HashStore(),
                                         **timeout)


def k2_model_provider(cfg: K2Config | str, layout: ParallelLayout | None = None, **config_kwargs):
    """A megatron-style model provider: ``provider(pre_process=..., post_process=..., vp_stage=...)`` builds
    this rank's model (chunk) of ``cfg`` on ``layout`` with ``build_k2_model`` (config kwargs as for
    to_transformer_config)."""
    if isinstance(cfg, str):
        cfg = get_preset(cfg)

    def provider(pre_process: bool | None = None, post_process: bool | None = None, vp_stage: int | None = None,
                 **unused) -> GPTModel:
        return build_k2_model(cfg, layout=layout, pre_process=pre_process, post_process=post_process,
                              vp_stage=vp_stage, **config_kwargs)

    return provider


def teardown_distributed_cpu() -> None:
    """Undo init_distributed_cpu: megatron's parallel state, the default process group, cpu_compat."""
    from k2_megatron.megatron import cpu_compat

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    cpu_compat.disable()
