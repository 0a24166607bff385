#!/usr/bin/env bash
# The main job on the embedded default: LoRA on a tiny T5 with the tiny data set in the repo, 2 CPU processes.
source "$(dirname "$0")/env.sh"
torchrun --standalone --nproc_per_node=2 examples/tune_tiny.py "$@"
