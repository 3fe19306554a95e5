#!/usr/bin/env bash
# Runs PROGRAM as N ranks on this host as plain processes, for the tests in
# which a rank dies on purpose (test_fault_tolerance's RankFailure.*):
# torchrun, which tools/launch.sh uses, stops every rank as soon as one dies,
# so the survivors could not show that they go on.
#
#   tests/cpp/launch_faults.sh N KILLED PROGRAM [ARGS...]
#
# Each rank gets the variables torchrun would set (RANK, WORLD_SIZE,
# LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR=127.0.0.1, MASTER_PORT: a free
# port); rank 0 serves the store. KILLED is a comma-separated list of the
# ranks that must end killed by SIGKILL (by themselves or by a peer); every
# other rank must exit 0. Each rank's output is printed afterwards, prefixed
# with "[rank<r>]:". A rank still running after HOSTFUSE_LAUNCH_TIMEOUT
# seconds (default 120) is killed and fails the run.
set -uo pipefail

if [[ $# -lt 3 || ! $1 =~ ^[1-9][0-9]*$ || ! $2 =~ ^([0-9]+(,[0-9]+)*)?$ ]]; then
  echo "usage: $0 N KILLED PROGRAM [ARGS...]  (KILLED: e.g. 2 or 1,2)" >&2
  exit 2
fi
ranks=$1
killed_list=$2
killed=",$2,"
shift 2

source "$(dirname "${BASH_SOURCE[0]}")/../../tools/setup.sh"
limit=$(hostfuse_timeout HOSTFUSE_LAUNCH_TIMEOUT 120) || exit 2
python=${HOSTFUSE_PYTHON:-python3}
port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])') ||
  exit 2

log_dir=$(mktemp -d "${TMPDIR:-/tmp}/hostfuse_faults.XXXXXX")
trap 'rm -rf "$log_dir"' EXIT
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

pids=()
for ((r = 0; r < ranks; ++r)); do
  RANK=$r WORLD_SIZE=$ranks LOCAL_RANK=$r LOCAL_WORLD_SIZE=$ranks \
    MASTER_ADDR=127.0.0.1 MASTER_PORT=$port "$@" >"$log_dir/$r.log" 2>&1 &
  pids+=($!)
done

# Waits for every rank, killing them all at the deadline.
deadline=$((SECONDS + ${limit%.*} + 1))
timed_out=0
while :; do
  running=0
  for pid in "${pids[@]}"; do
    kill -0 "$pid" 2>/dev/null && running=1
  done
  ((running)) || break
  if ((SECONDS >= deadline)); then
    timed_out=1
    for pid in "${pids[@]}"; do
      kill -KILL "$pid" 2>/dev/null
    done
    break
  fi
  sleep 0.2
done

failed=0
for ((r = 0; r < ranks; ++r)); do
  # (bash's "Killed" notice for the killed rank is left out.)
  wait "${pids[r]}" 2>/dev/null
  status=$?
  sed "s/^/[rank$r]: /" "$log_dir/$r.log"
  if [[ $killed == *",$r,"* ]]; then
    expected=137
  else
    expected=0
  fi
  if [[ $status -ne $expected ]]; then
    echo "launch_faults.sh: rank $r exited $status, expected $expected" \
      "(137: killed by SIGKILL)" >&2
    failed=1
  fi
done
if ((timed_out)); then
  echo "launch_faults.sh: FAILED: ranks still ran after ${limit}s" \
    "(HOSTFUSE_LAUNCH_TIMEOUT); all were killed" >&2
  exit 1
fi
if ((failed)); then
  echo "launch_faults.sh: FAILED: $*" >&2
  exit 1
fi
echo "launch_faults.sh: $* ended as expected on $ranks ranks (killed: ${killed_list:-none})"
