"""Engines: who wraps, shards and steps the model. One file per engine, one protocol (:class:`Engine`).

A recipe picks one with one key (``engine=ddp``). The engine called ``x`` is the :class:`Engine`
subclass with ``name = "x"`` in the module ``engines/x.py``: adding an engine is adding its file (and
its ``configs/engine/x.yaml``), nothing here. Optional dependencies (deepspeed, bmtrain) are imported
only by their own engine, inside the methods that need them, so that every engine class (and with it
the estimator's memory model) is available without them.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from opendelta_dist.errors import DeltaConfigError
from opendelta_dist.train.engines.base import Engine, OptimizerSpec
from opendelta_dist.train.topology import Topology

#: the modules of this package that are not engines
_NOT_ENGINES = frozenset({"base", "memory"})


def engine_names() -> list[str]:
    """The names of the engines, as a recipe's ``engine`` key takes them (their modules' names)."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name not in _NOT_ENGINES)


def engine_class(name: str) -> type[Engine]:
    """The class of the engine called ``name`` (its module is imported; its optional dependency is not).

    Raises:
        DeltaConfigError: unknown engine name.
    """
    if name not in engine_names():
        raise DeltaConfigError(f"unknown engine {name!r}; choose one of {', '.join(engine_names())}")
    module = importlib.import_module(f"{__name__}.{name}")
    found = [
        obj
        for obj in vars(module).values()
        if isinstance(obj, type) and issubclass(obj, Engine) and obj.__module__ == module.__name__
    ]
    if len(found) != 1 or found[0].name != name:
        raise DeltaConfigError(f"{module.__name__} must define one Engine subclass with name = {name!r}")
    return found[0]


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
