"""The K2 megatron-core model on a CPU, one process: the spec uses our ops and modules, the core attention
records current_max_attn_logits exactly, the router routes as K2, forward + backward runs through
megatron-core's forward_backward_func, and impossible layouts fail at construction."""

import pytest
import torch

from tests.helpers.model import (full_megatron_state_dict, k2_like_tiny_config, make_batches, make_hf_model,
                                 train_step_losses)

SEQ = 24
# Our bf16 model's errors measured at 0.5-1.3x transformers' (logits ~0.6x); a bf16-only bug such as the router
# losing its selection bias gives 2.4-12x.
BF16_ERROR_FACTOR = 2.0


@pytest.fixture(scope="module", autouse=True)
def _megatron_on_cpu():
    yield
    from tests.helpers.model import teardown_megatron

    teardown_megatron()


@pytest.fixture(scope="module")
def model_and_cfg():
    from tests.helpers.model import require_no_cuda

    require_no_cuda()
    from k2_megatron.checkpoint import load_megatron_state_dict
    from k2_megatron.megatron import build_k2_model, init_distributed_cpu

    init_distributed_cpu()
    cfg = k2_like_tiny_config()
    model = build_k2_model(cfg, qk_clip=True, qk_clip_threshold=100.0)
    load_megatron_state_dict(model, full_megatron_state_dict(cfg))
    return model, cfg


def _tokens(cfg, seed, b=2, s=SEQ):
    return torch.randint(0, cfg.vocab_size, (b, s), generator=torch.Generator().manual_seed(seed))


def _forward(model, tokens):
    return model(tokens, torch.arange(tokens.shape[1])[None].expand_as(tokens), None)


def test_spec_builds_k2_modules(model_and_cfg):
    from megatron.core.transformer.mlp import MLP
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.core.transformer.multi_latent_attention import MLASelfAttention

    from k2_megatron.megatron import K2AlltoAllTokenDispatcher, K2GroupedMLP, K2MLACoreAttention, K2MoELayer, K2Router

    model, cfg = model_and_cfg
    layers = model.decoder.layers
    assert len(layers) == cfg.num_hidden_layers
    for i, layer in enumerate(layers):
        assert isinstance(layer.self_attention, MLASelfAttention)
        assert isinstance(layer.self_attention.core_attention, K2MLACoreAttention)
        assert isinstance(layer.input_layernorm, torch.nn.RMSNorm)
        assert isinstance(layer.self_attention.q_layernorm, torch.nn.RMSNorm)
        assert isinstance(layer.self_attention.kv_layernorm, torch.nn.RMSNorm)
        if i < cfg.first_k_dense_replace:
            assert type(layer.mlp) is MLP
        else:
            assert isinstance(layer.mlp, MoELayer) and isinstance(layer.mlp, K2MoELayer)
            assert isinstance(layer.mlp.token_dispatcher, K2AlltoAllTokenDispatcher)
            assert isinstance(layer.mlp.experts, K2GroupedMLP)
            assert isinstance(layer.mlp.router, K2Router)
            assert layer.mlp.shared_experts is not None
            assert layer.mlp.router.expert_bias.dtype == torch.float32


def test_layers_call_our_ops(model_and_cfg, monkeypatch):
    import k2_megatron.ops

    model, cfg = model_and_cfg
    calls = {"mla_attention": 0, "grouped_gemm": 0, "permute": 0, "unpermute": 0}

    def spy(name):
        target = getattr(k2_megatron.ops, name)

        def wrapped(*args, **kwargs):
            calls[name] += 1
            return target(*args, **kwargs)

        return wrapped

    for name in calls:
        monkeypatch.setattr(k2_megatron.ops, name, spy(name))
    with torch.no_grad():
        _forward(model, _tokens(cfg, 0))
    assert calls["mla_attention"] == cfg.num_hidden_layers
    assert calls["grouped_gemm"] == 2 * cfg.num_moe_layers  # up and down projection of every MoE layer
    assert calls["permute"] == calls["unpermute"] == cfg.num_moe_layers  # the dispatcher's local permutation


