#!/usr/bin/env bash
# Uses hostfuse as another project would, from the build tree in $1:
#   1. `cmake --install` into a temporary prefix, and checks that the
#      installed libhostfuse.so's run path names nothing but $ORIGIN (no
#      path into a venv or the build tree);
#   2. configures, builds and runs tests/consumer against that prefix with
#      find_package(hostfuse), and checks that it prints "consumer: ok";
#   3. configures (without building) a project that pulls hostfuse in with
#      add_subdirectory, and checks that only hostfuse's library targets
#      come with it.
#
#   tests/consumer/run.sh BUILD_DIR [PYTHON]
#
# PYTHON (default: HOSTFUSE_PYTHON, else python3) is the Python whose torch
# the consumer finds. Exits 0 when all three hold.
set -euo pipefail

usage() {
  sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'
}
if [ "${1:-}" = "--help" ] || [ "${1:-}" = "-h" ]; then
  usage
  exit 0
fi
if [ $# -lt 1 ] || [ ! -f "$1/CMakeCache.txt" ]; then
  echo "run.sh: the first argument must be a configured hostfuse build folder" >&2
  usage >&2
  exit 2
fi
build_dir="$(cd "$1" && pwd)"
python="${2:-${HOSTFUSE_PYTHON:-python3}}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source_dir="$(cd "$here/../.." && pwd)"
work="$(mktemp -d "${TMPDIR:-/tmp}/hostfuse-consumer.XXXXXX")"
trap '[ -n "${HOSTFUSE_KEEP_CONSUMER:-}" ] || rm -rf "$work"' EXIT
generator=()
if command -v ninja >/dev/null; then
  generator=(-G Ninja)
fi

step() { echo "[consumer] $*"; }
fail() {
  echo "[consumer] FAILED: $*" >&2
  exit 1
}

step "installing $build_dir into $work/prefix"
cmake --install "$build_dir" --prefix "$work/prefix" >"$work/install.log" ||
  { cat "$work/install.log" >&2; fail "cmake --install"; }
library="$work/prefix/lib/libhostfuse.so"
[ -f "$library" ] || fail "no $library after the install"
[ -f "$work/prefix/include/hostfuse/ir/ops.h" ] ||
  fail "no include/hostfuse/ir/ops.h after the install"
[ -f "$work/prefix/lib/cmake/hostfuse/hostfuseConfig.cmake" ] ||
  fail "no lib/cmake/hostfuse/hostfuseConfig.cmake after the install"

step "checking the run path of the installed libhostfuse.so"
paths="$(readelf -d "$library" | sed -n 's/.*(\(RPATH\|RUNPATH\)).*\[\(.*\)\]/\2/p')"
echo "  run path: ${paths:-(none)}"
IFS=: read -r -a entries <<<"$paths"
for entry in "${entries[@]}"; do
  case "$entry" in
    '$ORIGIN' | '$ORIGIN/'*) ;;
    *) fail "the installed library's run path names '$entry'; only \$ORIGIN-relative entries may be there" ;;
  esac
done

step "building tests/consumer with find_package(hostfuse)"
cmake -S "$here" -B "$work/consumer" "${generator[@]}" \
  -DCMAKE_PREFIX_PATH="$work/prefix" -DHOSTFUSE_PYTHON="$python" \
  -Wno-dev >"$work/configure.log" 2>&1 ||
  { cat "$work/configure.log" >&2; fail "configuring the consumer"; }
cmake --build "$work/consumer" >"$work/build.log" 2>&1 ||
  { cat "$work/build.log" >&2; fail "building the consumer"; }

step "running it"
output="$("$work/consumer/consumer" 2>&1)" || {
  echo "$output" >&2
  fail "the consumer exited with an error"
}
echo "$output" | tail -n 3
grep -qx "consumer: ok" <<<"$output" || fail "the consumer did not print 'consumer: ok'"

step "configuring a project that uses add_subdirectory(hostfuse)"
cmake -S "$here/subdirectory" -B "$work/subdirectory" "${generator[@]}" \
  -DHOSTFUSE_SOURCE_DIR="$source_dir" -DHOSTFUSE_PYTHON="$python" \
  -Wno-dev >"$work/subdirectory.log" 2>&1 ||
  { cat "$work/subdirectory.log" >&2; fail "configuring with add_subdirectory"; }
targets="$(cmake --build "$work/subdirectory" --target help 2>/dev/null |
  sed -n 's/^\([A-Za-z0-9_.-]*\): .*/\1/p' | sort -u)"
for unwanted in test_ir moe_example bench_moe_cuda format-check; do
  if grep -qx "$unwanted" <<<"$targets"; then
    fail "add_subdirectory(hostfuse) brought in hostfuse's '$unwanted' target"
  fi
done
grep -qx hostfuse <<<"$targets" || fail "add_subdirectory(hostfuse) has no 'hostfuse' target"
step "ok"
