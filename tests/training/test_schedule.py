"""K2's warmup-stable-decay schedule, batch size in tokens, YaRN settings (k2_megatron/config/schedule.py) and
their application to torch optimizers (k2_megatron/training/schedule.py)."""

import math

import pytest
import torch

from k2_megatron.config.schedule import K2_GLOBAL_BATCH_TOKENS, BatchLayout, WSDSchedule, YarnConfig, batch_layout
from k2_megatron.training.schedule import set_lr, wsd_lr_scheduler

PEAK, FLOOR = 1e-3, 1e-4
SCHED = WSDSchedule(peak_lr=PEAK, warmup_steps=10, stable_steps=20, decay_steps=40, min_lr=FLOOR)


def _cosine(j, d):  # the decay value after j of d decay steps, written out independently of the module
    return FLOOR + (PEAK - FLOOR) * 0.5 * (1.0 + math.cos(math.pi * j / d))


@pytest.mark.parametrize("step,expected", [
    (0, PEAK * 1 / 10),            # warm-up start: the first step already moves
    (4, PEAK * 5 / 10),
    (9, PEAK),                     # warm-up end
    (10, PEAK),                    # stable start
    (29, PEAK),                    # stable end
    (30, _cosine(1, 40)),          # first decay step
    (39, FLOOR + (PEAK - FLOOR) * 0.5 * (1 + math.sqrt(0.5))),  # a quarter of the decay: cos(pi/4)
    (49, FLOOR + (PEAK - FLOOR) / 2),                           # decay mid: halfway between peak and floor
    (69, FLOOR),                   # decay end reaches the floor
    (70, FLOOR),
    (10**9, FLOOR),                # floor forever
])
def test_wsd_values(step, expected):
    assert SCHED.lr(step) == pytest.approx(expected, rel=1e-12, abs=0)
    assert SCHED(step) == SCHED.lr(step)


def test_wsd_shape_and_init_lr():
    lrs = [SCHED.lr(s) for s in range(80)]
    assert all(a < b for a, b in zip(lrs[:9], lrs[1:10]))           # strictly rising warm-up
    assert all(a >= b for a, b in zip(lrs[10:79], lrs[11:80]))      # never rising afterwards
    assert all(a > b for a, b in zip(lrs[29:69], lrs[30:70]))       # strictly falling decay
    assert SCHED.total_steps == 70 and SCHED.decay_start == 30
    s = WSDSchedule(peak_lr=1.0, warmup_steps=4, stable_steps=0, decay_steps=0, min_lr=0.5, init_lr=0.2)
    assert [s.lr(i) for i in range(6)] == pytest.approx([0.4, 0.6, 0.8, 1.0, 0.5, 0.5], rel=1e-12)
    # no warm-up, no decay: the peak for stable_steps, then the floor (= the peak for a constant schedule)
    c = WSDSchedule(peak_lr=3e-4, warmup_steps=0, stable_steps=5, decay_steps=0)
    assert [c.lr(i) for i in range(7)] == [3e-4] * 5 + [0.0] * 2
    c = WSDSchedule(peak_lr=3e-4, warmup_steps=0, stable_steps=5, decay_steps=0, min_lr=3e-4)
    assert {c.lr(i) for i in range(10)} == {3e-4}


def test_k2_preset():
    k2 = WSDSchedule.k2()
    assert k2.peak_lr == 2e-4 and k2.min_lr == 2e-5 and k2.warmup_steps == 500
    # 10T and 5.5T tokens at 16384 x 4096 tokens per step, rounded up to whole steps
    assert k2.stable_steps == math.ceil(10e12 / 67108864) == 149012
    assert k2.decay_steps == math.ceil(5.5e12 / 67108864) == 81957
    assert k2.lr(0) == pytest.approx(2e-4 / 500, rel=1e-12)
    assert k2.lr(499) == k2.lr(500 + 149011) == 2e-4
    assert k2.lr(k2.total_steps - 1) == pytest.approx(2e-5, rel=1e-12)
    assert WSDSchedule.from_tokens(peak_lr=1.0, min_lr=0.0, warmup_steps=1, stable_tokens=10, decay_tokens=11,
                                   tokens_per_step=5).decay_steps == 3


@pytest.mark.parametrize("kwargs,match", [
    (dict(peak_lr=0.0), "peak_lr"),
    (dict(peak_lr=float("nan")), "peak_lr"),
    (dict(min_lr=2e-3), "min_lr"),
    (dict(min_lr=-1e-5), "min_lr"),
    (dict(init_lr=5e-3), "init_lr"),
    (dict(warmup_steps=-1), "warmup_steps"),
    (dict(stable_steps=2.5), "stable_steps"),
    (dict(decay_steps=True), "decay_steps"),
])
def test_wsd_config_errors(kwargs, match):
    base = dict(peak_lr=PEAK, warmup_steps=10, stable_steps=20, decay_steps=40, min_lr=FLOOR)
    with pytest.raises(ValueError, match=match):
        WSDSchedule(**{**base, **kwargs})


