#!/usr/bin/env bash
# The suite on the edges of setup.py's ranges, each in its own environment (.venv-deps-<edge>); CI runs the lock.
#   bash scripts/test-deps.sh oldest [pytest args]   # the lowest version each range allows (uv's lowest-direct)
#   bash scripts/test-deps.sh newest [pytest args]   # the newest released version of everything
# A failure here says that a range in setup.py has to move, or the code has to follow upstream; main stays
# green because it installs requirements.lock. torch stays at constraints.txt's build on both edges.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
EDGE="${1:-}"
case "$EDGE" in
  oldest) resolution=lowest-direct ;;
  newest) resolution=highest ;;
  *) echo "usage: bash scripts/test-deps.sh oldest|newest [pytest args]" >&2; exit 2 ;;
esac
shift
VENV="$ROOT/.venv-deps-$EDGE"
REQUIREMENTS="$VENV.requirements.txt"
rm -f "$REQUIREMENTS"
LOCK_OUTPUT="$REQUIREMENTS" bash "$ROOT/scripts/lock.sh" --resolution "$resolution"
bash "$ROOT/scripts/install.sh" "$VENV" "$REQUIREMENTS"
echo "== $EDGE edge:"
grep -iE '^(torch|transformers|peft|deepspeed|hydra-core|omegaconf|safetensors|accelerate|huggingface-hub|numpy|rich)==' \
  "$REQUIREMENTS"
# shellcheck disable=SC1091
source "$VENV/bin/activate"
cd "$ROOT"
export HF_HUB_OFFLINE=1
python -m pytest -q "$@"
