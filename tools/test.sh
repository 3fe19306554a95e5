#!/usr/bin/env bash
# Runs the whole hostfuse test suite, after doing the set-up and the build
# itself (see tools/setup.sh): ctest over the C++ tests, then the Python
# package installed with pip and pytest over python_tests/. Tests that need a
# GPU skip themselves on machines without one.
#
#   tools/test.sh [extra ctest arguments, e.g. -R Validation]
#
# HOSTFUSE_SKIP_PYTHON=1 runs ctest only; HOSTFUSE_SKIP_CTEST=1 the Python
# part only.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
hostfuse_help_if_asked "$@"

if [ "${HOSTFUSE_SKIP_CTEST:-0}" != 1 ]; then
  hostfuse_build
  hostfuse_log "running ctest"
  # A filter that matches no test is an error, not a green run.
  (cd "$HOSTFUSE_BUILD_DIR" &&
    ctest --output-on-failure --timeout 600 --no-tests=error \
      -j "${HOSTFUSE_JOBS:-$(nproc)}" "$@")
fi
if [ "${HOSTFUSE_SKIP_PYTHON:-0}" != 1 ]; then
  [ "${HOSTFUSE_SKIP_CTEST:-0}" != 1 ] || hostfuse_find_torch
  hostfuse_python_install
  hostfuse_log "running pytest over python_tests"
  (cd "$HOSTFUSE_ROOT" &&
    "$HOSTFUSE_PYTHON" -m pytest python_tests -p no:cacheprovider -rs -q)
fi
