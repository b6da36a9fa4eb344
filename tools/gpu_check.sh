#!/usr/bin/env bash
# GPU validation in one device call (issue 9): environment, carried wheels, the sm_90a build, the GPU tests,
# every benchmark, and a table of the figures against the targets, printed last. Run from anywhere in the
# repository on the GPU machine; everything lands in "${OUT:-./gpu_check_out}":
#   gpu_check.log               the whole console output
#   summary.md                  the table (tools/gpu_summary.py)
#   gpu_check_results.tar.gz    every step's log, the benchmarks' JSON, pytest's junit XML, summary.json
#   pytest_gpu.xml              the GPU tests' junit XML
#   _C.cpython-*.so, _C.build-info.txt   the built library, to carry into a later call (see below)
# (the device tool returns at most 8 files from $OUT, so the rest travels in the tarball).
#
#   bash tools/gpu_check.sh [--quick] [--skip-tests] [--skip-bench] [--full-tests] [--bench=a,b] [--cpu-smoke]
#     --quick       reduced benchmark configurations (meant for build + tests + figures in one 10-minute call)
#     --skip-tests  no pytest; --skip-bench: no benchmarks
#     --full-tests  every test of the files that hold CUDA tests, not only the selected GPU tests
#     --bench=a,b   only these benchmarks (newton_schulz, attention, grouped_gemm, train_step, activation_memory)
#     --cpu-smoke   on a machine without a GPU: no build and no nvidia-smi, everything else as on the GPU
#                   (wheel install into a temporary target, test selection, benchmark invocations, summary)
# Environment:
#   K2_WHEELS (default wheels/)   .whl files to install (--no-index --no-deps) into a temporary target that goes
#                                 on PYTHONPATH; tools/fetch_gpu_wheels.sh fills it on a machine with internet
#   K2_SKIP_BUILD=1               use k2_megatron/_C*.so if present, else copy it from K2_PREBUILT (default
#                                 prebuilt/: the .so and _C.build-info.txt of an earlier call's $OUT)
#   K2_COMMIT                     the commit to record; else git, else .k2_commit (written by fetch_gpu_wheels.sh)
#   K2_TIME_BUDGET (default 570)  seconds for the whole script: each step gets at most what is left
#   K2_TEST_SELECT                pytest -k expression (default "cuda or gpu")
#   MAX_JOBS (default 16), K2_CUDA_ARCHS (default 90a), PYTHON (default python3)
# Exit status: 0 when every step ran and every GPU test passed; 1 otherwise (targets missed do not fail it).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

QUICK=0 CPU_SMOKE=0 RUN_TESTS=1 RUN_BENCH=1 FULL_TESTS=0 BENCH_ONLY=""
for arg in "$@"; do
  case "$arg" in
    --quick) QUICK=1 ;;
    --cpu-smoke) CPU_SMOKE=1 ;;
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
BUDGET=${K2_TIME_BUDGET:-570}
RESERVE=20            # seconds kept for the summary and the tarball
START=$(date +%s)
FAILED=0
MODE=$([ "$CPU_SMOKE" = 1 ] && echo cpu-smoke || ([ "$QUICK" = 1 ] && echo quick || echo full))
# NO_VCS_VERSION: megatron-core appends the git commit of the folder it is installed in to its version, which
# inside this checkout (the local work folder) breaks cpu_compat's version check.
export PYTHONUNBUFFERED=1 K2_GPU_CHECK_MODE=$MODE NO_VCS_VERSION=1
exec > >(tee "$OUT_DIR/gpu_check.log") 2>&1
TEE_PID=$!

pack() {
  tar -czf "$OUT_DIR/gpu_check_results.tar.gz" -C "$WORK" --exclude=./site . 2>/dev/null || true
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
  K2_COMMIT_SOURCE=".k2_commit (tools/fetch_gpu_wheels.sh)"
else
  K2_COMMIT=unknown
  K2_COMMIT_SOURCE="nothing: no K2_COMMIT, no git checkout, no .k2_commit"
fi
export K2_COMMIT K2_COMMIT_SOURCE
echo "gpu_check.sh ($MODE) at $(date -u +%FT%TZ): commit $K2_COMMIT from $K2_COMMIT_SOURCE; out $OUT_DIR; work $WORK"

torch_info="import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'GPU',
      torch.cuda.is_available() and torch.cuda.get_device_name())"
