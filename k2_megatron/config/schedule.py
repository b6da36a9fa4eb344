"""K2's pretraining schedule as data: warmup-stable-decay learning rate, batch size in tokens, YaRN settings.

The Kimi K2 technical report (arXiv:2507.20534): 500-step linear warm-up to 2e-4, 2e-4 constant for 10T tokens,
cosine decay to 2e-5 over 5.5T tokens, weight decay 0.1, global batch ~67M tokens at context 4096; then a
long-context stage with YaRN (factor 32 over the original 4096 positions).

Convention: ``lr(step)`` is the learning rate of optimizer step ``step`` (0-based), so with W warm-up steps,
S stable steps and D decay steps:

    step in [0, W):          lr = init + (peak - init) * (step + 1) / W          (reaches peak at step W-1)
    step in [W, W+S):        lr = peak
    step in [W+S, W+S+D):    lr = floor + (peak - floor) * (1 + cos(pi * j / D)) / 2,  j = step - W - S + 1
                                                                                  (reaches floor at step W+S+D-1)
    step >= W+S+D:           lr = floor

The schedule is a pure function of the step, so resuming needs nothing but the step count. Applying it to a
torch optimizer is k2_megatron.training.schedule's job (set_lr, wsd_lr_scheduler).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# K2 recipe numbers (the report's pretraining recipe).
K2_PEAK_LR = 2e-4
K2_MIN_LR = 2e-5
K2_WARMUP_STEPS = 500
K2_STABLE_TOKENS = 10 * 10**12
K2_DECAY_TOKENS = 55 * 10**11
K2_WEIGHT_DECAY = 0.1
K2_SEQ_LENGTH = 4096
K2_GLOBAL_BATCH_TOKENS = 16384 * 4096  # 67,108,864: the report's "~67M tokens"


def _check_int(name: str, value, low: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}: must be an int >= {low}, got {value!r}")
    return value


def _check_lr(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name}: must be a finite number >= 0, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class WSDSchedule:
    """Warmup-stable-decay: linear warm-up from ``init_lr`` to ``peak_lr`` over ``warmup_steps``, constant for
    ``stable_steps``, cosine decay to ``min_lr`` over ``decay_steps``, then ``min_lr`` forever."""

    peak_lr: float
    warmup_steps: int
    stable_steps: int
    decay_steps: int
    min_lr: float = 0.0
    init_lr: float = 0.0

    def __post_init__(self):
        peak = _check_lr("peak_lr", self.peak_lr)
        if peak <= 0:
            raise ValueError(f"peak_lr: must be > 0, got {self.peak_lr!r}")
        for name in ("warmup_steps", "stable_steps", "decay_steps"):
            _check_int(name, getattr(self, name))
        for name in ("min_lr", "init_lr"):
            if _check_lr(name, getattr(self, name)) > peak:
                raise ValueError(f"{name}: must be <= peak_lr={peak}, got {getattr(self, name)!r}")

    @property
    def decay_start(self) -> int:
        return self.warmup_steps + self.stable_steps

    @property
    def total_steps(self) -> int:
        """The first step at the floor for good: warmup + stable + decay."""
        return self.decay_start + self.decay_steps

    def lr(self, step: int) -> float:
        """The learning rate of optimizer step ``step`` (0-based); see the module docstring."""
        _check_int("step", step)
        if step < self.warmup_steps:
            return self.init_lr + (self.peak_lr - self.init_lr) * (step + 1) / self.warmup_steps
        if step < self.decay_start:
            return self.peak_lr
        if step < self.total_steps:
            progress = (step - self.decay_start + 1) / self.decay_steps
            return self.min_lr + (self.peak_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_lr

    __call__ = lr

    def multiplier(self, step: int) -> float:
        """lr(step) / peak_lr: the factor for ``torch.optim.lr_scheduler.LambdaLR``."""
        return self.lr(step) / self.peak_lr

    @classmethod
    def from_tokens(cls, *, peak_lr: float, min_lr: float, warmup_steps: int, stable_tokens: int,
                    decay_tokens: int, tokens_per_step: int, init_lr: float = 0.0) -> "WSDSchedule":
        """The phases given in tokens, as the K2 report states them; each rounds up to whole steps."""
        _check_int("tokens_per_step", tokens_per_step, 1)
        _check_int("stable_tokens", stable_tokens)
        _check_int("decay_tokens", decay_tokens)
        return cls(peak_lr=peak_lr, warmup_steps=warmup_steps, stable_steps=-(-stable_tokens // tokens_per_step),
                   decay_steps=-(-decay_tokens // tokens_per_step), min_lr=min_lr, init_lr=init_lr)

    @classmethod
    def k2(cls, tokens_per_step: int = K2_GLOBAL_BATCH_TOKENS) -> "WSDSchedule":
        """The K2 pretraining schedule: 500 warm-up steps to 2e-4, 10T tokens constant, cosine to 2e-5 over 5.5T."""
        return cls.from_tokens(peak_lr=K2_PEAK_LR, min_lr=K2_MIN_LR, warmup_steps=K2_WARMUP_STEPS,
                               stable_tokens=K2_STABLE_TOKENS, decay_tokens=K2_DECAY_TOKENS,
                               tokens_per_step=tokens_per_step)


@dataclass(frozen=True)
class BatchLayout:
    """How a global batch in tokens splits into sequences, data-parallel ranks and micro-batches."""

    global_batch_tokens: int
    seq_length: int
    micro_batch_size: int          # sequences per micro-batch per data-parallel rank
    dp_size: int
    global_batch_size: int         # sequences per optimizer step over all ranks
    num_micro_batches: int         # gradient-accumulation steps per optimizer step on each rank

    @property
    def tokens_per_micro_batch(self) -> int:
        return self.micro_batch_size * self.seq_length


def batch_layout(global_batch_tokens: int, seq_length: int, micro_batch_size: int, dp_size: int = 1
                 ) -> BatchLayout:
    """Splits a global batch given in tokens: global_batch_tokens = seq_length * micro_batch_size * dp_size *
    num_micro_batches, each factor a positive integer; a clear error names the quantity that does not divide."""
    _check_int("global_batch_tokens", global_batch_tokens, 1)
    _check_int("seq_length", seq_length, 1)
    _check_int("micro_batch_size", micro_batch_size, 1)
    _check_int("dp_size", dp_size, 1)
    if global_batch_tokens % seq_length:
        lo = global_batch_tokens // seq_length * seq_length
        raise ValueError(f"global_batch_tokens: {global_batch_tokens} is not a multiple of seq_length={seq_length} "
                         f"(nearest: {lo or seq_length} or {lo + seq_length})")
    sequences = global_batch_tokens // seq_length
    per_step = micro_batch_size * dp_size
    if sequences % per_step:
        unit = per_step * seq_length
        lo = global_batch_tokens // unit * unit
        raise ValueError(f"global_batch_tokens: {global_batch_tokens} tokens = {sequences} sequences of {seq_length}, "
                         f"not a multiple of micro_batch_size * dp_size = {micro_batch_size} * {dp_size} = {per_step}"
                         f" (nearest: {lo or unit} or {lo + unit} tokens, or change micro_batch_size)")
    return BatchLayout(global_batch_tokens, seq_length, micro_batch_size, dp_size, sequences, sequences // per_step)


@dataclass(frozen=True)
class YarnConfig:
    """YaRN context extension for a long-context stage (the maths lives in the model's rotary embedding).

    Defaults are K2's: factor 32 over the original 4096 positions (128K), beta_fast = beta_slow = 1,
    mscale = mscale_all_dim = 1. ``rope_scaling()`` is the config.json block ``K2Config.rope_scaling`` takes.
    """

    factor: float = 32.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 1.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 1.0

    def __post_init__(self):
        if isinstance(self.factor, bool) or not isinstance(self.factor, (int, float)) or not self.factor >= 1:
            raise ValueError(f"factor: must be a number >= 1, got {self.factor!r}")
        _check_int("original_max_position_embeddings", self.original_max_position_embeddings, 1)
        for name in ("beta_fast", "beta_slow", "mscale", "mscale_all_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name}: must be a finite number >= 0, got {value!r}")

    @property
    def max_position_embeddings(self) -> int:
        """The extended context: factor * original positions."""
        return int(self.factor * self.original_max_position_embeddings)

    def rope_scaling(self) -> dict:
        return {"type": "yarn", "factor": float(self.factor),
                "original_max_position_embeddings": self.original_max_position_embeddings,
                "beta_fast": float(self.beta_fast), "beta_slow": float(self.beta_slow),
                "mscale": float(self.mscale), "mscale_all_dim": float(self.mscale_all_dim)}
