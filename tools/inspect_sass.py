#!/usr/bin/env python
"""Inspects the CUDA code compiled into k2_megatron._C, without a GPU: every kernel per SM architecture with its
tensor-core instruction counts (HMMA: mma.sync; HGMMA: Hopper wgmma), registers and stack frame, and the PTX
embedded next to the SASS.

    python tools/inspect_sass.py [--so PATH] [--json] [--check]

--check runs the build checks (also run by tests/extension/test_build.py) and exits 1 when one fails:
  spills               no kernel has a stack frame (register spills, or local arrays) in any architecture
  wgmma_serialized     no sm_90a kernel has more warpgroup arrives in its SASS than wgmma.fence in its PTX: an
                       extra one is injected by ptxas (warning C7519) and serialises the wgmmas around it
  wgmma_fence_order    in the PTX, no instruction between a wgmma.fence and a wgmma of its group writes an
                       accumulator or A register of that wgmma (PTX ISA, wgmma.fence; undefined behaviour)
  ptx_fallback         the PTX of the fallback architecture (k2_megatron._C.cuda_ptx_arch(), e.g. compute_80) is
                       embedded with every kernel of its SASS, the mma.sync ones with their mma.sync: GPUs without
                       matching SASS (Blackwell) JIT-compile it
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


def default_ptx_arch() -> str | None:
    """The PTX fallback architecture the installed k2_megatron._C says it embeds ("80"), None for none."""
    from k2_megatron import _extension

    return _extension.ptx_arch()


def _demangle(names: list[str]) -> list[str]:
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt or not names:
        return names
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return out.splitlines()


# ------------------------------------------------------------------------------------------------------ SASS

def _resource_usage(cuobjdump: str, cubin: str) -> dict[str, dict[str, int]]:
    """Mangled kernel name -> {"registers", "stack", "local"} from `cuobjdump -res-usage` (STACK: the stack
    frame, where ptxas puts spilled registers)."""
    out = subprocess.run([cuobjdump, "-res-usage", cubin], capture_output=True, text=True, check=True).stdout
    usage = {}
    for name, fields in re.findall(r"Function (\S+):\s*\n\s*(REG:.*)", out):
        values = dict(re.findall(r"(\w+):(\d+)", fields))
        usage[name] = {"registers": int(values["REG"]), "stack": int(values["STACK"]), "local": int(values["LOCAL"])}
    return usage


def _sass_rows(cuobjdump: str, env: dict, cubin: str) -> list[dict]:
    arch = re.search(r"\.(sm_\w+)\.cubin$", cubin).group(1)
    sass = subprocess.run([cuobjdump, "-sass", cubin], capture_output=True, text=True, env=env, check=True).stdout
    usage = _resource_usage(cuobjdump, cubin)
    rows = []
    for chunk in re.split(r"\n\s*Function : ", sass)[1:]:
        name, body = chunk.split("\n", 1)
        name = name.strip()
        ops = re.findall(r"/\*[0-9a-f]{4,}\*/\s+([A-Z][A-Z0-9_.]*)", body)
        counts = {ins: sum(1 for op in ops if op.split(".")[0] == ins) for ins in INSTRUCTIONS}
        rows.append({"arch": arch, "cubin": os.path.basename(cubin), "mangled": name, "instructions": len(ops),
                     **counts, "warpgroup_arrives": ops.count("WARPGROUP.ARRIVE"),
                     **usage.get(name, {"registers": -1, "stack": -1, "local": -1})})
    return rows


# ------------------------------------------------------------------------------------------------------- PTX

def ptx_entries(ptx: str) -> dict[str, str]:
    """Mangled entry name -> its body (the text between the braces of the function) for a PTX module."""
    entries = {}
    for match in re.finditer(r"\.entry\s+(\w+)\s*\(", ptx):
        start = ptx.index("{", ptx.index(")", match.end()))
        depth, pos = 0, start
        while True:
            nxt = min(i for i in (ptx.find("{", pos), ptx.find("}", pos)) if i >= 0)
            depth += 1 if ptx[nxt] == "{" else -1
            pos = nxt + 1
            if depth == 0:
                break
        entries[match.group(1)] = ptx[start + 1:pos - 1]
    return entries


# Opcodes whose first operand is not written (the rest write the registers of their first operand, unless it
# is a memory operand [..]).
_NO_DESTINATION = ("bra", "call", "ret", "exit", "trap", "bar", "barrier", "membar", "fence", "wgmma", "cp",
                   "st", "red", "prefetch", "stmatrix", "nanosleep", "griddepcontrol", "setmaxnreg")


def _statements(body: str) -> list[tuple[str, list[str]]]:
    """(opcode, operands) of every instruction of a PTX function body, in order (directives, labels and the
    braces of inline-asm scopes dropped; a {..} vector operand stays one operand)."""
    body = re.sub(r"//[^\n]*", "", body)
    body = re.sub(r"^\s*\.(loc|file)\b[^\n]*", "", body, flags=re.M)  # line-info directives end at the line, not at ;
    out = []
    for stmt in body.split(";"):
        stmt = re.sub(r"^[\s{}]*(\$?\w+:\s*)?[\s{}]*", "", stmt).strip()
        stmt = re.sub(r"^@!?%\w+\s+", "", stmt)
        if not stmt or stmt.startswith("."):
            continue
        opcode, _, rest = stmt.partition(" ")
        operands, depth, current = [], 0, ""
        for ch in rest:
            if ch == "," and depth == 0:
                operands.append(current.strip())
                current = ""
                continue
            depth += ch == "{"
            depth -= ch == "}"
            current += ch
        if current.strip():
            operands.append(current.strip())
        out.append((opcode, operands))
    return out


def _registers(operand: str) -> set[str]:
    return set(re.findall(r"%\w+", operand))


def _written_registers(opcode: str, operands: list[str]) -> set[str]:
    if not operands or operands[0].startswith("[") or opcode.split(".")[0] in _NO_DESTINATION:
        return set()
    return _registers(operands[0])


def wgmma_fence_violations(body: str) -> list[str]:
    """Register writes that the PTX ISA forbids in a wgmma group: between a wgmma.fence and a wgmma.mma_async of
    its group (up to wgmma.commit_group), an instruction other than a wgmma that writes one of that wgmma's
    accumulator or A-fragment registers."""
    statements = _statements(body)
    problems = []
    for i, (opcode, _) in enumerate(statements):
        if not opcode.startswith("wgmma.fence"):
            continue
        writes = []  # (statement, registers) of the non-wgmma writers seen since the fence
        for opcode_j, operands in statements[i + 1:]:
            if opcode_j.startswith(("wgmma.commit_group", "wgmma.fence")):
                break
            if opcode_j.startswith("wgmma.mma_async"):
                used = _registers(operands[0]) | (_registers(operands[1]) if operands[1].startswith("{") else set())
                for writer, registers in writes:
                    for reg in sorted(registers & used):
                        problems.append(f"{writer} writes {reg} after wgmma.fence, before the wgmma that uses it")
                continue
            written = _written_registers(opcode_j, operands)
            if written:
                writes.append((f"`{opcode_j} {', '.join(operands)}`", written))
    return problems


def _ptx_rows(ptx_file: str) -> list[dict]:
    arch = re.search(r"\.(sm_\w+)\.ptx$", ptx_file).group(1).replace("sm_", "compute_")
    with open(ptx_file, encoding="utf-8") as f:
        entries = ptx_entries(f.read())
    return [{"arch": arch, "ptx": os.path.basename(ptx_file), "mangled": name,
             "mma_sync": len(re.findall(r"\bmma\.sync\.", body)),
             "wgmma": len(re.findall(r"\bwgmma\.mma_async\.", body)),
             "wgmma_fences": len(re.findall(r"\bwgmma\.fence\.", body)),
             "fence_violations": wgmma_fence_violations(body)} for name, body in entries.items()]


# ---------------------------------------------------------------------------------------------------- report

def inspect(so_path: str) -> dict[str, list[dict]]:
    """{"kernels": one row per (SASS arch, kernel), "ptx": one row per (PTX arch, kernel)}."""
    cuobjdump = find_binary("cuobjdump")
    env = dict(os.environ, NVDISASM_PATH=os.path.dirname(find_binary("nvdisasm")))
    path = os.path.abspath(so_path)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([cuobjdump, "-xelf", "all", path], cwd=tmp, check=True, capture_output=True)
        listed = subprocess.run([cuobjdump, "-lptx", path], capture_output=True, text=True).stdout
        if "PTX file" in listed:
            subprocess.run([cuobjdump, "-xptx", "all", path], cwd=tmp, check=True, capture_output=True)
        kernels = [row for cubin in sorted(glob.glob(os.path.join(tmp, "*.cubin")))
                   for row in _sass_rows(cuobjdump, env, cubin)]
        ptx = [row for f in sorted(glob.glob(os.path.join(tmp, "*.ptx"))) for row in _ptx_rows(f)]
    for rows in (kernels, ptx):
        for row, pretty in zip(rows, _demangle([r["mangled"] for r in rows])):
            row["kernel"] = pretty
    return {"kernels": kernels, "ptx": ptx}


# Kernels the PTX fallback must carry on mma.sync (the tensor-core kernels that newer GPUs run from it).
MMA_SYNC_KERNELS = ("attention_forward_kernel", "attention_backward_dkdv_kernel", "attention_backward_dq_kernel",
                    "syrk_bf16_kernel", "grouped_gemm_sm80_kernel")


def check_spills(report: dict) -> list[str]:
    return [f"{r['kernel']} ({r['arch']}): {r['stack']} bytes of stack frame, {r['local']} of local memory "
            f"(register spills) with {r['registers']} registers"
            for r in report["kernels"] if r["stack"] != 0 or r["local"] != 0]


def check_wgmma_serialized(report: dict) -> list[str]:
    ptx = {r["mangled"]: r for r in report["ptx"] if r["arch"] == "compute_90a"}
    problems = []
    for r in report["kernels"]:
        if r["arch"] != "sm_90a" or r["HGMMA"] == 0:
            continue
        if r["mangled"] not in ptx:
            problems.append(f"{r['kernel']}: no sm_90a PTX embedded to compare its SASS with")
        elif r["warpgroup_arrives"] > ptx[r["mangled"]]["wgmma_fences"]:
            problems.append(f"{r['kernel']}: {r['warpgroup_arrives']} warpgroup arrives in the SASS for "
                            f"{ptx[r['mangled']]['wgmma_fences']} wgmma.fence in the PTX: ptxas injected "
                            "the others (C7519) and serialises the wgmmas")
    return problems


def check_wgmma_fence_order(report: dict) -> list[str]:
    with_ptx = {r["mangled"] for r in report["ptx"] if r["arch"] == "compute_90a"}
    missing = [f"{r['kernel']}: no sm_90a PTX embedded to check" for r in report["kernels"]
               if r["arch"] == "sm_90a" and r["HGMMA"] > 0 and r["mangled"] not in with_ptx]
    return missing + [f"{r['kernel']} ({r['arch']} PTX): {v}" for r in report["ptx"] for v in r["fence_violations"]]


def check_ptx_fallback(report: dict, ptx_arch: str | None) -> list[str]:
    if not ptx_arch:
        return ["the library embeds no PTX for GPUs newer than its SASS targets (k2_megatron._C.cuda_ptx_arch())"]
    ptx = {r["mangled"]: r for r in report["ptx"] if r["arch"] == f"compute_{ptx_arch}"}
    sass = [r for r in report["kernels"] if r["arch"] == f"sm_{ptx_arch}"]
    if not ptx:
        return [f"no compute_{ptx_arch} PTX in the library although k2_megatron._C says it embeds it"]
    problems = [f"{r['kernel']}: in the sm_{ptx_arch} SASS but not in the compute_{ptx_arch} PTX"
                for r in sass if r["mangled"] not in ptx]
    for fragment in MMA_SYNC_KERNELS:
        rows = [r for r in ptx.values() if fragment in r["kernel"]]
        if not rows:
            problems.append(f"no *{fragment}* in the compute_{ptx_arch} PTX")
        problems += [f"{r['kernel']}: no mma.sync in its compute_{ptx_arch} PTX" for r in rows if r["mma_sync"] == 0]
    return problems


def check(report: dict, ptx_arch: str | None) -> dict[str, list[str]]:
    """Every build check by name, with its problems ([] = passes)."""
    return {"spills": check_spills(report), "wgmma_serialized": check_wgmma_serialized(report),
            "wgmma_fence_order": check_wgmma_fence_order(report),
            "ptx_fallback": check_ptx_fallback(report, ptx_arch)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--so", help="path of the built extension or object (default: the installed k2_megatron._C)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--check", action="store_true", help="run the build checks; exit 1 if one fails")
    parser.add_argument("--ptx-arch", help="the PTX fallback architecture to expect (default: what k2_megatron._C "
                                           "reports; give it with --so)")
    args = parser.parse_args()
    try:
        report = inspect(args.so or default_library())
        ptx_arch = args.ptx_arch if args.ptx_arch is not None else (None if args.so else default_ptx_arch())
    except FileNotFoundError as exc:
        sys.exit(f"inspect_sass: {exc}")
    if args.json:
        print(json.dumps(report, indent=2))
    elif not args.check:
        cols = ["arch", *INSTRUCTIONS, "registers", "stack", "kernel"]
        print("  ".join(c.ljust(9) for c in cols[:-1]) + "  kernel")
        for r in report["kernels"]:
            print("  ".join(str(r[c]).ljust(9) for c in cols[:-1]) + "  " + r["kernel"])
        print("PTX:", ", ".join(sorted({r["arch"] for r in report["ptx"]})) or "none")
    if args.check:
        results = check(report, ptx_arch)
        for name, problems in results.items():
            print(f"{name}: {'FAILED' if problems else 'ok'}")
            for problem in problems:
                print(f"  {problem}")
        sys.exit(1 if any(results.values()) else 0)


if __name__ == "__main__":
    main()
