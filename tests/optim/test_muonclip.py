"""MuonClip (Muon + AdamW + QK-Clip) against an independent float64 implementation of the K2 report's algorithm."""

import copy
import io
import math

import pytest
import torch

from k2_megatron.optim import MLAHeadLayout, MuonClip, NonFiniteGradientError, muon_param_groups, qk_clip_
from k2_megatron.optim.qk_clip import WeightShard
from k2_megatron.optim import muon as muon_module
from tests.helpers.muon_reference import Float64MuonClip


# ---- a toy model with every kind of parameter ----------------------------------------------------------------

LAYOUT = MLAHeadLayout(num_heads=4, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6)


class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_tokens = torch.nn.Embedding(50, 32)
        self.q_up = torch.nn.Parameter(torch.randn(LAYOUT.num_heads * LAYOUT.q_rows_per_head, 24) * 0.2)
        self.kv_up = torch.nn.Parameter(torch.randn(LAYOUT.num_heads * LAYOUT.kv_rows_per_head, 16) * 0.2)
        self.proj = torch.nn.Linear(32, 40, bias=True)  # a second 2-D matrix of another shape, plus a bias
        self.proj2 = torch.nn.Linear(32, 40, bias=False)  # same shape as proj: batched together
        self.experts = torch.nn.Parameter(torch.randn(3, 40, 32) * 0.1)  # [E, n, m]: batched with proj
        self.router = torch.nn.Linear(32, 3, bias=False)
        self.norm = torch.nn.Parameter(torch.ones(32))
        self.lm_head = torch.nn.Linear(32, 50, bias=False)


def make_toy(seed=0):
    torch.manual_seed(seed)
    return Toy()


def random_grads(model, seed):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(p.shape, generator=g) for n, p in model.named_parameters()}


def set_grads(model, grads):
    for n, p in model.named_parameters():
        p.grad = grads[n].to(p.dtype).clone()


MUON_NAMES = {"q_up", "kv_up", "proj.weight", "proj2.weight", "experts"}


def test_default_split():
    groups = muon_param_groups(make_toy(), lr=0.01)
    by_kind = {g["use_muon"]: set(g["param_names"]) for g in groups}
    assert by_kind[True] == MUON_NAMES
    assert by_kind[False] == {"embed_tokens.weight", "proj.bias", "router.weight", "norm", "lm_head.weight"}
    assert all(g["lr"] == 0.01 for g in groups)


@pytest.mark.slow
@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("steps", [1, 3])
def test_matches_float64_algorithm_fp32_newton_schulz(steps, nesterov):
    model = make_toy()
    ref = Float64MuonClip(dict(model.named_parameters()), MUON_NAMES, lr=0.02, wd=0.1, nesterov=nesterov)
    opt = MuonClip(muon_param_groups(model), lr=0.02, weight_decay=0.1, nesterov=nesterov, ns_dtype=torch.float32,
                   qk_clip_tau=None)
    for s in range(steps):
        grads = random_grads(model, seed=100 + s)
        set_grads(model, grads)
        opt.step()
        ref.step(grads)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach().double(), ref.w[n], rtol=0, atol=2e-6, msg=n)


@pytest.mark.slow
def test_matches_float64_algorithm_bf16_newton_schulz():
    """The paper's setting (Newton-Schulz in bf16): each Muon update within 10% of the exact one."""
    model = make_toy()
    before = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    ref = Float64MuonClip(dict(model.named_parameters()), MUON_NAMES, lr=0.02, wd=0.0)
    opt = MuonClip(muon_param_groups(model), lr=0.02, weight_decay=0.0, qk_clip_tau=None)
    grads = random_grads(model, seed=7)
    set_grads(model, grads)
    opt.step()
    ref.step(grads)
    for n, p in model.named_parameters():
        got, want = p.detach().double() - before[n], ref.w[n] - before[n]
        if n in MUON_NAMES:
            assert float((got - want).norm() / want.norm()) < 0.1, n
        else:
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6, msg=n)


