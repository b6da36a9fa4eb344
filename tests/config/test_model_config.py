"""K2 presets, config validation, parallel-layout errors and Hugging Face config.json I/O (no megatron)."""

import json
import math

import pytest

from k2_megatron.config import (
    PRESETS,
    K2Config,
    ParallelLayout,
    YarnConfig,
    config_from_hf,
    config_to_hf,
    get_preset,
    save_hf_config,
)


def test_k2_preset_is_the_release_architecture_at_its_pretraining_context():
    c = get_preset("k2")
    expected = dict(num_hidden_layers=61, first_k_dense_replace=1, hidden_size=7168, intermediate_size=18432,
                    num_attention_heads=64, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
                    qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=384, num_experts_per_tok=8,
                    n_shared_experts=1, moe_intermediate_size=2048, routed_scaling_factor=2.827,
                    norm_topk_prob=True, n_group=1, topk_group=1, scoring_func="sigmoid", vocab_size=163840,
                    rms_norm_eps=1e-6, rope_theta=50000.0)
    for key, value in expected.items():
        assert getattr(c, key) == value, key
    assert c.qk_head_dim == 192
    # K2 pretrains at 4096 with plain RoPE; YaRN belongs to the long-context stage (and to the release)
    assert c.rope_scaling is None and c.max_position_embeddings == 4096
    assert c.softmax_scale() == 1 / math.sqrt(192)
    release = c.with_yarn(YarnConfig())
    assert release.rope_scaling == {"type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096,
                                    "beta_fast": 1.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}
    assert release.max_position_embeddings == 131072
    mscale = 0.1 * math.log(32) + 1
    assert release.softmax_scale() == pytest.approx(mscale ** 2 / math.sqrt(192), rel=1e-15)
    assert c.n_routed_experts // c.num_experts_per_tok == 48  # sparsity
    total, active = c.num_parameters()
    # the report's 1.04T / 32.6B; our count (embeddings, norms and router included) is 1.026T / 32.86B
    assert total == pytest.approx(1.04e12, rel=0.015)
    assert active == pytest.approx(32.6e9, rel=0.01)


def test_smaller_presets_keep_k2_structure():
    k2 = get_preset("k2")
    for name in ("k2-mini", "k2-tiny"):
        c = get_preset(name)
        assert c.first_k_dense_replace == 1 and c.n_shared_experts == 1 and c.scoring_func == "sigmoid"
        assert c.rope_scaling is None and c.routed_scaling_factor == k2.routed_scaling_factor
        assert c.qk_head_dim * 2 == c.v_head_dim * 3  # 192 : 128
        assert c.q_lora_rank and c.kv_lora_rank
    mini = get_preset("k2-mini")
    assert (mini.qk_nope_head_dim, mini.qk_rope_head_dim, mini.v_head_dim) == (128, 64, 128)  # K2's kernel shapes
    total, _ = mini.num_parameters()
    assert total * 16 < 40e9  # bf16 weights + fp32 master + 2 Adam moments: < 40 GB of an 80 GB GPU
    tiny_total, _ = get_preset("k2-tiny").num_parameters()
    assert tiny_total < 1e6
    assert sorted(PRESETS) == ["k2", "k2-mini", "k2-tiny"]


def test_preset_errors_and_overrides():
    with pytest.raises(ValueError,
                       match=r"unknown K2 preset 'k2-huge'; known presets: \['k2', 'k2-mini', 'k2-tiny'\]"):
        get_preset("k2-huge")
    assert get_preset("k2-tiny", num_hidden_layers=6).num_hidden_layers == 6
    assert get_preset("k2-tiny") is not get_preset("k2-tiny")
    with pytest.raises(ValueError, match="scoring_func must be 'sigmoid'"):
        get_preset("k2-tiny", scoring_func="softmax")
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        get_preset("k2-tiny", num_experts_per_tok=9)
    with pytest.raises(ValueError, match="qk_rope_head_dim must be even"):
        get_preset("k2-tiny", qk_rope_head_dim=7)
    with pytest.raises(ValueError, match="only YaRN"):
        get_preset("k2-tiny", rope_scaling={"type": "linear", "factor": 2.0})
    with pytest.raises(ValueError, match="first_k_dense_replace"):
        get_preset("k2-tiny", first_k_dense_replace=9)


