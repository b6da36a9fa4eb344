"""Pretraining: the K2 schedule (warmup-stable-decay lr, batch size in tokens, YaRN settings), the run config,
the loop (``k2_megatron.training.pretrain``: ``pretrain(cfg)`` and the ``k2-pretrain`` command, ``main``; its
atomic checkpoints are k2_megatron.checkpoint.megatron), run logging and plots (``logging``) and the dry-run memory
planner (``plan``).
"""

from k2_megatron.training.config import ConfigError, PretrainConfig, load_config
from k2_megatron.training.schedule import (K2_GLOBAL_BATCH_TOKENS, K2_MIN_LR, K2_PEAK_LR, K2_SEQ_LENGTH,
                                          K2_WARMUP_STEPS, K2_WEIGHT_DECAY, BatchLayout, WSDLRScheduler,
                                          WSDSchedule, YarnConfig, batch_layout, set_lr, wsd_lr_scheduler)

__all__ = ["ConfigError", "PretrainConfig", "load_config", "K2_GLOBAL_BATCH_TOKENS", "K2_MIN_LR", "K2_PEAK_LR",
           "K2_SEQ_LENGTH", "K2_WARMUP_STEPS", "K2_WEIGHT_DECAY", "BatchLayout", "WSDLRScheduler", "WSDSchedule",
           "YarnConfig", "batch_layout", "set_lr", "wsd_lr_scheduler"]
