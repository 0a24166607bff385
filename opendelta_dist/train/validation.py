"""The run configuration's checks, made before a run creates anything.

:func:`validate_run_config` refuses what cannot train (a step count, batch size or learning rate out of
range, a model directory that is not there, a ``run_dir`` that cannot be written) with a
:class:`~opendelta_dist.errors.DeltaConfigError` that names the key and the fix, so that a mistyped
override costs neither a model build nor a half-written run directory. The device is checked where it
is chosen (:meth:`~opendelta_dist.train.topology.Topology.from_environment`), the divisibility of the
batch by the world size by :func:`~opendelta_dist.train.batching.check_batch`.
"""

from __future__ import annotations

import difflib
import math
import os
import tempfile
from dataclasses import fields
from pathlib import Path
from typing import Any

from opendelta_dist.errors import DeltaConfigError
from opendelta_dist.train.data import DataConfig
from opendelta_dist.train.engines import engine_class
from opendelta_dist.train.engines.base import OPTIMIZERS, OptimizerSpec
from opendelta_dist.train.models import ModelConfig, check_model_source
from opendelta_dist.train.stopping import parse_margin, parse_signal
from opendelta_dist.train.tasks import task_class

_MISSING = object()

# key: (smallest value, what the value counts, a valid example)
_INTEGERS: dict[str, tuple[int, str, int]] = {
    "seed": (0, "the random seed", 0),
    "train.max_steps": (1, "the number of optimizer steps to train", 100),
    "train.global_batch_size": (1, "the examples per optimizer step, over all ranks and accumulation steps", 16),
    "train.grad_accum": (1, "the micro-batches accumulated per optimizer step", 1),
    "train.eval_batch_size": (1, "the evaluation batch, over all ranks", 32),
    "train.eval_every": (0, "the optimizer steps between evaluations (0: only the final one)", 50),
    "train.log_every": (1, "the optimizer steps between log lines", 10),
    "checkpoint.every": (0, "the optimizer steps between checkpoints (0: none but the final delta)", 50),
    "checkpoint.keep_last": (0, "the checkpoints kept (0: all of them)", 2),
    "checkpoint.max_requeues": (0, "the requeues of its Slurm job the run may ask for", 20),
    "optim.warmup_steps": (0, "the optimizer steps of warm-up", 0),
}

# key: (bound, whether the bound itself is allowed, what the value is, a valid example)
_NUMBERS: dict[str, tuple[float, bool, str, str]] = {
    "optim.lr": (0.0, False, "the learning rate", "1e-3"),
    "optim.weight_decay": (0.0, True, "the weight decay", "0.01"),
    "optim.eps": (0.0, False, "the optimizer's epsilon", "1e-8"),
    "optim.momentum": (0.0, True, "the SGD momentum", "0.9"),
    "optim.max_grad_norm": (0.0, False, "the gradient clipping norm (null: no clipping)", "1.0"),
}

# what the recipe sets in an OptimizerSpec itself, from the train group
_DERIVED_OPTIM_FIELDS = ("total_steps", "grad_accum")


def _lookup(cfg: dict[str, Any], key: str) -> Any:
    """The value at the dotted ``key``, or ``_MISSING``."""
    value: Any = cfg
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return _MISSING
        value = value[part]
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_integers(cfg: dict[str, Any]) -> None:
    for key, (minimum, what, example) in _INTEGERS.items():
        value = _lookup(cfg, key)
        if value is _MISSING:
            continue  # the recipe's default applies
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            kind = "a positive integer" if minimum == 1 else "0 or a positive integer"
            raise DeltaConfigError(f"{key}={value!r}: {what} must be {kind}; set e.g. {key}={example}")


#: the keys of each group the recipe reads (delta, engine and optim are checked by what reads them)
_GROUP_KEYS: dict[str, tuple[str, ...]] = {
    "": (
        "seed",
        "device",
        "run_dir",
        "resume",
        "overwrite_run_dir",
        "train",
        "model",
        "delta",
        "data",
        "engine",
        "optim",
        "logger",
        "checkpoint",
        "prompt",
    ),
    "train": ("max_steps", "global_batch_size", "grad_accum", "eval_every", "eval_batch_size", "log_every"),
    "checkpoint": ("every", "keep_last", "signal", "time_limit_margin", "max_requeues"),
    "logger": ("backends", "project"),
    "model": tuple(f.name for f in fields(ModelConfig)),
    "data": tuple(f.name for f in fields(DataConfig)),
}


