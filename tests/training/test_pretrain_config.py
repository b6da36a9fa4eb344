"""Pretraining config: YAML + dotted overrides, validation errors that name the key, the recipes in
examples/configs, and the WSD schedule the run derives from the config. No model is built (fast)."""

from __future__ import annotations

import dataclasses
import math
import os

import pytest

from k2_megatron.config import ConfigError, PretrainConfig, load_config

from tests.helpers import REPO_ROOT

CONFIGS = str(REPO_ROOT / "examples" / "configs")


def test_tiny_yaml_is_the_default():
    """`k2-pretrain` with no arguments runs the dataclass defaults; the YAML recipe must say the same."""
    from_yaml = load_config(os.path.join(CONFIGS, "k2_tiny_cpu.yaml")).to_dict()
    defaults = PretrainConfig().to_dict()
    assert from_yaml == defaults


@pytest.mark.parametrize("name", ["k2_tiny_cpu.yaml", "k2_mini_1gpu.yaml", "k2_full.yaml"])
def test_recipes_load(name):
    cfg = load_config(os.path.join(CONFIGS, name))
    assert cfg.optim.weight_decay == 0.1


def test_full_recipe_is_the_papers():
    cfg = load_config(os.path.join(CONFIGS, "k2_full.yaml"))
    assert (cfg.model.preset, cfg.parallel.pipeline, cfg.parallel.expert) == ("k2", 16, 16)
    assert cfg.parallel.virtual_stages and cfg.parallel.virtual_stages > 1
    assert cfg.train.global_batch_tokens == 16384 * 4096 and cfg.data.seq_length == 4096
    sched = cfg.schedule()
    assert (sched.peak_lr, sched.min_lr, sched.warmup_steps) == (2e-4, 2e-5, 500)
    # 10T tokens stable, 5.5T decay, in steps of 67,108,864 tokens (rounded up)
    assert sched.stable_steps == math.ceil(10e12 / 67108864) and sched.decay_steps == math.ceil(5.5e12 / 67108864)


def test_overrides_are_typed_and_nested():
    cfg = load_config(None, ["train.iters=20", "optim.peak_lr=3e-3", "optim.qk_clip_tau=null",
                             "model.overrides.num_hidden_layers=2", "data.train_prefix=/a", "data.valid_prefix=/b"])
    assert cfg.train.iters == 20 and cfg.optim.peak_lr == 3e-3 and cfg.optim.qk_clip_tau is None
    assert cfg.model.overrides == {"num_hidden_layers": 2}
    assert cfg.data.train_prefix == ["/a"] and cfg.data.valid_prefix == ["/b"]
    assert cfg.k2_config(4096).num_hidden_layers == 2 and cfg.k2_config(4096).vocab_size == 4096