@pytest.mark.parametrize("kwargs, match", [
    ({"tensor_parallel": 3}, "num_attention_heads=64 is not divisible by tensor_parallel=3"),
    ({"expert_parallel": 5}, "n_routed_experts=384 is not divisible by expert_parallel=5"),
    ({"pipeline_parallel": 16}, r"num_hidden_layers=61 is not divisible by pipeline_parallel x virtual_pipel"),
    ({"pipeline_parallel": 2, "virtual_pipeline_stages": 2}, "= 2 x 2 = 4"),
    ({"expert_tensor_parallel": 2}, "expert_tensor_parallel=2 is not supported"),
    ({"context_parallel": 2}, "context_parallel=2 is not supported"),
    ({"tensor_parallel": 0}, "tensor_parallel must be an int >= 1"),
])
def test_impossible_layouts(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ParallelLayout(**kwargs).check_model(get_preset("k2"))


def test_possible_layouts():
    ParallelLayout(tensor_parallel=8, expert_parallel=16, pipeline_parallel=61).check_model(get_preset("k2"))
    ParallelLayout(tensor_parallel=2, pipeline_parallel=2, expert_parallel=2).check_model(get_preset("k2-tiny"))


@pytest.mark.parametrize("stage", ["pretraining", "release"])
def test_release_config_json_round_trip(tmp_path, stage):
    k2 = get_preset("k2") if stage == "pretraining" else get_preset("k2").with_yarn(YarnConfig())
    hf = config_to_hf(k2, "kimi_k2")
    assert hf["model_type"] == "kimi_k2" and hf["architectures"] == ["DeepseekV3ForCausalLM"]
    assert (hf["rope_scaling"] is None if stage == "pretraining" else hf["rope_scaling"]["type"] == "yarn")
    assert hf["num_key_value_heads"] == 64
    assert hf["num_nextn_predict_layers"] == 0 and hf["topk_method"] == "noaux_tc"
    path = save_hf_config(k2, tmp_path)
    assert json.loads(open(path).read()) == json.loads(json.dumps(hf))
    assert config_from_hf(tmp_path) == k2
    assert config_from_hf(path) == k2
    assert config_from_hf(config_to_hf(k2, "deepseek_v3")) == k2


def test_reads_transformers_v5_layout_and_keeps_extra_keys():
    hf = config_to_hf(get_preset("k2-tiny").with_yarn(YarnConfig(original_max_position_embeddings=128)),
                      "deepseek_v3")
    scaling = hf.pop("rope_scaling")
    theta = hf.pop("rope_theta")
    hf["rope_parameters"] = {**{k: v for k, v in scaling.items() if k != "type"}, "rope_type": "yarn",
                             "rope_theta": theta}
    hf["torch_dtype"] = "bfloat16"
    c = config_from_hf(hf)
    assert c.rope_theta == theta and c.rope_scaling == scaling
    assert config_to_hf(c)["torch_dtype"] == "bfloat16"  # unknown keys are written back unchanged


@pytest.mark.parametrize("stage", ["pretraining", "release"])
def test_reads_what_transformers_writes(stage):
    transformers = pytest.importorskip("transformers")
    k2 = get_preset("k2") if stage == "pretraining" else get_preset("k2").with_yarn(YarnConfig())
    written = transformers.DeepseekV3Config(**config_to_hf(k2, "deepseek_v3")).to_dict()
    back = config_from_hf(written)
    for f in ("hidden_size", "num_hidden_layers", "q_lora_rank", "n_routed_experts", "routed_scaling_factor",
              "rope_theta", "rope_scaling", "first_k_dense_replace", "max_position_embeddings"):
        assert getattr(back, f) == getattr(k2, f), f


@pytest.mark.parametrize("change, match", [
    ({"model_type": "llama"}, "model_type must be one of"),
    ({"scoring_func": "softmax"}, "scoring_func='softmax' is not supported"),
    ({"num_key_value_heads": 8}, "num_key_value_heads=8"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"num_nextn_predict_layers": -1}, "multi-token-prediction"),
    ({"num_nextn_predict_layers": "1"}, "multi-token-prediction"),
])
def test_unsupported_config_json(change, match):
    hf = {**config_to_hf(get_preset("k2-tiny")), **change}
    with pytest.raises(ValueError, match=match):
        config_from_hf(hf)


