#!/usr/bin/env bash
# The GPU run, in steps that each fit one command of a lent GPU machine (under 540 s on one
# H100) and pack their own results. Needs no network: the checkout installs offline, with
# any extra wheels from an ignored .whl/ folder.
#
#   bash bench/gpu_session.sh                       list the steps
#   OUT=DIR bash bench/gpu_session.sh STEP...       run steps (default OUT: build/gpu-session)
#   bash bench/gpu_session.sh --dry-run [STEP...]   the same on the CPU (no STEP: every step):
#                                                   Triton interpreter, tiny shapes, every
#                                                   script, result file, plot and archive
#
# $OUT receives session.log (every step appends to it) and STEP.tgz per step (its result
# files, logs and environment.txt), re-packed after each command so that a step cut short
# still returns what it measured: at most 6 files for all steps together.
# TESTS="tests/test_a.py ..." limits the tests step to those files (e.g. a second call for
# the files a first one had no time for: summary.txt lists each file's status).
# STEP_S=S (default 530) gives each step S seconds: the benchmarks' time budgets shrink with
# it, so that e.g. STEP_S=270 runs two benchmark steps in one 600 s command.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

STEPS=(tests sanitize layer multi model serve qlora)
describe() {
  case $1 in
    tests)    echo "GPU tests (-m gpu), then the others one file per process, 4 at a time; per-test timeout" ;;
    sanitize) echo "compute-sanitizer memcheck over one small call of every kernel family" ;;
    layer)    echo "decode (three timings), layer (bf16 and fp32 adapters) and DoRA benchmarks" ;;
    multi)    echo "multi-adapter benchmark, --targets grid (64-row decode, 32 adapters; M=8192, 1..128 adapters)" ;;
    model)    echo "~1B Llama-style model: PEFT vs fastlora.patch, training and decode steps" ;;
    serve)    echo "fastlora.serve: decode steps (1-128 adapters over 16-128 rows; eager, CUDA graph, PEFT, base, bound) and adapter page-in time" ;;
    qlora)    echo "4-bit (bitsandbytes NF4) base: one layer (fastlora vs F.linear and PEFT Linear4bit, decode and M=8192, traffic bound), then the ~1B model (training and decode steps)" ;;
  esac
}
usage() {
  echo "usage: [OUT=DIR] bash bench/gpu_session.sh [--dry-run] STEP..."
  echo "steps (each under 540 s on one H100; 'all' runs them in turn):"
  for s in "${STEPS[@]}"; do printf '  %-9s %s\n' "$s" "$(describe "$s")"; done
}

DRY=0
steps=()
for arg in "$@"; do
  case $arg in
    --dry-run) DRY=1 ;;
    -h|--help) usage; exit 0 ;;
    all) steps+=("${STEPS[@]}") ;;
    tests|sanitize|layer|multi|model|serve|qlora) steps+=("$arg") ;;
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
export PYTHONUNBUFFERED=1
DRYFLAG=()
if [ $DRY = 1 ]; then
  DRYFLAG=(--dry-run)
  export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout, whatever is installed
fi

say() { echo "=== $* ($(date -u +%T), ${SECONDS}s)" | tee -a "$LOG"; }

# run CAP CMD...: CMD under a timeout of CAP seconds or what is left of the step, output to
# the log and to stdout; returns CMD's status (124: timed out).
run() {
  local cap=$1 left=$((DEADLINE - SECONDS)); shift
  local limit=$((cap < left ? cap : left))
  if [ "$limit" -le 10 ]; then say "skipped, the step's time is used up: $*"; return 124; fi
  echo "+ $* (limit ${limit}s)" | tee -a "$LOG"
  timeout --signal=INT --kill-after=20 "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || say "exit status $rc: $*"
  return "$rc"
}

# budget CAP: a benchmark's --budget-s: CAP, or less when the step has less time left
budget() { local left=$((DEADLINE - SECONDS - 60)); echo $(($1 < left ? $1 : (left > 0 ? left : 1))); }

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
  { "$PY" bench/junit_summary.py "$d"
    for f in "$d"/*.log; do echo "$(basename "$f" .log): $(tail -n 1 "$f")"; done
  } | tee "$d/summary.txt" | tee -a "$LOG"
  return $rc
}

step_sanitize() {
  local d=$WORK/sanitize
  # The first, plain run autotunes (results cached on disk) and checks the numbers, so that
  # the run under the sanitizer launches each kernel only a few times.
  export TRITON_CACHE_AUTOTUNING=1
  run 240 "$PY" bench/sanitize_calls.py "${DRYFLAG[@]}" >"$d/calls.log" || { cat "$d/calls.log"; return 1; }
  cat "$d/calls.log"
  if [ $DRY = 1 ]; then
    say "dry run: the script ran without compute-sanitizer"
    return 0
  fi
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 run 400 compute-sanitizer --tool memcheck --error-exitcode 3 \
    --print-limit 50 --log-file "$d/memcheck.log" "$PY" bench/sanitize_calls.py
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
  [ $rc -eq 0 ] || "$PY" bench/plot.py "$WORK/$STEP" >>"$LOG" 2>&1  # plots of what was saved
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

# bitsandbytes is not on the GPU machine: installed from the ignored .whl/ folder when its
# wheel is there; without it bench_qlora.py leaves out the PEFT rows and says so, and the
# 4-bit model benchmark (which quantizes with bitsandbytes) is skipped
step_qlora() {
  local rc=0
  if [ $DRY = 0 ] && ! "$PY" -c "import bitsandbytes" 2>/dev/null; then
    run 120 "$PY" -m pip install -q --no-index --find-links .whl bitsandbytes \
      || say "bitsandbytes not installed (no wheel in .whl/): the PEFT Linear4bit rows are left out"
  fi
  bench bench_qlora.py 200 150 || rc=1
  if "$PY" -c "import bitsandbytes" 2>/dev/null; then
    bench bench_model.py 320 240 --quant4 || rc=1
  else
    say "bitsandbytes not installed: the 4-bit model benchmark (bench_model.py --quant4) is skipped"
  fi
  return $rc
}

if [ $DRY = 0 ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  say "no CUDA device: nothing to run on (bash bench/gpu_session.sh --dry-run checks the run on a CPU)"
  exit 1
fi
status=0
for STEP in "${steps[@]}"; do
  SECONDS=0
  DEADLINE=$STEP_S
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
