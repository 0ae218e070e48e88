#!/usr/bin/env bash
# The one prepared script for the GPU test machine (H100/H200, 16 cores, no network). From the repo root:
#
#   bash benchmarks/device_check.sh             # build, GPU tests, benchmarks at H100 sizes (< 8 min)
#   bash benchmarks/device_check.sh --dry-run   # (or DRY_RUN=1) the same steps on the CPU at tiny sizes
#
# Steps:
#   (a) build the CUDA extension in place (ninja, MAX_JOBS=$(nproc), TORCH_CUDA_ARCH_LIST=9.0a,
#       CUDA_HOME=/usr/local/cuda by default) when csrc/ has *.cu or *.cpp sources; a dry run only says
#       what it would build;
#   (a2) benchmarks/diagnose_cuda_attention.py: the CUDA attention forward with both orders of V's wgmma
#       descriptor strides against float64 (the one layout the emulator cannot confirm); if the built-in
#       order fails (or the step times out), (a3) reruns its small cases under compute-sanitizer, and the
#       later steps run with LLM2VEC_FAST_CUDA_ATTENTION=off (the Triton fallback) (GPU runs only);
#   (a4) `llm2vec-fast check --backend cuda --quick` for the other CUDA kernels (pool, contrastive_loss,
#       rms_norm, gated_activation, rotary_embedding) against float64; after a failure each op alone, and the
#       failing ones run their Triton fallback in the later steps (LLM2VEC_FAST_CUDA_OFF) (GPU runs only);
#   (b) python -m pytest -m gpu -q tests   (exit status 5, "no tests collected", counts as success);
#   (c) the benchmark suite (benchmarks/run.py; --quick --device cpu in a dry run), writing
#       <device>-<date>-<sha>.{json,md,png} under ${OUT:-benchmarks/results};
#   (d) the step summary, then the results table, last.
# A failed step does not stop the later ones (GPU minutes are scarce); the exit status is 1 if any step
# failed. Nothing is installed: the repo is imported through PYTHONPATH=$PWD, with no pip at all.
#
# Time: the whole run is held under DEVICE_CHECK_BUDGET_S (default 450 s, under the 8-minute limit).
# Each step runs under `timeout`: build at most BUILD_TIMEOUT (150 s), tests at most TEST_TIMEOUT
# (150 s), benchmarks whatever is left; the benchmark runner also gets a --time-budget 60 s shorter
# than its timeout, so it skips the impls it has no time for and still writes its results.
#
# Environment: PYTHON (default python3), OUT, CUDA_HOME, MAX_JOBS, TORCH_CUDA_ARCH_LIST, DRY_RUN,
# DEVICE_CHECK_BUDGET_S, BUILD_TIMEOUT, TEST_TIMEOUT, BENCH_OPS (default attention,pool,fused,loss,model,encode,train),
# BENCH_FIRST (default encode,train: run before the others, which go cheapest first), BENCH_TRAIN_SEARCH_S (45),
# BENCH_EXTRA_ARGS (more benchmarks/run.py arguments, e.g. "--skip-impls flex,eager").
set -euo pipefail

usage() { sed -n '2,30p' "$0" | sed 's/^# \{0,1\}//'; }

DRY_RUN=${DRY_RUN:-0}
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "device_check.sh: unknown argument '$arg' (try --help)" >&2; exit 2 ;;
  esac
done
[[ "$DRY_RUN" == "0" || "$DRY_RUN" == "" ]] && DRY_RUN=0 || DRY_RUN=1

if [[ ! -f setup.py || ! -d llm2vec_fast || ! -d benchmarks ]]; then
  echo "device_check.sh: run it from the repository root (bash benchmarks/device_check.sh)" >&2
  exit 2
fi

PYTHON=${PYTHON:-python3}
OUT_DIR=${OUT:-benchmarks/results}
BUDGET=${DEVICE_CHECK_BUDGET_S:-450}
BUILD_TIMEOUT=${BUILD_TIMEOUT:-150}
TEST_TIMEOUT=${TEST_TIMEOUT:-150}
BENCH_OPS=${BENCH_OPS:-attention,pool,fused,loss,model,encode,train}
# The headline goals run first (issue 5's encode, issue 7's SimCSE step), so that a budget cut falls on the
# long attention sweep; the SimCSE step's largest-batch search gets 45 s per impl unless set.
BENCH_FIRST=${BENCH_FIRST:-encode,train}
export BENCH_TRAIN_SEARCH_S=${BENCH_TRAIN_SEARCH_S:-45}
RESERVE_S=10            # kept back for the summary
BENCH_MARGIN_S=60       # between the runner's --time-budget and its hard timeout
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
if [[ "$DRY_RUN" == 1 ]]; then
  export CUDA_VISIBLE_DEVICES=""   # the dry run is a CPU run even on a machine with a GPU
