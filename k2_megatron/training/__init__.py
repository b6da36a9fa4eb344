"""Pretraining: the loop (``k2_megatron.training.pretrain``: ``pretrain(cfg)`` and the ``k2-pretrain`` command,
``main``), run logging and plots (``logging``), the learning-rate schedule applied to optimizers (``schedule``) and
the dry-run memory planner (``plan``). Its atomic checkpoints are k2_megatron.checkpoint.megatron; the run's
configuration is k2_megatron.config (PretrainConfig, load_config, WSDSchedule, ...).
"""

from k2_megatron.training.schedule import WSDLRScheduler, set_lr, wsd_lr_scheduler

__all__ = ["WSDLRScheduler", "set_lr", "wsd_lr_scheduler"]
