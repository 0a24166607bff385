#!/usr/bin/env bash
# bash scripts/opendelta-fixtures.sh [ARGS...]: regenerates tests/fixtures/opendelta_0_3_2/ with the real OpenDelta 0.3.2.
#
# Creates (on first use, and again whenever the pins change) a side virtual environment outside the repository,
# OPENDELTA_FIXTURES_VENV (default /tmp/opendelta-0.3.2-venv), holding exactly the packages pinned in
# scripts/opendelta-fixtures.requirements.txt, then runs scripts/opendelta_fixtures.py in it with ARGS
# (--out DIR, --only PREFIX; see its --help). The project's own environment (.venv) is left alone, and the tests
# never need this one.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${OPENDELTA_FIXTURES_VENV:-/tmp/opendelta-0.3.2-venv}"
REQ="$ROOT/scripts/opendelta-fixtures.requirements.txt"
STAMP="$VENV/.installed"
if [ ! -x "$VENV/bin/python" ] || [ ! -f "$STAMP" ] || [ "$REQ" -nt "$STAMP" ]; then
  python3 -m venv --clear "$VENV"
  # --no-deps: the requirements file lists every package (see its header for why)
  "$VENV/bin/python" -m pip install -q --no-deps -c "$ROOT/constraints.txt" -r "$REQ"
  "$VENV/bin/python" -c "import opendelta" 2>/dev/null || { echo "import opendelta fails in $VENV" >&2; exit 1; }
  touch "$STAMP"
fi
cd "$ROOT"
exec "$VENV/bin/python" "$ROOT/scripts/opendelta_fixtures.py" "$@"