fi

mkdir -p "$OUT_DIR"
LOG_DIR=$OUT_DIR
[[ -z "${OUT:-}" ]] && LOG_DIR=benchmarks/results/tmp   # ignored by git
mkdir -p "$LOG_DIR"
LOG="$LOG_DIR/device_check.log"
: > "$LOG"
exec > >(tee -a "$LOG") 2>&1

START=$(date +%s)
MARK=$(mktemp)
trap 'rm -f "$MARK"' EXIT
STATUS=()
FAILED=0

elapsed() { echo $(( $(date +%s) - START )); }
# The timeout for a step: its cap, or what is left of the budget, whichever is smaller.
step_limit() {
  local cap=$1 left
  left=$(( BUDGET - $(elapsed) - RESERVE_S ))
  (( left < cap )) && echo "$left" || echo "$cap"
}

# run_step NAME LIMIT_S OK_CODES COMMAND...: runs COMMAND under timeout; OK_CODES is a space-separated list.
run_step() {
  local name=$1 limit=$2 ok_codes=$3
  shift 3
  local t0 rc=0
  t0=$(date +%s)
  echo
  echo "=== ${name} (timeout ${limit} s, at +$(elapsed) s) ==="
  if (( limit < 10 )); then
    STATUS+=("${name}: SKIPPED (no time left in the ${BUDGET} s budget)")
    FAILED=1
    return 0
  fi
  timeout --kill-after=15 "$limit" "$@" || rc=$?
  local took=$(( $(date +%s) - t0 ))
  if [[ " $ok_codes " == *" $rc "* ]]; then
    STATUS+=("${name}: ok (exit ${rc}, ${took} s)")
  elif (( rc == 124 || rc == 137 )); then
    STATUS+=("${name}: TIMED OUT after ${took} s (limit ${limit} s)")
    FAILED=1
  else
    STATUS+=("${name}: FAILED (exit ${rc}, ${took} s)")
    FAILED=1
  fi
}

echo "device_check: $([[ $DRY_RUN == 1 ]] && echo 'DRY RUN (CPU, tiny sizes)' || echo 'GPU run') at $(date -u +%FT%TZ)"
echo "python: $(command -v "$PYTHON" || echo "$PYTHON (not found)"), out: $OUT_DIR, budget: ${BUDGET} s, log: $LOG"

