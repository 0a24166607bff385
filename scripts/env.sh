# Sourced by the set-up commands: creates .venv from requirements.lock on first use (again whenever the lock or
# the install script changes), then activates it. Every package, transitive ones included, is pinned in the lock;
# torch is its local CPU build (constraints.txt), so no CUDA build is pulled.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${OPENDELTA_VENV:-$ROOT/.venv}"
STAMP="$VENV/.installed"
if [ ! -x "$VENV/bin/python" ] || [ ! -f "$STAMP" ] || [ "$ROOT/requirements.lock" -nt "$STAMP" ] \
  || [ "$ROOT/scripts/install.sh" -nt "$STAMP" ] || [ "$ROOT/setup.py" -nt "$STAMP" ]; then
  bash "$ROOT/scripts/install.sh" "$VENV" "$ROOT/requirements.lock"
  touch "$STAMP"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
# DeepSpeed's CPU ops, compiled by install.sh
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$VENV/torch_extensions}"
cd "$ROOT"
