#!/usr/bin/env bash
# bash scripts/install-bmt.sh [PYTHON]: installs the `bmt` extra (BMTrain + ModelCenter) into PYTHON's environment
# (default: the set-up's .venv), building BMTrain from its sdist for today's CUDA.
#
# BMTrain publishes only an sdist, and its 1.0.1 build cannot work unchanged with CUDA 12.8+/13: CMakeLists.txt
# hard-codes GPU architectures 61-80 (nvcc 13 stops at "Unsupported gpu architecture 'compute_61'") and its build
# asks for the CUDA 11 NCCL wheel. This script builds it without build isolation against the CUDA 13 NCCL wheel,
# for the architectures in BMT_CUDA_ARCHS (default "80;90": A100, H100/H200). Its CPU part (the offloaded Adam)
# is compiled with -march=native: build on the machine (or CPU family) that runs it. Every download is pinned
# by version and sha256 in scripts/bmt.lock. It needs nvcc (CUDA toolkit 12.x or 13.x) and a C++ compiler, not
# a GPU: the result imports on a CPU machine, where the CPU-side tests use it; a GPU is needed to run it.
#
#   bash scripts/install-bmt.sh                          # into .venv (what .ci/run does where nvcc exists)
#   bash scripts/install-bmt.sh /path/to/venv/bin/python # another environment
#   BMT_CUDA_ARCHS=90 BMT_WHEEL_DIR=dist bash scripts/install-bmt.sh   # H100 only; keep the built wheel
#
# NCCL: the one torch already uses where a CUDA torch brought the nvidia-nccl wheel; NCCL_INCLUDE_DIR and
# NCCL_LIB_DIR for another (e.g. the system's libnccl-dev); else the CUDA 13 wheel pinned in the lock.
# BUILD_DOCKER_ENV=1 (for images built on one machine and run on others) compiles the CPU part with BMTrain's
# portable flags instead of -march=native; they include -mavx512f.
#
# Without nvcc it prints why and exits 3, installing nothing (the bmt tests then skip, saying so).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${1:-$ROOT/.venv/bin/python}"
ARCHS="${BMT_CUDA_ARCHS:-80;90}"
LOCK="$ROOT/scripts/bmt.lock"

die() { echo "install-bmt: error: $1" >&2; exit "${2:-1}"; }
note() { echo "install-bmt: $*" >&2; }

[ -x "$PY" ] || die "no Python at '$PY': create the environment first (source scripts/env.sh), or pass its python"
[[ "$ARCHS" =~ ^[0-9]+a?([\;,][0-9]+a?)*$ ]] \
  || die "BMT_CUDA_ARCHS='$ARCHS': give compute capabilities like \"80;90\" (80 A100, 90 H100/H200)" 2
ARCHS="${ARCHS//,/;}"
NVCC="${CUDACXX:-$(command -v nvcc || true)}"
if [ -z "$NVCC" ]; then
  for candidate in /usr/local/cuda/bin/nvcc /usr/local/cuda-*/bin/nvcc; do
    [ -x "$candidate" ] && NVCC="$candidate" && break
  done
fi
[ -n "$NVCC" ] && [ -x "$NVCC" ] \
  || die "nvcc not found: BMTrain compiles CUDA kernels at install time. Install the CUDA toolkit (12.x or 13.x) \
or set CUDACXX=/path/to/nvcc" 3
command -v cmake >/dev/null || die "cmake not found: install it (apt-get install cmake, or pip install cmake)"

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

# 1. the pinned wheels the build needs (pybind11; NCCL's headers and library where no NCCL is given or
#    installed), then the two sdists, checked against their hashes
if [ -n "${NCCL_INCLUDE_DIR:-}" ] && [ -n "${NCCL_LIB_DIR:-}" ]; then
  exclude='^(bmtrain|model-center|nvidia-nccl-cu13)=='
elif "$PY" -c 'import nvidia.nccl as n, os, sys; sys.exit(not os.path.isfile(list(n.__path__)[0] + "/include/nccl.h"))' \
  2>/dev/null; then
  exclude='^(bmtrain|model-center|nvidia-nccl-cu13)=='  # torch's own NCCL: never replace it