def test_same_shaped_matrices_share_one_newton_schulz_call(monkeypatch):
    calls = []
    real = muon_module.newton_schulz

    def spy(x, **kw):
        calls.append(tuple(x.shape))
        return real(x, **kw)

    monkeypatch.setattr(muon_module, "newton_schulz", spy)
    model = make_toy()
    opt = MuonClip(muon_param_groups(model), lr=0.01, qk_clip_tau=None)
    set_grads(model, random_grads(model, 1))
    opt.step()
    # proj, proj2 (2-D [40, 32]) and the 3 experts [3, 40, 32]: one call on 5 matrices; q_up, kv_up alone.
    assert sorted(calls) == sorted([(5, 40, 32), (1, 48, 24), (1, 56, 16)])


class FusedSwiGLU(torch.nn.Module):
    """megatron's layout of SwiGLU weights: fc1 = [gate; up] (2-D) and a routed-expert stack [E, 2F, H]."""

    def __init__(self, hidden=24, ffn=10, experts=3):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.fc1 = torch.nn.Parameter(torch.randn(2 * ffn, hidden, generator=g) * 0.1)
        self.experts_fc1 = torch.nn.Parameter(torch.randn(experts, 2 * ffn, hidden, generator=g) * 0.1)
        self.ffn = ffn
        for p in (self.fc1, self.experts_fc1):
            muon_module.set_row_matrices(p, 2)

    def hf_matrices(self, tensors: dict) -> dict:
        """The same tensors the way the Hugging Face release stores them: gate_proj and up_proj per expert."""
        f = self.ffn
        out = {"gate_proj": tensors["fc1"][:f], "up_proj": tensors["fc1"][f:]}
        for e, w in enumerate(tensors["experts_fc1"]):
            out[f"experts.{e}.gate_proj"], out[f"experts.{e}.up_proj"] = w[:f], w[f:]
        return out


@pytest.mark.parametrize("joint", [False, True], ids=["per_matrix", "joint_would_fail"])
def test_fused_gate_up_are_orthogonalised_one_by_one(joint):
    """Gate and up stored as one [gate; up] weight get the updates of the two separate matrices of the release
    (each NewtonSchulz'ed with its own scale 0.2 sqrt(max(F, H))), against float64 Muon on the separate matrices.
    ``joint``: without the row-matrix mark, the fused update is far from the reference (the test is not blind)."""
    model = FusedSwiGLU()
    if joint:
        for p in model.parameters():
            delattr(p, muon_module.ROW_MATRICES_ATTR)
    names = {n for n, _ in model.named_parameters()}
    hf = model.hf_matrices(dict(model.named_parameters()))
    ref = Float64MuonClip(hf, set(hf), lr=0.02, wd=0.1)
    opt = MuonClip(muon_param_groups(model), lr=0.02, weight_decay=0.1, ns_dtype=torch.float32, qk_clip_tau=None)
    for s in range(2):
        grads = {n: g for n, g in random_grads(model, seed=200 + s).items() if n in names}
        set_grads(model, grads)
        opt.step()
        ref.step(model.hf_matrices(grads))
    got = model.hf_matrices({n: p.detach().double() for n, p in model.named_parameters()})
    worst = max(float((got[k] - ref.w[k]).abs().max()) for k in got)
    assert (worst > 1e-3) if joint else (worst <= 2e-6), worst


def test_row_matrices_errors():
    with pytest.raises(ValueError, match=r"shape \(5, 4\) cannot hold 2 matrices"):
        muon_module.set_row_matrices(torch.nn.Parameter(torch.zeros(5, 4)), 2)
    with pytest.raises(ValueError, match="count must be a positive int, got 0"):
        muon_module.set_row_matrices(torch.nn.Parameter(torch.zeros(4, 4)), 0)


# ---- QK-Clip ------------------------------------------------------------------------------------------------


