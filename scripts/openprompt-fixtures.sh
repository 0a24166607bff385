#!/usr/bin/env bash
# bash scripts/openprompt-fixtures.sh [ARGS...]: regenerates tests/fixtures/openprompt_1_0_1/ with the real OpenPrompt 1.0.1.
#
# Creates (on first use, and again whenever the pins change) a side virtual environment outside the repository,
# OPENPROMPT_FIXTURES_VENV (default /tmp/openprompt-1.0.1-venv), holding exactly the packages pinned in
# scripts/openprompt-fixtures.requirements.txt, then runs scripts/openprompt_fixtures.py in it with ARGS
# (--out DIR, --only PREFIX; see its --help). The project's own environment (.venv) is left alone, and the tests
# never need this one.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${OPENPROMPT_FIXTURES_VENV:-/tmp/openprompt-1.0.1-venv}"
REQ="$ROOT/scripts/openprompt-fixtures.requirements.txt"
STAMP="$VENV/.installed"
if [ ! -x "$VENV/bin/python" ] || [ ! -f "$STAMP" ] || [ "$REQ" -nt "$STAMP" ]; then
  python3 -m venv --clear "$VENV"
  # --no-deps: the requirements file lists every package (see its header for why)
  "$VENV/bin/python" -m pip install -q --no-deps -c "$ROOT/constraints.txt" -r "$REQ"
  "$VENV/bin/python" -W ignore -c "import openprompt" 2>/dev/null || { echo "import openprompt fails in $VENV" >&2; exit 1; }
  touch "$STAMP"
fi
cd "$ROOT"
exec "$VENV/bin/python" "$ROOT/scripts/openprompt_fixtures.py" "$@"
