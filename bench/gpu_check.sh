#!/usr/bin/env bash
# The GPU machine's check (the device tool), in stages sized for its short leases: build the
# extension in place, run the GPU tests, run the benchmarks, and write logs, a table and the JSON
# under $OUT (the table is printed last).
#   bash bench/gpu_check.sh tests    build; tests/test_gpu.py on 8 workers (stops at 4 min)
#   bash bench/gpu_check.sh goals    build; the benchmarks that decide the open issues' GPU goals:
#                                    ceilings, sampling, the sCM step, FP8 GEMM and DiT-XL, losses
#                                    (stops at 7.5 min; compiles first on 8 workers, then times serially)
#   bash bench/gpu_check.sh [all]    tests, then goals: more than one 10-minute device call holds, so
#                                    there run "tests" and "goals" as two calls on the warm machine
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
  timeout -k 30 --signal=INT "${GPU_CHECK_TESTS_S:-240}" python3 -m pytest tests/test_gpu.py -q -n 8 --maxfail=20 \
    -p no:cacheprovider --durations=10 2>&1 | tee "$OUT/tests.log" | tail -40
  tests_rc=${PIPESTATUS[0]}
fi

# $1: name of the run; $2: its time limit (s); $3: the files to compile first on 8 workers (those
# with torch.compile peers and autotuned kernels): that pass fills Triton's and Inductor's on-disk
# caches, so the serial, timed pass over the rest ($4...) finds them compiled. Files run in order:
# what is cut at the limit is the end of the list.
benchmarks() {
  local name=$1 limit=$2 warm=$3
  shift 3
  local json="$OUT/${stamp}_${gpu}_${name}.json"
  echo "== GPU benchmarks: $name"
  # shellcheck disable=SC2086
  timeout -k 30 --signal=INT "$((limit / 3))" python3 -m pytest $warm -q -n 8 -p no:cacheprovider --benchmark-disable \
    > "$OUT/${name}_warm.log" 2>&1
  tail -2 "$OUT/${name}_warm.log"
  timeout -k 30 --signal=INT "$((limit - limit / 3))" python3 -m pytest "$@" -q -p no:cacheprovider \
    --benchmark-json="$json" > "$OUT/${name}.log" 2>&1
  local rc=$?
  tail -5 "$OUT/${name}.log"
  [ -s "$json" ] && python3 bench/summarize.py "$json" > "$OUT/${name}_table.txt"
  return $rc
}

bench_rc=0
if [ "$stage" = goals ] || [ "$stage" = all ]; then
  # ceilings first, then the open issues' goals: sampling (6), the sCM step (7), FP8 (5), losses (4)
  benchmarks goals "${GPU_CHECK_GOALS_S:-450}" "bench/bench_fp8_linear.py bench/bench_losses.py" \
    bench/bench_copy.py bench/bench_matmul.py bench/bench_sampling.py bench/bench_distill.py \
    bench/bench_fp8_linear.py bench/bench_losses.py
  bench_rc=$?
  cat "$OUT/goals_table.txt" 2>/dev/null
elif [ "$stage" = bench ]; then
  benchmarks all "${GPU_CHECK_BENCH_S:-3000}" "bench/" bench/
  bench_rc=$?
  cat "$OUT/all_table.txt" 2>/dev/null
fi
echo "tests rc=$tests_rc bench rc=$bench_rc"
exit $(( tests_rc || bench_rc ))
