"""Engines: who wraps, shards and steps the model. One file per engine, one protocol (:class:`Engine`).

A recipe picks one with one key (``engine=ddp``). The engine called ``x`` is the :class:`Engine`
subclass with ``name = "x"`` in the module ``engines/x.py``: adding an engine is adding its file (and
its ``configs/engine/x.yaml``), nothing here. Optional dependencies (deepspeed, bmtrain) are imported
only by their own engine, inside the methods that need them, so that every engine class (and with it
the estimator's memory model) is available without them.
"""

from __future__ import annotations

from typing import Any

from opendelta_dist.errors import DeltaConfigError
from opendelta_dist.train.engines.base import Engine, OptimizerSpec
from opendelta_dist.train.plugins import module_names, named_subclass
from opendelta_dist.train.topology import Topology

#: the modules of this package that are not engines
_NOT_ENGINES = frozenset({"base", "memory"})


def engine_names() -> list[str]:
    """The names of the engines, as a recipe's ``engine`` key takes them (their modules' names)."""
    return module_names(__path__, _NOT_ENGINES)


def engine_class(name: str) -> type[Engine]:
    """The class of the engine called ``name`` (its module is imported; its optional dependency is not).

    Raises:
        DeltaConfigError: unknown engine name.
    """
    if name not in engine_names():
        raise DeltaConfigError(f"unknown engine {name!r}; choose one of {', '.join(engine_names())}")
    return named_subclass(f"{__name__}.{name}", Engine, name)


def build_engine(name: str, topology: Topology, options: dict[str, Any] | None = None) -> Engine:
    """The engine called ``name`` for this process.

    Raises:
        DeltaConfigError: unknown engine name, or an option the engine does not have (e.g. one a recipe
            set for another engine).
    """
    cls = engine_class(name)
    known = list(cls.option_defaults())
    unknown = sorted(set(options or {}) - set(known))
    if unknown:
        drop = " ".join(f"~engine.options.{k}" for k in unknown)
        raise DeltaConfigError(
            f"engine {name} has no option {', '.join(unknown)} (its options: {', '.join(known) or 'none'}); a "
            f"recipe written for another engine may set it: drop it with {drop}"
        )
    return cls(topology, **(options or {}))


__all__ = ["Engine", "OptimizerSpec", "build_engine", "engine_class", "engine_names"]


def reads_training_state(engine: str, written_by: str) -> bool:
    """Whether engine ``engine`` resumes from a checkpoint that engine ``written_by`` wrote (the same engine, or
    one that writes the same ``training_state_format``)."""
    if engine == written_by:
        return True
    ours = engine_class(engine).training_state_format
    return ours is not None and engine_class(written_by).training_state_format == ours
