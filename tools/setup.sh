#!/usr/bin/env bash
# Set-up shared by the tools: finds or installs what the build needs,
# configures and builds. Source it, then call hostfuse_build.
#
#   source tools/setup.sh && hostfuse_build
#
# What it does, in order:
#   1. Build tools: cmake, ninja, g++, GoogleTest, clang-format. Missing ones
#      are installed with apt-get (Debian/Ubuntu), with sudo when not root.
#   2. The CUDA 13 toolkit in $CUDA_HOME (default /usr/local/cuda): needed
#      for compiling (headers, cudart, NVRTC), not for running on CPU.
#      Checked before the torch download.
#   3. torch 2.11: the first Python that imports it is used:
#      $HOSTFUSE_PYTHON, then python3 on PATH (the GPU machines have torch
#      installed and no network), then the virtual environment
#      $HOSTFUSE_VENV (default ~/.cache/hostfuse/venv-torch-2.11, shared by
#      every clone). If none has it, that environment is created and the
#      PyPI wheels torch==2.11.0 and numpy are installed into it (pip shows
#      its progress).
#   4. Configure with CMake (Ninja) into $HOSTFUSE_BUILD_DIR (default
#      build/) and build with all cores.
#
# Environment: HOSTFUSE_PYTHON, HOSTFUSE_VENV, HOSTFUSE_BUILD_DIR,
# HOSTFUSE_WERROR (ON/OFF, default OFF), CUDA_HOME, HOSTFUSE_JOBS,
# HOSTFUSE_SANITIZE (a -fsanitize= list such as address,undefined: builds
# into build-sanitize/ by default, without examples and benchmarks; README,
# "Sanitizer suite").

HOSTFUSE_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
HOSTFUSE_TORCH_VERSION="2.11.0"
# A sanitizer build lives in a folder of its own: its objects differ from
# every object of the plain build.
if [ -n "${HOSTFUSE_SANITIZE:-}" ]; then
  HOSTFUSE_BUILD_DIR="${HOSTFUSE_BUILD_DIR:-$HOSTFUSE_ROOT/build-sanitize}"
else
  HOSTFUSE_BUILD_DIR="${HOSTFUSE_BUILD_DIR:-$HOSTFUSE_ROOT/build}"
fi
HOSTFUSE_VENV="${HOSTFUSE_VENV:-$HOME/.cache/hostfuse/venv-torch-2.11}"
CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"

# With -h or --help as its first argument, prints the calling script's
# header comment (its usage) and exits 0. Scripts call it right after
# sourcing this file: hostfuse_help_if_asked "$@"
hostfuse_help_if_asked() {
  if [[ ${1:-} == -h || ${1:-} == --help ]]; then
    sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "${BASH_SOURCE[1]}"
    exit 0
  fi
}

hostfuse_log() {
  echo "[hostfuse $(date +%H:%M:%S)] $*" >&2
}

hostfuse_die() {
  hostfuse_log "error: $*"
  exit 1
}

# Prints the timeout in variable $1 (seconds), or the default $2 when it is
# unset or empty. A value that is not a number of seconds in [0.001, 86400],
# the range of the library's timeouts (docs/options.md), is refused with an
# error naming the variable and the value, and the function returns 1: a
# timeout of 0 would disable the bound, inf would never fire.
hostfuse_timeout() {
  local value="${!1:-$2}"
  if [[ ! $value =~ ^[0-9]+([.][0-9]+)?$ ]] ||
    ! awk -v v="$value" 'BEGIN { exit !(v >= 0.001 && v <= 86400) }'; then
    hostfuse_log "error: $1=$value is not a timeout: it must be a number" \
      "of seconds in [0.001, 86400]"
    return 1
  fi
  echo "$value"
}

