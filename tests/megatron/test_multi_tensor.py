"""k2_megatron.megatron.multi_tensor against megatron-core's own local fallbacks (megatron.core.utils
local_multi_tensor_l2_norm / local_multi_tensor_scale), and where it is installed."""

from __future__ import annotations

import pytest
import torch
from megatron.core import utils as megatron_utils
from megatron.core.optimizer import clip_grads
from megatron.core.optimizer import optimizer as megatron_optimizer

from k2_megatron.megatron import cpu_compat, multi_tensor

SHAPES = [(7, 13), (1,), (64, 3, 5), (1000,)]


def _tensors(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(s, generator=g) * (i + 1)).to(dtype) for i, s in enumerate(SHAPES)]


@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_the_l2_norm_equals_megatrons_fallback(dtype, rtol):
    tensors = _tensors(dtype)
    flag = torch.zeros(1, dtype=torch.int)
    with cpu_compat.cpu_mode():  # megatron's fallback puts its result on device="cuda"
        expected, expected_per_tensor = megatron_utils.local_multi_tensor_l2_norm(2048, flag, [tensors], False)
    norm, per_tensor = multi_tensor.foreach_l2_norm(2048, flag, [tensors], False)
    assert per_tensor is None and expected_per_tensor is None
    assert norm.shape == (1,) and norm.dtype == torch.float32
    # bf16: megatron rounds each tensor's norm to bf16 (8 bits of mantissa), ours are float32
    torch.testing.assert_close(norm, expected.float(), rtol=rtol, atol=0)
    reference = torch.cat([t.double().flatten() for t in tensors]).norm()
    torch.testing.assert_close(norm.double(), reference.reshape(1), rtol=1e-6, atol=0)


def test_the_l2_norm_of_nothing_is_zero():
    norm, _ = multi_tensor.foreach_l2_norm(2048, torch.zeros(1, dtype=torch.int), [[]], False)
    assert norm.tolist() == [0.0]


@pytest.mark.parametrize("src_dtype, dst_dtype, rtol", [
    (torch.float32, torch.float32, 0), (torch.bfloat16, torch.bfloat16, 0),
    (torch.float32, torch.bfloat16, 0), (torch.bfloat16, torch.float32, 8e-3)])
def test_scaling_into_other_tensors_equals_megatrons_fallback(src_dtype, dst_dtype, rtol):
    src = _tensors(src_dtype)
    expected = [torch.empty_like(t, dtype=dst_dtype) for t in src]
    megatron_utils.local_multi_tensor_scale(2048, None, [src, expected], 0.37)
    out = [torch.empty_like(t, dtype=dst_dtype) for t in src]
    before = [t.clone() for t in src]
    multi_tensor.foreach_scale(2048, None, [src, out], 0.37)
    for o, e, s, b in zip(out, expected, src, before):
        # bf16 -> fp32: megatron rounds src * scale to bf16 before the copy, ours keeps float32
        torch.testing.assert_close(o, e, rtol=rtol, atol=0)
        assert torch.equal(s, b)  # sources untouched


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scaling_in_place_equals_megatrons_fallback_without_a_copy(dtype):
    expected = _tensors(dtype)
    megatron_utils.local_multi_tensor_scale(2048, None, [expected, expected], 0.37)
    grads = _tensors(dtype)
    pointers = [g.data_ptr() for g in grads]
    multi_tensor.foreach_scale(2048, None, [grads, grads], 0.37)
    for g, e, p in zip(grads, expected, pointers):
        torch.testing.assert_close(g, e, rtol=0, atol=0)
        assert g.data_ptr() == p


def test_install_replaces_only_megatrons_local_fallbacks(monkeypatch):
    for name in ("l2_norm_impl", "multi_tensor_scale_impl"):
        monkeypatch.setattr(clip_grads, name, getattr(clip_grads, name))
    monkeypatch.setattr(megatron_optimizer, "multi_tensor_scale_impl", megatron_optimizer.multi_tensor_scale_impl)

    monkeypatch.setattr(clip_grads, "l2_norm_impl", megatron_utils.local_multi_tensor_l2_norm)
    monkeypatch.setattr(clip_grads, "multi_tensor_scale_impl", megatron_utils.local_multi_tensor_scale)
    monkeypatch.setattr(megatron_optimizer, "multi_tensor_scale_impl", megatron_utils.local_multi_tensor_scale)
    assert multi_tensor.install()
    assert clip_grads.l2_norm_impl is multi_tensor.foreach_l2_norm
    assert clip_grads.multi_tensor_scale_impl is multi_tensor.foreach_scale
    assert megatron_optimizer.multi_tensor_scale_impl is multi_tensor.foreach_scale
    assert multi_tensor.install()  # idempotent

    def fused(*args):  # stands for TE's / Apex's kernel
        raise AssertionError("not called")

    monkeypatch.setattr(clip_grads, "l2_norm_impl", fused)
    monkeypatch.setattr(clip_grads, "multi_tensor_scale_impl", fused)
    monkeypatch.setattr(megatron_optimizer, "multi_tensor_scale_impl", fused)
    assert not multi_tensor.install()
    assert clip_grads.l2_norm_impl is fused and megatron_optimizer.multi_tensor_scale_impl is fused


def test_an_untested_megatron_keeps_its_fallbacks(monkeypatch):
    monkeypatch.setattr(clip_grads, "l2_norm_impl", megatron_utils.local_multi_tensor_l2_norm)
    monkeypatch.setattr(clip_grads, "multi_tensor_scale_impl", megatron_utils.local_multi_tensor_scale)
    monkeypatch.setattr(megatron_optimizer, "multi_tensor_scale_impl", megatron_utils.local_multi_tensor_scale)
    monkeypatch.setattr(multi_tensor, "megatron_version", lambda: "0.99.0")
    assert not multi_tensor.install()
    assert clip_grads.l2_norm_impl is megatron_utils.local_multi_tensor_l2_norm


@pytest.fixture
def one_rank_group(tmp_path):
    import torch.distributed as dist

    if dist.is_initialized():
        yield dist.group.WORLD
        return
    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"file://{tmp_path / 'init'}")
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def test_megatrons_clipping_with_the_replacements_equals_the_definition(monkeypatch, one_rank_group):
    monkeypatch.setattr(clip_grads, "l2_norm_impl", megatron_utils.local_multi_tensor_l2_norm)
    monkeypatch.setattr(clip_grads, "multi_tensor_scale_impl", megatron_utils.local_multi_tensor_scale)
    monkeypatch.setattr(megatron_optimizer, "multi_tensor_scale_impl", megatron_utils.local_multi_tensor_scale)
    assert multi_tensor.install()
    params = [torch.nn.Parameter(t) for t in _tensors(torch.float32)]
    for p, g in zip(params, _tensors(torch.float32, seed=1)):
        p.grad = g
    grads = [p.grad.clone() for p in params]
    total = torch.cat([g.double().flatten() for g in grads]).norm().item()
    assert total > 0.5  # so that clipping scales
    with cpu_compat.cpu_mode():  # megatron's "cuda" tensors and its clipping's grad type assertion
        norm = clip_grads.get_grad_norm_fp32([p.grad for p in params], grad_stats_parallel_group=one_rank_group)
        clip_grads.clip_grad_by_total_norm_fp32(params, 0.5, norm)
    assert norm == pytest.approx(total, rel=1e-6)
    for p, g in zip(params, grads):
        torch.testing.assert_close(p.grad, g * (0.5 / (total + 1e-6)), rtol=1e-6, atol=1e-7)
