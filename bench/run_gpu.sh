#!/usr/bin/env bash
# One command for a GPU machine with torch/triton/timm preinstalled and no
# network (`make bench-gpu`): build the extension, run tests/ on CUDA (Triton
# kernels compiled, not interpreted), run the benchmarks, and write everything
# into one folder so a single remote call collects it.
#   bench/run_gpu.sh [OUT_DIR] [STEP ...]   (OUT_DIR default: $OUT, else bench/results/gpu-<date>)
# STEPs (default: all but cifar10, in this order):
#   build info tests bench-block bench-2to4 bench-attn bench-compaction bench-vit demo cifar10
# The steps can be split over several calls where one call has a time limit
# (the build stays in place): e.g. `build info tests`, then `bench-block
# bench-2to4`, then `bench-attn bench-compaction bench-vit demo`.
# cifar10 trains the dense tiny preset on $LOTUS_CIFAR10 (default
# .data/cifar10-jpeg.tar.gz) and records it with bench/record_train.py.
# Every step runs even if an earlier one failed; each step's exit code is in
# OUT_DIR/steps.txt and the script exits non-zero if any step failed.
set -u
PYTHON=${PYTHON:-python3}
out=${1:-${OUT:-bench/results/gpu-$(date -u +%Y%m%d-%H%M%S)}}
shift $(( $# > 0 ? 1 : 0 ))
steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(build info tests bench-block bench-2to4 bench-attn bench-compaction bench-vit demo)
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
bench() {  # bench NAME FILE: one benchmark file into OUT/NAME.json
  step "$1" "$PYTHON" -m pytest "bench/$2" --benchmark-only -q -p no:cacheprovider --benchmark-json="$out/$1.json"
}
for s in "${steps[@]}"; do
  case $s in
    build) step build "$PYTHON" -m pip install -e . --no-build-isolation --no-deps ;;
    info) step info "$PYTHON" -m lotus_kernels.info --json; mv "$out/info.log" "$out/info.json" ;;
    tests) step tests "$PYTHON" -m pytest tests/ -q -p no:cacheprovider -ra ;;
    bench-block) bench bench-block bench_block_sparse_matmul.py ;;
    bench-2to4) bench bench-2to4 bench_semi_structured_matmul.py ;;
    bench-attn) bench bench-attn bench_patch_drop_attention.py ;;
    bench-compaction) bench bench-compaction bench_mask_compaction.py ;;
    bench-vit) bench bench-vit bench_vit.py ;;
    demo) step demo "$PYTHON" -m lotus_kernels.demo --json "$out/demo.json" ;;
    cifar10) step cifar10 "$PYTHON" bench/record_train.py --out "$out/train-cifar10-tiny.json" \
        --what "dense vit_tiny_cifar on CIFAR-10 (JPEG q75), one GPU" -- \
        --data cifar10 --data-path "${LOTUS_CIFAR10:-.data/cifar10-jpeg.tar.gz}" --preset tiny --profile full ;;
    *) echo "unknown step $s (steps: build info tests bench-block bench-2to4 bench-attn bench-compaction bench-vit demo cifar10)" | tee -a "$out/steps.txt"; status=1 ;;
  esac
done
echo "results in $out"
exit $status
