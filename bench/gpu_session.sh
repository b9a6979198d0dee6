#!/usr/bin/env bash
# One device call does it all: install this checkout offline, run the test suite on the GPU
# (bf16 included), then every benchmark; logs and results go to $OUT (8 files at most).
#   run: bash bench/gpu_session.sh            (QUICK=1 for the short benchmark grid)
set -uo pipefail
OUT=${OUT:-bench/results/session}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
LOG="$OUT/session.log"
quick=${QUICK:+--quick}
step() { echo "=== $* ($(date -u +%T))" | tee -a "$LOG"; }

step environment
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import sys, torch, triton; print(sys.version.split()[0], torch.__version__, triton.__version__)"
  python3 -m pip show peft transformers 2>/dev/null | grep -E '^(Name|Version)'; } >>"$LOG" 2>&1

step install
python3 -m pip install -q --no-deps --no-build-isolation -e . >>"$LOG" 2>&1 || { echo "install failed" | tee -a "$LOG"; exit 1; }

step gpu tests
timeout 1200 python3 -m pytest -q -x -p no:cacheprovider tests 2>&1 | tail -40 >>"$LOG"

step layer benchmark bf16 adapters
python3 bench/bench_layer.py --out "$OUT" --adapter-dtype bf16 $quick >>"$LOG" 2>&1
step layer benchmark fp32 adapters
python3 bench/bench_layer.py --out "$OUT" --adapter-dtype fp32 --quick >>"$LOG" 2>&1
step DoRA benchmark
python3 bench/bench_dora.py --out "$OUT" $quick >>"$LOG" 2>&1
if [ -f bench/bench_model.py ]; then
  step model benchmark
  python3 bench/bench_model.py --out "$OUT" $quick >>"$LOG" 2>&1
fi
step done
ls -la "$OUT" >>"$LOG"
