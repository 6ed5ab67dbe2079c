#!/usr/bin/env bash
# One call on a GPU machine (the device tool): build the extension in place, run the GPU tests,
# run the GPU benchmarks, and write a table and the full JSON under $OUT (the table is printed last).
#   bash bench/gpu_check.sh
set -uo pipefail
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

echo "== GPU tests"
python3 -m pytest tests/test_gpu.py -q -x -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" | tail -25
tests_rc=${PIPESTATUS[0]}

echo "== GPU benchmarks"
json="$OUT/${stamp}_${gpu}.json"
python3 -m pytest bench/bench_copy.py bench/bench_matmul.py bench/bench_modulated_norm.py bench/bench_qk_norm_rope.py bench/bench_attention.py \
  -q -p no:cacheprovider \
  -k "cuda" --benchmark-json="$json" > "$OUT/bench.log" 2>&1
bench_rc=$?
tail -5 "$OUT/bench.log"
python3 bench/summarize.py "$json" | tee "$OUT/table.txt"
echo "tests rc=$tests_rc bench rc=$bench_rc"
exit $(( tests_rc || bench_rc ))
