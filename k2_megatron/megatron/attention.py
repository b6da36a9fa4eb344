"""K2 core attention for megatron-core's MLA: softmax(scale * q k^T) v through ``k2_megatron.ops.mla_attention``.

Plugs in as ``MLASelfAttentionSubmodules.core_attention``. megatron-core builds it with
(config, layer_number, attn_mask_type, attention_type, softmax_scale, k_channels, v_channels, cp_comm_type,
pg_collection) and calls forward(query, key, value, attention_mask, ...) with [s, b, heads, d] tensors,
expecting [s, b, heads * d_v] back. megatron-core 0.19's local DotProductAttention rejects
k_channels/v_channels (MLA + local spec fails at construction); this module takes them.

Under tensor parallelism the key's rope part (K2's k_R, one vector shared by all heads and broadcast to this
rank's heads by megatron's MLA) gets its gradient all-reduced over the TP group here: megatron-core 0.19's MLA
gathers the column-parallel kv down-projection with an op whose backward keeps only this rank's slice,
assuming the gradient is the same on every rank, which for k_R it is not (each rank sees only its heads).
Summing over TP ranks before the broadcast's own sum over local heads gives the sum over all heads.

Max logits for QK-Clip, one protocol: every forward records ``current_max_attn_logits`` (float32 [heads on this
TP rank]), the running maximum of the scaled, causally masked logits (the attribute megatron's
MLASelfAttention.clip_qk() reads); ``take_max_attn_logits()`` hands it over and resets it, and
``take_global_max_attn_logits(layers)`` does so for every layer of a model at once, all-reduced (MAX) over the
data- and context-parallel ranks: the one reduction, used by k2_megatron.megatron.optimizer.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron.core import parallel_state
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from k2_megatron import ops  # looked up per call: ops.<name> is whatever k2_megatron.ops exports then
from k2_megatron.megatron.layout import all_reduce_on_backend, collective_device


class K2MLACoreAttention(MegatronModule):
    """Causal MLA core attention (q·k dim ``k_channels``, value dim ``v_channels``) with max-logit recording."""

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, attention_dropout: float | None = None, softmax_scale: float | None = None,
                 k_channels: int | None = None, v_channels: int | None = None, cp_comm_type: str | None = None,
                 pg_collection=None, **unused):
        super().__init__(config=config)
        if attention_type != "self":
            raise ValueError(f"K2MLACoreAttention: attention_type must be 'self', got {attention_type!r}")
        if attn_mask_type not in (AttnMaskType.causal, AttnMaskType.padding_causal):
            raise ValueError(f"K2MLACoreAttention: attn_mask_type must be causal, got {attn_mask_type}")
        if config.context_parallel_size != 1:
            raise ValueError(f"K2MLACoreAttention: context_parallel_size must be 1, got {config.context_parallel_size}")
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise ValueError(f"K2MLACoreAttention: attention dropout is not supported (K2 uses 0), got {dropout}")
        if pg_collection is None:
            from megatron.core.process_groups_config import ProcessGroupCollection

            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        tp_size = pg_collection.tp.size()
        self.tp_group = pg_collection.tp
        self.tp_size = tp_size
        self.qk_rope_head_dim = getattr(config, "qk_pos_emb_head_dim", 0)
        if config.num_attention_heads % tp_size:
            raise ValueError(f"K2MLACoreAttention: num_attention_heads={config.num_attention_heads} is not divisible "
                             f"by the tensor-parallel size {tp_size}")
        self.layer_number = layer_number
        self.num_heads_per_partition = config.num_attention_heads // tp_size
        self.k_channels = k_channels if k_channels is not None else config.kv_channels
        self.v_channels = v_channels if v_channels is not None else config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else self.k_channels ** -0.5
        self.current_max_attn_logits: torch.Tensor | None = None

    def _shared_rope_key(self, key: torch.Tensor) -> torch.Tensor:
        """key with its rope part marked 'identity forward, all-reduce over TP backward' (see the module doc)."""
        if self.tp_size == 1 or not self.qk_rope_head_dim:
            return key
        k_nope, k_rope = key.split([key.shape[-1] - self.qk_rope_head_dim, self.qk_rope_head_dim], dim=-1)
        return torch.cat([k_nope, copy_to_tensor_model_parallel_region(k_rope, group=self.tp_group)], dim=-1)

    def take_max_attn_logits(self) -> torch.Tensor | None:
        """The per-head max logits of the forwards since the last call (None if there was none); resets them."""
        logits, self.current_max_attn_logits = self.current_max_attn_logits, None
        return logits

    def _record(self, max_logits: torch.Tensor) -> None:
        max_logits = max_logits.detach().float()
        if self.current_max_attn_logits is None:
            self.current_max_attn_logits = max_logits
        else:
            self.current_max_attn_logits = torch.maximum(self.current_max_attn_logits, max_logits)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, attn_mask_type: AttnMaskType | None = None,
                attention_bias: torch.Tensor | None = None, packed_seq_params: PackedSeqParams | None = None,
                **unused) -> torch.Tensor:
        if attention_bias is not None:
            raise ValueError("K2MLACoreAttention: attention_bias is not supported")
        mask_type = attn_mask_type if attn_mask_type is not None else AttnMaskType.causal
        key = self._shared_rope_key(key)
        packed = packed_seq_params is not None and packed_seq_params.qkv_format == "thd"
        # Causal: a mask tensor, if megatron passes one, carries nothing beyond the causal structure. A padding
        # mask is only expressible as packed sequences (cu_seqlens), where padding_causal is what megatron uses.
        if not (mask_type == AttnMaskType.causal or (mask_type == AttnMaskType.padding_causal and packed)):
            raise ValueError(f"K2MLACoreAttention: only causal attention (padding_causal with packed sequences) is "
                             f"supported, got {mask_type}")
        if packed:
            # query [t, h, d] (megatron squeezed the batch dim), one packed batch of sequences.
            if query.dim() == 4:
                query, key, value = query.squeeze(1), key.squeeze(1), value.squeeze(1)
            cu_q = packed_seq_params.cu_seqlens_q
            cu_k = packed_seq_params.cu_seqlens_kv
            out, max_logits = ops.mla_attention_varlen(
                query, key, value, cu_q, cu_k, packed_seq_params.max_seqlen_q, packed_seq_params.max_seqlen_kv,
                causal=True, softmax_scale=self.softmax_scale)
            self._record(max_logits)
            return out.reshape(out.shape[0], -1)
        if packed_seq_params is not None:
            raise ValueError(f"K2MLACoreAttention: packed_seq_params.qkv_format must be 'thd', got "
                             f"{packed_seq_params.qkv_format!r}")
        if query.dim() != 4:
            raise ValueError(f"K2MLACoreAttention: query must be [s, b, heads, d], got shape {tuple(query.shape)}")
        s, b, h, _ = query.shape
        # megatron's layout is [s, b, h, d]; the op takes [b, s, h, d] strided views.
        out, max_logits = ops.mla_attention(query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1),
                                             causal=True, softmax_scale=self.softmax_scale)
        self._record(max_logits)
        return out.transpose(0, 1).reshape(s, b, h * out.shape[-1])


def take_global_max_attn_logits(attention_layers) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Each layer's max logits since it last handed them over (``take_max_attn_logits``), all-reduced (MAX) over
    the data- and context-parallel ranks, and the names of the layers that recorded none (-inf heads there).

    attention_layers: [(name, MLASelfAttention with a K2MLACoreAttention)], the same layers in the same order on
    every rank of the data-parallel group. A collective, on the device of the group's backend (NCCL refuses CPU
    tensors)."""
    if not attention_layers:
        return {}, []
    group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    device = collective_device(group)
    values, missing = [], []
    for name, attn in attention_layers:
        core = attn.core_attention
        logits = core.take_max_attn_logits()
        if logits is None:
            missing.append(name)
            logits = torch.full((core.num_heads_per_partition,), float("-inf"))
        values.append(logits.detach().to(device=device, dtype=torch.float32))
    flat = all_reduce_on_backend(torch.cat(values), op=dist.ReduceOp.MAX, group=group)
    return dict(zip([name for name, _ in attention_layers], flat.split([v.numel() for v in values]))), missing