def test_current_max_attn_logits_match_float64(model_and_cfg):
    model, cfg = model_and_cfg
    captured = []
    layers = model.decoder.layers
    hooks = [layer.self_attention.core_attention.register_forward_hook(
        lambda mod, args, out: captured.append((mod, args[0].detach(), args[1].detach()))) for layer in layers]
    try:
        for layer in layers:  # forget earlier forwards
            layer.self_attention.core_attention.take_max_attn_logits()
        with torch.no_grad():
            _forward(model, _tokens(cfg, 1))
            _forward(model, _tokens(cfg, 2, b=1, s=SEQ + 5))  # running max over two forwards
    finally:
        for h in hooks:
            h.remove()
    assert len(captured) == 2 * cfg.num_hidden_layers
    for layer in layers:
        core = layer.self_attention.core_attention
        expected = None
        for mod, q, k in captured:
            if mod is not core:
                continue
            s = torch.einsum("sbhd,tbhd->bhst", q.double(), k.double()) * core.softmax_scale
            n = s.shape[-1]
            s = s.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
            m = s.amax(dim=(0, 2, 3))
            expected = m if expected is None else torch.maximum(expected, m)
        got = core.take_max_attn_logits()
        assert core.current_max_attn_logits is None  # handed over and reset
        assert got.dtype == torch.float32 and got.shape == (cfg.num_attention_heads,)
        torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-6)
    # softmax scale is 1/sqrt(d_qk) * mscale^2 (YaRN), the same as transformers'
    assert layers[0].self_attention.core_attention.softmax_scale == pytest.approx(cfg.softmax_scale(), rel=1e-12)


def test_megatron_qk_clip_reads_our_max_logits(model_and_cfg):
    """megatron's MLASelfAttention.clip_qk() consumes our current_max_attn_logits (shape [heads]) and
    scales the q_C / q_R / k_C rows of the heads above tau (K2 report: sqrt(gamma), gamma, sqrt(gamma))."""
    model, cfg = model_and_cfg
    attn = model.decoder.layers[1].self_attention
    attn.core_attention.take_max_attn_logits()  # forget earlier forwards
    with torch.no_grad():
        _forward(model, _tokens(cfg, 4))
    s_max = attn.core_attention.current_max_attn_logits.clone()
    w_q, w_kv = attn.linear_q_up_proj.weight.detach().clone(), attn.linear_kv_up_proj.weight.detach().clone()
    tau = float(s_max.median())
    attn.config.qk_clip_threshold = tau
    try:
        attn.clip_qk()
        new_q = attn.linear_q_up_proj.weight.detach().clone()
        new_kv = attn.linear_kv_up_proj.weight.detach().clone()
    finally:
        attn.config.qk_clip_threshold = 100.0
        with torch.no_grad():
            attn.linear_q_up_proj.weight.copy_(w_q)
            attn.linear_kv_up_proj.weight.copy_(w_kv)
    assert attn.core_attention.current_max_attn_logits is None  # consumed and reset by clip_qk
    gamma = torch.clamp(tau / s_max, max=1.0)
    assert (gamma < 1).any() and (gamma == 1).any()
    n, dn, dr, dv = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    q_old, q_new = w_q.view(n, dn + dr, -1), new_q.view(n, dn + dr, -1)
    kv_old, kv_new = w_kv.view(n, dn + dv, -1), new_kv.view(n, dn + dv, -1)
    for h in range(n):
        g = gamma[h].item()
        torch.testing.assert_close(q_new[h, :dn], q_old[h, :dn] * g ** 0.5)
        torch.testing.assert_close(q_new[h, dn:], q_old[h, dn:] * g)
        torch.testing.assert_close(kv_new[h, :dn], kv_old[h, :dn] * g ** 0.5)
        torch.testing.assert_close(kv_new[h, dn:], kv_old[h, dn:])


