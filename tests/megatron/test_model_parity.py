"""Parity with the reference implementation: transformers' DeepseekV3ForCausalLM (the architecture of the
K2 release) -> hf_to_megatron -> our megatron-core K2 model, in float32.

The tiny K2-like config (k2-tiny) has a dense first layer, MoE layers with a shared expert, sigmoid routing
with a non-zero correction bias, YaRN (factor 32, mscale softmax correction), q and kv LoRA, and q.k / v
head dims 24 / 16 (the 192 / 128 ratio). Tolerances: both models compute in float32 with different
summation orders (fused [gate; up] matmuls, grouped experts, online-softmax attention), so logits agree to
a few float32 ulps of their magnitude (|logits| ~ 3): we require max abs error <= 2e-5 (measured ~2e-6).
Loss: rel 1e-6. Gradients: max abs error <= 1e-5 relative to the gradient's max magnitude.
"""

import os

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import pytest
import torch

from tests.helpers.model import k2_like_tiny_config, make_hf_model

pytestmark = pytest.mark.slow  # a transformers model and ours, forward and backward

LOGIT_ATOL = 2e-5
LOSS_RTOL = 1e-6
GRAD_RTOL_OF_MAX = 1e-5
SEQ = 48  # < original context 128, and the YaRN frequencies still differ from plain RoPE


@pytest.fixture(scope="module", autouse=True)
def _megatron_on_cpu():
    yield
    from tests.helpers.model import teardown_megatron

    teardown_megatron()


@pytest.fixture(scope="module")
def setup():
    from tests.helpers.model import require_no_cuda

    require_no_cuda()
    from k2_megatron.checkpoint import hf_to_megatron
    from k2_megatron.megatron import build_k2_model, init_distributed_cpu

    init_distributed_cpu()
    cfg = k2_like_tiny_config()
    hf = make_hf_model(cfg, seed=0)
    model = build_k2_model(cfg)
    missing, unexpected = model.load_state_dict(hf_to_megatron(hf.state_dict(), cfg), strict=False)
    assert [k for k in missing if not k.endswith("_extra_state")] == [] and unexpected == []
    model.eval()
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, cfg.vocab_size, (2, SEQ + 1), generator=g)
    return cfg, hf, model, tokens


def _meg_logits(model, tokens):
    pos = torch.arange(tokens.shape[1])[None].expand_as(tokens)
    return model(tokens, pos, None)


def test_config_is_k2_like(setup):
    cfg, hf, model, _ = setup
    assert cfg.first_k_dense_replace == 1 and cfg.num_hidden_layers > 1 and cfg.n_shared_experts == 1
    assert cfg.q_lora_rank and cfg.kv_lora_rank and cfg.rope_scaling["type"] == "yarn"
    assert cfg.qk_head_dim * 2 == cfg.v_head_dim * 3  # 192 : 128
    bias = hf.model.layers[1].mlp.gate.e_score_correction_bias
    assert bias.abs().min() > 0
    # the bias changes which experts are chosen for some token (selection-only, as in K2)
    torch.manual_seed(0)
    x = torch.randn(64, cfg.hidden_size)
    scores = torch.sigmoid(x @ hf.model.layers[1].mlp.gate.weight.T)
    assert not torch.equal(scores.topk(cfg.num_experts_per_tok).indices.sort().values,
                           (scores + bias).topk(cfg.num_experts_per_tok).indices.sort().values)


def test_logits_match_transformers(setup):
    cfg, hf, model, tokens = setup
    with torch.no_grad():
        ref = hf(tokens).logits
        out = _meg_logits(model, tokens)
    assert out.shape == ref.shape == (2, SEQ + 1, cfg.vocab_size)
    err = (out - ref).abs().max().item()
    assert err <= LOGIT_ATOL, f"max |logits - HF logits| = {err:.3e} (|HF logits| max {ref.abs().max():.2f})"


def test_yarn_matters(setup):
    """Without YaRN (or with a wrong softmax scale) the logits would be far outside the tolerance."""
    from k2_megatron.checkpoint import hf_to_megatron
    from k2_megatron.megatron import build_k2_model

    cfg, hf, model, tokens = setup
    plain = cfg.replace(rope_scaling=None)
    other = build_k2_model(plain)
    other.load_state_dict(hf_to_megatron(hf.state_dict(), plain), strict=False)
    other.eval()
    with torch.no_grad():
        err = (_meg_logits(other, tokens) - hf(tokens).logits).abs().max().item()
    assert err > 100 * LOGIT_ATOL