if [ "$CPU_SMOKE" = 1 ]; then
  run_step env 60 "uname -a; $PY --version; $PY -c \"$torch_info\""
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
  echo "=== [wheels] none in $WHEELS/ (tools/fetch_gpu_wheels.sh fills it): using what is installed"
  record wheels skipped - 0 "no .whl in $WHEELS/"
fi

# ---- c. build (or a carried build) -----------------------------------------------------------------------
if [ "$CPU_SMOKE" = 1 ]; then
  record build skipped - 0 "--cpu-smoke"
elif [ "${K2_SKIP_BUILD:-0}" = 1 ]; then
  PREBUILT=${K2_PREBUILT:-prebuilt}
  if ! compgen -G "k2_megatron/_C*.so" >/dev/null; then
    for f in "$PREBUILT"/_C*.so "$PREBUILT"/_C*.so.gz; do
      [ -f "$f" ] || continue
      case "$f" in *.gz) gunzip -c "$f" > "k2_megatron/$(basename "${f%.gz}")" ;; *) cp "$f" k2_megatron/ ;; esac
    done
  fi
  if compgen -G "k2_megatron/_C*.so" >/dev/null; then
    note="prebuilt $(ls k2_megatron/_C*.so | head -n1)"
    if [ -f "$PREBUILT/_C.build-info.txt" ]; then
      built_hash=$(sed -n 's/^csrc_hash=//p' "$PREBUILT/_C.build-info.txt")
      built_torch=$(sed -n 's/^torch=//p' "$PREBUILT/_C.build-info.txt")
      have_torch=$($PY -c 'import torch; print(torch.__version__)')
      [ "$built_hash" = "$(csrc_hash)" ] || note="$note; STALE: built from other csrc/ sources ($built_hash)"
      [ "$built_torch" = "$have_torch" ] || note="$note; built for torch $built_torch, here $have_torch"
    else
      note="$note (no _C.build-info.txt: sources unchecked)"
    fi
    echo "=== [build] skipped (K2_SKIP_BUILD=1): $note"
    record build prebuilt - 0 "$note"
  else
    echo "=== [build] K2_SKIP_BUILD=1 but no k2_megatron/_C*.so and none in $PREBUILT/"
    record build fail - 0 "K2_SKIP_BUILD=1 without a prebuilt _C .so"
  fi
else
  run_step build 420 "K2_CUDA_ARCHS=${K2_CUDA_ARCHS:-90a} MAX_JOBS=${MAX_JOBS:-16} \
    $PY -m pip install --no-index --no-build-isolation --no-deps -e ."
  so=$(ls k2_megatron/_C*.so 2>/dev/null | head -n1 || true)
  if [ -n "$so" ]; then
    # the device tool returns files of at most 16 MiB
    if [ "$(stat -c %s "$so")" -lt $((16 * 1024 * 1024)) ]; then
      cp "$so" "$OUT_DIR/"
    else
      gzip -c "$so" > "$OUT_DIR/$(basename "$so").gz"
    fi
    { echo "commit=$K2_COMMIT"; echo "csrc_hash=$(csrc_hash)"
      echo "torch=$($PY -c 'import torch; print(torch.__version__)')"
      echo "archs=${K2_CUDA_ARCHS:-90a}"; echo "built=$(date -u +%FT%TZ)"; } > "$OUT_DIR/_C.build-info.txt"
  fi
fi

# ---- d. extension status and GPU tests -------------------------------------------------------------------
check_loaded="import torch, k2_megatron; from k2_megatron import _extension as e
assert $([ "$CPU_SMOKE" = 1 ] && echo True || echo False) or torch.cuda.is_available(), 'no CUDA GPU visible to torch'
assert not torch.cuda.is_available() or e.extension_loaded(), 'k2_megatron._C did not load: ' + k2_megatron.kernels_status()"
run_step status 60 "$PY -m k2_megatron && $PY -c \"$check_loaded\""

if [ "$RUN_TESTS" = 1 ]; then
  mapfile -t test_files < <(grep -l -E 'requires_cuda|torch\.cuda\.is_available\(\)' tests/test_*.py)
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
$PY tools/gpu_summary.py --work "$WORK" --out "$OUT_DIR/summary.md" || { echo "gpu_summary.py failed"; FAILED=1; }
pack
exec >&- 2>&-
wait "$TEE_PID" || true   # gpu_check.log complete before the device call collects $OUT
exit "$FAILED"
