"""Training checkpoints: delta + optimizer + schedule + step + RNG states + data position.

Layout under ``<run_dir>/checkpoints/``::

    step_00000050/
        delta/                  a delta checkpoint (save_finetuned format: config.json + safetensors)
        training_state.pt       optimizer and schedule (or the engine's own files, e.g. DeepSpeed's)
        rng_rank<R>.pt          each rank's random number generator states
        trainer_state.json      step, data position, world size, metrics; written last

A checkpoint is assembled in a hidden temporary directory and renamed into place by rank 0 once
every rank has written its part, so a crash at any moment leaves the previous checkpoint intact and
never a half-written one under a ``step_*`` name.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from opendelta_dist.errors import DeltaCheckpointError

TRAINER_STATE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


def step_dir(root: Path, step: int) -> Path:
    """The directory of the checkpoint at ``step``."""
    return root / f"step_{step:08d}"


def staging_dir(root: Path, step: int) -> Path:
    """Where the checkpoint at ``step`` is assembled before it is renamed into place."""
    return root / f".step_{step:08d}.tmp"


def complete_checkpoints(root: Path) -> list[Path]:
    """The finished checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / TRAINER_STATE).is_file()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(root: Path) -> Path | None:
    """The newest finished checkpoint under ``root``, or None."""
    done = complete_checkpoints(root)
    return done[-1] if done else None


def prune(root: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` checkpoints, and stale staging directories."""
    for stale in root.glob(".step_*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    if keep_last > 0:
        for old in complete_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)


def rng_state() -> dict[str, Any]:
    """This process's random number generator states."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.random.get_rng_state(),
        # numpy's state as tensors and numbers, so that it loads with torch.load(weights_only=True)
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.random.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_rng(directory: Path, rank: int) -> None:
    """Write this rank's RNG states."""
    torch.save(rng_state(), directory / f"rng_rank{rank}.pt")


def load_rng(directory: Path, rank: int) -> None:
    """Restore this rank's RNG states, if the checkpoint has them for this rank."""
    file = directory / f"rng_rank{rank}.pt"
    if file.is_file():
        set_rng_state(torch.load(file, weights_only=True))


def write_trainer_state(directory: Path, state: dict[str, Any]) -> None:
    """Write the trainer state last: its presence marks the checkpoint complete."""
    (directory / TRAINER_STATE).write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")


def read_trainer_state(directory: Path) -> dict[str, Any]:
    """The trainer state of a finished checkpoint.

    Raises:
        DeltaCheckpointError: the directory is not a finished checkpoint.
    """
    file = directory / TRAINER_STATE
    if not file.is_file():
        raise DeltaCheckpointError(f"{directory} is not a finished training checkpoint (no {TRAINER_STATE})")
    return json.loads(file.read_text())
