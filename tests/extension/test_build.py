"""The built extension: every kernel compiled for every requested architecture, on tensor cores.

Reads the SASS of k2_megatron._C (tools/inspect_sass.py), so it checks the CUDA build on a machine without
a GPU. Skipped when the extension is not built.
"""

import json
import subprocess
import sys

import pytest

from k2_megatron import _extension

from tests.helpers import REPO_ROOT

pytestmark = [pytest.mark.slow,  # inspect_sass.py reads the whole library first
              pytest.mark.skipif(not _extension.extension_loaded(), reason="k2_megatron._C not built")]

TOOL = REPO_ROOT / "tools" / "inspect_sass.py"

# kernel name fragment -> {arch: the tensor-core instruction it must contain on that arch}. Every kernel is
# built for every arch, but some are empty stubs where they cannot run (the sm90 grouped GEMM outside
# sm_90a): only the archs listed are checked, and only those that were built.
TENSOR_CORE_KERNELS = {
    "syrk_bf16_kernel": {"sm_80": "HMMA", "sm_90a": "HMMA"},
    "grouped_gemm_sm80_kernel": {"sm_80": "HMMA", "sm_90a": "HMMA"},
    "grouped_gemm_sm90_kernel": {"sm_90a": "HGMMA"},
    "attention_forward_kernel": {"sm_80": "HMMA", "sm_90a": "HMMA"},
    "attention_forward_sm90_kernel": {"sm_90a": "HGMMA"},
    "attention_backward_dkdv_sm90_kernel": {"sm_90a": "HGMMA"},
    "attention_backward_dq_sm90_kernel": {"sm_90a": "HGMMA"},
    "attention_backward_dkdv_kernel": {"sm_80": "HMMA", "sm_90a": "HMMA"},
    "attention_backward_dq_kernel": {"sm_80": "HMMA", "sm_90a": "HMMA"},
}


@pytest.fixture(scope="module")
def sass_rows():
    out = subprocess.run([sys.executable, str(TOOL), "--json"], capture_output=True, text=True)
    if out.returncode != 0:
        pytest.fail(f"tools/inspect_sass.py failed: {out.stderr or out.stdout}")
    return json.loads(out.stdout)


def test_every_kernel_built_for_every_arch(sass_rows):
    archs = {f"sm_{a}" for a in _extension.compiled_archs()}
    assert {r["arch"] for r in sass_rows} == archs
    kernels_by_arch = {a: {r["kernel"] for r in sass_rows if r["arch"] == a} for a in archs}
    assert len({frozenset(k) for k in kernels_by_arch.values()}) == 1, kernels_by_arch


@pytest.mark.parametrize("fragment,arch,instruction", [
    (fragment, arch, instruction)
    for fragment, per_arch in sorted(TENSOR_CORE_KERNELS.items())
    for arch, instruction in sorted(per_arch.items())
])
def test_kernels_use_tensor_cores(sass_rows, fragment, arch, instruction):
    if arch not in {f"sm_{a}" for a in _extension.compiled_archs()}:
        pytest.skip(f"k2_megatron._C was not built for {arch}")
    rows = [r for r in sass_rows if fragment in r["kernel"] and r["arch"] == arch]
    assert rows, f"no kernel named *{fragment}* for {arch} in k2_megatron._C"
    for r in rows:
        assert r[instruction] > 0, f"{r['kernel']} on {r['arch']} has no {instruction}"
