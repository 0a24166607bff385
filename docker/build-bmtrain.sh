#!/usr/bin/env bash
# Build BMTrain from its source release for the given GPU architectures and install it into the active
# Python (used by docker/Dockerfile; needs nvcc, NCCL's headers and libraries, torch already installed).
#   bash docker/build-bmtrain.sh 1.0.1 "80;90"
#
# BMTrain's CMakeLists.txt hard-codes sm_61..sm_80 (CUDA 13's nvcc no longer knows sm_61, and Hopper's
# sm_90 is missing): the list becomes CUDA_ARCHS. Its dependency on the CUDA 11 NCCL wheel is dropped:
# the extension links the system NCCL, and torch brings its own into the process. BUILD_DOCKER_ENV=1
# selects BMTrain's portable CPU flags instead of -march=native of the build machine; they include
# -mavx512f (its CPU Adam does not compile without it), so its compiled CPU code may need AVX-512 CPUs.
set -euo pipefail

die() {
  printf 'build-bmtrain.sh: error: %s\n' "$*" >&2
  exit 2
}
version="${1:-}"
archs="${2:-}"
[[ -n "$version" && -n "$archs" ]] || die "usage: build-bmtrain.sh VERSION CUDA_ARCHS (e.g. 1.0.1 \"80;90\")"
[[ "$archs" =~ ^[0-9]+(;[0-9]+)*$ ]] || die "CUDA_ARCHS='$archs': give compute capabilities like \"80;90\""
NCCL_INCLUDE_DIR="${NCCL_INCLUDE_DIR:-/usr/include}"
NCCL_LIB_DIR="${NCCL_LIB_DIR:-/usr/lib/x86_64-linux-gnu}"
[[ -f "$NCCL_INCLUDE_DIR/nccl.h" ]] || die "no nccl.h in $NCCL_INCLUDE_DIR: install libnccl-dev or set NCCL_INCLUDE_DIR"
command -v nvcc >/dev/null || die "nvcc is not on PATH: build in a CUDA devel image"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
pip download --no-deps --no-binary=bmtrain --no-build-isolation "bmtrain==${version}" -d "$work"
tar -xzf "$work/bmtrain-${version}.tar.gz" -C "$work"
src="$work/bmtrain-${version}"

grep -q '"61;62;70;72;75;80"' "$src/CMakeLists.txt" \
  || die "bmtrain ${version}'s CMakeLists.txt has no hard-coded architecture list to replace; check this script"
sed -i \
  -e "s/\"61;62;70;72;75;80\"/\"${archs}\"/g" \
  -e 's/ *-gencode=arch=compute_[0-9]*,code=sm_[0-9]*//g' \
  "$src/CMakeLists.txt"
sed -i '/nvidia-nccl-cu11/d' "$src/setup.py"

pip install "cmake>3.27" pybind11 ninja
BUILD_DOCKER_ENV=1 NCCL_INCLUDE_DIR="$NCCL_INCLUDE_DIR" NCCL_LIB_DIR="$NCCL_LIB_DIR" \
  CMAKE_BUILD_PARALLEL_LEVEL="${MAX_JOBS:-8}" \
  pip install --no-build-isolation --no-deps "$src"
