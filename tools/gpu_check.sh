#!/usr/bin/env bash
# On a GPU machine: configures against the installed torch, builds with
# ninja, runs every test (GPU-only ones included; the multi-rank ones with
# one rank per GPU: ctest's multidevice_np<N> and test_cuda_moe through
# tools/run_cuda_moe_tests.sh; pytest over python_tests/ after installing
# the Python package), the examples and, with --bench, the
# benchmarks (bench_moe_layer's stage table also as layer.csv and its plot
# in the log folder); prints a short summary last.
#
#   tools/gpu_check.sh [--bench] [extra ctest arguments]
#
# Logs go to $HOSTFUSE_LOG_DIR (default build/logs; $OUT/logs when $OUT is
# set, as on the device machines). HOSTFUSE_CUDA_MOE_TIMEOUT (seconds,
# default 900, in [0.001, 86400]) bounds the test_cuda_moe run;
# HOSTFUSE_SKIP_PYTHON=1 leaves out the Python package and pytest.
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
hostfuse_help_if_asked "$@"

bench=0
if [ "${1:-}" = "--bench" ]; then
  bench=1
  shift
fi
# Seconds the cuda backend's multi-process tests may take.
cuda_moe_timeout=$(hostfuse_timeout HOSTFUSE_CUDA_MOE_TIMEOUT 900) || exit 2
log_dir="${HOSTFUSE_LOG_DIR:-${OUT:+$OUT/logs}}"
log_dir="${log_dir:-$HOSTFUSE_BUILD_DIR/logs}"
mkdir -p "$log_dir"
summary=()
failed=0

hostfuse_build || exit 1
if ! hostfuse_has_gpu; then
  hostfuse_log "warning: torch sees no GPU here; GPU tests will skip"
fi
gpus="$(hostfuse_gpu_count)"
summary+=("gpus: $gpus ($(nvidia-smi -L 2>/dev/null | head -1 | sed 's/ (UUID.*//'))")
summary+=("torch: $(hostfuse_torch_version_of "$HOSTFUSE_PYTHON") from $HOSTFUSE_PYTHON")

hostfuse_log "running ctest (log: $log_dir/ctest.log)"
start=$SECONDS
# The JUnit file keeps the end of the output of passing tests too, so the
# summary can show what ran inside them (tools/test_totals.py, as in
# tools/test.sh).
(cd "$HOSTFUSE_BUILD_DIR" &&
  ctest --output-on-failure --timeout 600 -j "$(nproc)" \
    --test-output-size-passed 1000000 --test-output-truncation middle \
    --output-junit "$log_dir/ctest.xml" "$@") >"$log_dir/ctest.log" 2>&1
ctest_status=$?
tail -n 40 "$log_dir/ctest.log"
summary+=("ctest: $(grep -E 'tests passed|tests failed' "$log_dir/ctest.log" | tail -1) ($((SECONDS - start)) s)")
skipped="$(grep -c -- '\*\*\*Skipped' "$log_dir/ctest.log")"
summary+=("ctest skipped: $skipped ($(grep -- '\*\*\*Skipped' "$log_dir/ctest.log" | sed 's/.*Test *#[0-9]*: //; s/ \..*//' | tr '\n' ' '))")
[ "$ctest_status" -eq 0 ] || failed=1

# The Python package and python_tests/ (with a GPU, their GPU cases too:
# hostfuse.moe on CUDA tensors, CUDA graph capture, the examples under
# torchrun), as tools/test.sh runs them; HOSTFUSE_SKIP_PYTHON=1 leaves them
# out.
pytest_args=()
if [ "${HOSTFUSE_SKIP_PYTHON:-0}" != 1 ]; then
  hostfuse_log "installing the Python package, then pytest (log: $log_dir/pytest.log)"
  # Its own results folder: tools/test.sh clears the JUnit files there.
  pytest_xml="$log_dir/python/pytest.xml"
  HOSTFUSE_SKIP_CTEST=1 HOSTFUSE_TEST_RESULTS="$log_dir/python" \
    HOSTFUSE_PYTHON="$HOSTFUSE_PYTHON" "$HOSTFUSE_ROOT/tools/test.sh" \
    >"$log_dir/pytest.log" 2>&1
  pytest_status=$?
  tail -n 5 "$log_dir/pytest.log"
  if [ -f "$pytest_xml" ]; then
    pytest_args=(--pytest "$pytest_xml" --pytest-status "$pytest_status")
  else
    summary+=("pytest: not run, the Python package did not install (exit $pytest_status; see pytest.log)")
  fi
  [ "$pytest_status" -eq 0 ] || failed=1