# Installs Debian packages, as root or through sudo.
hostfuse_apt_install() {
  command -v apt-get >/dev/null ||
    hostfuse_die "missing $*, and there is no apt-get to install them"
  local sudo=""
  if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null || hostfuse_die "installing $* needs root"
    sudo="sudo"
  fi
  hostfuse_log "installing with apt-get: $*"
  $sudo apt-get update -qq || hostfuse_log "apt-get update failed; trying anyway"
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >/dev/null ||
    hostfuse_die "apt-get install $* failed"
}

hostfuse_install_build_tools() {
  local missing=()
  command -v cmake >/dev/null || missing+=(cmake)
  command -v ninja >/dev/null || missing+=(ninja-build)
  command -v g++ >/dev/null || missing+=(g++)
  [ -f /usr/include/gtest/gtest.h ] || missing+=(libgtest-dev)
  if [ "${#missing[@]}" -gt 0 ]; then
    hostfuse_apt_install "${missing[@]}"
  fi
  # Optional: only the format check needs it, and it is skipped without it.
  # In CI as any required tool; elsewhere from the package lists already
  # there (no apt-get update): on a machine without network that fails at
  # once instead of waiting for the mirrors.
  if ! command -v clang-format >/dev/null; then
    if [ -n "${CI:-}" ]; then
      (hostfuse_apt_install clang-format) ||
        hostfuse_log "warning: no clang-format; the format check is skipped"
    else
      hostfuse_apt_install_now clang-format ||
        hostfuse_log "warning: no clang-format; the format check is skipped"
    fi
  fi
}

# Installs optional Debian packages from the package lists already on the
# machine; returns 1 (saying nothing more) when that is not possible.
hostfuse_apt_install_now() {
  command -v apt-get >/dev/null || return 1
  local sudo=()
  if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null || return 1
    sudo=(sudo -n)
  fi
  apt-cache show "$@" >/dev/null 2>&1 || return 1
  hostfuse_log "installing with apt-get: $*"
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
    -o Acquire::Retries=0 "$@" >/dev/null 2>&1
}

# Prints the torch version importable by $1, or nothing.
hostfuse_torch_version_of() {
  "$1" -c 'import torch; print(torch.__version__)' 2>/dev/null || true
}

# Sets HOSTFUSE_PYTHON to the first Python that imports torch 2.11:
# $HOSTFUSE_PYTHON, python3 on PATH, then $HOSTFUSE_VENV. Installs nothing;
# returns 1 when there is none. tools/launch.sh uses it too.
hostfuse_find_installed_torch() {
  local candidates=()
  [ -n "${HOSTFUSE_PYTHON:-}" ] && candidates+=("$HOSTFUSE_PYTHON")
  command -v python3 >/dev/null && candidates+=("$(command -v python3)")
  candidates+=("$HOSTFUSE_VENV/bin/python")
  local python version
  for python in "${candidates[@]}"; do
    [ -x "$python" ] || continue
    version="$(hostfuse_torch_version_of "$python")"
    if [[ "$version" == 2.11.* ]]; then
      HOSTFUSE_PYTHON="$python"
      return 0
    fi
  done
  return 1
}

# torch warns on every import without NumPy ("Failed to initialize NumPy"),
# so every rank of every multi-rank run would print it: install NumPy into
# our own environment when it lacks it.
hostfuse_ensure_numpy() {
  "$HOSTFUSE_PYTHON" -c 'import numpy' 2>/dev/null && return 0
  if [ "$HOSTFUSE_PYTHON" = "$HOSTFUSE_VENV/bin/python" ]; then
    hostfuse_log "installing numpy into $HOSTFUSE_VENV"
    "$HOSTFUSE_PYTHON" -m pip install numpy >&2 ||
      hostfuse_log "warning: could not install numpy; torch will warn"
  fi
}

