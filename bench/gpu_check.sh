#!/usr/bin/env bash
# The GPU machine's check (the device tool), in stages sized for its short leases: build the
# extension in place, run the GPU tests, run the benchmarks, and write logs, a table and the JSON
# under $OUT (the table is printed last).
#   bash bench/gpu_check.sh tests    build; tests/test_gpu.py on 8 workers        (about 4 min)
#   bash bench/gpu_check.sh goals    build; the benchmarks that decide the open issues' GPU goals:
#                                    ceilings, losses, FP8 GEMM and DiT-XL, sampling, the sCM step
#                                    (about 6 min; compiles first on 8 workers, then times serially)
#   bash bench/gpu_check.sh all      tests, then goals (one call when 10 minutes allow both)
#   bash bench/gpu_check.sh bench    build; every GPU benchmark, attention and norms included (long)
# Each stage stops at its time limit (GPU_CHECK_TESTS_S, GPU_CHECK_GOALS_S, GPU_CHECK_BENCH_S
# seconds) and still writes what it has. On a warm machine the build and the compile caches of
# an earlier call are reused, so "tests" then "goals" as two calls cost little more than "all".
set -uo pipefail
stage=${1:-all}
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/local}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 FASTGEN_BENCH_DEVICES=cuda
stamp=$(date -u +%Y-%m-%d)
gpu=$(python3 -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))")
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

echo "== build (in place)"
python3 setup.py build_ext --inplace -j 16 > "$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
# Run from the working tree without installing (the GPU machine has no network for pip): the
# installed layout maps triton_ops/ to fastgen_kernels.triton_ops (pyproject.toml); a link does here.
python3 -c "import fastgen_kernels.triton_ops" 2>/dev/null || ln -sfn ../triton_ops fastgen_kernels/triton_ops
python3 -c "import fastgen_kernels.triton_ops.fp8_linear" || exit 1
tail -3 "$OUT/build.log"
python3 -m fastgen_kernels info | tee "$OUT/info.txt"

tests_rc=0
if [ "$stage" = tests ] || [ "$stage" = all ]; then
  echo "== GPU tests"
  timeout --signal=INT "${GPU_CHECK_TESTS_S:-300}" python3 -m pytest tests/test_gpu.py -q -n 8 --maxfail=20 \
    -p no:cacheprovider --durations=10 2>&1 | tee "$OUT/tests.log" | tail -40
  tests_rc=${PIPESTATUS[0]}
fi

# $1: name of the run; $2: its time limit (s); the rest: benchmark files and pytest options
benchmarks() {
  local name=$1 limit=$2
  shift 2
  local json="$OUT/${stamp}_${gpu}_${name}.json"
  echo "== GPU benchmarks: $name (compile on 8 workers, then time serially)"
  # the first pass fills Triton's and Inductor's on-disk caches: torch.compile and autotuning
  # compile in parallel; the second, timed, pass finds them compiled
  timeout --signal=INT "$((limit / 3))" python3 -m pytest "$@" -q -n 8 -p no:cacheprovider --benchmark-disable \
    > "$OUT/${name}_warm.log" 2>&1
  tail -2 "$OUT/${name}_warm.log"
  timeout --signal=INT "$((limit - limit / 3))" python3 -m pytest "$@" -q -p no:cacheprovider \
    --benchmark-json="$json" > "$OUT/${name}.log" 2>&1
  local rc=$?
  tail -5 "$OUT/${name}.log"
  [ -s "$json" ] && python3 bench/summarize.py "$json" > "$OUT/${name}_table.txt"
  return $rc
}

bench_rc=0
if [ "$stage" = goals ] || [ "$stage" = all ]; then
  benchmarks goals "${GPU_CHECK_GOALS_S:-420}" bench/bench_copy.py bench/bench_matmul.py bench/bench_losses.py \
    bench/bench_fp8_linear.py bench/bench_sampling.py bench/bench_distill.py
  bench_rc=$?
  cat "$OUT/goals_table.txt" 2>/dev/null
elif [ "$stage" = bench ]; then
  benchmarks all "${GPU_CHECK_BENCH_S:-3000}" bench/
  bench_rc=$?
  cat "$OUT/all_table.txt" 2>/dev/null
fi
echo "tests rc=$tests_rc bench rc=$bench_rc"
exit $(( tests_rc || bench_rc ))
