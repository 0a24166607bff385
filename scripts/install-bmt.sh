#!/usr/bin/env bash
# bash scripts/install-bmt.sh [PYTHON]: installs the `bmt` extra (BMTrain + ModelCenter) into PYTHON's environment
# (default: the set-up's .venv), building BMTrain from its sdist for today's CUDA.
#
# BMTrain publishes only an sdist, and its 1.0.1 build cannot work unchanged with CUDA 12.8+/13: CMakeLists.txt
# hard-codes GPU architectures 61-80 (nvcc 13 stops at "Unsupported gpu architecture 'compute_61'") and its build
# asks for the CUDA 11 NCCL wheel. This script builds it without build isolation against the CUDA 13 NCCL wheel,
# for the architectures in BMT_CUDA_ARCHS (default "80;90": A100, H100/H200). Its CPU part (the offloaded Adam)
# is compiled with -march=native: build on the machine (or CPU family) that runs it. Every download is pinned
# by version and sha256 in scripts/bmt.lock. It needs nvcc (CUDA toolkit 12.x or 13.x) and a C++ compiler, not a GPU: the result
# imports on a CPU machine, where the CPU-side tests use it; a GPU is needed to run it.
#
#   bash scripts/install-bmt.sh                          # into .venv (what .ci/run does where nvcc exists)
#   bash scripts/install-bmt.sh /path/to/venv/bin/python # another environment
#   BMT_CUDA_ARCHS=90 BMT_WHEEL_DIR=dist bash scripts/install-bmt.sh   # H100 only; keep the built wheel
#
# Without nvcc it prints why and exits 3, installing nothing (the bmt tests then skip, saying so).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${1:-$ROOT/.venv/bin/python}"
ARCHS="${BMT_CUDA_ARCHS:-80;90}"
LOCK="$ROOT/scripts/bmt.lock"

die() { echo "install-bmt: error: $*" >&2; exit "${2:-1}"; }
note() { echo "install-bmt: $*" >&2; }

[ -x "$PY" ] || die "no Python at '$PY': create the environment first (source scripts/env.sh), or pass its python"
NVCC="${CUDACXX:-$(command -v nvcc || true)}"
if [ -z "$NVCC" ]; then
  for candidate in /usr/local/cuda/bin/nvcc /usr/local/cuda-*/bin/nvcc; do
    [ -x "$candidate" ] && NVCC="$candidate" && break
  done
fi
[ -n "$NVCC" ] && [ -x "$NVCC" ] \
  || die "nvcc not found: BMTrain compiles CUDA kernels at install time. Install the CUDA toolkit (12.x or 13.x) or set CUDACXX=/path/to/nvcc" 3
command -v cmake >/dev/null || die "cmake not found: install it (apt-get install cmake, or pip install cmake)"

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

# 1. the pinned wheels the build and the import need (NCCL's headers and library, pybind11), and ModelCenter's
#    undeclared imports; then the two sdists, checked against their hashes
"$PY" -m pip install -q --require-hashes --no-deps -r <(grep -v -E '^(bmtrain|model-center)==' "$LOCK")
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
grep -q "\"${ARCHS}\"" "$SRC/CMakeLists.txt" || die "BMTrain's CMakeLists.txt is not the one this script knows (architectures not set)"
! grep -q -- "-gencode" "$SRC/CMakeLists.txt" || die "BMTrain's CMakeLists.txt still has -gencode flags"
# the CUDA 11 NCCL wheel would overwrite the CUDA 13 one torch uses (same nvidia/nccl path)
sed -i -e '/nvidia-nccl-cu11/d' "$SRC/setup.py"
# nvidia.nccl is a namespace package in the CUDA 13 wheel (no __file__): find its lib folder through __path__
sed -i -e 's/os.path.dirname(nvidia.nccl.__file__)/list(nvidia.nccl.__path__)[0]/' "$SRC/bmtrain/utils.py"
NCCL_ROOT_DIR="$("$PY" -c 'import nvidia.nccl as n; print(list(n.__path__)[0])')"
[ -f "$NCCL_ROOT_DIR/include/nccl.h" ] || die "nccl.h not found under $NCCL_ROOT_DIR (is nvidia-nccl-cu13 installed?)"
note "building BMTrain for CUDA architectures $ARCHS with $NVCC"
if ! NCCL_ROOT_DIR="$NCCL_ROOT_DIR" CUDACXX="$NVCC" \
  CMAKE_BUILD_PARALLEL_LEVEL="${BMT_BUILD_JOBS:-$(nproc)}" \
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
"$PY" -c 'import torch, bmtrain, model_center.model; print("install-bmt: bmtrain", bmtrain.__file__.rsplit("/", 2)[0], "and model_center import")' >&2
