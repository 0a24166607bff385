"""Which checkpoint a run resumes from, and whether this run can take it.

Checked before the engine is prepared, so that a checkpoint the run cannot continue costs no optimizer
set-up: a damaged one (its files do not match its manifest) is set aside for the one before it, one
past ``train.max_steps``, written for another delta or by an engine whose optimizer state this engine
cannot read is refused with what to do.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from opendelta_dist.auto_delta import AutoDeltaConfig, read_config_file
from opendelta_dist.basemodel import DeltaBase
from opendelta_dist.errors import DeltaCheckpointError, DeltaConfigError
from opendelta_dist.train import checkpoint as ckpt
from opendelta_dist.train.engines import Engine, reads_training_state
from opendelta_dist.train.topology import Topology


def resume_source(
    resume: str | None, ckpt_root: Path, max_steps: int, say: Callable[[str], None] | None
) -> Path | None:
    """The checkpoint to resume from; collective.

    ``resume=auto``: the newest intact checkpoint under ``ckpt_root``. Rank 0 checks every file against the
    checkpoint's manifest, sets a damaged newer one aside (renamed ``*.damaged``, said by name) and tells
    the other ranks its choice. ``resume=PATH``: that checkpoint, which must be intact.

    Args:
        resume: ``None``, ``"auto"`` or a checkpoint directory.
        ckpt_root: the run's ``checkpoints`` directory.
        max_steps: ``train.max_steps``.
        say: rank 0's console (None on the other ranks).

    Returns:
        The checkpoint, or None (a new run, or ``resume=auto`` with no checkpoint yet).

    Raises:
        DeltaCheckpointError: the named checkpoint, or every checkpoint, is damaged.
        DeltaConfigError: the checkpoint is past ``train.max_steps``.
    """
    if resume is None:
        return None
    main = say is not None
    choice: list[Any] = [None, [], None]
    if main:
        if resume == "auto":
            chosen, damaged = ckpt.choose_checkpoint(ckpt_root)
            choice = [str(chosen) if chosen else None, [(str(p), why) for p, why in damaged], None]
        else:
            path = Path(resume)
            try:
                ckpt.read_trainer_state(path)  # raises when it is not a finished checkpoint
                problem = ckpt.verify_checkpoint(path)
                choice = [str(path), [(str(path), problem)] if problem else [], None]
            except DeltaCheckpointError as error:  # said by every rank alike, below
                choice = [None, [], f"resume={resume}: {error}; give resume=auto, or a checkpoint directory (step_N)"]
    if dist.is_initialized() and dist.get_world_size() > 1:
        # a few bytes: over gloo's CPU side of the group where it has one (``cpu:gloo,cuda:nccl``)
        cpu = torch.device("cpu") if "gloo" in str(dist.get_backend()) else None
        dist.broadcast_object_list(choice, src=0, device=cpu)
    chosen, damaged, refused = choice
    if refused is not None:
        raise DeltaConfigError(refused)
    if damaged and (resume != "auto" or chosen is None):
        found = "; ".join(f"{p}: {why}" for p, why in damaged)
        what = "it" if resume != "auto" else "every checkpoint"
        raise DeltaCheckpointError(
            f"cannot resume: {what} is damaged ({found}). Resume from an intact checkpoint (resume=PATH), or start "
            "again with overwrite_run_dir=true"
        )
    if say is not None:
        for path, why in damaged:
            aside = ckpt.set_aside(Path(path))
            say(f"checkpoint {path} is damaged ({why}): set aside as {aside.name}")
        if resume == "auto" and chosen is None:
            say(f"resume=auto: no checkpoint in {ckpt_root}; starting from step 0")
    if chosen is None:
        return None
    source = Path(chosen)
    step = int(ckpt.read_trainer_state(source)["step"])
    if step > max_steps:
        raise DeltaConfigError(
            f"cannot resume from {source}: it is at step {step}, past train.max_steps={max_steps}; resume with "
            f"train.max_steps={step} or more, or start a new run in another run_dir"
        )
    return source


def check_resumable(source: Path, engine: Engine, topology: Topology, tuned_name: str) -> None:
    """Refuse a checkpoint whose optimizer state this engine and topology cannot take.

    Raises:
        DeltaConfigError: written by an engine whose state this one cannot read, or refused by the engine
            (e.g. DeepSpeed's partitions for another world size).
    """
    state = ckpt.read_trainer_state(source)
    written_by = state.get("engine")
    if written_by is not None and not reads_training_state(engine.name, written_by):
        raise DeltaConfigError(
            f"cannot resume from {source}: it was written by engine={written_by}, whose optimizer state "
            f"engine={engine.name} cannot read; resume with engine={written_by}, or start a new run "
            f"(another run_dir, or overwrite_run_dir=true); its delta is in {source / tuned_name}"
        )
    try:
        engine.check_resume(state, topology)
    except DeltaConfigError as error:
        raise DeltaConfigError(f"cannot resume from {source}: {error}") from error


def check_same_delta(source: Path, delta: DeltaBase | None, engine: Engine, tuned_name: str) -> None:
    """Refuse a checkpoint of another delta (or of full fine-tuning for a delta run, and the reverse).

    Raises:
        DeltaConfigError: the checkpoint holds something else, or its delta options differ (named).
    """
    holds = "model" if (source / "model").is_dir() else "delta"
    if holds != tuned_name:
        what = {"model": "a fully fine-tuned model (delta_type none)", "delta": "a delta"}
        raise DeltaConfigError(
            f"cannot resume from {source}: it holds {what[holds]} and this run trains {what[tuned_name]}. "
            "Resume with the delta configuration it was written with, or start a new run (another run_dir, "
            "or overwrite_run_dir=true)."
        )
    if delta is None:
        return
    saved = AutoDeltaConfig.from_dict(read_config_file(source / "delta")).to_dict()
    wanted = delta.config.to_dict()
    # what the engine saves differently (the bmt engine saves for transformers' T5, backend hf)
    wanted |= {k: v for k, v in engine.saved_delta_config().items() if k in wanted}
    differ = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
    if differ:
        details = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {wanted.get(k)!r}" for k in differ)
        raise DeltaConfigError(
            f"cannot resume from {source}: its delta configuration differs ({details}). Resume with the "
            "same delta options, or start a new run (another run_dir, or overwrite_run_dir=true)."
        )
