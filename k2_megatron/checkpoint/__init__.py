"""Checkpoints, one error hierarchy (``errors``) for all of them:

- ``hf/``: Hugging Face files (DeepSeek-V3 / Kimi K2 layout): streaming safetensors IO, the release's FP8 block
  (de)quantisation, the HF <-> megatron state-dict adapter;
- ``megatron``: the megatron dist_checkpointing checkpoints of a training run (atomic save, ``latest``, load);
- ``convert`` / ``convert_cli``: the conversions between the two behind tools/convert_checkpoint.py.
"""

from k2_megatron.checkpoint.convert import convert_hf_to_hf, convert_hf_to_megatron, convert_megatron_to_hf
from k2_megatron.checkpoint.errors import (CheckpointCorruptError, CheckpointError, CheckpointMismatchError,
                                          CheckpointSaveError)
from k2_megatron.checkpoint.hf.adapter import (
    StateDictMismatch,
    hf_to_megatron,
    load_megatron_state_dict,
    megatron_to_hf,
)
from k2_megatron.checkpoint.hf.fp8 import dequantize_fp8_blockwise, quantize_fp8_blockwise
from k2_megatron.checkpoint.hf.safetensors_io import HFCheckpoint

__all__ = ["CheckpointCorruptError", "CheckpointError", "CheckpointMismatchError", "CheckpointSaveError",
           "HFCheckpoint", "StateDictMismatch", "convert_hf_to_hf", "convert_hf_to_megatron", "convert_megatron_to_hf", "dequantize_fp8_blockwise",
           "hf_to_megatron", "load_megatron_state_dict", "megatron_to_hf", "quantize_fp8_blockwise"]
