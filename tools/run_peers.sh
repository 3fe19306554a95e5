#!/usr/bin/env bash
# The whole peers comparison in one go, N ranks (one GPU each, or CPU ranks
# with --cpu), into one CSV, its Markdown tables and its plots:
#
#   tools/run_peers.sh N [--tokens "T1 T2 ..."] [--out DIR] [--cpu]
#
#   1. benchmarks/peers/bench_peers.py: hostfuse, plain PyTorch, torch
#      symmetric memory, with --dump for step 3
#   2. build/bench_nvlink_push --peers-csv: the NVLink floor (N >= 2 GPUs)
#   3. build_nccl_ep/bin/nccl_ep_bench: NCCL EP, if tools/nccl_ep.sh built
#      it (else the run says so and goes on)
#   4. tools/plot_perf.py: DIR/peers.md (tables) and DIR/peers_*.png
#
# Default tokens: "128 4096"; default DIR: build/peers-<N>ranks. DIR is
# emptied first when an earlier run_peers.sh made it (a fresh CSV each
# run); any other non-empty DIR is refused, never deleted. Builds and
# installs the Python package first (tools/setup.sh) unless
# HOSTFUSE_NO_BUILD=1. Exit status 1 if a step fails or a row's
# output check fails; the other steps still run.
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
hostfuse_help_if_asked "$@"

n="${1:-}"
if [[ ! $n =~ ^[1-9][0-9]*$ ]]; then
  echo "run_peers.sh: N (the number of ranks) must come first, a whole number" \
    ">= 1; got '${n}'" >&2
  echo "usage: tools/run_peers.sh N [--tokens \"T1 T2 ...\"] [--out DIR] [--cpu]" >&2
  exit 2
fi
shift
tokens="128 4096" out="" cpu=()
while [ $# -gt 0 ]; do
  case "$1" in
    --tokens | --out)
      [ $# -ge 2 ] || {
        echo "run_peers.sh: $1 needs a value (see --help)" >&2
        exit 2
      }
      [ "$1" = --tokens ] && tokens="$2" || out="$2"
      shift 2
      ;;
    --cpu)
      cpu=(--cpu)
      shift
      ;;
    *)
      echo "run_peers.sh: unexpected argument '$1' (see --help)" >&2
      exit 2
      ;;
  esac
done
read -r -a token_list <<<"$tokens"
for t in "${token_list[@]}"; do
  [[ $t =~ ^[1-9][0-9]*$ ]] || {
    echo "run_peers.sh: --tokens expects positive integers separated by" \
      "spaces, got '$tokens'" >&2
    exit 2
  }
done
if [ ${#token_list[@]} -eq 0 ]; then
  echo "run_peers.sh: --tokens is empty" >&2
  exit 2
fi
out="${out:-$HOSTFUSE_BUILD_DIR/peers-${n}ranks}"
marker="$out/.made_by_run_peers"
if [ -e "$out" ] && [ ! -d "$out" ]; then
  echo "run_peers.sh: --out $out is a file, not a folder" >&2
  exit 2
fi
if [ -d "$out" ] && [ ! -e "$marker" ] && [ -n "$(ls -A "$out")" ]; then
  echo "run_peers.sh: --out $out holds files that run_peers.sh did not" \
    "write; give an empty or new folder" >&2
  exit 2
fi
if [ "${HOSTFUSE_NO_BUILD:-0}" = 1 ]; then
  hostfuse_find_torch
else
  hostfuse_build --target bench_nvlink_push
  hostfuse_python_install
fi
if [ -e "$marker" ]; then
  rm -rf "$out"
fi
mkdir -p "$out" && touch "$marker" || {
  echo "run_peers.sh: cannot create the folder $out" >&2
  exit 1
}
csv="$out/peers.csv"
status=0
launch="$(dirname "${BASH_SOURCE[0]}")/launch.sh"
export HOSTFUSE_LAUNCH_TIMEOUT="${HOSTFUSE_LAUNCH_TIMEOUT:-1800}"

hostfuse_log "1/4 bench_peers.py on $n ranks, T = ${token_list[*]}"
"$launch" "$n" "$HOSTFUSE_PYTHON" "$HOSTFUSE_ROOT/benchmarks/peers/bench_peers.py" \
  --tokens "${token_list[@]}" --csv "$csv" --dump "$out/dump" "${cpu[@]}" ||
  status=1

if [ "$n" -ge 2 ] && [ ${#cpu[@]} -eq 0 ]; then
  # On the run's N GPUs: the floor is that of N ranks.
  hostfuse_log "2/4 the NVLink floor (bench_nvlink_push on $n GPUs)"
  CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-$(seq -s, 0 $((n - 1)))}" \
    "$HOSTFUSE_BUILD_DIR/bench_nvlink_push" --peers-csv "$csv" \
    --tokens "$(
      IFS=,
      echo "${token_list[*]}"
    )" || status=1
else
  hostfuse_log "2/4 the NVLink floor: needs 2 or more GPU ranks, skipped"
fi

nccl_ep="$HOSTFUSE_ROOT/build_nccl_ep/bin/nccl_ep_bench"
if [ ${#cpu[@]} -gt 0 ]; then
  hostfuse_log "3/4 NCCL EP: needs GPUs, skipped"
elif [ -x "$nccl_ep" ]; then
  hostfuse_log "3/4 NCCL EP (nccl_ep_bench)"
  "$launch" "$n" "$nccl_ep" --dump "$out/dump" --csv "$csv" || status=1
else
  hostfuse_log "3/4 NCCL EP: not built ($nccl_ep missing: tools/nccl_ep.sh builds it), skipped"
fi

hostfuse_log "4/4 tables and plots into $out"
"$HOSTFUSE_PYTHON" "$HOSTFUSE_ROOT/tools/plot_perf.py" "$csv" --markdown \
  >"$out/peers.md" || status=1
"$HOSTFUSE_PYTHON" "$HOSTFUSE_ROOT/tools/plot_perf.py" "$csv" --out "$out" \
  --prefix peers || status=1
cat "$out/peers.md"
exit "$status"