def _expected_clip(w_q, w_kv, s_max, layout, tau, alpha):
    """Per-row expectation: weight times the factor rounded to fp32, product rounded once to the weight dtype."""
    nope, h = layout.qk_nope_head_dim, layout.num_heads
    fq, fk, fr = torch.ones(h, dtype=torch.float64), torch.ones(h, dtype=torch.float64), torch.ones(h, dtype=torch.float64)
    for i, s in enumerate(s_max.tolist()):
        if s > tau:
            gamma = tau / s
            fq[i], fk[i], fr[i] = gamma**alpha, gamma ** (1 - alpha), gamma
    wq = w_q.float().view(h, -1, w_q.shape[1]).clone()
    wkv = w_kv.float().view(h, -1, w_kv.shape[1]).clone()
    wq[:, :nope] *= fq.float()[:, None, None]
    wq[:, nope:] *= fr.float()[:, None, None]
    wkv[:, :nope] *= fk.float()[:, None, None]
    return wq.reshape(w_q.shape).to(w_q.dtype), wkv.reshape(w_kv.shape).to(w_kv.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("alpha", [0.5, 0.0, 1.0, 0.3])
def test_qk_clip_scales_exactly_the_right_rows(alpha, dtype):
    torch.manual_seed(0)
    w_q = torch.randn(LAYOUT.num_heads * LAYOUT.q_rows_per_head, 24).to(dtype)
    w_kv = torch.randn(LAYOUT.num_heads * LAYOUT.kv_rows_per_head, 16).to(dtype)
    s_max = torch.tensor([50.0, 150.0, 100.0, 400.0])  # head 2 sits exactly at tau: not clipped
    want_q, want_kv = _expected_clip(w_q, w_kv, s_max, LAYOUT, 100.0, alpha)
    before_q, before_kv = w_q.clone(), w_kv.clone()
    clipped = qk_clip_(w_q, w_kv, s_max, LAYOUT, tau=100.0, alpha=alpha)
    assert clipped.tolist() == [False, True, False, True]
    assert torch.equal(w_q, want_q) and torch.equal(w_kv, want_kv)
    q_heads, kv_heads = w_q.view(4, 12, -1), w_kv.view(4, 14, -1)
    bq, bkv = before_q.view(4, 12, -1), before_kv.view(4, 14, -1)
    for h in (0, 2):  # heads at or below tau: bit-identical
        assert torch.equal(q_heads[h], bq[h]) and torch.equal(kv_heads[h], bkv[h])
    assert torch.equal(kv_heads[:, 8:], bkv[:, 8:])  # v rows never touched
    if alpha == 0.0:
        assert torch.equal(q_heads[:, :8], bq[:, :8])  # gamma^0: q_C untouched, all on k_C


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("q_cuts,kv_cuts", [
    ([7, 30, 31], [5, 227, 228]),   # boundaries in the middle of rows, and pieces shorter than a row
    ([24, 48, 500], [16, 32, 100]),  # boundaries on row starts
])
def test_qk_clip_on_flat_shards_equals_whole_weights(dtype, q_cuts, kv_cuts):
    """A ZeRO-1 optimizer holds flat pieces of a weight whose boundaries fall anywhere: clipping each piece gives
    exactly the whole-weight result."""
    torch.manual_seed(2)
    w_q = torch.randn(LAYOUT.num_heads * LAYOUT.q_rows_per_head, 24).to(dtype)
    w_kv = torch.randn(LAYOUT.num_heads * LAYOUT.kv_rows_per_head, 16).to(dtype)
    s_max = torch.tensor([150.0, 20.0, 300.0, 101.0])
    want_q, want_kv = w_q.clone(), w_kv.clone()
    qk_clip_(want_q, want_kv, s_max, LAYOUT, tau=100.0)
    got_q, got_kv = w_q.clone().view(-1), w_kv.clone().view(-1)
    q_bounds, kv_bounds = [0, *q_cuts, got_q.numel()], [0, *kv_cuts, got_kv.numel()]
    for (a, b), (c, d) in zip(zip(q_bounds, q_bounds[1:]), zip(kv_bounds, kv_bounds[1:])):
        qk_clip_(WeightShard(got_q[a:b], a, *w_q.shape), WeightShard(got_kv[c:d], c, *w_kv.shape), s_max, LAYOUT,
                 tau=100.0)
    assert torch.equal(got_q.view_as(w_q), want_q) and torch.equal(got_kv.view_as(w_kv), want_kv)


def test_weight_shard_must_fit():
    with pytest.raises(ValueError, match="do not fit"):
        WeightShard(torch.zeros(10), 2, 2, 5)


def test_init_state_allocates_everything():
    model = make_toy()
    opt = MuonClip(muon_param_groups(model), lr=0.01)
    opt.init_state()
    assert set(opt.state[model.q_up]) == {"step", "momentum_buffer"}
    assert set(opt.state[model.norm]) == {"step", "exp_avg", "exp_avg_sq"}
    assert all(float(st["step"]) == 0 for st in opt.state.values())


def _rope(x, positions):
    half = x.shape[-1] // 2
    freqs = 1.0 / (10000 ** (torch.arange(half, dtype=torch.float64) / half))
    angle = positions[:, None].double() * freqs[None]
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos[:, None] - x2 * sin[:, None], x1 * sin[:, None] + x2 * cos[:, None]], dim=-1)


