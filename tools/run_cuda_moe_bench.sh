#!/usr/bin/env bash
# Runs the MoE dispatch/combine benchmark (build/bench_moe_cuda: the cuda
# backend against the collective/NCCL one) as N processes, one GPU each,
# with torchrun; rank 0 prints the table.
#
#   tools/run_cuda_moe_bench.sh N [T ...] [--sweep] [--profile]
#   (default T: 128 4096)
#
# Every argument after N goes to bench_moe_cuda unchanged; --sweep adds one
# line per blocks / push_blocks setting (graph replay); --profile
# adds the kernels' per-phase timing per T (docs/moe_cuda.md).
# Builds first (tools/setup.sh) unless HOSTFUSE_NO_BUILD=1.
# HOSTFUSE_MOE_BLOCKS overrides the number of blocks per kernel.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
hostfuse_help_if_asked "$@"

n="${1:?usage: tools/run_cuda_moe_bench.sh N [T ...] [--sweep] [--profile]}"
shift
if [ "${HOSTFUSE_NO_BUILD:-0}" = 1 ]; then
  hostfuse_find_torch
else
  hostfuse_build --target bench_moe_cuda
fi
torchrun="$(command -v torchrun || echo "$(dirname "$HOSTFUSE_PYTHON")/torchrun")"
hostfuse_log "running bench_moe_cuda on $n ranks"
exec "$torchrun" --no-python --standalone --nproc-per-node="$n" \
  "$HOSTFUSE_BUILD_DIR/bench_moe_cuda" "$@"
