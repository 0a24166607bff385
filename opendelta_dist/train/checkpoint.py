"""Training checkpoints: delta + optimizer + schedule + step + RNG states + data position.

Layout under ``<run_dir>/checkpoints/``::

    step_00000050/
        delta/                  a delta checkpoint (save_finetuned format: config.json + safetensors)
        training_state.pt       optimizer and schedule (or the engine's own files, e.g. DeepSpeed's)
        rng_rank<R>.pt          each rank's random number generator states
        trainer_state.json      step, data position, world size, metrics, and the manifest
                                ("files": each other file's size and SHA-256); written last

A checkpoint is assembled in a hidden temporary directory and renamed into place by rank 0 once
every rank has written its part, so a crash at any moment leaves the previous checkpoint intact and
never a half-written one under a ``step_*`` name.

What the disk does afterwards is checked on resume: :func:`verify_checkpoint` compares the files
with the manifest, :func:`choose_checkpoint` falls back past damaged checkpoints, and
:func:`set_aside` renames one to ``step_XXXXXXXX.damaged`` so that it is neither resumed from nor
pruned. A full disk is reported as :class:`CheckpointSpaceError` (:func:`check_free_space` before
writing, :func:`writing` around the writes).
"""

from __future__ import annotations

import errno
import json
import random
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from opendelta_dist.errors import DeltaCheckpointError
from opendelta_dist.saving import _file_sha256

TRAINER_STATE = "trainer_state.json"
MANIFEST_KEY = "files"
DAMAGED_SUFFIX = ".damaged"
_STEP_DIR = re.compile(r"^step_(\d{8})$")
_DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})
_SPACE_FIX = (
    "Free space there, or point run_dir to another filesystem; the previous checkpoints are intact, and "
    "resume=auto continues from the newest."
)


class CheckpointSpaceError(DeltaCheckpointError, OSError):
    """The disk (or the user's quota) has too little room for a checkpoint.

    Both a :class:`DeltaCheckpointError` and an :class:`OSError` whose ``errno`` is ``ENOSPC`` (or
    ``EDQUOT``, when the quota was what ran out), so ``except OSError`` handlers keep working.
    """

    def __init__(self, message: str, code: int = errno.ENOSPC) -> None:
        # the message alone as args (OSError's (errno, strerror) form would not pickle back here)
        super().__init__(message)
        self.errno = code


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
    """Delete all but the newest ``keep_last`` checkpoints, and stale staging directories.

    Checkpoints set aside as damaged (``step_XXXXXXXX.damaged*``) are not checkpoints any more and are
    kept for a person to look at.
    """
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
    """Write the trainer state last: its presence marks the checkpoint complete.

    The JSON also holds the manifest under ``"files"``: every other file under ``directory``
    (recursively), by relative POSIX path, with its size and SHA-256, for :func:`verify_checkpoint`.

    Args:
        directory: the checkpoint (or its staging directory), every other file already written.
        state: step, data position and the like; not modified.
    """
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        name = path.relative_to(directory).as_posix()
        if name != TRAINER_STATE:
            files[name] = {"size": path.stat().st_size, "sha256": _file_sha256(path)}
    text = json.dumps({**state, MANIFEST_KEY: files}, indent=2, sort_keys=True) + "\n"
    (directory / TRAINER_STATE).write_text(text)


def read_trainer_state(directory: Path) -> dict[str, Any]:
    """The trainer state of a finished checkpoint.

    Raises:
        DeltaCheckpointError: the directory is not a finished checkpoint, or its trainer state is
            not valid JSON.
    """
    file = directory / TRAINER_STATE
    if not file.is_file():
        raise DeltaCheckpointError(f"{directory} is not a finished training checkpoint (no {TRAINER_STATE})")
    try:
        return json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DeltaCheckpointError(f"{file} is not valid JSON ({err}); the checkpoint is damaged") from err


def verify_checkpoint(directory: Path) -> str | None:
    """Compare a finished checkpoint's files with the manifest in its trainer state.

    Every size is checked before any file is hashed, so a truncated file is found without reading
    gigabytes first. Files that are not in the manifest are ignored. A checkpoint written before
    manifests existed (no ``"files"`` key) is accepted as it is.

    Args:
        directory: a ``step_XXXXXXXX`` checkpoint directory.

    Returns:
        None if the checkpoint is intact, else one sentence that names the first problem found,
        e.g. ``"training_state.pt does not match its SHA-256 (corrupted)"``.
    """
    if not (directory / TRAINER_STATE).is_file():
        return f"{TRAINER_STATE} is missing (the checkpoint was never finished)"
    try:
        state = json.loads((directory / TRAINER_STATE).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError):
        return f"{TRAINER_STATE} is not valid JSON"
    except OSError as err:
        return f"{TRAINER_STATE} cannot be read ({err.strerror or err})"
    if not isinstance(state, dict):
        return f"{TRAINER_STATE} does not hold a JSON object"
    if MANIFEST_KEY not in state:
        return None
    files = state[MANIFEST_KEY]
    if not _is_manifest(files):
        return f"the file list in {TRAINER_STATE} is malformed"
    name = TRAINER_STATE
    try:
        for name, entry in files.items():
            file = directory / name
            if not file.is_file():
                return f"{name} is missing"
            size, expected = file.stat().st_size, entry["size"]
            if size != expected:
                how = "truncated" if size < expected else "longer than when it was written"
                return f"{name} is {size} bytes, {expected} expected ({how})"
        for name, entry in files.items():
            if _file_sha256(directory / name) != entry["sha256"]:
                return f"{name} does not match its SHA-256 (corrupted)"
    except OSError as err:
        return f"{name} cannot be read ({err.strerror or err})"
    return None