def _check_keys(cfg: dict[str, Any]) -> None:
    """A key that nothing reads (a typo, often added with Hydra's ``+``) is refused rather than ignored."""
    for group, known in _GROUP_KEYS.items():
        node = cfg if not group else cfg.get(group)
        if not isinstance(node, dict):
            continue
        for key in sorted(set(node) - set(known)):
            name = f"{group}.{key}" if group else key
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean {group + '.' if group else ''}{close[0]}? " if close else ""
            raise DeltaConfigError(
                f"{group or 'the configuration'} has no key {key!r} (its keys: {', '.join(known)}); {hint}"
                f"drop it with ~{name}"
            )


def _check_optimizer(cfg: dict[str, Any]) -> None:
    optim = cfg.get("optim", {})
    allowed = [f.name for f in fields(OptimizerSpec) if f.name not in _DERIVED_OPTIM_FIELDS]
    unknown = sorted(set(optim) - set(allowed))
    if unknown:
        drop = " ".join(f"~optim.{k}" for k in unknown)
        raise DeltaConfigError(
            f"optim has no key {', '.join(unknown)} (its keys: {', '.join(allowed)}); drop it with {drop}"
        )
    name = optim.get("name", "adamw")
    if name not in OPTIMIZERS:
        raise DeltaConfigError(f"optim.name={name!r} is not an optimizer; choose one of {', '.join(OPTIMIZERS)}")
    for key, (bound, inclusive, what, example) in _NUMBERS.items():
        value = _lookup(cfg, key)
        if value is _MISSING or (value is None and key == "optim.max_grad_norm"):
            continue
        if not _is_number(value) or value < bound or (value == bound and not inclusive):
            relation = f"at least {bound:g}" if inclusive else f"above {bound:g}"
            raise DeltaConfigError(f"{key}={value!r}: {what} must be a number {relation}; set e.g. {key}={example}")
    if name != "sgd" and optim.get("momentum"):
        raise DeltaConfigError(
            f"optim.momentum={optim['momentum']!r} is SGD's (optim.name=sgd), which {name} would ignore; AdamW's "
            "momentum is optim.betas (e.g. optim.betas=[0.9,0.999])"
        )
    betas = optim.get("betas", (0.9, 0.999))
    if not (isinstance(betas, list | tuple) and len(betas) == 2 and all(_is_number(b) and 0 <= b < 1 for b in betas)):
        raise DeltaConfigError(
            f"optim.betas={betas!r}: AdamW's betas must be two numbers in [0, 1); set e.g. optim.betas=[0.9,0.999]"
        )


def check_run_dir(run_dir: str | os.PathLike[str]) -> None:
    """Refuse a run directory that cannot be created or written, without creating it.

    The nearest directory that exists on the way to ``run_dir`` (``run_dir`` itself when it exists) must
    take a new entry: a uniquely named probe directory is made in it and removed again (a permission
    check alone would pass for root where nothing can be created, as under ``/proc``).

    Args:
        run_dir: the configured ``run_dir``.

    Raises:
        DeltaConfigError: a component of the path is a file, or the directory cannot be written.
    """
    path = Path(run_dir).absolute()  # as the recipe creates it (relative to the working directory, no ~)
    existing = next(p for p in (path, *path.parents) if p.exists())
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".opendelta-dist-probe-", dir=existing))
    except OSError as error:
        if not existing.is_dir():
            problem = f"{existing} is a file, not a directory"
        elif existing == path:
            problem = f"the directory {path} cannot be written"
        else:
            problem = f"no directory can be created in {existing}"
        raise DeltaConfigError(
            f"run_dir={run_dir}: {problem} ({error.strerror}); set run_dir to a directory you can write, "
            "e.g. run_dir=outputs/my_run"
        ) from error


def validate_run_config(cfg: dict[str, Any]) -> None:
    """Check a composed run configuration before anything is built or written.

    Args:
        cfg: the configuration as plain containers (``train``, ``optim``, ``model``, ``checkpoint``,
            ``run_dir``, ``seed``, ``engine``, ``delta``).

    Raises:
        DeltaConfigError: the first key that is out of range or points nowhere, named with its fix.
    """
    _check_keys(cfg)
    _check_integers(cfg)
    checkpoint = cfg.get("checkpoint") or {}
    parse_signal(checkpoint.get("signal", "USR1"))
    parse_margin(checkpoint.get("time_limit_margin", "auto"))
    if not isinstance(cfg.get("overwrite_run_dir", False), bool):
        raise DeltaConfigError(
            f"overwrite_run_dir={cfg['overwrite_run_dir']!r} must be true or false; set e.g. overwrite_run_dir=true"
        )
    _check_optimizer(cfg)
    check_model_source(ModelConfig(**cfg["model"]))
    task = task_class(str((cfg.get("data") or {}).get("task", "seq2seq")))
    task.check_engine(cfg["engine"]["name"])
    engine_class(cfg["engine"]["name"]).check_delta_options(cfg.get("delta") or {})
    task.check_config(cfg)
    check_run_dir(cfg["run_dir"])