else
  exclude='^(bmtrain|model-center)=='
fi
"$PY" -m pip install -q --require-hashes --no-deps -r <(grep -v -E "$exclude" "$LOCK" | grep -v '^#')
grep -E '^(bmtrain|model-center)==' "$LOCK" >"$WORK/sdists.txt"
"$PY" -m pip download -q --no-deps --no-binary :all: --no-build-isolation --require-hashes \
  -r "$WORK/sdists.txt" -d "$WORK/sdist" || die "could not download the BMTrain/ModelCenter sdists pinned in $LOCK"

# 2. BMTrain: unpack, set the architectures, build against the installed NCCL
tar -xzf "$WORK"/sdist/bmtrain-*.tar.gz -C "$WORK"
SRC="$(echo "$WORK"/bmtrain-*/)"
sed -i -E \
  -e "s/\"61;62;70;72;75;80\"/\"${ARCHS//;/\\;}\"/g" \
  -e 's/ -gencode=arch=compute_[0-9]+,code=sm_[0-9]+//g' \
  "$SRC/CMakeLists.txt"
grep -q "\"${ARCHS}\"" "$SRC/CMakeLists.txt" \
  || die "BMTrain's CMakeLists.txt is not the one this script knows (architectures not set)"
! grep -q -- "-gencode" "$SRC/CMakeLists.txt" || die "BMTrain's CMakeLists.txt still has -gencode flags"
# the CUDA 11 NCCL wheel would overwrite the CUDA 13 one torch uses (same nvidia/nccl path)
sed -i -e '/nvidia-nccl-cu11/d' "$SRC/setup.py"
# nvidia.nccl is a namespace package in the CUDA 13 wheel (no __file__): find its lib folder through __path__
sed -i -e 's/os.path.dirname(nvidia.nccl.__file__)/list(nvidia.nccl.__path__)[0]/' "$SRC/bmtrain/utils.py"
unset NCCL_ROOT_DIR  # BMTrain's FindNCCL would prefer it over the two below
if [ -z "${NCCL_INCLUDE_DIR:-}" ] || [ -z "${NCCL_LIB_DIR:-}" ]; then
  root="$("$PY" -c 'import nvidia.nccl as n; print(list(n.__path__)[0])')"
  NCCL_INCLUDE_DIR="$root/include" NCCL_LIB_DIR="$root/lib"
fi
[ -f "$NCCL_INCLUDE_DIR/nccl.h" ] || die "nccl.h not found in $NCCL_INCLUDE_DIR: set NCCL_INCLUDE_DIR and NCCL_LIB_DIR"
note "building BMTrain for CUDA architectures $ARCHS with $NVCC"
if ! NCCL_INCLUDE_DIR="$NCCL_INCLUDE_DIR" NCCL_LIB_DIR="$NCCL_LIB_DIR" CUDACXX="$NVCC" \
  CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
  "$PY" -m pip wheel -q --no-deps --no-build-isolation --no-index -w "$WORK/dist" "$SRC" >"$WORK/build.log" 2>&1; then
  tail -40 "$WORK/build.log" >&2
  die "the BMTrain build failed (the end of its log is above)"
fi
"$PY" -m pip install -q --no-deps --force-reinstall "$WORK"/dist/bmtrain-*.whl
if [ -n "${BMT_WHEEL_DIR:-}" ]; then
  mkdir -p "$BMT_WHEEL_DIR" && cp "$WORK"/dist/bmtrain-*.whl "$BMT_WHEEL_DIR/"
fi

# 3. ModelCenter: pure Python, from its sdist
"$PY" -m pip install -q --no-deps --no-build-isolation "$WORK"/sdist/model*center-*.tar.gz

# 4. check: both import (torch first: it loads the NCCL library BMTrain links against)
"$PY" -c 'import torch, bmtrain, model_center.model; print("install-bmt: bmtrain and model_center import")' >&2
