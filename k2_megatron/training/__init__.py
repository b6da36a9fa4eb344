"""Pretraining: the K2 schedule (warmup-stable-decay lr, batch size in tokens, YaRN settings)."""

from k2_megatron.training.schedule import (K2_GLOBAL_BATCH_TOKENS, K2_MIN_LR, K2_PEAK_LR, K2_SEQ_LENGTH,
                                          K2_WARMUP_STEPS, K2_WEIGHT_DECAY, BatchLayout, WSDLRScheduler,
                                          WSDSchedule, YarnConfig, batch_layout, set_lr, wsd_lr_scheduler)

__all__ = ["K2_GLOBAL_BATCH_TOKENS", "K2_MIN_LR", "K2_PEAK_LR", "K2_SEQ_LENGTH", "K2_WARMUP_STEPS", "K2_WEIGHT_DECAY",
           "BatchLayout", "WSDLRScheduler", "WSDSchedule", "YarnConfig", "batch_layout", "set_lr", "wsd_lr_scheduler"]
