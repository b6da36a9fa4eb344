#!/usr/bin/env bash
# GPU validation in one device call (issue 9): environment, carried wheels, the sm_90a library (carried or
# built), the GPU tests, every benchmark, and a table of the figures against the targets, printed last. Run from
# anywhere in the repository on the GPU machine; everything lands in "${OUT:-./gpu_check_out}":
#   gpu_check.log               the whole console output
#   summary.md                  the table (gpu_lab/gpu_summary.py)
#   gpu_check_results.tar.gz    every step's log, the benchmarks' JSON, pytest's junit XML, summary.json
#   pytest_gpu.xml              the GPU tests' junit XML
#   _C.cpython-*.so, _C.build-info.txt   the library built on the device, if it was built there
# (the device tool returns at most 8 files from $OUT, so the rest travels in the tarball).
#
#   bash gpu_lab/gpu_check.sh [--quick] [--skip-tests] [--skip-bench] [--full-tests] [--bench=a,b] [--cpu-smoke]
#   bash gpu_lab/gpu_check.sh --build-only
#     --quick       reduced benchmark configurations (tests + figures within the default budget)
#     --skip-tests  no pytest; --skip-bench: no benchmarks
#     --full-tests  every test of the files that hold CUDA tests, not only the selected GPU tests
#     --bench=a,b   only these benchmarks (newton_schulz, attention, grouped_gemm, train_step, activation_memory)
#     --cpu-smoke   on a machine without a GPU: no nvidia-smi, everything else as on the GPU (wheel install into
#                   a temporary target, the prebuilt library if one matches, test selection, benchmark
#                   invocations, summary)
#     --build-only  on any machine, GPU or not: build _C with $PYTHON out of the tree into $K2_PREBUILT (with
#                   _C.build-info.txt), and stop. With $PYTHON a venv holding the GPU machine's torch (2.11.0,
#                   Python 3.12), this saves the device call the build (README, "GPU validation").
# The library: $K2_PREBUILT/_C*.so is used when its _C.build-info.txt names these csrc/ sources (csrc_hash), this
# torch and this Python; otherwise (or with K2_FORCE_BUILD=1) the script builds in the tree, on the device.
# Environment:
#   K2_WHEELS (default wheels/)   .whl files to install (--no-index --no-deps) into a temporary target that goes
#                                 on PYTHONPATH; gpu_lab/fetch_gpu_wheels.sh fills it on a machine with internet
#   K2_PREBUILT (default prebuilt/)  where --build-only writes the library and where the checks look for it
#   K2_FORCE_BUILD=1              build on this machine even when the prebuilt library matches
#   K2_COMMIT                     the commit to record; else git, else .k2_commit (written by fetch_gpu_wheels.sh)
#   K2_TIME_BUDGET                seconds for the whole script, each step gets at most what is left (default 420:
#                                 a device session has 15 minutes, machine start included, and a rerun must fit;
#                                 --build-only: 1800)
#   K2_TEST_SELECT                pytest -k expression (default "cuda or gpu")
#   MAX_JOBS (default: the CPU count), K2_CUDA_ARCHS (default 90a), PYTHON (default python3)
# Exit status: 0 when every step ran and every GPU test passed; 1 otherwise (targets missed do not fail it).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

QUICK=0 CPU_SMOKE=0 BUILD_ONLY=0 RUN_TESTS=1 RUN_BENCH=1 FULL_TESTS=0 BENCH_ONLY=""
for arg in "$@"; do
  case "$arg" in
    --quick) QUICK=1 ;;
    --cpu-smoke) CPU_SMOKE=1 ;;
    --build-only) BUILD_ONLY=1 ;;
    --skip-tests) RUN_TESTS=0 ;;
    --skip-bench) RUN_BENCH=0 ;;
    --full-tests) FULL_TESTS=1 ;;
    --bench=*) BENCH_ONLY=",${arg#--bench=}," ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$arg' (see --help)" >&2; exit 2 ;;
  esac
done

