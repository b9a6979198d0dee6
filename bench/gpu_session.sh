#!/usr/bin/env bash
# The GPU run, in steps that each fit one command of a lent GPU machine and pack their own
# results. Needs no network: the checkout installs offline, with any extra wheels from an
# ignored .whl/ folder (--help says how to fetch them).
#
#   bash bench/gpu_session.sh                       list the steps
#   OUT=DIR bash bench/gpu_session.sh STEP...       run steps (default OUT: build/gpu-session)
#   bash bench/gpu_session.sh --dry-run [STEP...]   the same on the CPU (no STEP: every step):
#                                                   Triton interpreter, tiny shapes, every
#                                                   script, result file, plot and archive
#
# $OUT receives session.log (every step appends to it) and STEP.tgz per step (its result
# files, logs and environment.txt), re-packed after each command so that a step cut short
# still returns what it measured; the headline step also writes headline.md (its figures on
# one page): 3 files for the headline, 2 for another step alone (the device returns 8).
# TESTS="tests/test_a.py ..." limits the tests step to those files (e.g. a second call for
# the files a first one had no time for: summary.txt lists each file's status).
# STEP_S=S (default 530) gives each step but the headline S seconds: the benchmarks' time
# budgets shrink with it, so that e.g. STEP_S=270 runs two benchmark steps in one 600 s
# command. HEADLINE_S (default 440) is the headline's.
#
# The headline step, one command under 8 minutes on an H100 (estimate, from measurements
# on a CPU without a GPU: no GPU has run it yet). Each part is its own process under a hard
# cap; the deadline (440 s, then at most 20 s for a cut-short process to write its files and
# a few to pack) ends the command by about 470 s whatever happens:
#   install     pip, offline, the checkout and .whl/ wheels                  ~15 s
#   precompile  ~200 kernel configs (counted by tracing the headline's calls:
#               layer 63, DoRA 40, multi-adapter decode 48, 4-bit 52, plus the
#               sm_90 TMA kernel's) at 1.3-2.5 s of one core each (this
#               machine's CPU, sm_90), on 16 processes, plus ~20 s of start-up
#               and tracing per process                                       ~50 s (cap 120)
#   layer       4 points x 3 implementations; autotuning times only (about
#               10 kernel keys a point, up to 9 configs x ~0.15 s each)      ~70 s (cap 100)
#   dora        2 points x 3 implementations                                 ~45 s (cap 70)
#   multi       64-row decode, 32 adapters, 2 rank sets, eager and graph     ~50 s (cap 80)
#   qlora       2 points x 4 implementations (PEFT's with bitsandbytes)      ~45 s (cap 70)
#   gpu_smoke   the GPU tests that matter most, in the time left             the rest
# Without precompiling, the same autotuning compiles each config first, one at a time
# (~200 x 2 s: more than the whole budget).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

# in order of value; each but the headline under 540 s on one H100
STEPS=(headline tests layer multi qlora model serve vllm sanitize)
describe() {
  case $1 in
    headline) echo "in under 8 minutes: kernels compiled on every core, then fused LoRA vs F.linear and PEFT (M=16, 8192; dropout), DoRA, multi-adapter decode (64 rows, 32 adapters), 4-bit; then the gpu_smoke tests" ;;
    tests)    echo "GPU tests (-m gpu), then the others one file per process, 4 at a time; per-test timeout" ;;
    sanitize) echo "compute-sanitizer memcheck over one small call of every kernel family" ;;
    layer)    echo "decode (three timings), layer (bf16 and fp32 adapters) and DoRA benchmarks" ;;
    multi)    echo "multi-adapter benchmark, --targets grid (64-row decode, 32 adapters; M=8192, 1..128 adapters)" ;;
    model)    echo "~1B Llama-style model: PEFT vs fastlora.patch, training and decode steps" ;;
    serve)    echo "fastlora.serve: decode steps (1-128 adapters over 16-128 rows; eager, CUDA graph, PEFT, base, bound) and adapter page-in time" ;;
    vllm)     echo "vLLM-shaped layers (merged QKV, o_proj; decode and prefill, 1-32 active slots): fastlora's fused op vs vLLM's punica shrink+expand (PyTorch per-slot loop without vLLM) and F.linear" ;;
    qlora)    echo "4-bit (bitsandbytes NF4) base: one layer (fastlora vs F.linear and PEFT Linear4bit, decode and M=8192, traffic bound), then the ~1B model (training and decode steps)" ;;
  esac
}
usage() {
  echo "usage: [OUT=DIR] bash bench/gpu_session.sh [--dry-run] STEP..."
  echo "steps, in order of value (the headline under 8 minutes, each other under 540 s on one"
  echo "H100; 'all' runs them in turn):"
  for s in "${STEPS[@]}"; do printf '  %-9s %s\n' "$s" "$(describe "$s")"; done
}
wheels() {
  cat <<'TXT'
Wheels: the GPU machine has no network. Every wheel in the checkout's ignored .whl/ folder
is installed offline (pip --no-index --no-deps) at the start of each step. On a machine
with a network, from the checkout root:
  bitsandbytes (the 4-bit rows: PEFT's Linear4bit; about 41 MiB; its wheel is tagged for
  manylinux_2_24, so pip needs that platform named):
    pip download bitsandbytes==0.50.2 --no-deps --only-binary=:all: \
        --platform manylinux_2_24_x86_64 --python-version 3.12 -d .whl
  where the image lacks them (each step's environment.txt lists what it has):
    pip download peft==0.21.2 accelerate==1.16.0 pytest-timeout==2.4.0 --no-deps \
        --only-binary=:all: --python-version 3.12 -d .whl
TXT
}

DRY=0
steps=()
for arg in "$@"; do
  case $arg in
    --dry-run) DRY=1 ;;
    -h|--help) usage; echo; wheels; exit 0 ;;
    all) steps+=("${STEPS[@]}") ;;
    headline|tests|sanitize|layer|multi|model|serve|vllm|qlora) steps+=("$arg") ;;
    *) echo "gpu_session.sh: unknown step '$arg'" >&2; usage >&2; exit 2 ;;
  esac
