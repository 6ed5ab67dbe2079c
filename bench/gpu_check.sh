#!/usr/bin/env bash
# The GPU machine's check (the device tool), sized for its short leases: build the extension in
# place, run the GPU tests, run the benchmarks, and leave logs, tables and the JSON in
# $OUT/gpu_check.tar.gz (the tool brings back at most 8 files); the table is printed last.
# A lease is 15 minutes of device time, the machine's start included: one call of `all` (the
# default, inside GPU_CHECK_DEADLINE_S) is what a session can count on; `rest` goes on only where
# time is left.
#   bash bench/gpu_check.sh [all]   the goal benchmarks with autotuned kernels or torch.compile peers
#                                   compile on 8 workers while the extension builds; the GPU tests
#                                   (tests/test_gpu.py) run on 8 more for at most GPU_CHECK_TESTS_S
#                                   (150 s); then the goal benchmarks are timed one file after another
#   bash bench/gpu_check.sh tests   build; the GPU tests
#   bash bench/gpu_check.sh goals   build; compile, then time the goal benchmarks
#   bash bench/gpu_check.sh rest    on the same warm machine after a cut-off run: the goal files that
#                                   did not finish, then the other benchmarks (attention, norms, ...)
#   bash bench/gpu_check.sh bench   build; every GPU benchmark, attention and norms included (long)
# The goal benchmarks, in order (GPU_CHECK_GOALS overrides the list): the ceilings, then the goals
# still open: the sCM step (issue 7), the losses (4), FP8 GEMM and DiT-XL (5); then
# bench/profile_gpu.py (host against kernel time of the sCM step, a DiT-XL evaluation, a loss),
# bench/loss_host_cost.py (each loss's fixed per-call cost against eager's) and
# bench/host_cost.py (the fused ops', the sCM step's and sample's); sampling (6, met on the H200
# on 2026-11-27) last.
# Each file writes its own JSON, so a cut at the deadline loses only that file's unfinished
# benchmarks. Everything stops by
# GPU_CHECK_DEADLINE_S seconds after the start (default 550: inside the tool's 10-minute call);
# what did not run is listed, and kept in bench/results/local/not_run for "rest". A warm machine
# keeps the build and the Triton and Inductor caches of an earlier call.
set -uo pipefail
stage=${1:-all}
cd "$(dirname "$0")/.."
start=$SECONDS
deadline=${GPU_CHECK_DEADLINE_S:-550}
OUT=${OUT:-bench/results/local}
LOGS=$(mktemp -d)
STATE=bench/results/local  # outlives the call on a warm machine (ignored by git, so never copied over)
mkdir -p "$OUT" "$STATE"
export PYTHONUNBUFFERED=1 FASTGEN_BENCH_DEVICES=${FASTGEN_BENCH_DEVICES:-cuda} MAX_JOBS=16
pack() { tar -czf "$OUT/gpu_check.tar.gz" -C "$LOGS" .; }
trap pack EXIT
left() { echo $((deadline - (SECONDS - start))); }
# limited SECONDS CMD...: runs CMD for at most SECONDS, and never past the deadline (SIGINT first,
# so pytest still writes its JSON and summary)
limited() {
  local limit=$1 remaining
  shift
  remaining=$(( $(left) - 15 ))
  (( remaining < limit )) && limit=$remaining
  (( limit > 0 )) || { echo "skipped (deadline): $*"; return 124; }
  timeout -k 10 --signal=INT "$limit" "$@"
}

stamp=$(date -u +%Y-%m-%d)
gpu=$(python3 -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_') if torch.cuda.is_available() else 'cpu')")
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

# Run from the working tree without installing (the GPU machine has no network for pip): the
# installed layout maps triton_ops/ to fastgen_kernels.triton_ops (pyproject.toml); a link does here.
python3 -c "import fastgen_kernels.triton_ops" 2>/dev/null || ln -sfn ../triton_ops fastgen_kernels/triton_ops
build() {
  echo "== build (in place) at $((SECONDS - start)) s"
  python3 setup.py build_ext --inplace > "$LOGS/build.log" 2>&1 || { tail -50 "$LOGS/build.log"; exit 1; }
  python3 -c "import fastgen_kernels.triton_ops.fp8_linear" || exit 1
  python3 -m fastgen_kernels info > "$LOGS/info.txt"
  grep -E "cuda|triton|extension" "$LOGS/info.txt" | head -5
}

goals=${GPU_CHECK_GOALS:-bench/bench_copy.py bench/bench_matmul.py bench/bench_distill.py bench/bench_losses.py bench/bench_fp8_linear.py bench/bench_sampling.py}
case $stage in
  goals | all) timed=$goals ;;
  rest)  # what was cut, then the other benchmarks that have not run to the end on this machine
    timed=$(cat "$STATE/not_run" <(for f in bench/bench_*.py; do [[ " $goals " == *" $f "* ]] || echo "$f"; done) \
            2>/dev/null | awk '!seen[$0]++' | grep -vxF -f <(cat "$STATE/done" 2>/dev/null; echo :)) ;;
  bench) timed=$(ls bench/bench_*.py) ;;
  *) timed= ;;
