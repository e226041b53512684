#!/usr/bin/env bash
# One command for a GPU machine with torch/triton/timm preinstalled and no
# network (`make bench-gpu`): build the extension, run tests/ on CUDA (Triton
# kernels compiled, not interpreted), run the benchmarks, and write everything
# into one folder so a single remote call collects it.
#   bench/run_gpu.sh [OUT_DIR]        (default: $OUT, else bench/results/gpu-<date>)
# Every step runs even if an earlier one failed; each step's exit code is in
# OUT_DIR/steps.txt and the script exits non-zero if any step failed.
set -u
PYTHON=${PYTHON:-python3}
out=${1:-${OUT:-bench/results/gpu-$(date -u +%Y%m%d-%H%M%S)}}
mkdir -p "$out"
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
status=0
step() {  # step NAME COMMAND...: run, log to OUT/NAME.log, record the exit code
  local name=$1; shift
  local start=$SECONDS
  "$@" > "$out/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc seconds=$((SECONDS - start))" | tee -a "$out/steps.txt"
  [ $rc -eq 0 ] || status=1
}
step build "$PYTHON" -m pip install -e . --no-build-isolation --no-deps
step info "$PYTHON" -m lotus_kernels.info --json
mv "$out/info.log" "$out/info.json"  # 8 files in all: what one remote call brings back
step tests "$PYTHON" -m pytest tests/ -q -p no:cacheprovider -ra
step bench "$PYTHON" -m pytest bench/ --benchmark-only -q -p no:cacheprovider --benchmark-json="$out/bench.json"
step demo "$PYTHON" -m lotus_kernels.demo --json "$out/demo.json"
echo "results in $out"
exit $status
