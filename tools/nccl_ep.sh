#!/usr/bin/env bash
# Builds what measuring NCCL EP takes, from an NCCL source tree (>= 2.30,
# with contrib/nccl_ep): NCCL itself, the nccl_ep library and
# benchmarks/peers/nccl_ep_bench, for one GPU architecture, into OUT:
#
#   OUT/bin/nccl_ep_bench      finds its libraries through $ORIGIN/../lib
#   OUT/lib/libnccl.so.2, libnccl_ep.so.0    stripped
#   OUT/include/...            nccl.h, nccl_device*, nccl_ep.h, nccl_ep/: the
#                              headers nccl_ep's run-time compiler (HT mode)
#                              needs on the machine that runs it
#
#   tools/nccl_ep.sh --nccl-src DIR [--out OUT] [--arch SM] [--jobs N]
#
# OUT defaults to build_nccl_ep/ in this repository (git-ignored, so it
# can travel with the source tree to a GPU machine without network). OUT is
# replaced when an earlier nccl_ep.sh made it; any other non-empty OUT is
# refused, never deleted. NCCL builds in
# DIR/build (its own default) and a second run reuses it. NCCL's source:
# github.com/NVIDIA/nccl (a release tag >= v2.30, or master). Building NCCL
# for one architecture took about 40 minutes on 2 cores.
# docs/performance.md ("NCCL EP") says how the benchmark is run.
set -euo pipefail

usage() {
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'
}

src="" out="" arch=90 jobs="$(nproc)"
while [ $# -gt 0 ]; do
  case "$1" in
    -h | --help)
      usage
      exit 0
      ;;
    --nccl-src | --out | --arch | --jobs)
      [ $# -ge 2 ] || {
        echo "nccl_ep.sh: $1 needs a value (see --help)" >&2
        exit 2
      }
      case "$1" in
        --nccl-src) src="$2" ;;
        --out) out="$2" ;;
        --arch) arch="$2" ;;
        --jobs) jobs="$2" ;;
      esac
      shift 2
      ;;
    *)
      echo "nccl_ep.sh: unexpected argument '$1' (see --help)" >&2
      exit 2
      ;;
  esac
done
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${out:-$root/build_nccl_ep}"
cuda="${CUDA_HOME:-/usr/local/cuda}"
die() {
  echo "nccl_ep.sh: $*" >&2
  exit 1
}
usage_error() {
  echo "nccl_ep.sh: $* (see --help)" >&2
  exit 2
}
[ -n "$src" ] || usage_error "--nccl-src DIR is required"
[[ $arch =~ ^[1-9][0-9]+$ ]] ||
  usage_error "--arch expects an SM number such as 90, got '$arch'"
[[ $jobs =~ ^[1-9][0-9]*$ ]] ||
  usage_error "--jobs expects a positive integer, got '$jobs'"
marker="$out/.made_by_nccl_ep_sh"
if [ -e "$out" ] && [ ! -d "$out" ]; then
  usage_error "--out $out is a file, not a folder"
fi
if [ -d "$out" ] && [ ! -e "$marker" ] && [ -n "$(ls -A "$out")" ]; then
  usage_error "--out $out holds files that nccl_ep.sh did not write; give an empty or new folder"
fi
[ -f "$src/makefiles/version.mk" ] || die "$src is not an NCCL source tree (no makefiles/version.mk)"
[ -d "$src/contrib/nccl_ep" ] || die "$src has no contrib/nccl_ep: NCCL EP needs NCCL >= 2.30"
[ -x "$cuda/bin/nvcc" ] || die "no nvcc in $cuda/bin: set CUDA_HOME"
src="$(cd "$src" && pwd)"
minor="$(awk '/^NCCL_MINOR/ { print $3 }' "$src/makefiles/version.mk" 2>/dev/null)"
major="$(awk '/^NCCL_MAJOR/ { print $3 }' "$src/makefiles/version.mk" 2>/dev/null)"
[[ $major =~ ^[0-9]+$ && $minor =~ ^[0-9]+$ ]] ||
  die "cannot read NCCL's version from $src/makefiles/version.mk"
if [ "$major" -lt 2 ] || { [ "$major" -eq 2 ] && [ "$minor" -lt 30 ]; }; then
  die "$src is NCCL $major.$minor; NCCL EP needs >= 2.30"
fi

log() { echo "[nccl_ep.sh $(date +%H:%M:%S)] $*"; }
gencode="-gencode=arch=compute_$arch,code=sm_$arch"
build="$src/build"
start=$SECONDS

mkdir -p "$build"
# Some CUDA installs carry an older NCCL's headers (nccl.h, nccl_device/) in
# the toolkit's include/, which NCCL's makefiles put before the tree's own:
# compile against a view of that folder without them.
cuda_inc="$cuda/include"
if compgen -G "$cuda/include/nccl*" >/dev/null; then
  cuda_inc="$build/cuda-include-without-nccl"
  rm -rf "$cuda_inc"
  mkdir -p "$cuda_inc"
  for entry in "$cuda/include/"*; do
    case "$(basename "$entry")" in
      nccl*) ;;
      *) ln -s "$(readlink -f "$entry")" "$cuda_inc/" ;;
    esac
  done
  log "$cuda/include holds NCCL headers of its own: compiling against $cuda_inc"
fi

log "NCCL $major.$minor for sm_$arch in $build ($jobs jobs; log: $build/nccl-build.log)"
make -C "$src" -j "$jobs" src.build CUDA_HOME="$cuda" CUDA_INC="$cuda_inc" \
  NVCC_GENCODE="$gencode" >"$build/nccl-build.log" 2>&1 || {
  tail -n 30 "$build/nccl-build.log" >&2
  die "building NCCL failed"
}
log "nccl_ep (log: $build/nccl-ep-build.log)"
make -C "$src/contrib/nccl_ep" -j "$jobs" lib BUILDDIR="$build" CUDA_HOME="$cuda" \
  CUDA_INC="$cuda_inc" NVCC_GENCODE="$gencode" >"$build/nccl-ep-build.log" 2>&1 || {
  tail -n 30 "$build/nccl-ep-build.log" >&2
  die "building nccl_ep failed"
}

log "staging into $out"
if [ -e "$marker" ]; then
  rm -rf "$out"
fi
mkdir -p "$out/bin" "$out/lib" "$out/include" && touch "$marker" ||
  die "cannot create the folder $out"
cp -L "$build/lib/libnccl.so.2" "$build/lib/libnccl_ep.so.0" "$out/lib/"
strip --strip-unneeded "$out/lib/libnccl.so.2" "$out/lib/libnccl_ep.so.0"
ln -s libnccl.so.2 "$out/lib/libnccl.so"
ln -s libnccl_ep.so.0 "$out/lib/libnccl_ep.so"
cp -r "$build/include/." "$out/include/"

log "nccl_ep_bench"
"$cuda/bin/nvcc" -O2 -std=c++17 "-arch=sm_$arch" -I"$out/include" \
  "$root/benchmarks/peers/nccl_ep_bench.cu" -o "$out/bin/nccl_ep_bench" \
  -L"$out/lib" -L"$cuda/lib64/stubs" -lnccl_ep -lnccl -lcuda \
  -Xlinker --disable-new-dtags -Xlinker -rpath -Xlinker '$ORIGIN/../lib'

log "done in $((SECONDS - start)) s: $(du -sh "$out" | cut -f1) in $out"
du -h "$out/lib/"*.so.* "$out/bin/nccl_ep_bench" | sed 's/^/  /'