@pytest.mark.parametrize("override, message", [
    ("train.iters=0", "train.iters: must be an int >= 1, got 0"),
    ("train.iters=ten", "train.iters: expected int, got str 'ten'"),
    ("train.iterz=10", "train.iterz: unknown key 'iterz' in section 'train'"),
    ("trian.iters=10", "trian.iters: unknown config section 'trian'"),
    ("iters=10", "overrides are section.key=value"),
    ("train.iters", "expected section.key=value"),
    ("optim.peak_lr=-1", "optim.peak_lr: must be a finite number > 0"),
    ("optim.min_lr=1.0", "optim.min_lr: must be <= optim.peak_lr"),
    ("optim.adam_beta2=1.0", r"optim.adam_beta2: must be in \[0, 1\)"),
    ("optim.qk_clip_tau=0", "optim.qk_clip_tau: must be a number > 0 or null"),
    ("model.preset=k3", "model.preset: unknown preset 'k3'"),
    ("model.params_dtype=float16", "model.params_dtype: must be 'float32' or 'bfloat16'"),
    ("model.overrides.num_experts_per_tok=99", "model: K2Config.num_experts_per_tok"),
    ("data.seq_length=100000", "data.seq_length=100000 exceeds the model's max_position_embeddings"),
    ("data.tokenizer=gpt2", "data.tokenizer: must be 'default:N', 'bpe:PATH' or 'tiktoken:PATH'"),
    ("data.train_prefix=/a", "give both"),
    ("parallel.virtual_stages=2", "parallel.virtual_stages=2 needs parallel.pipeline >= 2"),
    ("checkpoint.keep=0", "checkpoint.keep: must be an int >= 1"),
    ("parallel.pipeline_layout=auto", "parallel.pipeline_layout needs parallel.pipeline >= 2"),
])
def test_validation_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_yaml_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  iters: 10\n  bogus: 1\n")
    with pytest.raises(ConfigError, match="train.bogus: unknown key"):
        load_config(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize("world, overrides, message", [
    (3, ["parallel.pipeline=2"], "world size 3 is not divisible by parallel.tensor x parallel.pipeline"),
    (2, ["parallel.pipeline=2", "parallel.virtual_stages=4"], "not divisible by pipeline_parallel x virtual"),
    (2, ["parallel.expert=3"], "parallel.expert=3 must divide"),
    (2, ["train.global_batch_tokens=4000"], "not a multiple of seq_length=128"),
    (4, ["train.global_batch_tokens=3072"], "not a multiple of micro_batch_size \\* dp_size"),
    (2, ["parallel.pipeline=2", "parallel.virtual_stages=2", "parallel.pipeline_layout=Et|tt|t|tL"],
     r"has 5 decoder layers \('t'\), but num_hidden_layers=4"),
    (2, ["parallel.pipeline=2", "parallel.pipeline_layout=Et|t|t|tL"], "4 chunks, but pipeline_parallel x virtual"),
])
def test_layout_errors(world, overrides, message):
    cfg = load_config(None, overrides)
    with pytest.raises(ConfigError, match=message):
        cfg.layout(world)


def test_layout_of_the_default_run():
    dp, layout = load_config(None).layout(1)
    assert dp == 1 and layout.global_batch_size == 32 and layout.num_micro_batches == 4
    dp, layout = load_config(None).layout(2)
    assert dp == 2 and layout.num_micro_batches == 2  # same tokens per step on two ranks


def test_schedule_wiring():
    """The run's WSD schedule: warm-up steps, then constant, then cosine over decay_fraction x iters to min_lr."""
    cfg = load_config(None, ["train.iters=100", "optim.warmup_steps=10", "optim.decay_fraction=0.2",
                             "optim.peak_lr=1e-2", "optim.min_lr=1e-3"])
    s = cfg.schedule()
    assert (s.warmup_steps, s.stable_steps, s.decay_steps) == (10, 70, 20)
    assert s.lr(0) == pytest.approx(1e-3) and s.lr(9) == pytest.approx(1e-2)  # linear, peak at the last warm-up step
    assert s.lr(10) == s.lr(79) == 1e-2
    assert s.lr(89) == pytest.approx(1e-3 + 9e-3 * 0.5 * (1 + math.cos(math.pi * 10 / 20)))  # half way: 5.5e-3
    assert s.lr(99) == pytest.approx(1e-3) and s.lr(150) == 1e-3
    # explicit phase lengths win over the fraction; a warm-up longer than the run is cut to the run
    s = load_config(None, ["train.iters=5", "optim.warmup_steps=15"]).schedule()
    assert s.warmup_steps == 5 and s.lr(4) == pytest.approx(1e-2)
    s = load_config(None, ["optim.stable_steps=7", "optim.decay_steps=3"]).schedule()
    assert (s.stable_steps, s.decay_steps) == (7, 3)


def test_config_round_trips_through_a_dict(tmp_path):
    import yaml

    cfg = load_config(None, ["train.iters=7", "model.overrides.hidden_size=32"])
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    assert dataclasses.asdict(load_config(path)) == cfg.to_dict()


def test_pipeline_layout_option():
    """parallel.pipeline_layout: an uneven split over pipeline x virtual stages (5 layers on PP2 x VPP2 here, 61 on
    PP16 x VPP2 in the full recipe), planned by the dry run exactly as it is built."""
    from k2_megatron.training.plan import plan_memory

    base = ["model.overrides.num_hidden_layers=5", "parallel.pipeline=2", "parallel.virtual_stages=2"]
    with pytest.raises(ConfigError, match="not divisible by pipeline_parallel x virtual_pipeline_stages"):
        load_config(None, base).layout(2)
    for layout, chunks in (("auto", [1, 2, 1, 1]), ("Ett|t|t|tL", [2, 1, 1, 1])):
        cfg = load_config(None, base + [f"parallel.pipeline_layout={layout}"])
        assert cfg.layout(2)[0] == 1
        plan = plan_memory(cfg, 2)
        assert [s.chunk_layers for s in plan.stages] == [[chunks[0], chunks[2]], [chunks[1], chunks[3]]]
    with pytest.raises(ConfigError, match="parallel.pipeline_layout cannot be combined with"):
        load_config(None, base + ["parallel.pipeline_layout=auto", "parallel.first_stage_layers=2"])
    with pytest.raises(ConfigError, match=r"parallel.pipeline_layout: .*chunk 1 has no decoder layer"):
        plan_memory(load_config(None, base + ["parallel.pipeline_layout=Ettt||t|tL"]), 2)


def test_full_recipe_uses_virtual_stages_with_an_uneven_layout():
    from k2_megatron.training.plan import plan_memory

    cfg = load_config(os.path.join(CONFIGS, "k2_full.yaml"))
    p = cfg.parallel
    assert (p.pipeline, p.virtual_stages, p.pipeline_layout) == (16, 2, "auto")
    assert p.first_stage_layers is None and p.last_stage_layers is None
    dp, _ = cfg.layout(256)
    assert dp == 16
    chunks = p.layout().chunk_layers(61)
    plan = plan_memory(cfg, 256)
    assert [s.chunk_layers for s in plan.stages] == [[chunks[s], chunks[s + 16]] for s in range(16)]
    assert sum(len(s.layers) for s in plan.stages) == 61