def _is_manifest(files: object) -> bool:
    # relative paths inside the checkpoint only: a damaged manifest must not send us elsewhere
    return isinstance(files, dict) and all(
        isinstance(entry, dict)
        and isinstance(entry.get("size"), int)
        and isinstance(entry.get("sha256"), str)
        and not Path(name).is_absolute()
        and ".." not in Path(name).parts
        for name, entry in files.items()
    )


def choose_checkpoint(root: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest intact checkpoint under ``root``, and the newer ones that are damaged.

    Args:
        root: the checkpoints directory (``<run_dir>/checkpoints``).

    Returns:
        The newest finished checkpoint that passes :func:`verify_checkpoint` (None when there is
        none), and ``(path, problem)`` for every newer finished checkpoint that failed, newest first.
    """
    damaged: list[tuple[Path, str]] = []
    for candidate in reversed(complete_checkpoints(root)):
        problem = verify_checkpoint(candidate)
        if problem is None:
            return candidate, damaged
        damaged.append((candidate, problem))
    return None, damaged


def set_aside(directory: Path) -> Path:
    """Rename a damaged checkpoint so that it is neither resumed from nor pruned.

    ``step_00000050`` becomes ``step_00000050.damaged``, or ``.damaged.1``, ``.damaged.2``, ... when
    that name is taken, in the same directory.

    Args:
        directory: the damaged checkpoint.

    Returns:
        Its new path.
    """
    target = directory.with_name(directory.name + DAMAGED_SUFFIX)
    number = 0
    while target.exists():
        number += 1
        target = directory.with_name(f"{directory.name}{DAMAGED_SUFFIX}.{number}")
    return directory.rename(target)


def checkpoint_size(directory: Path) -> int:
    """The bytes of all files under ``directory`` (recursively)."""
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def check_free_space(root: Path, needed: int) -> None:
    """Refuse to start a checkpoint that the filesystem holding ``root`` has no room for.

    Args:
        root: where the checkpoint goes; it need not exist yet (its nearest existing ancestor is
            asked).
        needed: the bytes the checkpoint needs, e.g. :func:`checkpoint_size` of the previous one.

    Raises:
        CheckpointSpaceError: less than ``needed`` bytes are free there.
    """
    free = _free_bytes(root)
    if free < needed:
        raise CheckpointSpaceError(
            f"not enough disk space for a checkpoint in {root}: {_mb(needed)} needed, {_mb(free)} free. {_SPACE_FIX}"
        )


@contextmanager
def writing(path: Path, needed: int | None = None) -> Iterator[None]:
    """Report a full disk (or quota) while writing ``path`` as a :class:`CheckpointSpaceError`.

    Args:
        path: the file or directory being written, named in the message.
        needed: the bytes the write needs, if known, also named in the message.

    Raises:
        CheckpointSpaceError: an ``OSError`` with errno ``ENOSPC`` or ``EDQUOT`` was raised inside
            (chained as its cause). Other errors pass through unchanged.
    """
    try:
        yield
    except CheckpointSpaceError:
        raise
    except OSError as err:
        if err.errno not in _DISK_FULL:
            raise
        need = f"{_mb(needed)} needed, " if needed is not None else ""
        what = "the disk quota ran out" if err.errno == errno.EDQUOT else "the disk filled up"
        raise CheckpointSpaceError(
            f"{what} while writing {path}: {need}{_mb(_free_bytes(path))} free now. {_SPACE_FIX}", err.errno
        ) from err


def _free_bytes(path: Path) -> int:
    # the path itself may not exist yet: ask the filesystem of its nearest existing ancestor
    existing = path.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    return shutil.disk_usage(existing).free


def _mb(size: int) -> str:
    return f"{size / 2**20:.1f} MB"


def space_error(path: Path, needed: int | None, error: BaseException) -> CheckpointSpaceError | None:
    """``error`` as a :class:`CheckpointSpaceError` when it came from a full filesystem, else None.

    torch.save and safetensors do not raise ``OSError(ENOSPC)`` for a full disk (``unexpected pos``, ``No
    space left``); what tells is the filesystem: less than 1 MiB (or ``needed``) left where ``path`` was written.
    """
    if isinstance(error, CheckpointSpaceError):
        return error
    free = _free_bytes(path)
    if free >= max(needed or 0, 2**20):
        return None
    wanted = f"{_mb(needed)} MB needed, " if needed else ""
    message = f"the disk is full while writing {path} ({wanted}{_mb(free)} MB free now; {error}). {_SPACE_FIX}"
    space = CheckpointSpaceError(message)
    space.__cause__ = error
    return space