def test_router_is_k2(model_and_cfg):
    model, cfg = model_and_cfg
    router = model.decoder.layers[2].mlp.router
    x = torch.randn(SEQ, 1, cfg.hidden_size, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        probs, routing_map = router(x)
        scores = torch.sigmoid(x.view(-1, cfg.hidden_size).double() @ router.weight.double().T)
        chosen = (scores + router.expert_bias.double()).topk(cfg.num_experts_per_tok).indices
        w = scores.gather(1, chosen)
        w = w / w.sum(-1, keepdim=True) * cfg.routed_scaling_factor
        expected = torch.zeros_like(scores).scatter(1, chosen, w)
    assert torch.equal(routing_map, expected > 0)
    torch.testing.assert_close(probs.double(), expected, rtol=1e-6, atol=1e-7)
    assert router.bias_update_rate > 0
    router.freeze_bias()
    assert router.bias_update_rate == 0
    router.freeze_bias(False)


@pytest.mark.slow
def test_forward_backward_func_single_process(model_and_cfg):
    model, cfg = model_and_cfg
    batches = make_batches(cfg, 2, 2, SEQ, seed=11)
    losses = train_step_losses(model, batches, SEQ, 2)
    assert len(losses) == 2
    with torch.no_grad():
        for loss, batch in zip(losses, batches):
            tokens = batch["tokens"]
            pos = torch.arange(SEQ)[None].expand_as(tokens)
            direct = model(tokens, pos, None, labels=batch["labels"]).mean().item()
            assert loss == pytest.approx(direct, rel=1e-6)
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        if "experts.linear_fc" in name or "router" in name or "linear" in name:
            assert p.grad.abs().sum() > 0, name
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("kwargs, match", [
    ({"tensor_parallel": 3}, "num_attention_heads=4 is not divisible by tensor_parallel=3"),
    ({"expert_parallel": 3}, "n_routed_experts=8 is not divisible by expert_parallel=3"),
    ({"pipeline_parallel": 3}, r"num_hidden_layers=4 is not divisible by pipeline_parallel x virtual"),
    ({"pipeline_parallel": 2, "virtual_pipeline_stages": 4}, r"2 x 4 = 8"),
])
def test_impossible_layouts_fail_at_construction(kwargs, match):
    from k2_megatron.config import ParallelLayout
    from k2_megatron.megatron import to_transformer_config

    with pytest.raises(ValueError, match=match):
        to_transformer_config(k2_like_tiny_config(), ParallelLayout(**kwargs))


def test_unknown_preset_and_mismatched_layout_fail(model_and_cfg):
    from k2_megatron.config import ParallelLayout
    from k2_megatron.megatron import build_k2_model, to_transformer_config

    with pytest.raises(ValueError, match="q_lora_rank=None"):
        to_transformer_config(k2_like_tiny_config(q_lora_rank=None))

    with pytest.raises(ValueError, match="unknown K2 preset 'k3'"):
        build_k2_model("k3")
    with pytest.raises(ValueError, match="tensor-parallel size 2 != initialised size 1"):
        build_k2_model(k2_like_tiny_config(),
                       to_transformer_config(k2_like_tiny_config(), ParallelLayout(tensor_parallel=2)))


@pytest.mark.slow
def test_packed_sequences_match_separate_sequences(model_and_cfg):
    """thd packing (PackedSeqParams, our mla_attention_varlen): two sequences packed into one row give the
    logits of running each alone (rope positions restart per sequence, no attention across the boundary)."""
    from megatron.core.packed_seq_params import PackedSeqParams

    model, cfg = model_and_cfg
    a, b = _tokens(cfg, 20, b=1, s=10), _tokens(cfg, 21, b=1, s=14)
    cu = torch.tensor([0, 10, 24], dtype=torch.int32)
    packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=14,
                             max_seqlen_kv=14)
    pos = torch.cat([torch.arange(10), torch.arange(14)])[None]
    with torch.no_grad():
        out = model(torch.cat([a, b], 1), pos, None, packed_seq_params=packed)
        ra, rb = _forward(model, a), _forward(model, b)
    torch.testing.assert_close(out[:, :10], ra, rtol=0, atol=1e-5)
    torch.testing.assert_close(out[:, 10:], rb, rtol=0, atol=1e-5)


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    return float((got - want).norm() / want.norm())


