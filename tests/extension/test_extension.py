"""The extension loader: which path is live, and the package working without k2_megatron._C."""

import subprocess
import sys
import textwrap

import pytest

from k2_megatron import _extension


@pytest.mark.slow
def test_without_extension_every_op_runs_the_reference():
    """As on a machine where _C was not built: import it as missing and use the public ops."""
    code = textwrap.dedent("""
        import sys
        sys.modules["k2_megatron._C"] = None  # makes `from k2_megatron import _C` raise ImportError
        import torch
        import k2_megatron
        from k2_megatron import _extension, ops
        assert not _extension.extension_loaded() and not k2_megatron.kernels_available()
        status = k2_megatron.kernels_status()
        assert status.startswith("reference (pure PyTorch) for every op: "), status
        x = torch.randn(3, 8, 12)
        y = ops.newton_schulz(x)
        expected = ops.reference.newton_schulz.newton_schulz(x, [3.4445, -4.7750, 2.0315] * 5, 1e-7)
        assert torch.equal(y, expected)
        print("ok", status)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok reference")


@pytest.mark.parametrize("arch,cc,runs", [
    ("80", (8, 0), True), ("80", (8, 6), True), ("80", (9, 0), False), ("86", (8, 0), False),
    ("90a", (9, 0), True), ("90a", (10, 0), False), ("90", (9, 0), True), ("100a", (10, 0), True),
])
def test_arch_compatibility(arch, cc, runs):
    assert _extension._arch_runs_on(arch, *cc) == runs


@pytest.mark.slow
def test_main_prints_status():
    out = subprocess.run([sys.executable, "-m", "k2_megatron"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "ops: " in out.stdout
    if _extension.extension_loaded():
        assert "k2_megatron::newton_schulz" in out.stdout


@pytest.mark.skipif(not _extension.extension_loaded(), reason="k2_megatron._C not built")
def test_op_layer_calls_the_registered_operators():
    """With _C built, every public op (forward and backward) goes through torch.ops.k2_megatron.* on the CPU too:
    its reference path (the one an op layer falls back to) is forbidden here, so a dispatch that always picks the
    reference fails this test on any machine, not only on a GPU."""
    import torch

    from k2_megatron import ops
    from tests.helpers.gpu import reference_forbidden

    q, k, v = (torch.randn(1, 5, 2, d, requires_grad=True) for d in (24, 24, 16))
    x, w = torch.randn(6, 8, requires_grad=True), torch.randn(2, 8, 4, requires_grad=True)
    tokens, topk = torch.randn(4, 8, requires_grad=True), torch.tensor([[0, 1], [1, 0], [0, 0], [1, 1]])
    with reference_forbidden(*sorted(ops._registration.REGISTERED_OPS)):
        out, _ = ops.mla_attention(q, k, v)
        torch.autograd.grad(out.sum(), (q, k, v))
        y = ops.grouped_gemm(x, w, torch.tensor([4, 2]))
        torch.autograd.grad(y.sum(), (x, w))
        permuted, row_map, _ = ops.permute(tokens, topk, 2)
        torch.autograd.grad(ops.unpermute(permuted, row_map, None).sum(), tokens)
        ops.newton_schulz(torch.randn(2, 4, 6))
        quantized, scales = ops.fp8_tile_quantize(torch.randn(2, 200))
        ops.fp8_tile_dequantize(quantized, scales)
