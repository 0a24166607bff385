"""One run per run directory: what a run writes there, and how a new, resumed or finished run treats it.

A run directory holds exactly one run. A new run (``resume: null``) in a directory that holds another
run's files is refused before anything is built, with the three ways on: continue it (``resume=auto``),
replace it (``overwrite_run_dir=true``, which deletes only what runs write, listed in :data:`RUN_FILES`),
or choose another ``run_dir``. A resumed run continues the directory's files: its ``metrics.jsonl`` loses
the rows written after the checkpoint it resumes from, so no step is logged twice. A finished run leaves
``result.json`` (its last step and final metrics); ``resume=auto`` on it does nothing, unless
``train.max_steps`` asks for more steps.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from opendelta_dist.errors import DeltaConfigError
from opendelta_dist.train.loggers import CONSOLE_LOG, METRICS_FILE, WANDB_ID

RESULT = "result.json"
CONFIG = "config.json"
#: who runs in the directory: host, pid and launch id, in a file locked while the run lives (not a run file:
#: never deleted, and alone it does not make a run)
LAUNCH = ".launch"

#: what a run writes into its run directory (and ``overwrite_run_dir=true`` deletes); nothing else is touched
RUN_FILES = (
    CONFIG,
    METRICS_FILE,
    CONSOLE_LOG,
    RESULT,
    "checkpoints",
    "final_delta",
    "final_model",
    "tensorboard",
    "wandb",
    "wandb-cache",
    "wandb-config",
    WANDB_ID,
)


def run_files(run_dir: Path) -> list[str]:
    """The names of :data:`RUN_FILES` present in ``run_dir`` (empty: it holds no run)."""
    return [name for name in RUN_FILES if (run_dir / name).exists()]


def clear_run(run_dir: Path) -> None:
    """Delete what a run wrote into ``run_dir`` (:data:`RUN_FILES`), and nothing else."""
    for name in RUN_FILES:
        path = run_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def launch_id() -> str | None:
    """What stays the same across the restarts of one job: torchrun's run id, or Slurm's job id."""
    return os.environ.get("TORCHELASTIC_RUN_ID") or os.environ.get("SLURM_JOB_ID") or None


def restarted(run_dir: Path) -> bool:
    """Whether this process restarts a job that already ran in ``run_dir`` (torchrun's ``--max_restarts``, a
    Slurm requeue): the launch id recorded there is this process's."""
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0
    restart |= int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0
    if not restart or launch_id() is None:
        return False
    try:
        recorded = json.loads((run_dir / LAUNCH).read_text()).get("launch_id")
    except (OSError, ValueError):
        return False
    return recorded == launch_id()


def resume_setting(cfg: dict[str, Any], run_dir: Path) -> str | None:
    """``resume`` as the run uses it: None (a new run), ``"auto"`` or a checkpoint path.

    A restart of a job that already ran here (:func:`restarted`) continues from its newest checkpoint
    (``auto``), whatever ``resume`` says: ``resume=PATH`` is where the first attempt started.

    Raises:
        DeltaConfigError: ``overwrite_run_dir=true`` together with ``resume``.
    """
    resume = cfg.get("resume")
    resume = None if resume in (None, "", "none", "null", False) else str(resume)
    if cfg.get("overwrite_run_dir") and resume is not None:
        raise DeltaConfigError(
            f"overwrite_run_dir=true deletes run_dir's run, and resume={resume} continues one; choose one of them"
        )
    if restarted(run_dir):
        return "auto"
    return resume


def check_run_dir_free(run_dir: Path, resume: str | None, overwrite: bool) -> None:
    """Refuse a new run in a directory that holds a run.

    A run resumed from a checkpoint of another directory (``resume=PATH`` outside ``run_dir``) is a new run
    here.

    Args:
        run_dir: the run directory (absolute).
        resume: :func:`resume_setting`.
        overwrite: ``overwrite_run_dir``.

    Raises:
        DeltaConfigError: ``run_dir`` holds a run and this one neither continues nor replaces it.
    """
    continues = resume == "auto" or (resume is not None and Path(resume).resolve().is_relative_to(run_dir))
    if continues or overwrite:
        return
    present = run_files(run_dir)
    if not present:
        return
    raise DeltaConfigError(
        f"run_dir={run_dir} holds a run already ({', '.join(present)}). Continue it with resume=auto, replace "
        "it with overwrite_run_dir=true (deletes those files), or choose another run_dir (e.g. run_dir="
        f"{run_dir.parent / (run_dir.name + '-2')})"
    )


