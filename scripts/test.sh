#!/usr/bin/env bash
# The test command: lint, then the whole suite (CPU, 2-process gloo runs included).
# As root with apt it first installs the system packages of the Slurm, multi-host and browser tests
# (scripts/system-deps.sh, once per machine; OPENDELTA_SYSTEM_DEPS=0 skips it); elsewhere those tests skip,
# saying why.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${OPENDELTA_SYSTEM_DEPS:-1}" != 0 ]; then
  bash scripts/system-deps.sh || echo "test.sh: system packages not installed; the tests that need them will skip" >&2
fi
source scripts/env.sh
export HF_HUB_OFFLINE=1  # no test downloads anything; fail fast instead of retrying the hub
ruff check .
python -m pytest -q --durations=30 "$@"  # the slowest tests, for keeping the suite fast
