#!/usr/bin/env python
"""Lists the CUDA kernels compiled into k2_megatron._C, per SM architecture, with their tensor-core
instruction counts (HMMA: mma.sync/WMMA; HGMMA: Hopper wgmma) read from the SASS.

    python tools/inspect_sass.py [--so PATH] [--json]

A GPU-less check that every kernel was built for every requested architecture and really uses tensor cores.
Needs cuobjdump and nvdisasm: from the CUDA toolkit, or `pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm`.
"""

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

INSTRUCTIONS = ("HMMA", "HGMMA", "UTMALDG", "LDGSTS")  # tensor-core MMA, Hopper wgmma, TMA load, cp.async


def find_binary(name: str) -> str:
    """The toolkit binary `name`: $CUDA_HOME/bin, the nvidia-cuda-* pip wheels, then PATH."""
    candidates = [os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", name)]
    try:
        import nvidia

        for root in nvidia.__path__:
            candidates += glob.glob(os.path.join(root, "*", "bin", name))
    except ImportError:
        pass
    candidates.append(shutil.which(name) or "")
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    raise FileNotFoundError(f"{name} not found in $CUDA_HOME/bin, the nvidia pip wheels or PATH; "
                            "pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm")


def default_library() -> str:
    import importlib.util

    spec = importlib.util.find_spec("k2_megatron._C")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("k2_megatron._C is not built; pass --so PATH")
    return spec.origin


def _demangle(names: list[str]) -> list[str]:
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt or not names:
        return names
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return out.splitlines()


def inspect(so_path: str) -> list[dict]:
    """One row per (cubin arch, kernel): instruction counts of INSTRUCTIONS and the total."""
    cuobjdump = find_binary("cuobjdump")
    env = dict(os.environ, NVDISASM_PATH=os.path.dirname(find_binary("nvdisasm")))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([cuobjdump, "-xelf", "all", os.path.abspath(so_path)], cwd=tmp, check=True,
                       capture_output=True)
        for cubin in sorted(glob.glob(os.path.join(tmp, "*.cubin"))):
            arch = re.search(r"\.(sm_\w+)\.cubin$", cubin).group(1)
            sass = subprocess.run([cuobjdump, "-sass", cubin], capture_output=True, text=True, env=env,
                                  check=True).stdout
            for chunk in re.split(r"\n\s*Function : ", sass)[1:]:
                name, body = chunk.split("\n", 1)
                lines = re.findall(r"/\*[0-9a-f]{4,}\*/\s+([A-Z][A-Z0-9_.]*)", body)
                counts = {ins: sum(1 for op in lines if op.split(".")[0] == ins) for ins in INSTRUCTIONS}
                rows.append({"arch": arch, "cubin": os.path.basename(cubin), "kernel": name.strip(),
                             "instructions": len(lines), **counts})
    for row, pretty in zip(rows, _demangle([r["kernel"] for r in rows])):
        row["kernel"] = pretty
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--so", help="path of the built extension (default: the installed k2_megatron._C)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    try:
        rows = inspect(args.so or default_library())
    except FileNotFoundError as exc:
        sys.exit(f"inspect_sass: {exc}")
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    cols = ["arch", *INSTRUCTIONS, "instructions", "kernel"]
    print("  ".join(c.ljust(8) for c in cols[:-1]) + "  kernel")
    for r in rows:
        print("  ".join(str(r[c]).ljust(8) for c in cols[:-1]) + "  " + r["kernel"])


if __name__ == "__main__":
    main()
