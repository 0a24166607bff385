#!/usr/bin/env bash
# bash scripts/install-torch.sh PYTHON REQUIREMENTS: installs the torch build that REQUIREMENTS pins (its CPU
# build, torch==X+cpu, which PyPI does not carry) into PYTHON's environment, before the rest of the lock.
#
# Where it comes from: a wheel folder pip already knows (find-links in pip's configuration or PIP_FIND_LINKS: some
# machines keep the wheel on disk), else PyTorch's CPU index, https://download.pytorch.org/whl/cpu, or the index
# OPENDELTA_TORCH_INDEX names (a mirror of it). The index is asked only when no local wheel fits, so a machine that
# has the wheel and cannot reach the index never waits for it.
set -euo pipefail
PY=$1
REQUIREMENTS=$2
spec=$(sed -n 's/^\(torch==[^[:space:];]*\).*/\1/p' "$REQUIREMENTS" | head -n 1)
if [ -z "$spec" ]; then
  echo "install-torch: $REQUIREMENTS pins no torch==VERSION" >&2
  exit 1
fi
index=${OPENDELTA_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}
if "$PY" -m pip install -q --no-index --no-deps "$spec" >/dev/null 2>&1; then
  echo "torch: $spec, from a local wheel folder"
  exit 0
fi
echo "torch: $spec, from $index (about 200 MB)"
if ! "$PY" -m pip install --no-deps --timeout 30 --retries 2 --index-url "$index" "$spec"; then
  echo "install-torch: could not install $spec from $index: set OPENDELTA_TORCH_INDEX to an index that has it" \
    "(a mirror of PyTorch's CPU index), or put its wheel into a folder that pip's find-links names" >&2
  exit 1
fi