def _logits_loss_grads(model, tokens, logits_of):
    """(logits, loss, {parameter name: gradient}) of one forward-backward, the loss being the mean next-token
    cross-entropy computed here in float32 from the logits."""
    model.zero_grad(set_to_none=True)
    logits = logits_of(model, tokens[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    return logits.detach().float(), loss.detach(), {n: p.grad.float() for n, p in model.named_parameters()}


@pytest.mark.slow
def test_bf16_model_error_within_transformers_bf16_error(model_and_cfg):
    """The bf16 model against its float32 twin (same weights, same tokens): the relative error of the logits, the
    error of the loss and the relative error of every parameter's gradient are each at most BF16_ERROR_FACTOR x
    those of a same-precision baseline, transformers' DeepseekV3ForCausalLM in bf16 against float32 (as
    FlashAttention bounds a kernel's error by PyTorch's). bf16 at random initialisation is coarse (measured: logits
    4-12% off, gradients up to 20%, in both models), so only the baseline says what "close" is."""
    from k2_megatron.checkpoint import hf_to_megatron, load_megatron_state_dict
    from k2_megatron.megatron import k2_model_provider

    model, cfg = model_and_cfg
    bf16 = k2_model_provider(cfg, params_dtype=torch.bfloat16)(pre_process=True, post_process=True)
    load_megatron_state_dict(bf16, {k: v for k, v in model.state_dict().items() if torch.is_tensor(v)})
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    assert bf16.decoder.layers[1].mlp.router.expert_bias.dtype == torch.float32  # selection bias stays fp32
    hf32 = make_hf_model(cfg, seed=0)  # the weights model_and_cfg loaded
    hf16 = make_hf_model(cfg, seed=0).to(torch.bfloat16)
    for (name, bias16), bias32 in zip(hf16.named_buffers(), hf32.buffers()):
        if name.endswith("e_score_correction_bias"):  # fp32 in the release, as ours
            bias16.data = bias32.data.clone()
    tokens = _tokens(cfg, 31, s=SEQ + 1)
    got = _logits_loss_grads(bf16, tokens, _forward)
    want = _logits_loss_grads(model, tokens, _forward)
    hf_logits_of = lambda m, t: m(t).logits  # noqa: E731
    base, base_ref = (_logits_loss_grads(m, tokens, hf_logits_of) for m in (hf16, hf32))
    buffers = {n: b for n, b in hf32.named_buffers() if n.endswith("e_score_correction_bias")}
    base_grads, base_ref_grads = (hf_to_megatron({**g, **buffers}, cfg) for g in (base[2], base_ref[2]))

    assert _relative_error(got[0], want[0]) <= BF16_ERROR_FACTOR * _relative_error(base[0], base_ref[0])
    assert abs(float(got[1] - want[1])) <= BF16_ERROR_FACTOR * abs(float(base[1] - base_ref[1]))
    assert got[2].keys() == want[2].keys()
    worse = {}
    for name, grad in got[2].items():
        err, base_err = _relative_error(grad, want[2][name]), _relative_error(base_grads[name], base_ref_grads[name])
        if not err <= BF16_ERROR_FACTOR * base_err:
            worse[name] = (err, base_err)
    assert not worse, f"(our bf16 error, transformers' bf16 error) of the gradients: {worse}"
    model.zero_grad(set_to_none=True)


def test_core_attention_rejects_what_it_cannot_compute(model_and_cfg):
    from megatron.core.transformer.enums import AttnMaskType

    model, cfg = model_and_cfg
    core = model.decoder.layers[0].self_attention.core_attention
    q = torch.randn(5, 1, cfg.num_attention_heads, cfg.qk_head_dim)
    v = torch.randn(5, 1, cfg.num_attention_heads, cfg.v_head_dim)
    out = core(q, q, v, None)
    assert out.shape == (5, 1, cfg.num_attention_heads * cfg.v_head_dim)
    for mask_type in (AttnMaskType.padding, AttnMaskType.no_mask, AttnMaskType.padding_causal):
        with pytest.raises(ValueError, match="only causal attention"):
            core(q, q, v, None, attn_mask_type=mask_type)
    with pytest.raises(ValueError, match="attention_bias is not supported"):
        core(q, q, v, None, attention_bias=torch.zeros(1))
    with pytest.raises(ValueError, match=r"query must be \[s, b, heads, d\]"):
        core(q[0], q[0], v[0], None)


def test_full_k2_transformer_config_for_a_release_scale_layout():
    """The 61-layer release model on TP8 x EP16 x PP16 (uneven first/last stage): megatron accepts the config."""
    from k2_megatron.config import ParallelLayout, get_preset
    from k2_megatron.megatron import to_transformer_config

    layout = ParallelLayout(tensor_parallel=8, expert_parallel=16, pipeline_parallel=16, first_stage_layers=3,
                            last_stage_layers=2)
    tc = to_transformer_config(get_preset("k2"), layout, params_dtype=torch.bfloat16)
    assert tc.num_layers == 61 and tc.moe_layer_freq == [0] + [1] * 60
    assert (tc.num_attention_heads, tc.q_lora_rank, tc.kv_lora_rank) == (64, 1536, 512)
    assert (tc.qk_head_dim, tc.qk_pos_emb_head_dim, tc.v_head_dim) == (128, 64, 128)
    assert (tc.num_moe_experts, tc.moe_router_topk, tc.moe_ffn_hidden_size) == (384, 8, 2048)
    assert tc.moe_shared_expert_intermediate_size == 2048 and tc.moe_router_topk_scaling_factor == 2.827
    assert tc.moe_router_score_function == "sigmoid" and tc.moe_router_enable_expert_bias
    assert (tc.rope_type, tc.rotary_base, tc.rotary_scaling_factor, tc.mscale_all_dim) == ("rope", 50000.0, 1.0, 0.0)
    assert tc.sequence_parallel and tc.expert_tensor_parallel_size == 1 and tc.bf16
    assert (tc.num_layers_in_first_pipeline_stage, tc.num_layers_in_last_pipeline_stage) == (3, 2)


def test_expert_bias_update_rule_and_freeze(model_and_cfg):
    """Aux-loss-free balancing: megatron's finalize step moves each expert bias by rate * sign(mean load -
    load) from the loads counted in training forwards; a frozen K2Router keeps its bias."""
    from megatron.core.distributed.finalize_model_grads import _update_router_expert_bias

    model, cfg = model_and_cfg
    routers = [layer.mlp.router for layer in model.decoder.layers[cfg.first_k_dense_replace:]]
    saved = [r.expert_bias.clone() for r in routers]
    was_training = model.training
    model.train()
    try:
        for r in routers:
            r.local_tokens_per_expert.zero_()
        _forward(model, _tokens(cfg, 30))  # grad enabled: loads are counted
        loads = [r.local_tokens_per_expert.clone() for r in routers]
        assert all(int(load.sum()) == 2 * SEQ * cfg.num_experts_per_tok for load in loads)
        routers[0].freeze_bias()
        rate = model.config.moe_router_bias_update_rate
        _update_router_expert_bias([model], model.config)
        torch.testing.assert_close(routers[0].expert_bias, saved[0], rtol=0, atol=0)
        for r, load, old in zip(routers[1:], loads[1:], saved[1:]):
            expected = old + rate * torch.sign(load.mean() - load)
            torch.testing.assert_close(r.expert_bias, expected, rtol=0, atol=1e-7)
    finally:
        routers[0].freeze_bias(False)
        model.train(was_training)
        with torch.no_grad():
            for r, old in zip(routers, saved):
                r.expert_bias.copy_(old)
                r.local_tokens_per_expert.zero_()


@pytest.mark.parametrize("pp, vpp", [(1, None), (2, None), (2, 2)])
def test_pipeline_sends_are_unbatched_overlapped_and_freed(pp, vpp):
    """On every device: no batched p2p (its torch.cuda.synchronize after each batch is a host wait per send, and
    under gloo it mispairs equal-shaped messages: the PP2 x VPP2 test in test_model_distributed.py), overlap with
    virtual stages, outputs freed once sent."""
    from k2_megatron.config import ParallelLayout, get_preset
    from k2_megatron.megatron import to_transformer_config

    layout = ParallelLayout(pipeline_parallel=pp, virtual_pipeline_stages=vpp)
    tc = to_transformer_config(get_preset("k2-tiny"), layout, params_dtype=torch.bfloat16)
    if pp == 1:
        assert tc.batch_p2p_comm and not tc.overlap_p2p_comm  # megatron's defaults: no pipeline, nothing sent
        return
    assert not tc.batch_p2p_comm and tc.deallocate_pipeline_outputs
    assert tc.overlap_p2p_comm == (vpp is not None)
