"""Build and install k2_megatron.

One extension, ``k2_megatron._C``, is compiled from every .cpp/.cu file under csrc/ when torch has CUDA
and nvcc is found; otherwise the package installs without it and every op runs its pure-PyTorch
reference. Install with ``pip install --no-build-isolation -e .`` so the build sees the installed torch.

Environment variables (also in the README):
  K2_CUDA_ARCHS        semicolon-separated SM list, default "80;90a" (e.g. "90a" for H100/H200 only); the PTX of
                       the highest arch without 'a' is embedded too, for newer GPUs (Blackwell) to JIT-compile
  K2_SKIP_CUDA_BUILD=1 install the pure-PyTorch package only
  MAX_JOBS             parallel compile jobs (ninja)
  CUDA_HOME            CUDA toolkit root (default: /usr/local/cuda, else the nvcc on PATH)
  CUTLASS_INCLUDE_DIR  CUTLASS/CuTe headers (the directory holding cutlass/ and cute/); default: those of the
                       nvidia-cutlass wheel (`pip install --no-deps nvidia-cutlass==4.2.0.0`), found without
                       importing it

The build never queries a GPU: the architectures come from K2_CUDA_ARCHS alone.
"""

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "80;90a"


def _log(msg):
    print(f"[k2_megatron setup] {msg}", file=sys.stderr)


def _find_cuda_home():
    for cand in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if cand and os.path.isfile(os.path.join(cand, "bin", "nvcc")):
            return cand
    nvcc = shutil.which("nvcc")
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None


def _nvcc_version(cuda_home):
    out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"],
                         capture_output=True, text=True, check=True).stdout
    match = re.search(r"release (\d+)\.(\d+)", out)
    if not match:
        raise RuntimeError(f"cannot parse the output of {cuda_home}/bin/nvcc --version:\n{out}")
    return int(match.group(1)), int(match.group(2))


def parse_cuda_archs(spec):
    """"80;90a" -> ["80", "90a"]; rejects anything that is not an SM number with an optional 'a'."""
    archs = [a.strip() for a in spec.replace(",", ";").split(";") if a.strip()]
    bad = [a for a in archs if not re.fullmatch(r"\d{2,3}a?", a)]
    if not archs or bad:
        raise ValueError(f"K2_CUDA_ARCHS={spec!r}: expected SM numbers like '80;90a', bad entries: {bad or spec!r}")
    return archs


def gencode_flags(archs):
    """nvcc -gencode flags: SASS for every arch, with the arch's PTX embedded next to it. GPUs newer than every
    SASS target (Blackwell: sm_100, sm_120) JIT-compile the PTX of the highest plain arch (ptx_fallback_arch);
    the PTX of an 'a' arch runs on that exact SM only, where its SASS is taken: it is kept so that
    tools/inspect_sass.py can check the code the SASS was assembled from (wgmma register fences)."""
    return [f"-gencode=arch=compute_{a},code={code}_{a}" for a in archs for code in ("sm", "compute")]


def ptx_fallback_arch(archs):
    """The arch whose embedded PTX later GPUs run: the highest one without the 'a' suffix ("" if none)."""
    plain = [a for a in archs if not a.endswith("a")]
    return max(plain, key=int) if plain else ""


def find_cutlass_include():
    """The CUTLASS include directory: $CUTLASS_INCLUDE_DIR, else cutlass_library/source/include of the
    nvidia-cutlass wheel (located with find_spec: importing cutlass_library would pull in its dependencies)."""
    import importlib.util

    env = os.environ.get("CUTLASS_INCLUDE_DIR")
    if env:
        candidates = [env]
    else:
        spec = importlib.util.find_spec("cutlass_library")
        roots = list(spec.submodule_search_locations or []) if spec is not None else []
        candidates = [os.path.join(root, "source", "include") for root in roots]
    for cand in candidates:
        if os.path.isfile(os.path.join(cand, "cutlass", "cutlass.h")) and os.path.isdir(os.path.join(cand, "cute")):
            return os.path.abspath(cand)
    where = f"CUTLASS_INCLUDE_DIR={env!r}" if env else "the nvidia-cutlass wheel"
    raise RuntimeError(f"k2_megatron's grouped GEMM kernels need the CUTLASS headers, not found in {where}: "
                       "`pip install --no-deps nvidia-cutlass==4.2.0.0`, or set CUTLASS_INCLUDE_DIR to a "
                       "directory holding cutlass/cutlass.h and cute/ (or K2_SKIP_CUDA_BUILD=1)")


