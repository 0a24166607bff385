#!/usr/bin/env bash
# The test command: lint, then the whole suite (CPU, 2-process gloo runs included).
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1  # no test downloads anything; fail fast instead of retrying the hub
ruff check .
python -m pytest -q "$@"
