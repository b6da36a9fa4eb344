"""Checkpoints: the Hugging Face (DeepSeek-V3 / Kimi K2 layout) <-> megatron state-dict adapter, FP8 block
(de)quantisation, streaming safetensors IO and the conversion functions behind tools/convert_checkpoint.py."""

from k2_megatron.checkpoint.convert import convert_hf_to_hf, convert_hf_to_megatron, convert_megatron_to_hf
from k2_megatron.checkpoint.fp8 import dequantize_fp8_blockwise, quantize_fp8_blockwise
from k2_megatron.checkpoint.hf_adapter import (
    StateDictMismatch,
    hf_to_megatron,
    load_megatron_state_dict,
    megatron_to_hf,
)
from k2_megatron.checkpoint.safetensors_io import CheckpointError, HFCheckpoint

__all__ = ["CheckpointError", "HFCheckpoint", "StateDictMismatch", "convert_hf_to_hf", "convert_hf_to_megatron",
           "convert_megatron_to_hf", "dequantize_fp8_blockwise", "hf_to_megatron", "load_megatron_state_dict",
           "megatron_to_hf", "quantize_fp8_blockwise"]
