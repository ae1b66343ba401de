#!/usr/bin/env bash
# Every GPU check in one pass, sized for a short lease on one GPU (run from the repo root):
#
#   OUT=out/gpu bash benchmarks/gpu_checks.sh [stage ...]
#
# Stages (default: all, in this order; each has its own time limit, so a slow or failing stage
# cannot eat the others' time): env, build (pip install -e with the CUDA extension, sm_90),
# tests (every test that runs on the GPU: the cuda-marked ones, and the Triton backend on CUDA
# tensors), memcheck (compute-sanitizer over benchmarks/sanitize_ops.py), overhead
# (rnb bench overhead --preset gpu, shortened), kernels (bench_kernels at the GPT-2 head),
# racecheck. $OUT gets log.txt (every stage's output), tests.txt + junit.xml, and the benchmark
# CSVs; the exit status is the number of failed stages.
set -uo pipefail
OUT="${OUT:-out/gpu}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PY:-python3}"
LOG="$OUT/log.txt"
STAGES=("$@")
[ ${#STAGES[@]} -eq 0 ] && STAGES=(env build tests memcheck overhead kernels racecheck)
T_TESTS="${T_TESTS:-400}" T_MEMCHECK="${T_MEMCHECK:-75}" T_OVERHEAD="${T_OVERHEAD:-150}"
T_KERNELS="${T_KERNELS:-90}" T_RACECHECK="${T_RACECHECK:-60}"
# Short files first: the op files autotune Triton for every new shape (hypothesis draws many),
# which took 230 s for 41% of them on an H200 with 12 workers; xdist hands tests out in order.
TESTS="${TESTS:-tests/test_gpu_sync.py tests/test_op_dispatch.py tests/test_grouping.py
  tests/test_sharded_ops.py tests/test_op_gram.py tests/test_projected.py tests/test_exact_rows.py
  tests/test_hot_path.py tests/test_tracking.py tests/test_reseed.py tests/test_fused_ce.py
  tests/test_compile.py tests/test_op_domain_sketch.py tests/test_op_segmented_wgrad.py}"
failed=0

say() { echo "$*" | tee -a "$LOG"; }
run_stage() {  # name, seconds, command...
  local name=$1 limit=$2 t0=$SECONDS rc
  shift 2
  say "== $name (limit ${limit}s, $(date -u +%T))"
  timeout --kill-after=10 "$limit" "$@" >"$OUT/stage.txt" 2>&1
  rc=$?
  cat "$OUT/stage.txt" >>"$LOG"
  [ "$name" = tests ] && mv "$OUT/stage.txt" "$OUT/tests.txt"
  rm -f "$OUT/stage.txt"
  say "== $name: exit $rc after $((SECONDS - t0))s"
  [ "$rc" -ne 0 ] && failed=$((failed + 1))
  return 0
}

for stage in "${STAGES[@]}"; do
  case "$stage" in
    env)
      say "== env"
      nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm \
        --format=csv 2>&1 | tee -a "$LOG"
      "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', \
torch.__version__, 'cuda', torch.version.cuda, '| triton', triton.__version__)" 2>&1 | tee -a "$LOG"
      nvcc --version 2>&1 | tail -1 | tee -a "$LOG"
      command -v compute-sanitizer >/dev/null || say "compute-sanitizer not on PATH"
      say "git ${RNB_GIT_SHA:-unknown}; nproc $(nproc)"
      ;;
    build)
      run_stage build 240 env RNB_CUDA_ARCHS="${RNB_CUDA_ARCHS:-90}" MAX_JOBS="$(nproc)" \
        "$PY" -m pip install --no-build-isolation --no-deps --no-index -e .
      "$PY" -c "import rnb_kernels as r; [print(f'{k:7s}', v.available, v.reason) for k, v in \
r.backends().items()]" 2>&1 | tee -a "$LOG"
      ;;
    tests)
      # shellcheck disable=SC2086
      run_stage tests "$T_TESTS" "$PY" -m pytest -p no:cacheprovider -n "${WORKERS:-12}" \
        -v -rfE --tb=short --timeout=150 --junitxml="$OUT/junit.xml" $TESTS
      grep -E "passed|failed" "$OUT/tests.txt" | tail -1 | tee -a "$LOG"
      grep -E "^(FAILED|ERROR) " "$OUT/tests.txt" | head -60
      ;;
    memcheck)
      run_stage memcheck "$T_MEMCHECK" compute-sanitizer --tool memcheck --error-exitcode 9 \
        --print-limit 20 "$PY" benchmarks/sanitize_ops.py --dtypes fp32 bf16
      ;;
    racecheck)
      run_stage racecheck "$T_RACECHECK" compute-sanitizer --tool racecheck --error-exitcode 9 \
        --print-limit 20 "$PY" benchmarks/sanitize_ops.py --backends cuda --dtypes bf16
      ;;
    overhead)
      run_stage overhead "$T_OVERHEAD" "$PY" -m rnb_kernels.cli bench overhead \
        --preset "${PRESET:-gpu}" \
        --rounds "${ROUNDS:-6}" --warmup 1 --csv "$OUT/overhead_gpu.csv"
      ;;
    kernels)
      run_stage kernels "$T_KERNELS" "$PY" benchmarks/bench_kernels.py --layers gpt2-lm_head \
        --tokens 8192 --m 1 8 64 --dtypes bf16 --providers cuda triton cublas \
        --csv "$OUT/kernels_gpu.csv"
      ;;
    *) say "unknown stage $stage"; failed=$((failed + 1)) ;;
  esac
done
say "== done: $failed failed stage(s)"
exit "$failed"