esac
# The timed files with autotuned kernels or torch.compile peers run once first on 8 workers, which
# fills Triton's and Inductor's on-disk caches for the serial, timed pass. It starts while the
# extension builds: a fresh machine's pass runs without the extension (it needs only Triton and
# Inductor), and one whose extension is rebuilt under it may crash, which costs only its caching.
warm=$(for f in $timed; do grep -lE "torch\.compile|autotune|fp8_linear" "$f"; done | tr '\n' ' ')
compile_first() {
  [ -n "${warm// /}" ] || return 0
  # shellcheck disable=SC2086
  limited 240 python3 -m pytest $warm -q -n 8 -p no:cacheprovider --benchmark-disable > "$LOGS/warm.log" 2>&1
  echo "== compiled ($(tail -1 "$LOGS/warm.log")) at $((SECONDS - start)) s"
}
tests() {
  echo "== GPU tests at $((SECONDS - start)) s"
  limited "$1" python3 -m pytest tests/test_gpu.py -q -n 8 --maxfail=30 -p no:cacheprovider --durations=15 \
    > "$LOGS/tests.log" 2>&1
  local rc=$?
  grep -E "^(FAILED|ERROR)|passed|failed" "$LOGS/tests.log" | tail -40
  echo "== tests done at $((SECONDS - start)) s"
  return $rc
}

tests_rc=0
compile_first & warm_pid=$!
build
case $stage in
  all) tests "${GPU_CHECK_TESTS_S:-150}"; tests_rc=$? ;;
  tests) tests "${GPU_CHECK_TESTS_S:-300}"; tests_rc=$? ;;
esac
wait $warm_pid

# where the time goes (host or kernels) in the goals' workloads: after the open goals' files,
# before sampling's (met), so that a cut leaves sampling
profiled=0
profile() {
  (( profiled )) || [ "$stage" = tests ] && return 0
  profiled=1
  PYTHONPATH=. limited 150 python3 bench/profile_gpu.py cuda > "$LOGS/profile.txt" 2>&1
  grep -E "wall .* launches" "$LOGS/profile.txt"
  PYTHONPATH=. limited 60 python3 bench/loss_host_cost.py cuda > "$LOGS/loss_host_cost.txt" 2>&1
  cat "$LOGS/loss_host_cost.txt"
  PYTHONPATH=. limited 90 python3 bench/host_cost.py cuda > "$LOGS/host_cost.txt" 2>&1
  cat "$LOGS/host_cost.txt"
  pack
}

bench_rc=0 jsons=() not_run=()
for file in $timed; do
  name=$(basename "$file" .py)
  json="$LOGS/${stamp}_${gpu}_${name}.json"
  echo "== $file at $((SECONDS - start)) s"
  limited 600 python3 -m pytest "$file" -q -p no:cacheprovider --benchmark-json="$json" > "$LOGS/$name.log" 2>&1
  rc=$?
  tail -2 "$LOGS/$name.log"
  [ -s "$json" ] && jsons+=("$json")
  # the ceilings outlive the call, for the table of a later `rest` call (which does not rerun them)
  [[ -s "$json" && ( $name == bench_copy || $name == bench_matmul ) ]] && cp "$json" "$STATE/ceiling_$name.json"
  if (( rc == 124 || rc == 130 || rc == 137 )); then not_run+=("$file"); else echo "$file" >> "$STATE/done"; fi
  (( rc && rc != 124 && rc != 130 && rc != 137 )) && bench_rc=$rc
  pack
  [ "$file" = bench/bench_fp8_linear.py ] && profile
done
profile
if (( ${#jsons[@]} )); then
  # this machine's ceilings first: this call's own, where it measured them, come later and count
  python3 bench/summarize.py $(ls "$STATE"/ceiling_*.json 2>/dev/null) "${jsons[@]}" > "$LOGS/table.txt"
  cat "$LOGS/table.txt"
fi
[ -n "$timed" ] && printf '%s\n' "${not_run[@]}" > "$STATE/not_run"
(( ${#not_run[@]} )) && echo "cut at the deadline (bash bench/gpu_check.sh rest goes on): ${not_run[*]}"
echo "tests rc=$tests_rc bench rc=$bench_rc, $((SECONDS - start)) s"
exit $(( tests_rc || bench_rc ))
