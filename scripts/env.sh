# Sourced by the set-up commands: creates .venv on first use with pinned dependencies, then activates it.
# torch is pinned first (a local CPU build here); constraints.txt keeps every later install on that torch.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${OPENDELTA_VENV:-$ROOT/.venv}"
if [ ! -x "$VENV/bin/python" ] || [ ! -f "$VENV/.installed" ] || [ "$ROOT/setup.py" -nt "$VENV/.installed" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q "$(grep '^torch==' "$ROOT/constraints.txt")"
  "$VENV/bin/python" -m pip install -q -c "$ROOT/constraints.txt" -e "$ROOT[dev]"
  touch "$VENV/.installed"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
cd "$ROOT"
