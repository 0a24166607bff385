"""Train a delta with one command, on one process or many.

    torchrun --standalone --nproc_per_node=2 launch/train.py +recipe=lora_t5_tiny
    torchrun --nproc_per_node=8 launch/train.py +recipe=lora_t5_11b engine=fsdp
    python launch/train.py +recipe=lora_t5_tiny engine=single train.max_steps=20

The configuration is composed by Hydra from configs/ (defaults) and recipes/ (what a recipe changes);
any key can be overridden on the command line. Every rank composes the same configuration and
writes under the same run_dir (no timestamp in it: the same command resumes with resume=auto);
only rank 0 writes files and logs.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from opendelta_dist.errors import OpenDeltaError
from opendelta_dist.train.recipe import run


@hydra.main(version_base="1.3", config_path="../configs", config_name="config")
def main(cfg: DictConfig) -> None:
    """Run the composed recipe; a library error becomes one clear line and exit status 1."""
    try:
        run(cfg)
    except OpenDeltaError as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
