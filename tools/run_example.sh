#!/usr/bin/env bash
# Builds hostfuse (doing the set-up itself, see tools/setup.sh) and runs an
# example program, which prints its result and a check against a direct
# ATen computation. With a GPU and torch 2.x it runs on the GPU.
#
#   tools/run_example.sh [mlp] [example arguments]
#
#   mlp   a host program: RMSNorm fusion, gated MLP, residual, row sums
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"

example="${1:-mlp}"
[ $# -gt 0 ] && shift
case "$example" in
  mlp) target=mlp_example ;;
  *) hostfuse_die "unknown example '$example' (known: mlp)" ;;
esac

hostfuse_build --target "$target"
if hostfuse_has_gpu; then
  hostfuse_log "running $target on the GPU"
else
  hostfuse_log "running $target on the CPU (no GPU found)"
fi
"$HOSTFUSE_BUILD_DIR/$target" "$@"