def test_deepseek_v3_defaults_with_one_mtp_layer_read_as_the_main_model():
    """Every DeepSeek-V3 release and every DeepseekV3Config saved with its defaults says num_nextn_predict_layers 1;
    the model built here has no MTP layer, so the config reads as the main model and writes back 0."""
    transformers = pytest.importorskip("transformers")
    hf = config_to_hf(get_preset("k2-tiny"), "deepseek_v3")
    del hf["num_nextn_predict_layers"]
    written = transformers.DeepseekV3Config(**hf).to_dict()
    assert written["num_nextn_predict_layers"] == 1
    cfg = config_from_hf(written)
    assert cfg == config_from_hf({**written, "num_nextn_predict_layers": 0})
    assert config_to_hf(cfg)["num_nextn_predict_layers"] == 0


def test_config_json_missing_key():
    hf = config_to_hf(get_preset("k2-tiny"))
    del hf["kv_lora_rank"]
    with pytest.raises(ValueError, match=r"lacks required keys \['kv_lora_rank'\]"):
        config_from_hf(hf)
    with pytest.raises(ValueError, match="model_type"):
        config_to_hf(get_preset("k2-tiny"), "llama")


def test_config_is_a_dataclass_with_validation():
    with pytest.raises(ValueError, match="hidden_size must be a positive int"):
        K2Config(**{**get_preset("k2-tiny").__dict__, "hidden_size": 0})


def test_reads_a_release_style_kimi_k2_config_json():
    release = {  # moonshotai/Kimi-K2-Instruct's config.json, with keys we carry unchanged
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "kimi_k2", "vocab_size": 163840,
        "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
        "num_nextn_predict_layers": 0, "num_attention_heads": 64, "num_key_value_heads": 64,
        "n_shared_experts": 1, "n_routed_experts": 384, "ep_size": 1, "routed_scaling_factor": 2.827,
        "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64, "v_head_dim": 128,
        "qk_nope_head_dim": 128, "topk_method": "noaux_tc", "n_group": 1, "topk_group": 1,
        "num_experts_per_tok": 8, "moe_layer_freq": 1, "first_k_dense_replace": 1, "norm_topk_prob": True,
        "scoring_func": "sigmoid", "aux_loss_alpha": 0.001, "seq_aux": True, "hidden_act": "silu",
        "max_position_embeddings": 131072, "initializer_range": 0.02, "rms_norm_eps": 1e-06,
        "tie_word_embeddings": False, "rope_theta": 50000.0, "attention_bias": False, "attention_dropout": 0.0,
        "rope_scaling": {"beta_fast": 1.0, "beta_slow": 1.0, "factor": 32.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                         "original_max_position_embeddings": 4096, "type": "yarn"},
        "torch_dtype": "bfloat16",
        "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                "weight_block_size": [128, 128]},
    }
    c = config_from_hf(release)
    k2 = get_preset("k2").with_yarn(YarnConfig())  # the release keeps its YaRN: the architecture + K2's long context
    for f in ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
              "first_k_dense_replace", "num_attention_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
              "qk_rope_head_dim", "v_head_dim", "n_routed_experts", "num_experts_per_tok", "n_shared_experts",
              "routed_scaling_factor", "rope_theta", "rope_scaling", "rms_norm_eps", "max_position_embeddings"):
        assert getattr(c, f) == getattr(k2, f), f
    back = config_to_hf(c)
    assert back["quantization_config"] == release["quantization_config"] and back["seq_aux"] is True
    assert {k: back[k] for k in release} == release


