#!/usr/bin/env bash
# One command for a GPU machine with torch/triton/timm preinstalled and no
# network (`make bench-gpu`): build the extension, run tests/ on CUDA (Triton
# kernels compiled, not interpreted), run the benchmarks, report on them, and
# write everything into one folder so a single remote call collects it.
#   bench/run_gpu.sh [OUT_DIR] [STEP ...]   (OUT_DIR default: $OUT, else bench/results/gpu-<date>)
# STEPs (default: all but cifar10, in this order):
#   build info tests bench-block bench-2to4 bench-attn bench-compaction bench-vit report compare demo cifar10
# report: `lotus bench-report OUT_DIR/bench-*.json --out OUT_DIR` (bench_report.md,
#   targets, plots). compare: each OUT_DIR/bench-*.json against the newest
#   committed run of the same device with the same benchmarks under
#   $BENCH_BASELINE_DIR (default bench/results); fails on a regression (> 10%
#   slower), passes with a note where there is no baseline yet.
# BENCH_ARGS: extra pytest arguments for the bench-* steps, with shell quoting,
#   e.g. BENCH_ARGS='-k "vit_b16_224 and infer"'.
# The steps can be split over several calls where one call has a time limit
# (the build stays in place): e.g. `build info tests`, then `bench-block
# bench-2to4`, then `bench-attn bench-compaction bench-vit`, then `report compare demo`.
# cifar10 trains the dense tiny preset on $LOTUS_CIFAR10 (default
# .data/cifar10-jpeg.tar.gz) and records it with bench/record_train.py.
# Every step runs even if an earlier one failed; each step's exit code is in
# OUT_DIR/steps.txt and the script exits non-zero if any step failed.
set -u
PYTHON=${PYTHON:-python3}
ALL_STEPS="build info tests bench-block bench-2to4 bench-attn bench-compaction bench-vit report compare demo cifar10"
out=${1:-${OUT:-bench/results/gpu-$(date -u +%Y%m%d-%H%M%S)}}
shift $(( $# > 0 ? 1 : 0 ))
steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(build info tests bench-block bench-2to4 bench-attn bench-compaction bench-vit report compare demo)
baseline_dir=${BENCH_BASELINE_DIR:-bench/results}
bench_args=()
if [ -n "${BENCH_ARGS:-}" ]; then
  # shlex, not word splitting: a -k expression has spaces ("vit_b16_224 and infer"); not eval: nothing in it runs.
  mapfile -d '' bench_args < <("$PYTHON" -c 'import shlex, sys; sys.stdout.write("".join(a + "\0" for a in shlex.split(sys.argv[1])))' "$BENCH_ARGS")
fi
mkdir -p "$out"
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
status=0
record() {  # record NAME RC START: note a step's exit code and time in OUT/steps.txt
  echo "$1 rc=$2 seconds=$((SECONDS - $3))" | tee -a "$out/steps.txt"
  [ "$2" -eq 0 ] || status=1
}
step() {  # step NAME COMMAND...: run, log stdout and stderr to OUT/NAME.log, record the exit code
  local name=$1; shift
  local start=$SECONDS
  "$@" > "$out/$name.log" 2>&1
  record "$name" $? "$start"
}
bench() {  # bench NAME FILE: one benchmark file into OUT/NAME.json
  step "$1" "$PYTHON" -m pytest "bench/$2" --benchmark-only -q -p no:cacheprovider --benchmark-json="$out/$1.json" "${bench_args[@]}"
}
bench_json() {  # the pytest-benchmark files of this run, one a line (none: no output)
  local f
  for f in "$out"/bench-*.json; do [ -f "$f" ] && printf '%s\n' "$f"; done
}
with_bench_json() {  # with_bench_json COMMAND...: COMMAND followed by this run's bench-*.json; an error if there is none
  local files
  mapfile -t files < <(bench_json)
  if [ ${#files[@]} -eq 0 ]; then
    echo "no bench-*.json in $out: run a bench-* step first"
    return 1
  fi
  "$@" "${files[@]}"
}
for s in "${steps[@]}"; do
  case $s in
    build) step build "$PYTHON" -m pip install -e . --no-build-isolation --no-deps ;;
    info)  # stderr apart: warnings must not break the JSON
      start=$SECONDS
      "$PYTHON" -m lotus_kernels.info --json > "$out/info.json" 2> "$out/info.err"
      record info $? "$start" ;;
    tests) step tests "$PYTHON" -m pytest tests/ -q -p no:cacheprovider -ra ;;
    bench-block) bench bench-block bench_block_sparse_matmul.py ;;
    bench-2to4) bench bench-2to4 bench_semi_structured_matmul.py ;;
    bench-attn) bench bench-attn bench_patch_drop_attention.py ;;
    bench-compaction) bench bench-compaction bench_mask_compaction.py ;;
    bench-vit) bench bench-vit bench_vit.py ;;
    # The report lands in OUT_DIR itself (bench_report.md + PNGs) so it is committed with its JSON.
    report) step report with_bench_json "$PYTHON" -m lotus_kernels bench-report --out "$out" ;;
    compare) step compare with_bench_json "$PYTHON" -m lotus_kernels bench-report --baseline-dir "$baseline_dir" --compare-each ;;
    demo) step demo "$PYTHON" -m lotus_kernels.recipe.tools.demo --json "$out/demo.json" ;;
    cifar10) step cifar10 "$PYTHON" bench/record_train.py --out "$out/train-cifar10-tiny.json" \
        --what "dense vit_tiny_cifar on CIFAR-10 (JPEG q75), one GPU" -- \
        --data cifar10 --data-path "${LOTUS_CIFAR10:-.data/cifar10-jpeg.tar.gz}" --preset tiny --profile full ;;
    *) echo "unknown step $s (steps: $ALL_STEPS)" | tee -a "$out/steps.txt"; status=1 ;;
  esac
done
echo "results in $out"
exit $status
