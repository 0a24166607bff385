#!/usr/bin/env bash
# The main job: the embedded default recipe (LoRA on a tiny T5, the tiny data set in the package), 2 CPU processes.
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$(dirname "$0")/.."
torchrun --standalone --nproc_per_node=2 launch/train.py +recipe=lora_t5_tiny "$@"
