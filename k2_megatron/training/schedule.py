"""K2's learning-rate schedule applied to torch optimizers: ``set_lr`` (stateless, by step) and a LambdaLR
scheduler (``wsd_lr_scheduler``). The schedule itself is data: k2_megatron.config.schedule.WSDSchedule.
"""

from __future__ import annotations

import torch

from k2_megatron.config.schedule import WSDSchedule


def set_lr(optimizer: torch.optim.Optimizer, schedule: WSDSchedule, step: int) -> float:
    """Sets every param group's lr to ``schedule.lr(step) * group.get("lr_mult", 1.0)``; returns schedule.lr(step).

    Stateless: call it before each optimizer step with the step count (works with any optimizer, resumes by
    construction)."""
    lr = schedule.lr(step)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)
    return lr


class _Multiplier:
    """A picklable lr_lambda (LambdaLR saves callable objects' state, not functions)."""

    def __init__(self, schedule: WSDSchedule):
        self.schedule = schedule

    def __call__(self, step: int) -> float:
        return self.schedule.multiplier(step)


class WSDLRScheduler(torch.optim.lr_scheduler.LambdaLR):
    """LambdaLR over a WSDSchedule whose ``load_state_dict`` also re-applies the restored step's lr to the
    optimizer, so the order of loading optimizer and scheduler states does not matter."""

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        lrs = [base * lmbda(self.last_epoch) for base, lmbda in zip(self.base_lrs, self.lr_lambdas)]
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        self._last_lr = lrs


def wsd_lr_scheduler(optimizer: torch.optim.Optimizer, schedule: WSDSchedule, last_step: int = -1
                     ) -> WSDLRScheduler:
    """A torch LR scheduler for ``schedule``: each group's lr = its initial lr * lr(step) / peak_lr.

    Usual torch protocol: the lr right after construction is the lr of step 0 (when ``last_step`` = -1); call
    ``scheduler.step()`` after each ``optimizer.step()``. Its state_dict resumes it.
    """
    return WSDLRScheduler(optimizer, _Multiplier(schedule), last_epoch=last_step)
