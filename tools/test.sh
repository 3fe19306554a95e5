#!/usr/bin/env bash
# Runs the whole hostfuse test suite with ctest, after doing the set-up and
# the build itself (see tools/setup.sh). Tests that need a GPU skip
# themselves on machines without one.
#
#   tools/test.sh [extra ctest arguments, e.g. -R Validation]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
hostfuse_help_if_asked "$@"

hostfuse_build
hostfuse_log "running ctest"
cd "$HOSTFUSE_BUILD_DIR"
# A filter that matches no test is an error, not a green run.
ctest --output-on-failure --timeout 600 --no-tests=error \
  -j "${HOSTFUSE_JOBS:-$(nproc)}" "$@"