OUT_DIR=${OUT:-$ROOT/gpu_check_out}
mkdir -p "$OUT_DIR"
# $OUT comes back as at most 8 files: the per-step files live in WORK and travel as one tarball.
if [ -n "${OUT:-}" ]; then WORK=${K2_GPU_WORK:-/tmp/k2_gpu_check}; else WORK=${K2_GPU_WORK:-$OUT_DIR/work}; fi
rm -rf "$WORK"
mkdir -p "$WORK"
PY=${PYTHON:-python3}
BUDGET=${K2_TIME_BUDGET:-$([ "$BUILD_ONLY" = 1 ] && echo 1800 || echo 420)}
PREBUILT=${K2_PREBUILT:-prebuilt}
RESERVE=20            # seconds kept for the summary and the tarball
START=$(date +%s)
FAILED=0
if [ "$BUILD_ONLY" = 1 ]; then MODE=build-only
elif [ "$CPU_SMOKE" = 1 ]; then MODE=cpu-smoke
elif [ "$QUICK" = 1 ]; then MODE=quick
else MODE=full; fi
# NO_VCS_VERSION: megatron-core appends the git commit of the folder it is installed in to its version, which
# inside this checkout (the local work folder) breaks cpu_compat's version check.
export PYTHONUNBUFFERED=1 K2_GPU_CHECK_MODE=$MODE NO_VCS_VERSION=1
exec > >(tee "$OUT_DIR/gpu_check.log") 2>&1
TEE_PID=$!

pack() {
  tar -czf "$OUT_DIR/gpu_check_results.tar.gz" -C "$WORK" --exclude=./site --exclude=./build-temp --exclude=./lib --exclude=./pkg \
    --exclude=./own_library . 2>/dev/null || true
  [ -f "$WORK/pytest_gpu.xml" ] && cp "$WORK/pytest_gpu.xml" "$OUT_DIR/" || true
}

record() {  # name status rc seconds note
  printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" >> "$WORK/steps.tsv"
  case "$2" in fail|timeout|no-time) FAILED=1 ;; esac
}

# run_step NAME CAP_SECONDS 'shell command': runs under `timeout` (the cap or what is left of the budget),
# output tee'd to WORK/NAME.log; a failure is recorded and the script goes on.
run_step() {
  local name=$1 cap=$2 cmd=$3
  local left=$(( BUDGET - ($(date +%s) - START) - RESERVE ))
  if [ "$left" -lt 15 ]; then
    echo "=== [$name] skipped: the ${BUDGET} s budget is spent"
    record "$name" no-time - 0 "not run: the time budget is spent"
    return 0
  fi
  local limit=$(( cap < left ? cap : left ))
  echo "=== [$name] (limit ${limit} s) $cmd"
  local t0 rc status
  t0=$(date +%s)
  set +e
  timeout --kill-after=10 "$limit" bash -c "$cmd" 2>&1 | tee "$WORK/$name.log"
  rc=${PIPESTATUS[0]}
  set -e
  case "$rc" in 0) status=ok ;; 124|137) status=timeout ;; *) status=fail ;; esac
  local dt=$(( $(date +%s) - t0 ))
  echo "=== [$name] $status (rc $rc, ${dt} s)"
  # the note: the log's last non-empty line (pytest's counts, a benchmark's last word, an error)
  record "$name" "$status" "$rc" "$dt" \
    "$(tail -c 2000 "$WORK/$name.log" | grep -v '^\s*$' | tail -1 | tr '\t|' '  ' | cut -c1-120)"
  pack
}

csrc_hash() { find csrc setup.py -type f | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -c1-16; }

# ---- a. environment -------------------------------------------------------------------------------------
if [ -n "${K2_COMMIT:-}" ]; then
  K2_COMMIT_SOURCE="env K2_COMMIT"
elif git rev-parse --short HEAD >/dev/null 2>&1; then
  K2_COMMIT=$(git rev-parse --short HEAD)
  [ -n "$(git status --porcelain 2>/dev/null)" ] && K2_COMMIT="$K2_COMMIT+dirty"
  K2_COMMIT_SOURCE="git"