def toy_mla_max_logits(w_q, w_kv, c_q, c_kv, k_rope, layout, scale):
    """Per-head max of the scaled causal logits of a toy MLA (RoPE on the rope dims, shared k_R)."""
    s = c_q.shape[0]
    h, nope, rope = layout.num_heads, layout.qk_nope_head_dim, layout.qk_rope_head_dim
    q = (c_q @ w_q.T).view(s, h, nope + rope)
    kv = (c_kv @ w_kv.T).view(s, h, nope + layout.v_head_dim)
    pos = torch.arange(s)
    q_full = torch.cat([q[..., :nope], _rope(q[..., nope:], pos)], dim=-1)
    k_full = torch.cat([kv[..., :nope], _rope(k_rope[:, None], pos).expand(s, h, rope)], dim=-1)
    logits = torch.einsum("qhd,khd->hqk", q_full, k_full) * scale
    mask = torch.ones(s, s, dtype=torch.bool).tril()
    return logits.masked_fill(~mask, float("-inf")).amax(dim=(1, 2))


def test_qk_clip_caps_recomputed_max_logit_at_tau():
    torch.manual_seed(1)
    s = 20
    w_q = torch.randn(LAYOUT.num_heads * LAYOUT.q_rows_per_head, 24, dtype=torch.float64)
    w_kv = torch.randn(LAYOUT.num_heads * LAYOUT.kv_rows_per_head, 16, dtype=torch.float64)
    w_q.view(4, 12, -1)[1] *= 3.0  # make head 1 and 3 hot
    w_kv.view(4, 14, -1)[3, :8] *= 4.0
    c_q, c_kv, k_rope = torch.randn(s, 24, dtype=torch.float64), torch.randn(s, 16, dtype=torch.float64), \
        torch.randn(s, LAYOUT.qk_rope_head_dim, dtype=torch.float64)
    scale = 1 / math.sqrt(12)
    before = toy_mla_max_logits(w_q, w_kv, c_q, c_kv, k_rope, LAYOUT, scale)
    tau = float(before.sort().values[1:3].mean())  # between the 2nd and 3rd largest: two hot heads get clipped
    assert before.argsort()[2:].sort().values.tolist() == [1, 3]
    clipped = qk_clip_(w_q, w_kv, before, LAYOUT, tau=tau)
    after = toy_mla_max_logits(w_q, w_kv, c_q, c_kv, k_rope, LAYOUT, scale)
    assert clipped.tolist() == (before > tau).tolist()
    assert (after[clipped] <= tau * (1 + 1e-12)).all()
    torch.testing.assert_close(after[clipped], torch.full_like(after[clipped], tau))  # max scales by exactly gamma
    assert torch.equal(after[~clipped], before[~clipped])


