"""K2 on megatron-core: layer specs with k2_megatron kernels, the model builder, and CPU (gloo) support.

- spec: K2SpecProvider, get_k2_layer_spec, get_k2_decoder_block_spec (MLA + MoE layers, our ops inside)
- attention: K2MLACoreAttention (records current_max_attn_logits for QK-Clip)
- moe: K2GroupedMLP (grouped-GEMM experts), K2MoELayer + K2AlltoAllTokenDispatcher (permutation by our ops),
  K2Router (sigmoid, expert bias, scaled normalised top-k)
- model: to_transformer_config, build_k2_model, k2_model_provider, init_distributed_cpu / teardown_distributed_cpu
- layout: a k2_megatron.config.ParallelLayout in megatron's terms (initialize_model_parallel, initialized_layout)
- activation_memory: FP8-stored activations, SwiGLU recompute, CPU offload wiring (apply_activation_memory)
- optimizer: MuonClip on megatron-core (get_muonclip_optimizer)
- cpu_compat: the one module that patches megatron-core for CPU execution (used only without CUDA)

Importing this package imports megatron-core.
"""

from k2_megatron.megatron.activation_memory import apply_activation_memory
from k2_megatron.megatron.attention import K2MLACoreAttention
from k2_megatron.megatron.layout import initialize_model_parallel, initialized_layout
from k2_megatron.megatron.model import (
    build_k2_model,
    init_distributed_cpu,
    k2_model_provider,
    teardown_distributed_cpu,
    to_transformer_config,
)
from k2_megatron.megatron.moe import K2AlltoAllTokenDispatcher, K2GroupedMLP, K2MoELayer, K2Router
from k2_megatron.megatron.spec import K2RMSNorm, K2SpecProvider, get_k2_decoder_block_spec, get_k2_layer_spec

__all__ = ["K2AlltoAllTokenDispatcher", "K2GroupedMLP", "K2MLACoreAttention", "K2MoELayer", "K2RMSNorm", "K2Router",
           "K2SpecProvider", "apply_activation_memory", "build_k2_model", "get_k2_decoder_block_spec",
           "get_k2_layer_spec", "init_distributed_cpu", "initialize_model_parallel", "initialized_layout",
           "k2_model_provider", "teardown_distributed_cpu", "to_transformer_config"]
