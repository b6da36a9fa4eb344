"""K2 model definitions: the architecture as data (presets, validation, Hugging Face config.json I/O).

The megatron-core model itself is built by ``k2_megatron.megatron.build_k2_model``.
"""

from k2_megatron.models.config import (
    HF_MODEL_TYPES,
    PRESETS,
    K2Config,
    check_parallel_layout,
    config_from_hf,
    config_to_hf,
    get_preset,
    save_hf_config,
)

__all__ = ["HF_MODEL_TYPES", "PRESETS", "K2Config", "check_parallel_layout", "config_from_hf", "config_to_hf",
           "get_preset", "save_hf_config"]