def test_round_trip_to_transformers_gives_identical_logits(setup):
    from k2_megatron.checkpoint import megatron_to_hf

    cfg, hf, model, tokens = setup
    back = make_hf_model(cfg, seed=99)  # different weights, overwritten below
    for layout in ("fused", "per_expert"):
        hf_sd = megatron_to_hf(model.state_dict(), cfg, expert_layout=layout)
        if layout == "per_expert":
            assert "model.layers.1.mlp.experts.0.gate_proj.weight" in hf_sd
            from k2_megatron.checkpoint import hf_to_megatron

            hf_sd = megatron_to_hf(hf_to_megatron(hf_sd, cfg), cfg)  # per-expert names read back too
        result = back.load_state_dict(hf_sd, strict=True)
        assert not result.missing_keys and not result.unexpected_keys
        for k, v in hf.state_dict().items():
            assert torch.equal(back.state_dict()[k], v), k
        with torch.no_grad():
            assert torch.equal(back(tokens).logits, hf(tokens).logits)


def test_loss_and_gradients_match_transformers(setup):
    cfg, hf, model, tokens = setup
    hf.zero_grad(set_to_none=True)
    model.zero_grad(set_to_none=True)
    ref_loss = hf(tokens, labels=tokens).loss  # mean over the s - 1 next-token predictions
    ref_loss.backward()
    x, labels = tokens[:, :-1], tokens[:, 1:]
    pos = torch.arange(x.shape[1])[None].expand_as(x)
    loss = model(x, pos, None, labels=labels).mean()
    loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=LOSS_RTOL, atol=0)
    layers_hf, layers_meg = hf.model.layers, model.decoder.layers
    pairs = {
        "embed_tokens": (hf.model.embed_tokens.weight, model.embedding.word_embeddings.weight),
        "q_b_proj (layer 1)": (layers_hf[1].self_attn.q_b_proj.weight,
                               layers_meg[1].self_attention.linear_q_up_proj.weight),
        "kv_a_proj_with_mqa (layer 0)": (layers_hf[0].self_attn.kv_a_proj_with_mqa.weight,
                                         layers_meg[0].self_attention.linear_kv_down_proj.weight),
        "experts.gate_up_proj (layer 2)": (layers_hf[2].mlp.experts.gate_up_proj,
                                           layers_meg[2].mlp.experts.linear_fc1_weight),
        "experts.down_proj (layer 1)": (layers_hf[1].mlp.experts.down_proj,
                                        layers_meg[1].mlp.experts.linear_fc2_weight),
        "router (layer 1)": (layers_hf[1].mlp.gate.weight, layers_meg[1].mlp.router.weight),
        "lm_head": (hf.lm_head.weight, model.output_layer.weight),
    }
    for name, (a, b) in pairs.items():
        assert a.grad is not None and b.grad is not None, name
        scale = a.grad.abs().max().item()
        assert scale > 0, name
        err = (a.grad - b.grad).abs().max().item()
        assert err <= GRAD_RTOL_OF_MAX * scale, f"{name}: max grad error {err:.3e}, max |grad| {scale:.3e}"


def test_adapter_rejects_mismatched_state_dict(setup):
    from k2_megatron.checkpoint import StateDictMismatch, hf_to_megatron

    cfg, hf, _, _ = setup
    sd = dict(hf.state_dict())
    del sd["model.layers.1.self_attn.kv_b_proj.weight"]
    sd["model.layers.9.extra.weight"] = torch.zeros(1)
    with pytest.raises(StateDictMismatch, match=r"kv_b_proj.*model\.layers\.9\.extra"):
        hf_to_megatron(sd, cfg)
    with pytest.raises(ValueError, match="experts"):
        hf_to_megatron(hf.state_dict(), cfg.replace(moe_intermediate_size=cfg.moe_intermediate_size * 2))


def test_variant_config_matches_transformers(setup):
    """Other corners of the architecture: plain RoPE, group-limited routing (n_group=2, topk_group=1),
    two shared experts, two dense layers; logits and the round trip as above."""
    from k2_megatron.checkpoint import hf_to_megatron, megatron_to_hf
    from k2_megatron.megatron import build_k2_model

    cfg = k2_like_tiny_config(rope_scaling=None, n_group=2, topk_group=1, n_shared_experts=2,
                              first_k_dense_replace=2)
    hf = make_hf_model(cfg, seed=5)
    model = build_k2_model(cfg)
    model.load_state_dict(hf_to_megatron(hf.state_dict(), cfg), strict=False)
    model.eval()
    tokens = torch.randint(0, cfg.vocab_size, (2, 33), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        err = (_meg_logits(model, tokens) - hf(tokens).logits).abs().max().item()
    assert err <= LOGIT_ATOL
    back = megatron_to_hf(model.state_dict(), cfg)
    assert back.keys() == hf.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in hf.state_dict().items())
