"""Configuration as data: the K2 model (presets, Hugging Face config.json), the parallel layout, the activation
memory options, the pretraining schedule and the run's YAML schema. Light: nothing here builds a model.

- model: K2Config, PRESETS / get_preset, config_from_hf / config_to_hf / save_hf_config
- parallel: ParallelLayout (sizes, data-parallel size from the world, per-stage layers) and megatron-core's
  pipeline layout strings
- memory: MemoryOptions
- schedule: WSDSchedule, batch_layout, YarnConfig and the K2 recipe numbers
- run: PretrainConfig (YAML + dotted overrides, load_config), ConfigError
"""

from k2_megatron.config.memory import OFFLOAD_CHOICES, RECOMPUTE_CHOICES, MemoryOptions
from k2_megatron.config.model import (HF_MODEL_TYPES, PRESETS, K2Config, config_from_hf, config_to_hf, get_preset,
                                     save_hf_config)
from k2_megatron.config.parallel import ParallelLayout
from k2_megatron.config.run import ConfigError, PretrainConfig, load_config
from k2_megatron.config.schedule import BatchLayout, WSDSchedule, YarnConfig, batch_layout

__all__ = ["HF_MODEL_TYPES", "OFFLOAD_CHOICES", "PRESETS", "RECOMPUTE_CHOICES", "BatchLayout", "ConfigError",
           "K2Config", "MemoryOptions", "ParallelLayout", "PretrainConfig", "WSDSchedule", "YarnConfig",
           "batch_layout", "config_from_hf", "config_to_hf", "get_preset", "load_config", "save_hf_config"]
