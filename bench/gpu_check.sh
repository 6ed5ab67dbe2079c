#!/usr/bin/env bash
# One call on a GPU machine (the device tool): build the extension in place, run the GPU tests,
# run the GPU benchmarks, and write a table and the full JSON under $OUT (the table is printed last).
#   bash bench/gpu_check.sh          build, tests and benchmarks
#   bash bench/gpu_check.sh tests    build and tests only   } when one call's time limit cannot
#   bash bench/gpu_check.sh bench    build and benchmarks   } hold both (Triton compiles on first use)
set -uo pipefail
stage=${1:-all}
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/local}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
stamp=$(date -u +%Y-%m-%d)
gpu=$(python3 -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))")

echo "== build (in place)"
python3 setup.py build_ext --inplace -j 16 > "$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
tail -3 "$OUT/build.log"
python3 -m fastgen_kernels info | tee "$OUT/info.txt"

tests_rc=0
if [ "$stage" != bench ]; then
  echo "== GPU tests"
  python3 -m pytest tests/test_gpu.py -q --maxfail=10 -p no:cacheprovider --durations=10 2>&1 \
    | tee "$OUT/tests.log" | tail -40
  tests_rc=${PIPESTATUS[0]}
fi

bench_rc=0
if [ "$stage" != tests ]; then
  echo "== GPU benchmarks"
  json="$OUT/${stamp}_${gpu}.json"
  python3 -m pytest bench/bench_copy.py bench/bench_matmul.py bench/bench_modulated_norm.py \
    bench/bench_qk_norm_rope.py bench/bench_attention.py bench/bench_losses.py bench/bench_fp8_linear.py bench/bench_sampling.py bench/bench_distill.py \
    -q -p no:cacheprovider \
    -k "cuda" --benchmark-json="$json" > "$OUT/bench.log" 2>&1
  bench_rc=$?
  tail -5 "$OUT/bench.log"
  python3 bench/summarize.py "$json" | tee "$OUT/table.txt"
fi
echo "tests rc=$tests_rc bench rc=$bench_rc"
exit $(( tests_rc || bench_rc ))