hostfuse_find_torch() {
  if hostfuse_find_installed_torch; then
    hostfuse_log "torch $(hostfuse_torch_version_of "$HOSTFUSE_PYTHON")" \
      "from $HOSTFUSE_PYTHON"
    hostfuse_ensure_numpy
    return 0
  fi

  hostfuse_log "no torch 2.11 found; installing torch==$HOSTFUSE_TORCH_VERSION" \
    "from PyPI into $HOSTFUSE_VENV (a few GB, a few minutes; pip shows" \
    "its progress below)"
  command -v python3 >/dev/null || hostfuse_apt_install python3 python3-venv
  if [ ! -x "$HOSTFUSE_VENV/bin/python" ]; then
    mkdir -p "$(dirname "$HOSTFUSE_VENV")"
    python3 -m venv "$HOSTFUSE_VENV" 2>/dev/null || {
      hostfuse_apt_install python3-venv
      python3 -m venv "$HOSTFUSE_VENV"
    } || hostfuse_die "could not create the virtual environment $HOSTFUSE_VENV"
  fi
  "$HOSTFUSE_VENV/bin/python" -m pip install -q --upgrade pip >&2 ||
    hostfuse_log "pip upgrade failed; going on with the installed pip"
  "$HOSTFUSE_VENV/bin/python" -m pip install \
    "torch==$HOSTFUSE_TORCH_VERSION" numpy >&2 ||
    hostfuse_die "pip install torch==$HOSTFUSE_TORCH_VERSION failed"
  HOSTFUSE_PYTHON="$HOSTFUSE_VENV/bin/python"
  hostfuse_log "torch $(hostfuse_torch_version_of "$HOSTFUSE_PYTHON") installed"
}

hostfuse_check_cuda_toolkit() {
  [ -f "$CUDA_HOME/include/cuda_runtime_api.h" ] && [ -f "$CUDA_HOME/include/nvrtc.h" ] ||
    hostfuse_die "the CUDA 13 toolkit is needed to compile hostfuse (headers," \
      "cudart, NVRTC) and was not found in CUDA_HOME=$CUDA_HOME"
  export CUDA_HOME
  export CUDAToolkit_ROOT="$CUDA_HOME"
  case ":$PATH:" in
    *":$CUDA_HOME/bin:"*) ;;
    *) export PATH="$PATH:$CUDA_HOME/bin" ;;
  esac
}

hostfuse_configure() {
  local generator_args=() sanitizer_args=()
  # A build folder keeps the generator it was made with.
  if [ ! -f "$HOSTFUSE_BUILD_DIR/CMakeCache.txt" ]; then
    generator_args=(-G Ninja)
  fi
  # A sanitizer build is for the C++ suite (tools/test.sh), which runs no
  # example or benchmark: leaving them out saves minutes of a CI build.
  if [ -n "${HOSTFUSE_SANITIZE:-}" ]; then
    sanitizer_args=(-DHOSTFUSE_BUILD_EXAMPLES=OFF
      -DHOSTFUSE_BUILD_BENCHMARKS=OFF)
  fi
  hostfuse_log "configuring into $HOSTFUSE_BUILD_DIR"
  cmake -S "$HOSTFUSE_ROOT" -B "$HOSTFUSE_BUILD_DIR" "${generator_args[@]}" \
    -DHOSTFUSE_PYTHON="$HOSTFUSE_PYTHON" \
    -DHOSTFUSE_WERROR="${HOSTFUSE_WERROR:-OFF}" \
    -DHOSTFUSE_SANITIZE="${HOSTFUSE_SANITIZE:-}" "${sanitizer_args[@]}" \
    -Wno-dev >"$HOSTFUSE_BUILD_DIR/configure.log" 2>&1 || {
    cat "$HOSTFUSE_BUILD_DIR/configure.log" >&2
    hostfuse_die "cmake configure failed"
  }
}

