#!/usr/bin/env bash
# The test command: lint, then the whole suite (CPU, 2-process gloo runs included).
source "$(dirname "$0")/env.sh"
ruff check .
python -m pytest -q "$@"
