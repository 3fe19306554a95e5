#!/usr/bin/env bash
# Runs PROGRAM as N ranks on this host with torchrun, the launcher hostfuse
# uses on CPU machines and GPU machines alike (docs/moe.md says why).
#
#   tools/launch.sh N PROGRAM [ARGS...]
#
# Every rank's output is prefixed with "[default<rank>]:". The run fails if
# any rank fails (torchrun then stops the others) or if it does not finish
# within HOSTFUSE_LAUNCH_TIMEOUT seconds (default 600), so a hung rank fails
# a test instead of hanging CI; a value that is not a number of seconds in
# [0.001, 86400] (0 would disable the bound) exits 2 before anything runs,
# as do a bad N and a PROGRAM that is not there or not executable.
# torchrun's --standalone rendezvous picks a free port for each run, so runs
# in parallel do not collide.
#
# Which torchrun: HOSTFUSE_TORCHRUN (a command), else `python -m
# torch.distributed.run` of the torch that tools/setup.sh finds
# ($HOSTFUSE_PYTHON, python3 on PATH, the environment setup.sh made), else
# `torchrun` on PATH.
# On GPU machines each rank takes GPU <local rank>: use N <= number of GPUs
# for CUDA work.
set -uo pipefail

usage() {
  echo "usage: $0 N PROGRAM [ARGS...]"
  echo "  runs PROGRAM as N ranks on this host with torchrun (N >= 1);"
  echo "  HOSTFUSE_LAUNCH_TIMEOUT (seconds, default 600, at most 86400) bounds"
  echo "  the run."
}
if [[ ${1:-} == -h || ${1:-} == --help ]]; then
  usage
  exit 0
fi
if [[ $# -lt 2 ]]; then
  echo "launch.sh: needs N and a PROGRAM" >&2
  usage >&2
  exit 2
fi
if [[ ! $1 =~ ^[1-9][0-9]*$ ]]; then
  echo "launch.sh: N must be a whole number >= 1, got '$1'" >&2
  usage >&2
  exit 2
fi
ranks=$1
shift
# torchrun would report a missing program only inside the Python traceback
# that the filter below leaves out.
# A name without a slash is looked up on PATH, as torchrun does (shell
# functions and builtins do not count).
program=$1
if [[ $program != */* ]]; then
  program=$(type -P -- "$1") || {
    echo "launch.sh: no command '$1' on PATH" >&2
    exit 2
  }
fi
if [[ -d $program ]]; then
  echo "launch.sh: '$1' is a folder, not a program" >&2
  exit 2
elif [[ ! -e $program ]]; then
  echo "launch.sh: no program file '$1'" >&2
  exit 2
elif [[ ! -x $program ]]; then
  echo "launch.sh: '$1' is not executable" >&2
  exit 2
fi

source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
limit=$(hostfuse_timeout HOSTFUSE_LAUNCH_TIMEOUT 600) || exit 2

if [[ -n ${HOSTFUSE_TORCHRUN:-} ]]; then
  read -r -a torchrun <<<"$HOSTFUSE_TORCHRUN"
elif hostfuse_find_installed_torch; then
  torchrun=("$HOSTFUSE_PYTHON" -m torch.distributed.run)
elif command -v torchrun >/dev/null; then
  torchrun=(torchrun)
else
  echo "launch.sh: no torchrun: set HOSTFUSE_TORCHRUN or HOSTFUSE_PYTHON," \
    "or put torchrun on PATH" >&2
  exit 2
fi

log_dir=$(mktemp -d "${TMPDIR:-/tmp}/hostfuse_launch.XXXXXX")
trap 'rm -rf "$log_dir"' EXIT

# NVLink multicast stays off on the shared GPU machines: it is not available
# to these jobs there.
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
export TORCH_SYMM_MEM_DISABLE_MULTICAST=${TORCH_SYMM_MEM_DISABLE_MULTICAST:-1}
export NVSHMEM_DISABLE_NVLS=${NVSHMEM_DISABLE_NVLS:-1}
# Quiet torchrun's banner about OMP_NUM_THREADS; one thread per rank suits
# tests on small machines.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

timeout --kill-after=15 "$limit" "${torchrun[@]}" --standalone --nnodes=1 \
  --nproc-per-node="$ranks" --no-python --tee=3 --log-dir="$log_dir" \
  --max-restarts=0 "$@" 2>&1 |
  tee "$log_dir/launch.out" |
  grep -v -e '^W[0-9]\{4\} .*torch/distributed/run.py' \
    -e '^\*\{10,\}$' |
  # The frames of torchrun's own Python traceback when a rank fails say
  # nothing about the rank (the report after them does): left out, down to
  # the exception's line. The ranks' lines carry a "[defaultN]:" prefix, so
  # none of theirs is taken for it.
  awk '/^Traceback \(most recent call last\):$/ { skip = 1 }
       skip && /ChildFailedError:/ { skip = 0 }
       !skip { print; fflush() }'
status=${PIPESTATUS[0]}
# torchrun exits 1 whatever its ranks exited with; its failure report names
# the first failed rank's exit code ("exitcode  : 2"): pass that on, so that
# a usage error (2) stays one.
if [[ $status -eq 1 ]]; then
  rank_status=$(grep -m1 -o 'exitcode *: *[0-9]*' "$log_dir/launch.out" |
    grep -o '[0-9]*$')
  [[ -n $rank_status && $rank_status -gt 0 ]] && status=$rank_status
fi

if [[ $status -eq 124 || $status -eq 137 ]]; then
  echo "launch.sh: FAILED: $* with $ranks ranks did not finish within" \
    "${limit}s (a rank hung?); HOSTFUSE_LAUNCH_TIMEOUT sets the limit" >&2
elif [[ $status -ne 0 ]]; then
  # torchrun's report above names the rank that failed first.
  echo "launch.sh: FAILED: $* with $ranks ranks (exit $status)" >&2
else
  echo "launch.sh: $* passed on all $ranks ranks"
fi
exit "$status"
