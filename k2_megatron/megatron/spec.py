"""K2 layer specs for megatron-core: its MLASelfAttention / TransformerLayer / MoELayer, our kernels inside.

K2SpecProvider is a megatron BackendSpecProvider. Linears come from the base backend (megatron's local
ColumnParallelLinear/RowParallelLinear by default); the K2 parts are ours:
- core_attention -> K2MLACoreAttention (k2_megatron.ops.mla_attention, records current_max_attn_logits),
- grouped_mlp_modules -> K2GroupedMLP (k2_megatron.ops.grouped_gemm for both expert matmuls),
- layer_norm -> K2RMSNorm (torch RMSNorm whose weight is marked sequence_parallel when the config is, so
  megatron all-reduces its gradient over TP; megatron's own torch-norm wrapper refuses sequence parallel,
  which TP > 1 with MoE requires).
The MoE layer is K2MoELayer: megatron's MoELayer (router, all-to-all dispatcher, shared expert) with
router = K2Router and the dispatcher's local permutation / un-permutation done by k2_megatron.ops.permute /
unpermute (megatron keeps the EP all-to-all and regroups the received rows by local expert, the layout
grouped_gemm takes).
"""

from __future__ import annotations

import dataclasses
from functools import partial

import torch

from megatron.core import parallel_state
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.backends import BackendSpecProvider, LocalSpecProvider
from megatron.core.models.gpt.gpt_layer_specs import get_mlp_module_spec_for_backend
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.multi_latent_attention import MLASelfAttention, MLASelfAttentionSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from k2_megatron.megatron.attention import K2MLACoreAttention
from k2_megatron.megatron.layout import transformer_config_layout
from k2_megatron.megatron.moe import K2GroupedMLP, K2MoELayer, K2Router


def K2RMSNorm(config: TransformerConfig, hidden_size: int, eps: float = 1e-6, **unused) -> torch.nn.RMSNorm:
    """RMSNorm (y = x / sqrt(mean(x^2) + eps) * w) that works with sequence parallelism."""
    if config.normalization != "RMSNorm":
        raise ValueError(f"K2RMSNorm: config.normalization must be 'RMSNorm', got {config.normalization!r}")
    norm = torch.nn.RMSNorm(hidden_size, eps=eps, dtype=config.params_dtype,
                            device="cpu" if config.use_cpu_initialization or not torch.cuda.is_available()
                            else torch.cuda.current_device())
    # Under sequence parallelism each TP rank sees a slice of the sequence: the weight's gradient is partial
    # and megatron's finalize_model_grads all-reduces params flagged this way over the TP group.
    norm.weight.sequence_parallel = bool(config.sequence_parallel)
    return norm


class K2SpecProvider(BackendSpecProvider):
    """Backend for K2 layers: our core attention, experts and norm; linears from ``base`` (local by default)."""

    def __init__(self, base: BackendSpecProvider | None = None):
        self.base = base if base is not None else LocalSpecProvider()

    def column_parallel_linear(self) -> type:
        return self.base.column_parallel_linear()

    def row_parallel_linear(self) -> type:
        return self.base.row_parallel_linear()

    def fuse_layernorm_and_linear(self) -> bool:
        return False  # the MLA latents and the layer inputs use standalone norms (HF checkpoint layout)

    def column_parallel_layer_norm_linear(self):
        return None

    def layer_norm(self, rms_norm: bool = True, for_qk: bool = False, has_residual: bool = False):
        if not rms_norm:
            raise ValueError("K2SpecProvider: K2 uses RMSNorm only")
        return K2RMSNorm

    def core_attention(self) -> type:
        return K2MLACoreAttention

    def grouped_mlp_modules(self, moe_use_grouped_gemm: bool = True):
        return K2GroupedMLP

    def activation_func(self):
        return None


def get_k2_layer_spec(moe: bool, provider: BackendSpecProvider | None = None) -> ModuleSpec:
    """TransformerLayer spec of one K2 layer: MLA attention, then a dense SwiGLU MLP or the K2 MoE."""
    p = provider if provider is not None else K2SpecProvider()
    norm = p.layer_norm(rms_norm=True, has_residual=True)
    qk_norm = p.layer_norm(rms_norm=True, for_qk=True)
    if moe:
        mlp = get_mlp_module_spec_for_backend(backend=p, num_experts=1, moe_grouped_gemm=True)
        # megatron's MoE spec (its experts builder comes from p.grouped_mlp_modules) with our router, and our
        # MoELayer subclass whose all-to-all dispatcher permutes with k2_megatron.ops.
        mlp = partial(K2MoELayer, *mlp.args,
                      **{**mlp.keywords, "submodules": dataclasses.replace(mlp.keywords["submodules"],
                                                                           router=K2Router)})
    else:
        mlp = get_mlp_module_spec_for_backend(backend=p, num_experts=None)
    attention = ModuleSpec(
        module=MLASelfAttention,
        params={"attn_mask_type": AttnMaskType.causal},
        submodules=MLASelfAttentionSubmodules(
            linear_q_proj=p.column_parallel_linear(),
            linear_q_down_proj=p.column_parallel_linear(),
            linear_q_up_proj=p.column_parallel_linear(),
            linear_kv_down_proj=p.column_parallel_linear(),
            linear_kv_up_proj=p.column_parallel_linear(),
            core_attention=p.core_attention(),
            linear_proj=p.row_parallel_linear(),
            q_layernorm=qk_norm,
            kv_layernorm=qk_norm,
        ),
    )
    return ModuleSpec(module=TransformerLayer, submodules=TransformerLayerSubmodules(
        input_layernorm=norm, self_attention=attention, self_attn_bda=get_bias_dropout_add,
        pre_mlp_layernorm=norm, mlp=mlp, mlp_bda=get_bias_dropout_add))


def moe_layer_pattern(config: TransformerConfig) -> list[int]:
    """1 for an MoE layer, 0 for a dense one, over all config.num_layers layers."""
    freq = config.moe_layer_freq
    if isinstance(freq, int):
        return [1 if i % freq == 0 else 0 for i in range(config.num_layers)]
    return list(freq)


def get_k2_decoder_block_spec(config: TransformerConfig, vp_stage: int | None = None, pp_rank: int | None = None,
                              provider: BackendSpecProvider | None = None) -> TransformerBlockSubmodules:
    """The layers of this pipeline stage (and virtual stage): dense where config.moe_layer_freq says 0."""
    p = provider if provider is not None else K2SpecProvider()
    dense, moe = get_k2_layer_spec(False, p), get_k2_layer_spec(True, p)
    specs = [moe if m else dense for m in moe_layer_pattern(config)]
    layers = stage_layer_range(config, vp_stage=vp_stage, pp_rank=pp_rank)
    return TransformerBlockSubmodules(layer_specs=specs[layers.start:layers.stop],
                                      layer_norm=p.layer_norm(rms_norm=True))


def stage_layer_range(config: TransformerConfig, vp_stage: int | None = None,
                      pp_rank: int | None = None) -> range:
    """Global (0-based) indices of the decoder layers of pipeline stage ``pp_rank`` (default: this rank's),
    virtual stage ``vp_stage``: the split of config's ParallelLayout (k2_megatron.config.parallel), which equals
    megatron-core's (tests/test_pipeline_layout.py). megatron-core 0.19's own get_transformer_layer_offset /
    get_num_layers_to_build ignore pp_rank for a pipeline layout and take vp_stage = 0 while parallel_state has no
    virtual size, so they cannot answer for another stage."""
    if pp_rank is None:
        pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    return transformer_config_layout(config).stage_layers(config.num_layers, pp_rank, vp_stage)
