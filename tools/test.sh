#!/usr/bin/env bash
# Runs the whole hostfuse test suite, after doing the set-up and the build
# itself (see tools/setup.sh): ctest over the C++ tests, then the Python
# package installed with pip and pytest over python_tests/. Tests that need a
# GPU skip themselves on machines without one.
#
#   tools/test.sh [extra ctest arguments, e.g. -R Validation]
#
# The last line it prints, whatever happened, is the totals over both
# (tools/test_totals.py): tests passed, failed and skipped, where a ctest
# test that runs GoogleTest cases counts as its cases (every rank's, for the
# multi-rank ones), so cases skipped inside a binary show as skipped. The
# JUnit files they are read from are in $HOSTFUSE_BUILD_DIR/test-results.
# The exit status is nonzero when anything failed.
#
# HOSTFUSE_SKIP_PYTHON=1 runs ctest only; HOSTFUSE_SKIP_CTEST=1 the Python
# part only. HOSTFUSE_NO_BUILD=1 runs ctest on the build folder as it is;
# HOSTFUSE_TEST_RESULTS puts the JUnit files in another folder (the test
# of this script runs it inside a suite without touching the suite's own).
#
# The sanitizer suite: HOSTFUSE_SANITIZE=address,undefined builds with ASan
# and UBSan into build-sanitize/ (its own folder) and runs the C++ suite only:
# ctest without format_check (a source check, the same in every build) and
# install_consumer (a packaging check: its consumer program is not built
# with the sanitizers, and an instrumented library cannot load into it)
# and moe_soak_np2 (10,000 calls through code the other tests cover, about
# 2 min in the plain suite and several times that instrumented, which CI's
# time limit cannot spare); pytest is skipped (the interpreter would need
# the ASan runtime preloaded).
# Any report fails its test. .ci/run runs it after the plain suite.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
hostfuse_help_if_asked "$@"

sanitizer_args=()
if [ -n "${HOSTFUSE_SANITIZE:-}" ]; then
  HOSTFUSE_SKIP_PYTHON=1
  sanitizer_args=(-E '^(format_check|install_consumer|moe_soak_np2)$')
  # protect_shadow_gap=0: the CUDA driver maps memory where ASan would
  # otherwise keep its guard (without it cuInit fails on GPU machines).
  export ASAN_OPTIONS="${ASAN_OPTIONS:-protect_shadow_gap=0:detect_leaks=1}"
  export UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}"
fi

results="${HOSTFUSE_TEST_RESULTS:-$HOSTFUSE_BUILD_DIR/test-results}"
mkdir -p "$results"
# Results of an earlier run must not be counted as this one's.
rm -f "$results/ctest.xml" "$results/pytest.xml"
totals_args=()

# On any exit (a failed build or test included): the totals line, last.
# The script's own status only ever turns a success into a failure.
print_totals() {
  local status=$?
  trap - EXIT
  "${HOSTFUSE_PYTHON:-python3}" "$HOSTFUSE_ROOT/tools/test_totals.py" \
    "${totals_args[@]}" || [ "$status" -ne 0 ] || status=1
  exit "$status"
}
trap print_totals EXIT

if [ "${HOSTFUSE_SKIP_CTEST:-0}" != 1 ]; then
  totals_args+=(--ctest "$results/ctest.xml")
  if [ "${HOSTFUSE_NO_BUILD:-0}" != 1 ]; then
    hostfuse_build
  fi
  hostfuse_log "running ctest"
  # A filter that matches no test is an error, not a green run. The JUnit
  # file keeps the end of every test's output (gtest's counts are there).
  status=0
  (cd "$HOSTFUSE_BUILD_DIR" &&
    ctest --output-on-failure --timeout 600 --no-tests=error \
      --output-junit "$results/ctest.xml" --test-output-size-passed 1000000 \
      --test-output-truncation middle -j "${HOSTFUSE_JOBS:-$(nproc)}" \
      "${sanitizer_args[@]}" "$@") ||
    status=$?
  totals_args+=(--ctest-status "$status")
  [ "$status" -eq 0 ] || exit "$status"
fi
if [ "${HOSTFUSE_SKIP_PYTHON:-0}" != 1 ]; then
  [ "${HOSTFUSE_SKIP_CTEST:-0}" != 1 ] || hostfuse_find_torch
  totals_args+=(--pytest "$results/pytest.xml")
  hostfuse_python_install
  hostfuse_log "running pytest over python_tests"
  status=0
  (cd "$HOSTFUSE_ROOT" &&
    "$HOSTFUSE_PYTHON" -m pytest python_tests -p no:cacheprovider -rs -q \
      --junitxml="$results/pytest.xml") || status=$?
  totals_args+=(--pytest-status "$status")
  [ "$status" -eq 0 ] || exit "$status"
fi
