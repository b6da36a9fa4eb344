"""RoPE per training stage: the recipes pretrain with plain RoPE and the long-context stage applies YaRN.

K2 pretrains at 4096 tokens with plain RoPE and extends the context with YaRN (factor 32 over 4096) in its
long-context stage (K2 report, pre-training recipe); the release's config.json carries that YaRN. For every recipe in
examples/configs/ the stage's K2Config is built into a megatron-core model with the stage's RoPE and head dims (the
widths shrunk so that it builds on a CPU in a second), and its rotary angles, their YaRN magnitude factor and its
attention softmax scale are compared with transformers' DeepseekV3 (the release's reference implementation) for the
same config.json: an independent computation of the RoPE frequencies and of the mscale softmax correction.
"""

import math
import os

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import pytest
import torch

from tests.helpers import REPO_ROOT

# recipe -> the YaRN of its stage (factor, original positions), None for plain RoPE
STAGES = {"k2_tiny_cpu.yaml": None, "k2_mini_1gpu.yaml": None, "k2_full.yaml": None,
          "k2_long_context.yaml": (32.0, 4096)}
# the stage's RoPE and attention head dims stay; everything else is shrunk to build on a CPU
SMALL = dict(vocab_size=256, hidden_size=64, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
             num_attention_heads=2, q_lora_rank=32, kv_lora_rank=32, n_routed_experts=4, num_experts_per_tok=2)
ANGLE_RTOL = 1e-6  # float32 angles against transformers' float32 inverse frequencies times positions


@pytest.fixture(scope="module", autouse=True)
def _megatron_on_cpu():
    from tests.helpers.model import require_no_cuda, teardown_megatron

    require_no_cuda()
    from k2_megatron.megatron import init_distributed_cpu

    init_distributed_cpu()
    yield
    teardown_megatron()


def _stage_config(recipe: str):
    from k2_megatron.config import load_config

    return load_config(REPO_ROOT / "examples" / "configs" / recipe).k2_config(vocab_size=None)


def _transformers_reference(cfg):
    """(inverse frequencies, cos/sin magnitude factor, softmax scale) of transformers' DeepseekV3 for cfg."""
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf

    from k2_megatron.config import config_to_hf

    hf_config = DeepseekV3Config(**config_to_hf(cfg, "deepseek_v3"))
    rotary = hf.DeepseekV3RotaryEmbedding(hf_config)
    return rotary.inv_freq.double(), float(rotary.attention_scaling), hf.DeepseekV3Attention(hf_config, 0).scaling


@pytest.mark.parametrize("recipe", list(STAGES))
def test_stage_rope_scaling(recipe):
    cfg = _stage_config(recipe)
    yarn = STAGES[recipe]
    if yarn is None:
        assert cfg.rope_scaling is None and cfg.softmax_scale() == 1 / math.sqrt(cfg.qk_head_dim)
    else:
        factor, original = yarn
        assert cfg.rope_scaling["type"] == "yarn"
        assert (cfg.rope_scaling["factor"], cfg.rope_scaling["original_max_position_embeddings"]) == (factor, original)
        assert cfg.max_position_embeddings == factor * original
        mscale = 0.1 * cfg.rope_scaling["mscale_all_dim"] * math.log(factor) + 1
        assert cfg.softmax_scale() == pytest.approx(mscale**2 / math.sqrt(cfg.qk_head_dim), rel=1e-14)


def _release_config():
    """The K2 release's config.json (its RoPE keys as moonshotai/Kimi-K2 ships them) read with config_from_hf."""
    from k2_megatron.config import config_from_hf, config_to_hf, get_preset

    release = {**config_to_hf(get_preset("k2")), "max_position_embeddings": 131072,
               "rope_scaling": {"beta_fast": 1.0, "beta_slow": 1.0, "factor": 32.0, "mscale": 1.0,
                                "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096, "type": "yarn"}}
    return config_from_hf(release)


@pytest.mark.parametrize("recipe", list(STAGES) + ["hf_release"])
def test_built_model_rope_and_softmax_scale(recipe):
    """Per stage (and for the HF release's config.json, which keeps its YaRN): the built model's RoPE against
    transformers'."""
    from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import YarnRotaryEmbedding

    from k2_megatron.megatron import build_k2_model

    cfg = (_release_config() if recipe == "hf_release" else _stage_config(recipe)).replace(**SMALL)
    model = build_k2_model(cfg)
    inv_freq, magnitude, softmax_scale = _transformers_reference(cfg)
    for layer in model.decoder.layers:
        attn = layer.self_attention
        assert isinstance(attn.rotary_pos_emb, YarnRotaryEmbedding) == (STAGES.get(recipe) is not None
                                                                       or recipe == "hf_release")
        assert attn.core_attention.softmax_scale == pytest.approx(softmax_scale, rel=1e-12)
        assert attn.core_attention.softmax_scale == pytest.approx(cfg.softmax_scale(), rel=1e-12)
        # angles of positions spread over the stage's context (megatron: [s, 1, 1, rope dim] = [freqs | freqs])
        seq = min(cfg.max_position_embeddings, 8192)
        out = attn.rotary_pos_emb(seq)
        emb, mscale = out if isinstance(out, tuple) else (out, 1.0)
        positions = torch.arange(seq, dtype=torch.float64)
        want = positions[:, None] * inv_freq[None]
        half = cfg.qk_rope_head_dim // 2
        torch.testing.assert_close(emb[:, 0, 0, :half].double(), want, rtol=ANGLE_RTOL, atol=ANGLE_RTOL * seq)
        assert float(mscale) == pytest.approx(magnitude, rel=1e-12)


def test_long_context_stage_starts_from_the_pretraining_checkpoint():
    """The long-context recipe loads the pretraining recipe's checkpoint as a new stage (weights and optimizer state,
    step 0) in the same layout, with only the RoPE fields of the model changed."""
    import dataclasses

    from k2_megatron.config import load_config

    configs = REPO_ROOT / "examples" / "configs"
    pretrain, long = load_config(configs / "k2_full.yaml"), load_config(configs / "k2_long_context.yaml")
    assert long.checkpoint.load == pretrain.checkpoint.dir and long.checkpoint.load_mode == "weights"
    assert long.parallel == pretrain.parallel and long.model.preset == pretrain.model.preset
    before, after = (dataclasses.asdict(c.k2_config(vocab_size=None)) for c in (pretrain, long))
    assert {k for k in before if before[k] != after[k]} == {"rope_scaling", "max_position_embeddings"}
    assert long.data.seq_length == 32768 > pretrain.data.seq_length == 4096