fi
# Every rank's gtest counts of each multi-rank test, then the totals.
while IFS= read -r line; do
  summary+=("$line")
done < <("$HOSTFUSE_PYTHON" "$HOSTFUSE_ROOT/tools/test_totals.py" --per-test \
  --ctest "$log_dir/ctest.xml" --ctest-status "$ctest_status" "${pytest_args[@]}")

# Runs a multi-rank test command (after a label, its log and its rank
# count) under the cuda MoE time limit, and adds its line to the summary:
# how many ranks had failed tests (gtest ends a rank's output with "N
# FAILED TEST(S)" when any failed) and rank 0's count of passed tests.
run_ranks() {
  local label=$1 log=$2 ranks=$3
  shift 3
  hostfuse_log "running $label (log: $log)"
  local begin=$SECONDS
  timeout --kill-after=15 "$cuda_moe_timeout" "$@" >"$log" 2>&1
  local status=$?
  tail -n 5 "$log"
  local failed_ranks passed
  failed_ranks="$(grep -cE 'FAILED TESTS?$' "$log")"
  passed="$(grep -oE '\[  PASSED  \] [0-9]+ tests?' "$log" | head -1)"
  summary+=("$label: $failed_ranks of $ranks ranks with failed tests; rank 0 $passed (exit $status, $((SECONDS - begin)) s)")
  [ "$status" -eq 0 ] || failed=1
}

# The cuda MoE backend's own multi-process tests, one rank per GPU (ctest
# runs test_cuda_moe as a single rank only).
if [ "$gpus" -gt 0 ]; then
  hostfuse_log "running test_cuda_moe on $gpus ranks (log: $log_dir/test_cuda_moe.log)"
  start=$SECONDS
  HOSTFUSE_NO_BUILD=1 HOSTFUSE_PYTHON="$HOSTFUSE_PYTHON" \
    timeout --kill-after=15 "$cuda_moe_timeout" \
    "$HOSTFUSE_ROOT/tools/run_cuda_moe_tests.sh" "$gpus" \
    >"$log_dir/test_cuda_moe.log" 2>&1
  status=$?
  tail -n 10 "$log_dir/test_cuda_moe.log"
  passed_ranks="$(grep -cE '^\[  PASSED  \] [0-9]+ test' "$log_dir/test_cuda_moe.log")"
  summary+=("test_cuda_moe: $passed_ranks of $gpus ranks passed (exit $status, $((SECONDS - start)) s)")
  [ "$status" -eq 0 ] || failed=1
  # More ranks than GPUs: the same tests with ranks sharing GPUs (the GPU
  # time-slices the processes), which proves behaviour across ranks (the
  # protocol, errors, timeouts), never speed.
  for ranks in 2 3; do
    [ "$ranks" -gt "$gpus" ] || continue
    run_ranks "test_cuda_moe, $ranks ranks sharing $gpus GPU(s)" \
      "$log_dir/test_cuda_moe_shared$ranks.log" "$ranks" \
      env HOSTFUSE_SHARE_GPUS=1 HOSTFUSE_NO_BUILD=1 \
      HOSTFUSE_PYTHON="$HOSTFUSE_PYTHON" \
      "$HOSTFUSE_ROOT/tools/run_cuda_moe_tests.sh" "$ranks"
    # The cuda backend through the evaluator (its errors, their
    # publication, new evaluators after them) on the shared GPUs; NCCL
    # cannot run there, so the tests that compare with the collective
    # backend on GPUs need one GPU per rank.
    run_ranks "CudaBackendErrors.*, $ranks ranks sharing $gpus GPU(s)" \
      "$log_dir/cuda_backend_errors_shared$ranks.log" "$ranks" \
      env HOSTFUSE_SHARE_GPUS=1 "$HOSTFUSE_ROOT/tools/launch.sh" "$ranks" \
      "$HOSTFUSE_BUILD_DIR/tests/cpp/test_multidevice" \
      --gtest_filter='CudaBackendErrors.*'
  done
  # Every test of test_cuda_moe once more with the staged push in every
  # workspace (HOSTFUSE_MOE_STAGED_PUSH=1), one rank per GPU, or 2 ranks
  # sharing one GPU.
  ranks=$(( gpus > 1 ? gpus : 2 ))
  run_ranks "test_cuda_moe, staged push, $ranks ranks on $gpus GPU(s)" \
    "$log_dir/test_cuda_moe_staged$ranks.log" "$ranks" \
    env HOSTFUSE_MOE_STAGED_PUSH=1 \
    HOSTFUSE_SHARE_GPUS=$(( gpus < ranks ? 1 : 0 )) HOSTFUSE_NO_BUILD=1 \
    HOSTFUSE_PYTHON="$HOSTFUSE_PYTHON" \
    "$HOSTFUSE_ROOT/tools/run_cuda_moe_tests.sh" "$ranks"
