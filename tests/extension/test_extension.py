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
