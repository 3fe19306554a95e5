#!/usr/bin/env bash
# On a GPU machine: configures against the installed torch, builds with
# ninja, runs every test (GPU-only ones included), the examples and, with
# --bench, the benchmarks; prints a short summary last.
#
#   tools/gpu_check.sh [--bench] [extra ctest arguments]
#
# Logs go to $HOSTFUSE_LOG_DIR (default build/logs; $OUT/logs when $OUT is
# set, as on the device machines).
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"

bench=0
if [ "${1:-}" = "--bench" ]; then
  bench=1
  shift
fi
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
(cd "$HOSTFUSE_BUILD_DIR" &&
  ctest --output-on-failure --timeout 600 -j "$(nproc)" "$@") \
  >"$log_dir/ctest.log" 2>&1
ctest_status=$?
tail -n 40 "$log_dir/ctest.log"
summary+=("ctest: $(grep -E 'tests passed|tests failed' "$log_dir/ctest.log" | tail -1) ($((SECONDS - start)) s)")
skipped="$(grep -c -- '\*\*\*Skipped' "$log_dir/ctest.log")"
summary+=("ctest skipped: $skipped")
[ "$ctest_status" -eq 0 ] || failed=1

export HOSTFUSE_PYTHON
for example in "$HOSTFUSE_BUILD_DIR"/*_example; do
  [ -x "$example" ] || continue
  name="$(basename "$example")"
  hostfuse_log "running $name"
  if [ "$name" = moe_example ] || [ "$name" = moe_layer_example ]; then
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
      # One rank per GPU.
      "$HOSTFUSE_ROOT/tools/launch.sh" "$(( gpus > 0 ? gpus : 1 ))" \
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