else
  summary+=("test_cuda_moe: not run (no GPU)")
fi

export HOSTFUSE_PYTHON
for example in "$HOSTFUSE_BUILD_DIR"/*_example; do
  [ -x "$example" ] || continue
  name="$(basename "$example")"
  hostfuse_log "running $name"
  if [[ "$name" == *moe* ]]; then
    # One rank per GPU.
    "$HOSTFUSE_ROOT/tools/launch.sh" "$(( gpus > 0 ? gpus : 2 ))" "$example" \
      >"$log_dir/$name.log" 2>&1
  else
    "$example" >"$log_dir/$name.log" 2>&1
  fi
  status=$?
  tail -n 5 "$log_dir/$name.log"
  summary+=("$name: $(grep -E 'check' "$log_dir/$name.log" | tail -1) (exit $status)")
  [ "$status" -eq 0 ] || failed=1
done

if [ "$bench" = 1 ]; then
  for benchmark in "$HOSTFUSE_BUILD_DIR"/bench_*; do
    [ -x "$benchmark" ] || continue
    name="$(basename "$benchmark")"
    hostfuse_log "running $name"
    if [ "$name" = bench_moe_layer ]; then
      # Its stage table as CSV, and plotted (tools/plot_layer.py).
      rm -f "$log_dir/layer.csv"
      "$HOSTFUSE_ROOT/tools/launch.sh" "$(( gpus > 0 ? gpus : 2 ))" \
        "$benchmark" --csv "$log_dir/layer.csv" 2>&1 | tee "$log_dir/$name.log"
      if [ -s "$log_dir/layer.csv" ]; then
        "$HOSTFUSE_PYTHON" "$HOSTFUSE_ROOT/tools/plot_layer.py" \
          "$log_dir/layer.csv" --out "$log_dir" ||
          hostfuse_log "warning: tools/plot_layer.py failed"
      fi
    elif [[ "$name" == *moe* ]]; then
      # Multi-rank: one rank per GPU.
      "$HOSTFUSE_ROOT/tools/launch.sh" "$(( gpus > 0 ? gpus : 2 ))" \
        "$benchmark" 2>&1 | tee "$log_dir/$name.log"
    else
      "$benchmark" 2>&1 | tee "$log_dir/$name.log"
    fi
    summary+=("$name: exit ${PIPESTATUS[0]} (table in $name.log)")
  done
fi

echo
echo "==================== hostfuse gpu_check summary ===================="
printf '%s\n' "${summary[@]}"
echo "result: $([ "$failed" = 0 ] && echo PASS || echo FAIL)"
exit "$failed"