def _extensions():
    """Returns (ext_modules, cmdclass); an empty list when the CUDA build is skipped, with the reason logged."""
    if os.environ.get("K2_SKIP_CUDA_BUILD", "0") == "1":
        _log("K2_SKIP_CUDA_BUILD=1: installing without k2_megatron._C (pure-PyTorch reference ops)")
        return [], {}
    try:
        import torch
    except ImportError as exc:
        raise RuntimeError("k2_megatron's build needs torch installed first; install with "
                           "`pip install --no-build-isolation -e .` (or set K2_SKIP_CUDA_BUILD=1)") from exc
    if torch.version.cuda is None:
        _log(f"torch {torch.__version__} has no CUDA: installing without k2_megatron._C (pure-PyTorch reference ops)")
        return [], {}
    cuda_home = _find_cuda_home()
    if cuda_home is None:
        _log("nvcc not found (set CUDA_HOME): installing without k2_megatron._C (pure-PyTorch reference ops)")
        return [], {}
    nvcc_major, nvcc_minor = _nvcc_version(cuda_home)
    torch_major = int(torch.version.cuda.split(".")[0])
    if nvcc_major != torch_major:
        raise RuntimeError(f"nvcc {nvcc_major}.{nvcc_minor} at {cuda_home} does not match torch's CUDA "
                           f"{torch.version.cuda}; point CUDA_HOME at a CUDA {torch_major}.x toolkit "
                           "or set K2_SKIP_CUDA_BUILD=1")
    os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension at import
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    cutlass_include = find_cutlass_include()
    archs = parse_cuda_archs(os.environ.get("K2_CUDA_ARCHS", DEFAULT_CUDA_ARCHS))
    # Explicit -gencode flags: torch then adds none of its own and never asks a GPU what it is.
    gencode = gencode_flags(archs)
    defines = [f"-DK2_CUDA_ARCHS={'_'.join(archs)}", f"-DK2_CUDA_PTX_ARCH={ptx_fallback_arch(archs)}"]
    sources = sorted(glob.glob("csrc/**/*.cpp", recursive=True) + glob.glob("csrc/**/*.cu", recursive=True))
    ptx = ptx_fallback_arch(archs)
    _log(f"building k2_megatron._C with nvcc {nvcc_major}.{nvcc_minor} ({cuda_home}) for sm_{', sm_'.join(archs)} "
         f"({f'compute_{ptx} PTX for newer GPUs' if ptx else 'no PTX for newer GPUs'}); "
         f"{len(sources)} sources, MAX_JOBS={os.environ.get('MAX_JOBS', 'default')}, CUTLASS {cutlass_include}")
    ext = CUDAExtension(
        name="k2_megatron._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc"), cutlass_include],
        extra_compile_args={
            "cxx": ["-O3"] + defines,
            "nvcc": ["-O3", "-lineinfo", "--expt-relaxed-constexpr"] + gencode + defines,
        },
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


def _read(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return f.read()


# Ranges, not the pins of requirements.txt (which fix CI's environment): the same package must install
# over the GPU machines' torch 2.11.
INSTALL_REQUIRES = [
    "torch>=2.11",
    "megatron-core>=0.19,<0.20",
    "numpy>=1.26",
    "packaging>=24.2",
    "ninja",
    "pybind11>=2.13",
    "psutil>=5.9",
    "pyyaml>=6.0",
    "tqdm>=4.66",
    "safetensors>=0.4",
    "tokenizers>=0.20",
    "tiktoken>=0.7",
    "tensorboard>=2.16",
    "matplotlib>=3.8",
]

ext_modules, cmdclass = _extensions()
version = re.search(r'__version__ = "([^"]+)"', _read("k2_megatron/version.py")).group(1)

setup(
    name="k2_megatron",
    version=version,
    description="Kimi K2-class training on megatron-core: MuonClip, fused MLA attention, grouped MoE GEMMs",
    long_description=_read("README.md"),
    long_description_content_type="text/markdown",
    python_requires=">=3.12",
    packages=find_packages(include=["k2_megatron", "k2_megatron.*"]),
    package_data={"k2_megatron.data": ["corpus/*.jsonl.xz", "corpus/README.md"],
                  "k2_megatron.rehearsal": ["fake_cuda_runtime.cpp"]},
    install_requires=INSTALL_REQUIRES,
    entry_points={"console_scripts": [
        "k2-pretrain=k2_megatron.training.pretrain:main",
        "k2-convert-checkpoint=k2_megatron.checkpoint.convert_cli:main",
    ]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
