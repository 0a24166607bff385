"""Engines: who wraps, shards and steps the model. One file per engine, one protocol (:class:`Engine`).

A recipe picks one with one key (``engine=ddp``); optional dependencies (deepspeed, bmtrain) are
imported only by their own engine.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from opendelta_dist.errors import DeltaConfigError
from opendelta_dist.train.engines.base import Engine, OptimizerSpec
from opendelta_dist.train.topology import Topology

_ENGINES = {
    "single": "opendelta_dist.train.engines.single:SingleEngine",
    "ddp": "opendelta_dist.train.engines.ddp:DDPEngine",
    "fsdp": "opendelta_dist.train.engines.fsdp:FSDPEngine",
    "deepspeed": "opendelta_dist.train.engines.deepspeed:DeepSpeedEngine",
    "bmt": "opendelta_dist.train.engines.bmt:BMTEngine",
}


def build_engine(name: str, topology: Topology, options: dict[str, Any] | None = None) -> Engine:
    """The engine called ``name`` for this process.

    Raises:
        DeltaConfigError: unknown engine name, or an option the engine does not have (e.g. one a recipe
            set for another engine).
        ImportError: the engine's optional dependency is missing (the message says what to install).
    """
    if name not in _ENGINES:
        raise DeltaConfigError(f"unknown engine {name!r}; choose one of {', '.join(_ENGINES)}")
    module_name, cls_name = _ENGINES[name].split(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    known = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "topology")]
    unknown = sorted(set(options or {}) - set(known))
    if unknown:
        drop = " ".join(f"~engine.options.{k}" for k in unknown)
        raise DeltaConfigError(
            f"engine {name} has no option {', '.join(unknown)} (its options: {', '.join(known) or 'none'}); a "
            f"recipe written for another engine may set it: drop it with {drop}"
        )
    return cls(topology, **(options or {}))


__all__ = ["Engine", "OptimizerSpec", "build_engine"]