def test_uneven_pipeline_split():
    k2 = get_preset("k2")
    ParallelLayout(pipeline_parallel=16, first_stage_layers=3, last_stage_layers=2).check_model(k2)  # 3 + 14 x 4 + 2
    with pytest.raises(ValueError, match=r"the 57 middle layers are not divisible by middle stages x "
                                         r"virtual_pipeline_stages = 14 x 1"):
        ParallelLayout(pipeline_parallel=16, first_stage_layers=2, last_stage_layers=2).check_model(k2)
    with pytest.raises(ValueError, match="last_stage_layers=1 is not divisible by virtual_pipeline_stages=2"):
        ParallelLayout(pipeline_parallel=16, virtual_pipeline_stages=2, first_stage_layers=4,
                       last_stage_layers=1).check_model(k2)
    with pytest.raises(ValueError, match="need pipeline_parallel >= 2"):
        ParallelLayout(first_stage_layers=1).check_model(k2)
    with pytest.raises(ValueError, match="0 layers are left for 1 middle pipeline stages"):
        tiny = get_preset("k2-tiny")
        ParallelLayout(pipeline_parallel=3, first_stage_layers=2, last_stage_layers=2).check_model(tiny)
    ParallelLayout(pipeline_parallel=2, first_stage_layers=1).check_model(get_preset("k2-tiny"))  # 1 | 3


def test_parallel_layout_on_a_world():
    """The data-parallel size is what the world leaves after TP x PP (x CP); experts split inside DP x TP."""
    layout = ParallelLayout(tensor_parallel=2, pipeline_parallel=4, expert_parallel=8).for_world(64)
    assert (layout.data_parallel, layout.world_size, layout.expert_data_parallel) == (8, 64, 2)
    assert ParallelLayout(context_parallel=2).for_world(8).data_parallel == 4
    with pytest.raises(ValueError, match="world size 12 is not divisible by tensor_parallel x pipeline_parallel, "
                                         "i.e. not a positive multiple of TP x PP = 8"):
        ParallelLayout(tensor_parallel=2, pipeline_parallel=4).for_world(12)
    with pytest.raises(ValueError, match=r"expert_parallel=3 must divide DP x TP = 2 x 1"):
        ParallelLayout(expert_parallel=3).for_world(2)
    with pytest.raises(ValueError, match="data_parallel=4 does not fit world size 2"):
        ParallelLayout(data_parallel=4).for_world(2)
    with pytest.raises(ValueError, match="data_parallel is not known yet"):
        ParallelLayout().world_size


def test_parallel_layout_stages_and_labels():
    layout = ParallelLayout(pipeline_parallel=2, virtual_pipeline_stages=2)
    assert [layout.stage_layers(8, pp, vp) for vp in range(2) for pp in range(2)] == [
        range(0, 2), range(2, 4), range(4, 6), range(6, 8)]  # chunk order: virtual stage 0 of every stage first
    with pytest.raises(ValueError, match="vp_stage is required"):
        layout.stage_layers(8, 0)
    with pytest.raises(ValueError, match="out of range"):
        layout.stage_layers(8, 2, 0)
    # a run config names its own keys in the messages about the sizes
    with pytest.raises(ValueError, match="parallel.virtual_stages=2 needs parallel.pipeline >= 2, got 1"):
        ParallelLayout(virtual_pipeline_stages=2, labels={"virtual_pipeline_stages": "parallel.virtual_stages",
                                                          "pipeline_parallel": "parallel.pipeline"})
    assert ParallelLayout(labels={"tensor_parallel": "x"}) == ParallelLayout()