def test_optimizer_applies_qk_clip_after_the_update():
    model = make_toy()
    ref = Float64MuonClip(dict(model.named_parameters()), MUON_NAMES, lr=0.02, wd=0.1)
    opt = MuonClip(muon_param_groups(model), lr=0.02, weight_decay=0.1, ns_dtype=torch.float32, qk_clip_tau=100.0)
    source = {"value": torch.tensor([120.0, 80.0, 300.0, 99.0])}
    opt.register_attention("layer0", w_q_up=model.q_up, w_kv_up=model.kv_up, layout=LAYOUT,
                           max_logits=lambda: source["value"])
    grads = random_grads(model, 3)
    set_grads(model, grads)
    opt.step()
    ref.step(grads)
    ref.qk_clip("q_up", "kv_up", source["value"], LAYOUT, tau=100.0)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach().double(), ref.w[n], rtol=0, atol=2e-6, msg=n)
    stats = opt.qk_clip_stats["layer0"]
    assert stats.num_clipped == 2 and float(stats.max_logit) == 300.0
    # the source is asked again at every step
    source["value"] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    set_grads(model, grads)
    opt.step()
    assert opt.qk_clip_stats["layer0"].num_clipped == 0


# ---- state --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_state_dict_round_trip_is_exact():
    model = make_toy()
    opt = MuonClip(muon_param_groups(model), lr=0.01)
    logits = lambda: torch.tensor([90.0, 110.0, 50.0, 130.0])  # noqa: E731
    opt.register_attention("attn", w_q_up=model.q_up, w_kv_up=model.kv_up, layout=LAYOUT, max_logits=logits)
    for s in range(3):
        set_grads(model, random_grads(model, s))
        opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)

    twin = copy.deepcopy(model)
    twin_opt = MuonClip(muon_param_groups(twin), lr=0.5)  # hyper-parameters come back from the state dict
    twin_opt.register_attention("attn", w_q_up=twin.q_up, w_kv_up=twin.kv_up, layout=LAYOUT, max_logits=logits)
    twin_opt.load_state_dict(saved)
    assert twin_opt.param_groups[0]["lr"] == 0.01
    for s in range(3, 5):
        for m, o in ((model, opt), (twin, twin_opt)):
            set_grads(m, random_grads(m, s))
            o.step()
    for (n, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
        assert torch.equal(p, q), n


# ---- bad input ----------------------------------------------------------------------------------------------


def _snapshot(model, opt):
    return ({n: p.detach().clone() for n, p in model.named_parameters()}, copy.deepcopy(opt.state_dict()))


def _assert_unchanged(model, opt, snap):
    params, state = snap
    for n, p in model.named_parameters():
        assert torch.equal(p, params[n]), n
    assert str(opt.state_dict()) == str(state)


def test_non_finite_gradient_raises_and_changes_nothing():
    model = make_toy()
    opt = MuonClip(muon_param_groups(model), lr=0.01, qk_clip_tau=None)
    set_grads(model, random_grads(model, 0))
    opt.step()
    snap = _snapshot(model, opt)
    grads = random_grads(model, 1)
    grads["proj.weight"][3, 4] = float("nan")
    set_grads(model, grads)
    with pytest.raises(NonFiniteGradientError, match=r"proj\.weight \(40, 32\)"):
        opt.step()
    _assert_unchanged(model, opt, snap)


def test_non_finite_gradient_skip_policy():
    model = make_toy()
    opt = MuonClip(muon_param_groups(model), lr=0.01, qk_clip_tau=None, nonfinite="skip")
    snap = _snapshot(model, opt)
    grads = random_grads(model, 1)
    grads["norm"][0] = float("inf")
    set_grads(model, grads)
    with pytest.warns(RuntimeWarning, match="step skipped"):
        opt.step()
    assert opt.skipped_steps == 1
    _assert_unchanged(model, opt, snap)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_all_finite_is_one_flag_over_all_tensors_checked_in_pieces(dtype):
    from k2_megatron.optim.muonclip import all_finite

    big = torch.finfo(dtype).max  # finite extremes are finite
    tensors = [torch.full((5, 7), big, dtype=dtype), torch.zeros(0, dtype=dtype), -torch.ones(300, dtype=dtype)]
    budget = 64  # bytes: the 300-element tensor is checked in several pieces
    flag = all_finite(tensors, budget)
    assert flag.shape == () and flag.dtype == torch.bool and bool(flag)
    for bad in (float("nan"), float("inf"), -float("inf")):
        for where in (0, 150, 299):  # the first, a middle and the last piece
            broken = [t.clone() for t in tensors]
            broken[2][where] = bad
            assert not bool(all_finite(broken, budget)), (bad, where)
    assert bool(all_finite([]))


@pytest.mark.parametrize("logits,exc,match", [
    (torch.tensor([1.0, 2.0, 3.0]), ValueError, r"shape \[4\]"),
    (torch.tensor([1.0, float("nan"), 3.0, 4.0]), ValueError, "non-finite"),
    (torch.tensor([1.0, float("inf"), 3.0, 4.0]), ValueError, "non-finite"),
])
def test_bad_max_logits_refused_before_any_update(logits, exc, match):
    model = make_toy()
    opt = MuonClip(muon_param_groups(model), lr=0.01)
    opt.register_attention("attn", w_q_up=model.q_up, w_kv_up=model.kv_up, layout=LAYOUT, max_logits=lambda: logits)
    set_grads(model, random_grads(model, 0))
    snap = _snapshot(model, opt)
    with pytest.raises(exc, match=match):
        opt.step()
    _assert_unchanged(model, opt, snap)


def test_missing_max_logits_is_an_error():
    model = make_toy()
    opt = MuonClip(muon_param_groups(model), lr=0.01)
    opt.register_attention("attn", w_q_up=model.q_up, w_kv_up=model.kv_up, layout=LAYOUT, max_logits=lambda: None)
    set_grads(model, random_grads(model, 0))
    with pytest.raises(RuntimeError, match="no max logits for attention layer 'attn'"):
        opt.step()


@pytest.mark.parametrize("make,exc,match", [
    (lambda m: MuonClip(muon_param_groups(m), qk_clip_tau=0.0), ValueError, "tau must be a positive"),
    (lambda m: MuonClip(muon_param_groups(m), qk_clip_tau=-5.0), ValueError, "tau must be a positive"),
    (lambda m: MuonClip(muon_param_groups(m), qk_clip_alpha=1.5), ValueError, "alpha must be in"),
    (lambda m: MuonClip(m.parameters()), ValueError, "use_muon"),
    (lambda m: MuonClip([{"params": [m.norm], "use_muon": True}]), ValueError, r"shape \(32,\)"),
    (lambda m: MuonClip(muon_param_groups(m), ns_dtype=torch.float16), ValueError, "ns_dtype"),
    (lambda m: MuonClip(muon_param_groups(m), momentum=1.0), ValueError, "momentum"),
    (lambda m: MuonClip(muon_param_groups(m), nonfinite="ignore"), ValueError, "nonfinite"),
    (lambda m: MuonClip(muon_param_groups(m)).register_attention(
        "a", w_q_up=m.kv_up, w_kv_up=m.kv_up, layout=LAYOUT, max_logits=lambda: None), ValueError, "w_q_up must be"),
    (lambda m: MuonClip(muon_param_groups(m)).register_attention(
        "nope", w_q_up=m.q_up, w_kv_up=m.kv_up, layout=LAYOUT, max_logits=torch.zeros(4)), TypeError, "nope"),
])
def test_bad_configuration(make, exc, match):
    with pytest.raises(exc, match=match):
        make(make_toy())


def test_zero_gradient_applies_only_weight_decay():
    model = make_toy()
    opt = MuonClip(muon_param_groups(model), lr=0.1, weight_decay=0.1, qk_clip_tau=None)
    w = model.proj.weight.detach().clone()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    torch.testing.assert_close(model.proj.weight.detach(), w * (1 - 0.1 * 0.1), rtol=0, atol=0)