# (a) build the CUDA extension in place.
BUILT=0
shopt -s nullglob
SOURCES=(csrc/*.cu csrc/*.cpp)
shopt -u nullglob
if (( ${#SOURCES[@]} == 0 )); then
  echo
  echo "=== (a) build: no csrc/*.cu or csrc/*.cpp sources, nothing to build ==="
  STATUS+=("(a) build: skipped (no sources in csrc/)")
elif [[ "$DRY_RUN" == 1 ]]; then
  echo
  echo "=== (a) build: dry run, would build ${#SOURCES[@]} sources (${SOURCES[*]}) with:"
  echo "    CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} MAX_JOBS=${MAX_JOBS:-$(nproc)} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} $PYTHON setup.py build_ext --inplace"
  STATUS+=("(a) build: skipped (dry run; would build ${#SOURCES[@]} sources)")
else
  export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
  export MAX_JOBS=${MAX_JOBS:-$(nproc)}
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a}
  echo "CUDA_HOME=$CUDA_HOME MAX_JOBS=$MAX_JOBS TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"
  run_step "(a) build" "$(step_limit "$BUILD_TIMEOUT")" "0" "$PYTHON" setup.py build_ext --inplace
  "$PYTHON" -c "import llm2vec_fast._C as m; print('built:', m.__file__)" && BUILT=1 \
    || { STATUS+=("(a) build: llm2vec_fast._C does not import"); FAILED=1; }
fi

# (a2) first contact with the CUDA attention forward: both V-descriptor orders against float64; on a
# failure, the small cases again under compute-sanitizer (memcheck) when the toolkit has it.
if [[ "$DRY_RUN" == 0 ]]; then
  DIAG_RC=0
  run_step "(a2) diagnose cuda attention" "$(step_limit 60)" "0 1" "$PYTHON" benchmarks/diagnose_cuda_attention.py
  [[ "${STATUS[-1]}" == *"exit 1"* ]] && DIAG_RC=1
  [[ "${STATUS[-1]}" != *": ok "* ]] && DIAG_RC=1   # timed out, or could not start
  SANITIZER=${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer
  if [[ "$DIAG_RC" == 1 && -x "$SANITIZER" ]]; then
    run_step "(a3) compute-sanitizer on the small cases" "$(step_limit 90)" "0 1" \
      "$SANITIZER" --tool memcheck "$PYTHON" benchmarks/diagnose_cuda_attention.py --small
  fi
  # A kernel that fails its diagnosis is a failed run (exit 1), as a kernel switched off at (a4) is, though the
  # step itself counts exit 1 as done (it ran and gave its verdict).
  [[ "$DIAG_RC" == 1 ]] && FAILED=1
  if [[ "$DIAG_RC" == 1 && -z "${LLM2VEC_FAST_CUDA_ATTENTION:-}" ]]; then
    # Kill switch: the rest of the run (tests, benchmarks) uses the Triton fallback for the cuda backend's
    # attention instead of a kernel that failed its diagnosis or hung.
    export LLM2VEC_FAST_CUDA_ATTENTION=off
    STATUS+=("(a2) => LLM2VEC_FAST_CUDA_ATTENTION=off for the later steps (the Hopper attention kernel is skipped)")
  fi
fi

# (a4) first contact with the other CUDA kernels (pooling, contrastive loss, rms_norm, gated activation): their
# parity checks against float64 in one process. A kernel that faults poisons its process's CUDA context, so
# after a failure each op is checked alone, and the failing ones are switched off (LLM2VEC_FAST_CUDA_OFF) for
# the later steps: their cuda backend then runs the Triton fallback, and the tests and benchmarks still run.
if [[ "$DRY_RUN" == 0 && "$BUILT" == 1 ]]; then
  CUDA_OPS=(pool contrastive_loss rms_norm gated_activation rotary_embedding)
  CHECK_CMD=("$PYTHON" -m llm2vec_fast.cli check --backend cuda --quick --failures-only)
  run_step "(a4) check cuda kernels" "$(step_limit 90)" "0 1" "${CHECK_CMD[@]}" $(printf -- '--op %s ' "${CUDA_OPS[@]}")
  if [[ "${STATUS[-1]}" != *": ok (exit 0,"* ]]; then
    CUDA_OFF=()
    for op in "${CUDA_OPS[@]}"; do
      run_step "(a4) check cuda $op alone" "$(step_limit 45)" "0 1" "${CHECK_CMD[@]}" --op "$op"
      [[ "${STATUS[-1]}" != *": ok (exit 0,"* ]] && CUDA_OFF+=("$op")
    done
    if (( ${#CUDA_OFF[@]} )) && [[ -z "${LLM2VEC_FAST_CUDA_OFF:-}" ]]; then
      export LLM2VEC_FAST_CUDA_OFF=$(IFS=,; echo "${CUDA_OFF[*]}")
      STATUS+=("(a4) => LLM2VEC_FAST_CUDA_OFF=$LLM2VEC_FAST_CUDA_OFF for the later steps (kernels that failed)")
      FAILED=1
    fi
  fi
fi

# (b) GPU tests (skipped, or deselected, on the CPU).
# -rfE: a line per failure or error at the end; the junit file (beside the log) keeps every test's outcome
# and time when the console tail is cut.
run_step "(b) pytest -m gpu" "$(step_limit "$TEST_TIMEOUT")" "0 5" \
  "$PYTHON" -m pytest -m gpu -q -rfE --durations=15 -p no:cacheprovider --junitxml="$LOG_DIR/gpu_tests.xml" tests

# (c) benchmarks.
BENCH_LIMIT=$(step_limit 100000)
BENCH_ARGS=(--ops "$BENCH_OPS" --first "$BENCH_FIRST" --out "$OUT_DIR" --time-budget $(( BENCH_LIMIT > BENCH_MARGIN_S + 30 ? BENCH_LIMIT - BENCH_MARGIN_S : BENCH_LIMIT / 2 )))
[[ "$DRY_RUN" == 1 ]] && BENCH_ARGS+=(--quick --device cpu)
# shellcheck disable=SC2206  # word splitting of the extra arguments is intended
[[ -n "${BENCH_EXTRA_ARGS:-}" ]] && BENCH_ARGS+=(${BENCH_EXTRA_ARGS})
run_step "(c) benchmarks" "$BENCH_LIMIT" "0" "$PYTHON" benchmarks/run.py "${BENCH_ARGS[@]}"

# (d) summary: the steps, then the results table last.
echo
echo "=== (d) summary (total $(elapsed) s of ${BUDGET} s) ==="
for line in "${STATUS[@]}"; do echo "  $line"; done
RESULTS_MD=$(find "$OUT_DIR" -maxdepth 1 -name '*.md' -newer "$MARK" -printf '%T@ %p\n' | sort -n | tail -n 1 | cut -d' ' -f2-)
if [[ -n "$RESULTS_MD" ]]; then
  echo "  results: $(ls "${RESULTS_MD%.md}".json "${RESULTS_MD%.md}".md "${RESULTS_MD%.md}".png 2>/dev/null | tr '\n' ' ')"
  echo
  sed -n '/^## Results/,$p' "$RESULTS_MD"
else
  echo "  results: none written"
  FAILED=1
fi
exit "$FAILED"