def claim(run_dir: Path) -> Any:
    """Rank 0: lock ``run_dir`` for this run (released when the process ends, however it ends).

    Returns:
        The open lock file (keep it open for the run's life), or None where the filesystem has no locks.

    Raises:
        DeltaConfigError: another live run holds the directory (named by host and pid).
    """
    path = run_dir / LAUNCH
    handle = path.open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        try:
            holder = json.loads(handle.read() or "{}")
        except ValueError:
            holder = {}
        handle.close()
        who = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}"
        raise DeltaConfigError(
            f"run_dir={run_dir} is in use by a live run ({who}); wait for it or stop it, or choose another run_dir"
        ) from None
    except OSError:
        return None  # no locks on this filesystem: nothing to enforce with
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "launch_id": launch_id()}) + "\n")
    handle.flush()
    return handle


def read_result(run_dir: Path) -> dict[str, Any] | None:
    """The ``result.json`` of a finished run, or None."""
    try:
        return json.loads((run_dir / RESULT).read_text())
    except (OSError, ValueError):
        return None


def write_result(run_dir: Path, step: int, metrics: dict[str, float], final: Path) -> None:
    """Mark the run finished: its last step, final metrics and where its delta (or model) is."""
    text = json.dumps({"step": step, "eval": metrics, "final": final.name}, indent=2, sort_keys=True) + "\n"
    tmp = run_dir / f".{RESULT}.tmp"
    tmp.write_text(text)
    os.replace(tmp, run_dir / RESULT)


def truncate_metrics(run_dir: Path, step: int, final_eval_due: bool) -> int:
    """Drop the rows of ``metrics.jsonl`` that a run resumed at ``step`` writes again.

    Kept: every row before ``step``, the training row of ``step`` and, unless ``final_eval_due``, its
    evaluation row. (An evaluation the stop interrupted is not in the log and runs again on resume.)

    Args:
        run_dir: the run directory.
        step: the step of the checkpoint the run resumes from.
        final_eval_due: the run resumes at its last step, whose (final) evaluation runs again.

    Returns:
        The number of rows dropped.
    """
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
            row_step = int(row["step"])
        except (ValueError, KeyError, TypeError):
            dropped += 1  # a line cut short by the interruption
            continue
        if row_step < step or (row_step == step and (row.get("split") == "train" or not final_eval_due)):
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(f"{line}\n" for line in kept))
        os.replace(tmp, path)
    return dropped


def changed_settings(old: dict[str, Any], new: dict[str, Any], ignore: tuple[str, ...] = ()) -> list[str]:
    """``key: old -> new`` for every leaf of two configurations that differs (dotted keys), sorted."""

    def leaves(node: Any, prefix: str = "") -> dict[str, Any]:
        if not isinstance(node, dict):
            return {prefix: node}
        out: dict[str, Any] = {}
        for key, value in node.items():
            out |= leaves(value, f"{prefix}.{key}" if prefix else str(key))
        return out

    a, b = leaves(old), leaves(new)
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and k not in ignore)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys]


def claim_on_rank0(run_dir: Path, main: bool) -> Any:
    """:func:`claim` on rank 0, refused alike on every rank (collective).

    Returns:
        Rank 0's lock (None elsewhere).

    Raises:
        DeltaConfigError: another live run holds ``run_dir``.
    """
    lock, refusal = None, [None]
    if main:
        try:
            lock = claim(run_dir)
        except DeltaConfigError as error:
            refusal = [str(error)]
    if dist.is_initialized() and dist.get_world_size() > 1:
        cpu = torch.device("cpu") if "gloo" in str(dist.get_backend()) else None
        dist.broadcast_object_list(refusal, src=0, device=cpu)
    if refusal[0] is not None:
        raise DeltaConfigError(refusal[0])
    return lock
