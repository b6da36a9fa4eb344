"""The CUDA build, checked without a GPU from the one build CI makes (tools/inspect_sass.py reads the SASS,
resource usage and embedded PTX of k2_megatron._C): every kernel built for every requested architecture and on
tensor cores; no register spills; wgmma groups that ptxas does not serialise (C7519) and that no instruction
writes into; a PTX fallback for GPUs newer than the SASS; the kernel path each GPU generation takes. Also the
generated grouped GEMM instantiations against their table. The checks of the build skip when it is not built.
"""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from k2_megatron import _extension

from tests.helpers import REPO_ROOT

pytestmark = pytest.mark.slow  # inspect_sass.py reads the whole library first
requires_build = pytest.mark.skipif(not _extension.extension_loaded(), reason="k2_megatron._C not built")


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


inspect_sass = _load("inspect_sass", REPO_ROOT / "tools" / "inspect_sass.py")
generate_instantiations = _load("generate_instantiations",
                                REPO_ROOT / "csrc" / "grouped_gemm" / "generate_instantiations.py")

# kernel name fragment -> {arch: the tensor-core instruction it must contain on that arch}. Every kernel is
# built for every arch, but some are empty stubs where they cannot run (the sm90 kernels outside sm_90a): only
# the archs listed are checked, and only those that were built.
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
def report():
    return inspect_sass.inspect(inspect_sass.default_library())


def _built(arch: str) -> bool:
    return arch in {f"sm_{a}" for a in _extension.compiled_archs()}


# ---------------------------------------------------------------------------------------- SASS per kernel

@requires_build
def test_every_kernel_built_for_every_arch(report):
    archs = {f"sm_{a}" for a in _extension.compiled_archs()}
    assert {r["arch"] for r in report["kernels"]} == archs
    kernels_by_arch = {a: {r["kernel"] for r in report["kernels"] if r["arch"] == a} for a in archs}
    assert len({frozenset(k) for k in kernels_by_arch.values()}) == 1, kernels_by_arch


@requires_build
@pytest.mark.parametrize("fragment,arch,instruction", [
    (fragment, arch, instruction)
    for fragment, per_arch in sorted(TENSOR_CORE_KERNELS.items())
    for arch, instruction in sorted(per_arch.items())
])
def test_kernels_use_tensor_cores(report, fragment, arch, instruction):
    if not _built(arch):
        pytest.skip(f"k2_megatron._C was not built for {arch}")
    rows = [r for r in report["kernels"] if fragment in r["kernel"] and r["arch"] == arch]
    assert rows, f"no kernel named *{fragment}* for {arch} in k2_megatron._C"
    for r in rows:
        assert r[instruction] > 0, f"{r['kernel']} on {r['arch']} has no {instruction}"


@requires_build
def test_no_register_spills(report):
    """ptxas puts spilled registers in the stack frame: every kernel of every arch has none."""
    assert all(r["registers"] > 0 for r in report["kernels"]), "resource usage missing for some kernels"
    assert inspect_sass.check_spills(report) == []


# ------------------------------------------------------------------------------------------- wgmma groups

def _wgmma_kernels(report):
    return [r for r in report["kernels"] if r["arch"] == "sm_90a" and r["HGMMA"] > 0]


@requires_build
def test_wgmma_groups_not_serialised(report):
    """One warpgroup arrive per wgmma.fence: ptxas injected none (it does, with warning C7519, when a register a
    wgmma reads is written after the fence) for the attention and the grouped GEMM kernels."""
    if not _built("sm_90a"):
        pytest.skip("k2_megatron._C was not built for sm_90a")
    checked = [r["kernel"] for r in _wgmma_kernels(report)]
    for fragment in ("attention_forward_sm90_kernel", "attention_backward_dq_sm90_kernel", "grouped_gemm_sm90_kernel"):
        assert any(fragment in name for name in checked), f"no sm_90a *{fragment}* with wgmma"
    assert inspect_sass.check_wgmma_serialized(report) == []


@requires_build
def test_no_register_write_between_wgmma_fence_and_wgmma(report):
    if not _built("sm_90a"):
        pytest.skip("k2_megatron._C was not built for sm_90a")
    fenced = [r for r in report["ptx"] if r["arch"] == "compute_90a" and r["wgmma_fences"] > 0]
    assert len(fenced) >= len(_wgmma_kernels(report)) > 0, "the sm_90a PTX of the wgmma kernels is missing"
    assert inspect_sass.check_wgmma_fence_order(report) == []


WGMMA_GROUP = """
    wgmma.fence.sync.aligned;
    {WRITE}
    // begin inline asm
    {{
    .reg .pred p;
    setp.ne.b32 p, %r9, 0;
    wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {{%f1, %f2}}, {{%r1, %r2, %r3, %r4}}, %rd2, p, 1, 1, 1;
    }}
    // end inline asm
    wgmma.commit_group.sync.aligned;
"""


