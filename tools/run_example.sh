#!/usr/bin/env bash
# Builds hostfuse (doing the set-up itself, see tools/setup.sh) and runs an
# example program, which prints its result and a check against a reference
# computed directly with ATen. With a GPU and torch 2.x it runs on the GPUs.
#
#   tools/run_example.sh [moe|moe_layer|mlp] [example arguments]
#
#   moe        (default) a MoE layer: MoeDispatch, a matmul per expert,
#              MoeCombine, on 2 CPU ranks over Gloo, or on every local GPU
#              (one rank each) over NCCL; launched with tools/launch.sh
#              (torchrun)
#   moe_layer  a whole MoE layer: router (linear, softmax, top-k),
#              MoeDispatch, grouped GEMMs, a silu(gate) * up fusion,
#              MoeCombine; on 2 CPU ranks over Gloo with the collective
#              backend, or on every local GPU with the cuda backend as one
#              CUDA graph (GraphRunner), printing eager vs replayed step time
#   mlp        a one-process host program: RMSNorm fusion, gated MLP, residual
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
hostfuse_help_if_asked "$@"

example="${1:-moe}"
[ $# -gt 0 ] && shift
case "$example" in
  moe) target=moe_example ;;
  moe_layer) target=moe_layer_example ;;
  mlp) target=mlp_example ;;
  *) hostfuse_die "unknown example '$example' (known: moe, moe_layer, mlp)" ;;
esac

hostfuse_build --target "$target"
export HOSTFUSE_PYTHON
if [ "$target" = moe_example ] || [ "$target" = moe_layer_example ]; then
  ranks=2
  if hostfuse_has_gpu; then
    ranks="$(hostfuse_gpu_count)"
    hostfuse_log "running $target on $ranks GPUs (NCCL)"
  else
    hostfuse_log "running $target on $ranks CPU ranks (Gloo; no GPU found)"
  fi
  exec "$HOSTFUSE_ROOT/tools/launch.sh" "$ranks" \
    "$HOSTFUSE_BUILD_DIR/$target" "$@"
fi
if hostfuse_has_gpu; then
  hostfuse_log "running $target on the GPU"
else
  hostfuse_log "running $target on the CPU (no GPU found)"
fi
"$HOSTFUSE_BUILD_DIR/$target" "$@"
