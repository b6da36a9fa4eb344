#!/usr/bin/env bash
# Run HERE (no GPU needed), from anywhere: downloads the wheels gpu_lab/gpu_wheels.txt names, at the versions
# pinned in requirements*.txt, into wheels/ (or $K2_WHEELS) for the GPU machine (Python 3.12, x86-64, no
# internet), and writes .k2_commit (the commit, "+dirty" when the tree has changes) for gpu_check.sh.
# Both paths are git-ignored: name them in the device call's `carry` (64 MiB in all, the tree included).
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${K2_WHEELS:-wheels}
PYTHON=${PYTHON:-python3}
CARRY_LIMIT=$((64 * 1024 * 1024))

specs=$("$PYTHON" - <<'PY'
import re
from importlib import metadata
from pathlib import Path

pins = {}
for req in ("requirements.txt", "requirements-test.txt"):
    for line in Path(req).read_text().splitlines():
        m = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*(==|>=|~=)\s*([^\s#;]+)", line)
        if m:
            pins[m.group(1).lower().replace("_", "-")] = (m.group(2), m.group(3))
for line in Path("gpu_lab/gpu_wheels.txt").read_text().splitlines():
    name = line.split("#")[0].strip().lower().replace("_", "-")
    if not name:
        continue
    if name not in pins:
        raise SystemExit(f"gpu_lab/gpu_wheels.txt: {name} is not in requirements.txt / requirements-test.txt")
    op, version = pins[name]
    if op != "==":
        version = metadata.version(name)  # unpinned: the version tested here
    print(f"{name}=={version}")
PY
)
mkdir -p "$DEST"
rm -f "$DEST"/*.whl
# Exactly the machine's platform: CPython 3.12 on manylinux x86-64 (pure-Python wheels match as well).
# shellcheck disable=SC2086
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$DEST" $specs
ls -l "$DEST"/*.whl

commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
if [ "$commit" != unknown ] && [ -n "$(git status --porcelain 2>/dev/null)" ]; then
  commit="$commit+dirty"
fi
echo "$commit" > .k2_commit
echo "wrote .k2_commit: $commit"

wheels=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
tree=$(git ls-files -co --exclude-standard -z 2>/dev/null | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
tree=${tree:-0}
prebuilt=$( (du -cb prebuilt/* 2>/dev/null || echo 0) | tail -1 | cut -f1)
total=$((wheels + tree + prebuilt))
echo "carry: wheels $((wheels / 1024)) KiB + tree $((tree / 1024)) KiB + prebuilt/ $((prebuilt / 1024)) KiB" \
     "= $((total / 1024 / 1024)) MiB of the 64 MiB a device call may send"
if [ "$total" -ge "$CARRY_LIMIT" ]; then
  echo "fetch_gpu_wheels: over the 64 MiB limit; drop a wheel from gpu_lab/gpu_wheels.txt" >&2
  exit 1
fi
echo "device call: carry [\"$DEST\", \".k2_commit\", \"prebuilt\"] (prebuilt/: gpu_lab/gpu_check.sh --build-only," \
     "README \"GPU validation\"), command: bash gpu_lab/gpu_check.sh --quick"