elif [ -s .k2_commit ]; then
  K2_COMMIT=$(head -n1 .k2_commit)
  K2_COMMIT_SOURCE=".k2_commit (gpu_lab/fetch_gpu_wheels.sh)"
else
  K2_COMMIT=unknown
  K2_COMMIT_SOURCE="nothing: no K2_COMMIT, no git checkout, no .k2_commit"
fi
export K2_COMMIT K2_COMMIT_SOURCE
echo "gpu_check.sh ($MODE) at $(date -u +%FT%TZ): commit $K2_COMMIT from $K2_COMMIT_SOURCE; out $OUT_DIR; work $WORK"

torch_info="import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'GPU',
      torch.cuda.is_available() and torch.cuda.get_device_name())"
if [ "$CPU_SMOKE" = 1 ] || [ "$BUILD_ONLY" = 1 ]; then
  run_step env 60 "uname -a; (nvcc --version || true) | tail -n2; $PY --version; $PY -c \"$torch_info\""
else
  run_step env 60 "uname -a; nvidia-smi; \
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > '$WORK/gpu.txt'; \
    nvcc --version | tail -n2; $PY --version; $PY -c \"$torch_info\"; \
    $PY -m pip list 2>/dev/null | grep -i -E '^(torch|triton|transformers|megatron|nvidia-cutlass|pytest|numpy) ' || true"
fi

# ---- b. carried wheels ------------------------------------------------------------------------------------
WHEELS=${K2_WHEELS:-wheels}
SITE=$WORK/site
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  versions="import megatron.core, importlib.util as u
print('megatron-core', megatron.core.__version__, '| CUTLASS headers:', u.find_spec('cutlass_library') is not None)"
  run_step wheels 90 "$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target '$SITE' $WHEELS/*.whl && PYTHONPATH='$SITE' $PY -c \"$versions\""
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "=== [wheels] none in $WHEELS/ (gpu_lab/fetch_gpu_wheels.sh fills it): using what is installed"
  record wheels skipped - 0 "no .whl in $WHEELS/"
fi

