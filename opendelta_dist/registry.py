"""The registry of delta methods and of the foreign checkpoint formats they read.

A leaf of the package: it imports nothing of it but the errors, so any module may use it without
an import cycle. Delta methods register themselves when their module is imported (``import
opendelta_dist`` imports them all); a method that reads another library's checkpoint format (LoRA
reads HF PEFT adapters) registers that format here too, so loading needs no knowledge of the method.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from opendelta_dist.errors import DeltaConfigError

if TYPE_CHECKING:
    from torch import nn

    from opendelta_dist.basemodel import DeltaBase

#: delta_type -> delta method class, filled by :func:`register_delta_method`
DELTA_METHODS: dict[str, type[DeltaBase]] = {}
#: other spellings of a delta_type (e.g. the one an OpenDelta config.json carries) -> delta_type
DELTA_TYPE_ALIASES: dict[str, str] = {}


def register_delta_method(cls: type[DeltaBase]) -> type[DeltaBase]:
    """Class decorator: make a delta method known under its ``delta_type`` (and its ``delta_type_aliases``).

    Raises:
        DeltaConfigError: the class and its config class disagree on ``delta_type``, or another method
            has that name.
    """
    if not cls.delta_type or cls.config_class.delta_type != cls.delta_type:
        raise DeltaConfigError(f"{cls.__name__} and its config class must declare the same delta_type")
    known = DELTA_METHODS.get(cls.delta_type)
    if known is not None and known.__qualname__ != cls.__qualname__:
        raise DeltaConfigError(f"delta_type {cls.delta_type!r} is registered already, by {known.__name__}")
    DELTA_METHODS[cls.delta_type] = cls
    for alias in getattr(cls, "delta_type_aliases", ()):
        DELTA_TYPE_ALIASES[alias] = cls.delta_type
    return cls


def delta_method(delta_type: str) -> type[DeltaBase]:
    """The delta method class of ``delta_type`` (or of one of its aliases).

    Raises:
        DeltaConfigError: no method has that delta_type.
    """
    name = DELTA_TYPE_ALIASES.get(delta_type, delta_type)
    if name not in DELTA_METHODS:
        close = difflib.get_close_matches(str(delta_type), list(DELTA_METHODS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise DeltaConfigError(
            f"unknown delta_type {delta_type!r}{hint}; known delta types: {', '.join(sorted(DELTA_METHODS))}"
        )
    return DELTA_METHODS[name]


def delta_type_names() -> list[str]:
    """The known delta types."""
    return sorted(DELTA_METHODS)


@dataclass(frozen=True)
class CheckpointFormat:
    """Another library's checkpoint format that a delta method reads.

    Attributes:
        name: the format's name in messages (``"PEFT LoRA adapter"``).
        delta_type: the delta method that reads it.
        detect: whether a directory holds a checkpoint of this format.
        load: builds the delta from such a directory on a backbone (options as keyword overrides).
    """

    name: str
    delta_type: str
    detect: Callable[[Path], bool]
    load: Callable[..., DeltaBase]

    def __call__(self, path: Path, backbone_model: nn.Module, **kwargs: Any) -> DeltaBase:
        """``load(path, backbone_model, **kwargs)``."""
        return self.load(path, backbone_model, **kwargs)


CHECKPOINT_FORMATS: list[CheckpointFormat] = []


def register_checkpoint_format(fmt: CheckpointFormat) -> None:
    """Make ``from_finetuned`` read directories of another library's format (first match wins)."""
    if all(f.name != fmt.name for f in CHECKPOINT_FORMATS):
        CHECKPOINT_FORMATS.append(fmt)


def checkpoint_format(path: Path) -> CheckpointFormat | None:
    """The foreign format of the checkpoint directory ``path``, or None for this library's own (and OpenDelta's)."""
    return next((f for f in CHECKPOINT_FORMATS if f.detect(path)), None)