hostfuse_build() {
  local start=$SECONDS
  hostfuse_install_build_tools
  # Before the torch download: a missing toolkit should not cost minutes.
  hostfuse_check_cuda_toolkit
  hostfuse_find_torch
  mkdir -p "$HOSTFUSE_BUILD_DIR"
  hostfuse_configure
  local jobs="${HOSTFUSE_JOBS:-$(nproc)}"
  hostfuse_log "building with $jobs jobs"
  cmake --build "$HOSTFUSE_BUILD_DIR" -j "$jobs" "$@" ||
    hostfuse_die "build failed"
  hostfuse_log "build done in $((SECONDS - start)) s"
}

# The Python package's build and test tools: scikit-build-core (the PEP 517
# backend that pyproject.toml names), pytest, and matplotlib (tools/
# plot_perf.py, which a test runs). Installed from PyPI into our
# own environment when missing; any other Python (the GPU machines', which
# have them and no network) must already have them.
hostfuse_ensure_python_tools() {
  local missing=()
  "$HOSTFUSE_PYTHON" -c 'import scikit_build_core' 2>/dev/null ||
    missing+=(scikit-build-core)
  "$HOSTFUSE_PYTHON" -c 'import pytest' 2>/dev/null || missing+=(pytest)
  "$HOSTFUSE_PYTHON" -c 'import matplotlib' 2>/dev/null ||
    missing+=(matplotlib)
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$HOSTFUSE_PYTHON" = "$HOSTFUSE_VENV/bin/python" ]; then
    hostfuse_log "installing ${missing[*]} into $HOSTFUSE_VENV"
    "$HOSTFUSE_PYTHON" -m pip install "${missing[@]}" >&2 ||
      hostfuse_die "could not install ${missing[*]}"
  else
    hostfuse_die "$HOSTFUSE_PYTHON lacks ${missing[*]}:" \
      "pip install ${missing[*]} there first"
  fi
}

# Builds the Python package and installs it into $HOSTFUSE_PYTHON's
# environment with pip (no build isolation, no dependencies fetched:
# nothing is downloaded), showing the build's progress; the full log goes to
# $HOSTFUSE_BUILD_DIR/python-install.log.
hostfuse_python_install() {
  local start=$SECONDS log="$HOSTFUSE_BUILD_DIR/python-install.log"
  hostfuse_ensure_python_tools
  mkdir -p "$HOSTFUSE_BUILD_DIR"
  hostfuse_log "building and installing the Python package (log: $log)"
  CMAKE_BUILD_PARALLEL_LEVEL="${HOSTFUSE_JOBS:-$(nproc)}" \
    SKBUILD_CMAKE_DEFINE="HOSTFUSE_WERROR=${HOSTFUSE_WERROR:-OFF}" \
    "$HOSTFUSE_PYTHON" -m pip install --no-build-isolation --no-deps -v \
    "$HOSTFUSE_ROOT" 2>&1 | tee "$log" |
    grep --line-buffered -E '^ *\[[0-9]+/[0-9]+\]' |
    sed -u -E 's/^ *(.{1,100}).*/  \1/' >&2
  if [ "${PIPESTATUS[0]}" -ne 0 ]; then
    tail -n 40 "$log" >&2
    hostfuse_die "pip install of the Python package failed"
  fi
  hostfuse_log "Python package installed in $((SECONDS - start)) s"
}

# True when a CUDA GPU is usable from this machine's torch.
hostfuse_has_gpu() {
  "$HOSTFUSE_PYTHON" -c \
    'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' \
    2>/dev/null
}

hostfuse_gpu_count() {
  "$HOSTFUSE_PYTHON" -c 'import torch; print(torch.cuda.device_count())' \
    2>/dev/null || echo 0
}

# NVLink multicast stays off on the shared GPU machines.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

# Run rather than sourced: its help (with --help), else how to use it.
if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
  hostfuse_help_if_asked "$@"
  echo "tools/setup.sh is meant to be sourced: source tools/setup.sh &&" \
    "hostfuse_build (--help says what it does)" >&2
  exit 2
fi
