#!/usr/bin/env bash
# Runs the cuda MoE backend tests (build/tests/cpp/test_cuda_moe) as N
# processes, one GPU each, with torchrun. Needs a machine with >= N GPUs;
# with fewer, every test skips, unless HOSTFUSE_SHARE_GPUS=1: then rank
# i runs on GPU i mod the GPU count, and the GPU time-slices the ranks'
# kernels (a test of behaviour across ranks, never of speed).
#
#   tools/run_cuda_moe_tests.sh N [gtest arguments, e.g. --gtest_filter=*Graph*]
#
# Builds the test first (tools/setup.sh) unless HOSTFUSE_NO_BUILD=1.
# HOSTFUSE_MOE_DEBUG=1 prints counts and offsets of every call.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
hostfuse_help_if_asked "$@"

n="${1:?usage: tools/run_cuda_moe_tests.sh N [gtest arguments]}"
shift
if [ "${HOSTFUSE_NO_BUILD:-0}" = 1 ]; then
  hostfuse_find_torch
else
  hostfuse_build --target test_cuda_moe
fi
torchrun="$(command -v torchrun || echo "$(dirname "$HOSTFUSE_PYTHON")/torchrun")"
binary="$HOSTFUSE_BUILD_DIR/tests/cpp/test_cuda_moe"
hostfuse_log "running $binary on $n ranks"
exec "$torchrun" --no-python --standalone --nproc-per-node="$n" \
  "$binary" "$@"
