#!/usr/bin/env bash
# Regenerates requirements.lock: the exact version of every Python package that `.[dev]` needs, transitive
# ones included, resolved by uv out of setup.py's ranges for CPython 3.11 on x86_64 Linux. torch is held at
# constraints.txt's build, taken from /opt/wheels where the machine has that folder (this kind of machine keeps
# its CPU wheel there), so no CUDA package enters the lock.
#   bash scripts/lock.sh              # after changing setup.py: keeps the locked versions that still fit
#   bash scripts/lock.sh --upgrade    # every package to its newest allowed release (then run the tests)
# Extra arguments go to `uv pip compile`; LOCK_OUTPUT writes elsewhere (scripts/test-deps.sh uses both).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${LOCK_OUTPUT:-$ROOT/requirements.lock}"
# uv comes with the dev extra; the set-up's environment has it
# shellcheck source=scripts/env.sh
source "$ROOT/scripts/env.sh"
links=()
[ -d /opt/wheels ] && links=(--find-links /opt/wheels)
cd "$ROOT"
uv pip compile setup.py --extra dev --constraint constraints.txt "${links[@]}" \
  --python-version 3.11 --python-platform x86_64-manylinux_2_28 --no-header --quiet \
  --output-file "$OUT" "$@"
# a header that names the command, not the machine it ran on
{
  echo "# Exact versions of every Python dependency of .[dev], from setup.py's ranges. Do not edit:"
  echo "# regenerate with 'bash scripts/lock.sh' (see that script); installed by scripts/env.sh."
  cat "$OUT"
} >"$OUT.tmp" && mv "$OUT.tmp" "$OUT"