@pytest.mark.parametrize("write,bad", [
    ("mov.f32 %f2, 0f00000000;", True),                # accumulator zeroing sunk after the fence
    ("cvt.rn.bf16x2.f32 %r3, %f7, %f8;", True),        # A fragment converted after the fence
    ("@%p3 mov.b32 %r1, %r12;", True),                  # predicated writes count too
    ("mov.b64 %rd2, %rd7;", False),                     # a descriptor: not a register operand of the MMA
    ("st.shared.f32 [%r1], %f2;", False),               # reads only
    ("add.s32 %r20, %r1, 4;", False),                   # reads an A register, writes another one
])
def test_fence_order_check_finds_register_writes(write, bad):
    """The PTX check of test_no_register_write_between_wgmma_fence_and_wgmma, on hand-written groups."""
    problems = inspect_sass.wgmma_fence_violations(WGMMA_GROUP.format(WRITE=write))
    assert bool(problems) == bad, problems


def test_fence_order_check_reads_through_line_info():
    """nvcc -lineinfo (our build) puts `.loc` directives, which end at the line and not at a `;`, before the fence
    and between it and the writes: the check must still see both (it once skipped every fence so preceded)."""
    with_loc = "\n".join(f"    .loc 2 63 7, function_name $L__info_string18, inlined_at 1 128 5\n{line}"
                         for line in WGMMA_GROUP.format(WRITE="mov.f32 %f2, 0f00000000;").splitlines())
    assert inspect_sass.wgmma_fence_violations(with_loc), with_loc


# ------------------------------------------------------------------------------------------- PTX fallback

@requires_build
def test_ptx_fallback_for_newer_gpus(report):
    """The PTX of the highest plain (not 'a') arch is embedded with every kernel of its SASS, the mma.sync kernels
    with their mma.sync, for the driver to JIT-compile on GPUs without SASS (Blackwell)."""
    plain = [a for a in _extension.compiled_archs() if not a.endswith("a")]
    if not plain:
        pytest.skip("K2_CUDA_ARCHS has no plain arch: no PTX fallback is built")
    assert _extension.ptx_arch() == max(plain, key=int)
    assert inspect_sass.check_ptx_fallback(report, _extension.ptx_arch()) == []


def test_kernel_image_prefers_sass_then_ptx(monkeypatch):
    monkeypatch.setattr(_extension, "compiled_archs", lambda: ["80", "90a"])
    monkeypatch.setattr(_extension, "ptx_arch", lambda: "80")
    assert _extension.kernel_image(8, 0) == _extension.kernel_image(8, 9) == "sm_80 SASS"
    assert _extension.kernel_image(9, 0) == "sm_90a SASS"
    for cc in ((10, 0), (12, 0)):
        assert _extension.kernel_image(*cc).startswith("compute_80 PTX, JIT-compiled")
    assert _extension.kernel_image(7, 5) is None
    monkeypatch.setattr(_extension, "ptx_arch", lambda: None)
    assert _extension.kernel_image(10, 0) is None


@requires_build
def test_kernel_path_per_generation(monkeypatch):
    monkeypatch.delenv("K2_ATTENTION_KERNEL", raising=False)
    monkeypatch.delenv("K2_GROUPED_GEMM_KERNEL", raising=False)
    ampere, blackwell = _extension.kernel_path(8, 6), _extension.kernel_path(10, 0)
    assert ampere.startswith("sm_80 SASS") and "attention mma.sync" in ampere and "CUTLASS 2" in ampere
    assert blackwell.startswith("compute_80 PTX") and "attention mma.sync" in blackwell
    assert "wgmma exists on sm_90a (compute capability 9.0) only" in blackwell
    assert _extension.kernel_path(7, 5).startswith("reference")
    if _built("sm_90a"):
        hopper = _extension.kernel_path(9, 0)
        assert hopper.startswith("sm_90a SASS") and "attention wgmma" in hopper and "CUTLASS 3" in hopper
        monkeypatch.setenv("K2_ATTENTION_KERNEL", "sm80")
        assert "attention mma.sync (K2_ATTENTION_KERNEL=sm80 selects" in _extension.kernel_path(9, 0)


@requires_build
def test_main_reports_every_generation():
    out = subprocess.run([sys.executable, "-m", "k2_megatron"], capture_output=True, text=True, cwd=REPO_ROOT)
    assert out.returncode == 0, out.stderr
    for major, minor, _ in _extension.GENERATIONS:
        assert f"  sm_{major}{minor} (" in out.stdout, out.stdout


# --------------------------------------------------------------------------- generated instantiations

def test_grouped_gemm_instantiations_are_generated_from_the_table():
    """csrc/grouped_gemm/instantiations/ is exactly what generate_instantiations.py writes (run it after changing
    its arch x layout table)."""
    assert generate_instantiations.stale_files() == []
    assert len(generate_instantiations.instantiations()) == 6


def test_stale_instantiations_are_found(tmp_path):
    generate_instantiations.write(tmp_path)
    assert generate_instantiations.stale_files(tmp_path) == []
    (tmp_path / "sm80_wgrad.cu").write_text("// edited by hand\n", encoding="utf-8")
    (tmp_path / "sm70_forward_kn.cu").write_text("", encoding="utf-8")
    assert generate_instantiations.stale_files(tmp_path) == ["sm70_forward_kn.cu", "sm80_wgrad.cu"]