def test_wsd_step_errors():
    for bad in (-1, 1.5, None):
        with pytest.raises(ValueError, match="step"):
            SCHED.lr(bad)
    with pytest.raises(ValueError, match="tokens_per_step"):
        WSDSchedule.from_tokens(peak_lr=1.0, min_lr=0.0, warmup_steps=1, stable_tokens=1, decay_tokens=1,
                                tokens_per_step=0)


def _optimizer():
    w = torch.nn.Parameter(torch.zeros(2))
    b = torch.nn.Parameter(torch.zeros(1))
    return torch.optim.SGD([{"params": [w], "lr": PEAK}, {"params": [b], "lr": PEAK / 2, "lr_mult": 0.5}], lr=PEAK)


def test_torch_scheduler_and_set_lr_agree_and_resume():
    opt = _optimizer()
    sched = wsd_lr_scheduler(opt, SCHED)
    opt2 = _optimizer()
    history = []
    for step in range(75):
        assert opt.param_groups[0]["lr"] == pytest.approx(SCHED.lr(step), rel=1e-12)
        assert opt.param_groups[1]["lr"] == pytest.approx(SCHED.lr(step) / 2, rel=1e-12)
        assert set_lr(opt2, SCHED, step) == SCHED.lr(step)
        assert [g["lr"] for g in opt2.param_groups] == pytest.approx([g["lr"] for g in opt.param_groups], rel=1e-12)
        history.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
        if step == 33:  # a copy resumed mid-decay from the state dicts
            opt_r = _optimizer()
            opt_r.load_state_dict(opt.state_dict())
            sched_r = wsd_lr_scheduler(opt_r, SCHED)
            sched_r.load_state_dict(sched.state_dict())
    for step in range(34, 75):
        assert [g["lr"] for g in opt_r.param_groups] == pytest.approx(history[step], rel=1e-12)
        opt_r.step()
        sched_r.step()
    assert sched_r.last_epoch == sched.last_epoch == 75


def test_batch_layout():
    k2 = batch_layout(K2_GLOBAL_BATCH_TOKENS, 4096, micro_batch_size=1, dp_size=64)
    assert k2 == BatchLayout(67108864, 4096, 1, 64, global_batch_size=16384, num_micro_batches=256)
    small = batch_layout(8 * 256, 256, micro_batch_size=2, dp_size=2)
    assert (small.global_batch_size, small.num_micro_batches, small.tokens_per_micro_batch) == (8, 2, 512)
    assert batch_layout(512, 512, 1).num_micro_batches == 1


def test_batch_layout_errors():
    with pytest.raises(ValueError, match=r"not a multiple of seq_length=256 \(nearest: 768 or 1024\)"):
        batch_layout(1000, 256, 1)
    with pytest.raises(ValueError, match=r"micro_batch_size \* dp_size = 2 \* 3 = 6"):
        batch_layout(8 * 256, 256, micro_batch_size=2, dp_size=3)
    for kwargs, name in ((dict(global_batch_tokens=0), "global_batch_tokens"), (dict(seq_length=0), "seq_length"),
                         (dict(micro_batch_size=0), "micro_batch_size"), (dict(dp_size=-2), "dp_size")):
        args = {**dict(global_batch_tokens=1024, seq_length=256, micro_batch_size=1, dp_size=1), **kwargs}
        with pytest.raises(ValueError, match=name):
            batch_layout(**args)


def test_yarn_config_matches_k2_release():
    from k2_megatron.config.model import get_preset

    yarn = YarnConfig()
    assert yarn.max_position_embeddings == 131072
    assert get_preset("k2").with_yarn(yarn).rope_scaling == yarn.rope_scaling()
    assert get_preset("k2").rope_scaling is None  # the preset pretrains with plain RoPE
    # a long-context stage of a small model: the model config accepts the block
    tiny = get_preset("k2-tiny")
    ext = YarnConfig(factor=4.0, original_max_position_embeddings=128)
    assert tiny.replace(rope_scaling=ext.rope_scaling(), max_position_embeddings=ext.max_position_embeddings).yarn
    for kwargs, name in ((dict(factor=0.5), "factor"), (dict(original_max_position_embeddings=0),
                                                        "original_max_position_embeddings"),
                         (dict(beta_fast=float("inf")), "beta_fast"), (dict(mscale=-1.0), "mscale")):
        with pytest.raises(ValueError, match=name):
            YarnConfig(**kwargs)
