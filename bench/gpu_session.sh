#!/usr/bin/env bash
# One device call does it all: install this checkout offline, run the test suite on the GPU
# (bf16 included), then every benchmark. $OUT gets session.log and results.tgz (JSON and
# markdown of each benchmark), re-packed after every step so a timeout still returns them.
#   OUT=/some/dir bash bench/gpu_session.sh      (QUICK=1: the short benchmark grids)
set -uo pipefail
OUT=${OUT:-bench/results/session}
RES=$(mktemp -d)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
LOG="$OUT/session.log"
quick=${QUICK:+--quick}
step() { echo "=== $* ($(date -u +%T))" | tee -a "$LOG"; }
pack() { tar -czf "$OUT/results.tgz" -C "$RES" . ; }

step environment
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import sys, torch, triton; print(sys.version.split()[0], torch.__version__, triton.__version__)"
  python3 -m pip show peft transformers 2>/dev/null | grep -E '^(Name|Version)'; } >>"$LOG" 2>&1

step install
python3 -m pip install -q --no-deps --no-build-isolation -e . >>"$LOG" 2>&1 || { echo "install failed" | tee -a "$LOG"; exit 1; }

step gpu tests
timeout 1200 python3 -m pytest -q -x -p no:cacheprovider tests 2>&1 | tail -40 >>"$LOG"

for bench in "bench_layer.py --adapter-dtype bf16 $quick" "bench_layer.py --adapter-dtype fp32 --quick" \
             "bench_dora.py $quick" "bench_multi.py $quick" "bench_model.py $quick"; do
  script=${bench%% *}
  [ -f "bench/$script" ] || continue
  step "$bench"
  python3 bench/$bench --out "$RES" >>"$LOG" 2>&1
  pack
done
step done
ls -la "$RES" >>"$LOG"