# ---- c. the library: carried (prebuilt/) or built ------------------------------------------------------------
# What a library must have been built from to be used here; written into _C.build-info.txt, compared with it.
read -r torch_version ext_suffix < <($PY -c 'import sysconfig, torch
print(torch.__version__, sysconfig.get_config_var("EXT_SUFFIX"))') || true
library_identity() { echo "csrc_hash=$(csrc_hash)"; echo "torch=$torch_version"; echo "ext_suffix=$ext_suffix"; }
write_build_info() {  # DIR: what the library in DIR was built from
  { echo "commit=$K2_COMMIT"; library_identity
    echo "archs=${K2_CUDA_ARCHS:-90a}"; echo "built=$(date -u +%FT%TZ)"; } > "$1/_C.build-info.txt"
}
prebuilt_mismatch() {  # prints why $PREBUILT's library cannot be used here; prints nothing when it can
  local info=$PREBUILT/_C.build-info.txt line key
  if ! compgen -G "$PREBUILT/_C*.so*" >/dev/null; then echo "no library in $PREBUILT/"; return; fi
  if [ ! -f "$info" ]; then echo "$PREBUILT/ has no _C.build-info.txt"; return; fi
  while read -r line; do
    key=${line%%=*}
    grep -qxF "$line" "$info" ||
      { echo "$PREBUILT/ was built for $key $(sed -n "s/^$key=//p" "$info"), this is ${line#*=}"; return; }
  done < <(library_identity)
}
so_of() { compgen -G "$1/_C*.so" | head -n1 || true; }

if [ "$BUILD_ONLY" = 1 ]; then
  # Out of the tree, so that the library of this machine's own install (another torch) stays where it is.
  run_step build "$BUDGET" "K2_CUDA_ARCHS=${K2_CUDA_ARCHS:-90a} MAX_JOBS=${MAX_JOBS:-$(nproc)} \
    $PY setup.py -q build_ext --build-lib '$WORK/lib' --build-temp '$WORK/build-temp'"
  so=$(so_of "$WORK/lib/k2_megatron")
  if [ -z "$so" ]; then
    echo "gpu_check.sh --build-only: no library was built (see $OUT_DIR/gpu_check.log)" >&2
    pack; exit 1
  fi
  # It must load into this torch: a copy of the package with the new library, outside the tree.
  mkdir -p "$WORK/pkg" && cp -r k2_megatron "$WORK/pkg/" && rm -f "$WORK"/pkg/k2_megatron/_C*.so
  cp "$so" "$WORK/pkg/k2_megatron/"
  loads="from k2_megatron import _extension as e; import k2_megatron
assert e.extension_loaded(), k2_megatron.kernels_status()
print('loads:', k2_megatron.kernels_status())"
  run_step load 120 "cd '$WORK/pkg' && $PY -c \"$loads\""
  if ! grep -q "^load	ok" "$WORK/steps.tsv"; then echo "gpu_check.sh --build-only: $PREBUILT/ left as it was" >&2; pack; exit 1; fi
  mkdir -p "$PREBUILT"
  rm -f "$PREBUILT"/_C*.so "$PREBUILT"/_C*.so.gz "$PREBUILT/_C.build-info.txt"
  cp "$so" "$PREBUILT/.$(basename "$so").tmp" && mv "$PREBUILT/.$(basename "$so").tmp" "$PREBUILT/$(basename "$so")"
  write_build_info "$PREBUILT"
  echo "=== $PREBUILT/: $(ls -s --block-size=K "$PREBUILT" | tr '\n' ' ')"
  cat "$PREBUILT/_C.build-info.txt"
  echo "carry it: [\"wheels\", \".k2_commit\", \"$PREBUILT\"] (gpu_lab/fetch_gpu_wheels.sh prints the total)"
  pack; exit "$FAILED"
fi

why_not_prebuilt=$(prebuilt_mismatch)
[ "${K2_FORCE_BUILD:-0}" = 1 ] && why_not_prebuilt="K2_FORCE_BUILD=1"
if [ -z "$why_not_prebuilt" ]; then
  # The tree gets its own library (if any: another torch's build) back when the script ends.
  mkdir -p "$WORK/own_library"
  if compgen -G "k2_megatron/_C*.so" >/dev/null; then mv k2_megatron/_C*.so "$WORK/own_library/"; fi
  trap 'rm -f k2_megatron/_C*.so; mv "$WORK"/own_library/_C*.so k2_megatron/ 2>/dev/null || true' EXIT
  so=$(so_of "$PREBUILT")
  if [ -n "$so" ]; then cp "$so" k2_megatron/
  else f=$(compgen -G "$PREBUILT/_C*.so.gz" | head -n1); gunzip -c "$f" > "k2_megatron/$(basename "${f%.gz}")"; fi
  note="prebuilt $(grep -E '^(commit|archs|built)=' "$PREBUILT/_C.build-info.txt" | tr '\n' ' ')"
  echo "=== [build] not needed: $note"
  record build prebuilt - 0 "$note"
elif [ "$CPU_SMOKE" = 1 ]; then
  echo "=== [build] skipped (--cpu-smoke): $why_not_prebuilt"
  record build skipped - 0 "--cpu-smoke; $why_not_prebuilt"
else
  echo "=== [build] on this machine: $why_not_prebuilt"
  run_step build 420 "K2_CUDA_ARCHS=${K2_CUDA_ARCHS:-90a} MAX_JOBS=${MAX_JOBS:-$(nproc)} \
    $PY -m pip install --no-index --no-build-isolation --no-deps -e ."
  so=$(so_of k2_megatron)
  if [ -n "$so" ]; then
    # the device tool returns files of at most 16 MiB
    if [ "$(stat -c %s "$so")" -lt $((16 * 1024 * 1024)) ]; then
      cp "$so" "$OUT_DIR/"
    else
      gzip -c "$so" > "$OUT_DIR/$(basename "$so").gz"
    fi
    write_build_info "$OUT_DIR"
  fi
fi

# ---- d. extension status and GPU tests -------------------------------------------------------------------
check_loaded="import torch, k2_megatron; from k2_megatron import _extension as e
assert $([ "$CPU_SMOKE" = 1 ] && echo True || echo False) or torch.cuda.is_available(), 'no CUDA GPU visible to torch'
assert not torch.cuda.is_available() or e.extension_loaded(), 'k2_megatron._C did not load: ' + k2_megatron.kernels_status()"
run_step status 60 "$PY -m k2_megatron && $PY -c \"$check_loaded\""

if [ "$RUN_TESTS" = 1 ]; then
  mapfile -t test_files < <(grep -rl --include='test_*.py' -E 'pytest\.mark\.gpu|torch\.cuda\.is_available\(\)' tests | sort)
  select_args="-k '${K2_TEST_SELECT:-cuda or gpu}'"
  [ "$FULL_TESTS" = 1 ] && select_args=""
  [ "${#test_files[@]}" -gt 0 ] || { echo "gpu_check.sh: no test file holds a CUDA test" >&2; exit 1; }
  run_step tests 300 \
    "$PY -m pytest ${test_files[*]} -q -rfEs -p no:cacheprovider $select_args --junitxml='$WORK/pytest_gpu.xml'"
else
  record tests skipped - 0 "--skip-tests"
fi

# ---- e. benchmarks ---------------------------------------------------------------------------------------
bench() {  # name cap args...
  local name=$1 cap=$2
  shift 2
  if [ -n "$BENCH_ONLY" ] && [[ "$BENCH_ONLY" != *",$name,"* ]]; then
    record "bench_$name" skipped - 0 "not in --bench"
    return 0
  fi
  run_step "bench_$name" "$cap" "$PY -m benchmarks.$name $* --json '$WORK/bench_$name.json'"
}
if [ "$RUN_BENCH" = 1 ]; then
  # k2-mini at the 1-GPU recipe's 16k vocabulary (examples/configs/k2_mini_1gpu.yaml): K2's 163840-entry
  # embedding and output layer would dominate a step of this small model and hide the layers' kernels.
  if [ "$QUICK" = 1 ] || [ "$CPU_SMOKE" = 1 ]; then
    bench newton_schulz 60 --iters 5 --only experts
    bench attention 90 --seqlens 4096 --heads 16 64 --warmup 2 --iters 5
    bench grouped_gemm 90 --warmup 2 --iters 5
    bench train_step 120 --preset k2-mini --vocab 16384 --seq 1024 --micro-batch 4 --warmup 1 --steps 3
    if [ "$CPU_SMOKE" = 1 ]; then
      bench activation_memory 90 --seq 64 --options none fp8   # no GPU: its CPU count of k2-tiny
    else
      bench activation_memory 90 --seq 2048 --options none fp8 recompute --iters 2
    fi
  else
    bench newton_schulz 100 --iters 10
    bench attention 150
    bench grouped_gemm 120
    bench train_step 180 --preset k2-mini --vocab 16384 --seq 1024 --micro-batch 8 --warmup 2 --steps 5
    bench activation_memory 150
  fi
else
  record benchmarks skipped - 0 "--skip-bench"
fi

# ---- f. summary (printed last) ---------------------------------------------------------------------------
pack
echo "=== results: $OUT_DIR ($(ls "$OUT_DIR" | tr '\n' ' '))"
echo
$PY gpu_lab/gpu_summary.py --work "$WORK" --out "$OUT_DIR/summary.md" || { echo "gpu_summary.py failed"; FAILED=1; }
pack
exec >&- 2>&-
wait "$TEE_PID" || true   # gpu_check.log complete before the device call collects $OUT
exit "$FAILED"