done
if [ ${#steps[@]} -eq 0 ]; then
  if [ $DRY = 0 ]; then usage; exit 0; fi
  steps=("${STEPS[@]}")
fi

PY=${PYTHON:-python3}
OUT=${OUT:-build/gpu-session}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
LOG=$OUT/session.log
WORK=$(mktemp -d)
STEP_S=${STEP_S:-530}  # each step's deadline, seconds from its start
HEADLINE_S=${HEADLINE_S:-440}  # the headline's
SLOW=1  # the dry run's caps and deadlines are this many times longer (the interpreter is slow)
export PYTHONUNBUFFERED=1
DRYFLAG=()
if [ $DRY = 1 ]; then
  DRYFLAG=(--dry-run)
  SLOW=4
  export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout, whatever is installed
fi

say() { echo "=== $* ($(date -u +%T), ${SECONDS}s)" | tee -a "$LOG"; }

# run CAP CMD...: CMD under a timeout of CAP seconds or what is left of the step, output to
# the log and to stdout; returns CMD's status (124: timed out).
run() {
  local cap=$(($1 * SLOW)) left=$((DEADLINE - SECONDS)); shift
  local limit=$((cap < left ? cap : left))
  if [ "$limit" -le 10 ]; then say "skipped, the step's time is used up: $*"; return 124; fi
  echo "+ $* (limit ${limit}s)" | tee -a "$LOG"
  timeout --signal=INT --kill-after=20 "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || say "exit status $rc: $*"
  return "$rc"
}

# budget CAP: a benchmark's --budget-s: CAP (times SLOW), or less when the step has less time left
budget() { local b=$(($1 * SLOW)) left=$((DEADLINE - SECONDS - 60)); echo $((b < left ? b : (left > 0 ? left : 1))); }

pack() { tar -czf "$OUT/$STEP.tgz" -C "$WORK" "$STEP"; }

environment() {
  { echo "step $STEP, dry run $DRY, $(date -u +%FT%TZ)"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    (cd / && "$PY" - <<'EOF'
import importlib.metadata as md, sys
print("python", sys.version.split()[0])
for name in ("torch", "triton", "peft", "transformers", "bitsandbytes", "matplotlib", "pytest",
             "pytest-timeout"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "not installed")
EOF
    )
    command -v compute-sanitizer >/dev/null && compute-sanitizer --version | tail -1
    git rev-parse HEAD 2>/dev/null || echo "no git metadata"
  } >"$WORK/$STEP/environment.txt" 2>&1
  tee -a "$LOG" <"$WORK/$STEP/environment.txt"
}

install() {
  if [ $DRY = 1 ]; then say "install skipped in the dry run (the checkout is used as installed)"; return 0; fi
  if (cd / && "$PY" -c "import fastlora.kernels, sys; sys.exit(fastlora.__file__.find('$PWD/'))") 2>/dev/null; then
    return 0  # installed from this checkout by an earlier step on this machine
  fi
  local wheels=(.whl/*.whl)
  if [ -e "${wheels[0]}" ]; then
    run 120 "$PY" -m pip install -q --no-index --no-deps --no-build-isolation "${wheels[@]}" || return 1
  fi
  run 120 "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . || return 1
}

# test_file FILE: the tests of FILE not marked gpu, in their own process (exit status 5,
# nothing left to run once the gpu tests are deselected, counts as success)
test_file() {
  local n s
  n=$(basename "$1" .py)
  # shellcheck disable=SC2086  # the options are words
  timeout --signal=INT --kill-after=20 300 "$PY" -m pytest -q -p no:cacheprovider -m "not gpu" \
    $timeout_opt_s $collect_s --junitxml="$d/$n.xml" "$1" >"$d/$n.log" 2>&1
  s=$?
  echo "$n: exit status $s"
  [ $s -eq 5 ] || return $s
}

step_tests() {
  local d=$WORK/tests timeout_opt=(-o faulthandler_timeout=200)
  "$PY" -c "import pytest_timeout" 2>/dev/null && timeout_opt=(--timeout=200)
  local collect=() files
  # test_check_kernels compiles every kernel ahead of time without a GPU: CI runs it.
  files=${TESTS:-$(printf '%s\n' tests/test_*.py | grep -v test_check_kernels)}
  if [ $DRY = 1 ]; then  # collect two files (one with gpu tests): the plumbing, not the suite
    collect=(--collect-only)
    files="tests/test_lora_linear.py tests/test_bench_smoke.py"
  fi
  # shellcheck disable=SC2086  # the file list is words
  run 200 "$PY" -m pytest -q -p no:cacheprovider -m gpu "${timeout_opt[@]}" "${collect[@]}" \
    --junitxml="$d/gpu.xml" $files >"$d/gpu.log"
  local rc=$?
  # One process per file, 4 at a time: a device-side assert poisons only its file's CUDA context.
  export PY d timeout_opt_s="${timeout_opt[*]}" collect_s="${collect[*]}"
  export -f test_file
  printf '%s\n' $files | run 500 xargs -P 4 -n 1 bash -c 'test_file "$1"' _ || rc=1
  { "$PY" bench/tools/junit_summary.py "$d"
    for f in "$d"/*.log; do echo "$(basename "$f" .log): $(tail -n 1 "$f")"; done
  } | tee "$d/summary.txt" | tee -a "$LOG"
  return $rc
}

step_sanitize() {
  local d=$WORK/sanitize
  # The first, plain run autotunes (results cached on disk) and checks the numbers, so that
  # the run under the sanitizer launches each kernel only a few times.
  export TRITON_CACHE_AUTOTUNING=1
  run 240 "$PY" bench/tools/sanitize_calls.py "${DRYFLAG[@]}" >"$d/calls.log" || { cat "$d/calls.log"; return 1; }
  cat "$d/calls.log"
  if [ $DRY = 1 ]; then
    say "dry run: the script ran without compute-sanitizer"
    return 0
  fi
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 run 400 compute-sanitizer --tool memcheck --error-exitcode 3 \
    --print-limit 50 --log-file "$d/memcheck.log" "$PY" bench/tools/sanitize_calls.py
  local rc=$?
  tail -5 "$d/memcheck.log" | tee -a "$LOG"
  return $rc
}

# bench SCRIPT CAP BUDGET ARGS...: one benchmark into this step's folder, then pack; CAP and
# BUDGET are seconds for the default STEP_S=530 and shrink with a shorter STEP_S
bench() {
  local script=$1 cap=$(($2 * STEP_S / 530)) b; b=$(budget $(($3 * STEP_S / 530))); shift 3
  run "$cap" "$PY" "bench/$script" --out "$WORK/$STEP" --budget-s "$b" "${DRYFLAG[@]}" "$@"
  local rc=$?
  [ $rc -eq 0 ] || "$PY" bench/tools/plot.py "$WORK/$STEP" >>"$LOG" 2>&1  # plots of what was saved
  pack
  return $rc
}

step_layer() {
  local rc=0
  bench bench_decode.py 130 90 --adapter-dtype bf16 fp32 || rc=1
  bench bench_layer.py 280 220 --adapter-dtype bf16 fp32 --rank 16 64 || rc=1
  bench bench_dora.py 160 110 --adapter-dtype bf16 fp32 --rank 16 || rc=1
  return $rc
}

step_multi() { bench bench_multi.py 520 440 --targets; }

step_model() { bench bench_model.py 520 400; }

step_serve() { bench bench_serve.py 520 400; }

step_vllm() { bench bench_vllm.py 300 240; }

# bitsandbytes is not on the GPU machine: installed from the ignored .whl/ folder when its
# wheel is there; without it bench_qlora.py leaves out the PEFT rows and says so
bitsandbytes() {
  if [ $DRY = 0 ] && ! "$PY" -c "import bitsandbytes" 2>/dev/null; then
    run 120 "$PY" -m pip install -q --no-index --find-links .whl bitsandbytes \
      || say "bitsandbytes not installed (no wheel in .whl/): the PEFT Linear4bit rows are left out"
  fi
}

# the 4-bit model benchmark (which quantizes with bitsandbytes) is skipped without it
step_qlora() {
  local rc=0
  bitsandbytes
  bench bench_qlora.py 200 150 || rc=1
  if "$PY" -c "import bitsandbytes" 2>/dev/null; then
    bench bench_model.py 320 240 --quant4 || rc=1
  else
    say "bitsandbytes not installed: the 4-bit model benchmark (bench_model.py --quant4) is skipped"
  fi
  return $rc
}

# The headline (see the estimate at the top): the kernels compiled first on every core
# (bench/tools/precompile.py, the headline's own calls and shapes), each benchmark in its own
# process under a hard cap, then the gpu_smoke tests in the time left; headline.md beside
# the archive holds its figures on one page.
HEADLINE_SHAPE=(--shape 4096 4096 --rank 16)
step_headline() {
  local rc=0 d=$WORK/headline STEP_S=530  # (bench's caps are the headline's own, unscaled)
  mkdir -p "$d/tests"
  bitsandbytes
  # the compiler never runs in the interpreter; the dry run: the same plumbing, two
  # compilations (for sm_90) into a scratch cache
  local pre=(env -u TRITON_INTERPRET "$PY" bench/tools/precompile.py)
  [ $DRY = 1 ] && pre=(env -u TRITON_INTERPRET TRITON_CACHE_DIR="$WORK/triton-cache" "$PY"
                       bench/tools/precompile.py --dry-run --limit 2 --jobs 2)
  run 120 "${pre[@]}" "${HEADLINE_SHAPE[@]}" --m 16 8192 --dropout 0 0.1 \
    >"$d/precompile.log" || rc=1
  tail -n 3 "$d/precompile.log" | tee -a "$LOG"
  bench bench_layer.py 100 70 "${HEADLINE_SHAPE[@]}" --m 16 8192 --adapter-dtype bf16 \
    --dropout 0 0.1 --impls fastlora F.linear peft || rc=1
  bench bench_dora.py 70 45 "${HEADLINE_SHAPE[@]}" --m 16 8192 --adapter-dtype bf16 || rc=1
  bench bench_multi.py 80 60 --decode-only || rc=1
  bench bench_qlora.py 70 45 || rc=1
  local timeout_opt=(-o faulthandler_timeout=100) collect=()
  "$PY" -c "import pytest_timeout" 2>/dev/null && timeout_opt=(--timeout=100)
  [ $DRY = 1 ] && collect=(--collect-only)
  # in order of value (pytest runs the files in this order); the time left, at most 300 s
  run 300 "$PY" -m pytest -q -p no:cacheprovider -m gpu_smoke "${timeout_opt[@]}" "${collect[@]}" \
    --junitxml="$d/tests/gpu_smoke.xml" tests/test_linear_impls.py tests/test_lora_linear.py \
    tests/test_dispatch.py tests/test_capture_and_timing.py tests/test_routing.py \
    tests/test_multi.py tests/test_serve_graphs.py >"$d/tests/gpu_smoke.log" || rc=1
  tail -n 1 "$d/tests/gpu_smoke.log" | tee -a "$LOG"
  "$PY" bench/tools/headline_summary.py "$d" >"$d/headline.md" || rc=1
  cp "$d/headline.md" "$OUT/headline.md"
  return $rc
}

if [ $DRY = 0 ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  say "no CUDA device: nothing to run on (bash bench/gpu_session.sh --dry-run checks the run on a CPU)"
  exit 1
fi
status=0
for STEP in "${steps[@]}"; do
  SECONDS=0
  DEADLINE=$(( ($([ "$STEP" = headline ] && echo "$HEADLINE_S" || echo "$STEP_S")) * SLOW ))
  mkdir -p "$WORK/$STEP"
  say "step $STEP: $(describe "$STEP")"
  environment
  install || { say "install failed"; pack; exit 1; }
  "step_$STEP"
  rc=$?
  [ $rc -eq 0 ] || status=1
  cp "$LOG" "$WORK/$STEP/session.log"
  pack
  say "step $STEP done, exit status $rc: $OUT/$STEP.tgz holds $(tar -tzf "$OUT/$STEP.tgz" | grep -vc '/$') files"
done
rm -rf "$WORK"
exit $status
