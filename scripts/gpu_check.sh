#!/usr/bin/env bash
# The GPU check: on a machine with an NVIDIA GPU and no network (python3 with a CUDA build of torch,
# nvcc, cmake, ninja, pytest already installed) build moe_swap for this GPU, run the test suite's CUDA
# cases, then the benchmarks, and write logs and JSON under $OUT
# (default ./gpu_results). Budget: under 8 minutes. The last thing printed is a summary table.
#
#   bash scripts/gpu_check.sh            # OUT=./gpu_results
#   OUT=/tmp/r bash scripts/gpu_check.sh
#   TESTS=0 BENCHES="expert ops" bash scripts/gpu_check.sh   # a second run: skip the tests, pick benchmarks
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-./gpu_results}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
export CUDA_HOME="${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)")")}"
# The GPU image's default CXX (/opt/gcc, GCC 13) builds a module that segfaults when a TORCH_CHECK
# message formats an integer (its libstdc++ locale code clashes with torch's); the system g++ works.
if [ -x /usr/bin/g++ ]; then export CXX=/usr/bin/g++ CUDAHOSTCXX=/usr/bin/g++; fi
summary="$OUT/summary.txt"
: >"$summary"
status() { printf '%-28s %s\n' "$1" "$2" | tee -a "$summary"; }
start=$(date +%s)
deadline=$((start + 450))  # 7.5 minutes: every step below gets at most what is left of it
budget() {  # budget WANTED -> seconds this step may take (at least 1: `timeout 0` would mean no limit)
  local left=$((deadline - $(date +%s) - 10))
  if [ "$left" -lt "$1" ]; then echo $((left > 1 ? left : 1)); else echo "$1"; fi
}

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
  git rev-parse HEAD 2>/dev/null || true
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# 1. Build in place for this GPU's architecture (CMakeLists picks the local GPU's arch).
t0=$(date +%s)
if timeout 300 "$PY" setup.py build_ext --inplace >"$OUT/build.log" 2>&1; then
  status build "ok ($(( $(date +%s) - t0 )) s)"
else
  status build "FAILED (see build.log)"
  tail -40 "$OUT/build.log"
  exit 1
fi
"$PY" -c "import torch, moe_swap; ok = torch._C._dispatch_has_kernel_for_dispatch_key('moe_swap::fused_moe', 'CUDA'); print('CUDA kernels registered:', ok); raise SystemExit(0 if ok else 1)" \
  && status "cuda kernels" registered || status "cuda kernels" MISSING

# 2. Tests: only the CUDA cases (the CPU ones pass on CPU machines; here they would only spend device
# time). First with the debug switch on (synchronise and check after every launch and copy, so a fault
# names its kernel or copy), then without it, as users run them: debug's synchronisations hide races
# between the copy stream, side streams and the compute stream. A test running over 60 s dumps every
# thread's stack into the log (a hang shows where it waits) and goes on.
if [ "${TESTS:-1}" != 0 ]; then
  pytest_args=(tests -q -rfEs -k cuda -p no:cacheprovider -o faulthandler_timeout=60 --durations=8)
  t0=$(date +%s)
  MOE_SWAP_DEBUG=1 timeout "$(budget 150)" "$PY" -m pytest "${pytest_args[@]}" >"$OUT/tests_debug.log" 2>&1
  rc=$?
  status "tests (debug, cuda cases)" "$(tail -1 "$OUT/tests_debug.log") rc=$rc ($(( $(date +%s) - t0 )) s)"
  t0=$(date +%s)
  timeout "$(budget 120)" "$PY" -m pytest "${pytest_args[@]}" >"$OUT/tests.log" 2>&1
  rc=$?
  status "tests (cuda cases)" "$(tail -1 "$OUT/tests.log") rc=$rc ($(( $(date +%s) - t0 )) s)"
else
  status tests "skipped (TESTS=0)"
fi

# 3. Benchmarks, side by side, each writing JSON.
run_bench() {  # name, seconds, command...
  local name=$1 secs
  secs=$(budget "$2")
  shift 2
  if [ "$secs" -lt 15 ]; then
    status "$name" "skipped (the 8-minute budget is spent)"
    return
  fi
  t0=$(date +%s)
  if timeout "$secs" "$@" >>"$OUT/bench.log" 2>&1; then
    status "$name" "ok ($(( $(date +%s) - t0 )) s)"
  else
    status "$name" "FAILED or timed out rc=$? (see bench.log)"
  fi
}
: >"$OUT/bench.log"
# BENCHES picks and orders them (default: all, the expert-streaming one first), e.g. BENCHES="ops stream".
for bench in ${BENCHES:-expert ops stream e2e}; do
  case "$bench" in
    # shapes scaled by 4 (Mixtral-shaped experts of 22 MiB): every run builds a fresh pinned host store
    expert) run_bench bench_expert 120 "$PY" benchmarks/bench_expert.py --scale 4 --repeats 1 --steps 16 \
              --batch-sizes 1,8 --traces skewed,recorded,uniform --prefill-rounds 3 --out "$OUT/bench_expert.json" ;;
    ops) run_bench bench_ops 75 "$PY" benchmarks/bench_ops.py --out "$OUT/bench_ops.json" ;;
    stream) run_bench bench_stream 90 "$PY" benchmarks/bench_stream.py --out "$OUT/bench_stream.json" ;;
    e2e) run_bench "moe_swap bench" 75 "$PY" -m moe_swap bench --out "$OUT/bench_e2e.json" ;;
    *) status "$bench" "unknown benchmark (BENCHES takes expert, ops, stream, e2e)" ;;
  esac
done

echo
echo "==== summary ($(( $(date +%s) - start )) s) ===="
cat "$summary"
tail -n 80 "$OUT/bench.log"
# the issue's targets as bench_expert measured them here (its JSON has every row)
if [ -f "$OUT/bench_expert_targets.txt" ]; then echo "==== expert-streaming targets ===="; cat "$OUT/bench_expert_targets.txt"; fi
