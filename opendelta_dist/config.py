"""Delta configurations: every option of a delta method, validated, and a JSON round trip.

Each delta method has a dataclass config (``LoraConfig``, ...) deriving from
:class:`BaseDeltaConfig`, where each of its options is declared once, with :func:`option`: its type,
default, documentation and check. The method's class takes its signature and the Args section of
its docstring from there (see :class:`~opendelta_dist.basemodel.DeltaBase`). ``from_dict`` refuses
unknown options (with a "did you mean") and values of the wrong type instead of silently dropping
them, so every option survives ``to_dict``/``from_dict``.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import types
import typing
from collections.abc import Callable
from dataclasses import Field, dataclass, fields
from typing import Any, ClassVar, get_type_hints

from opendelta_dist.errors import DeltaConfigError

#: Keys a saved ``config.json`` may hold beside the options: checkpoint bookkeeping written by this
#: library or by OpenDelta. They are kept out of the config object.
METADATA_KEYS = frozenset(
    {
        "backbone_class",
        "backbone_checkpoint_name",
        "backbone_hash",
        "backbone_fingerprint",
        "weights_file",
        "weights_sha256",
        "format_version",
        "opendelta_dist_version",
        "opendelta_version",
        "transformers_version",
    }
)

#: Validates an option's value: called with the option's name and the value, it raises
#: :class:`~opendelta_dist.errors.DeltaConfigError` naming the option. It runs before the type check and
#: judges the values of the kind it knows (numbers, for a numeric check), so that ``reduction_factor=1.5``
#: gets its message; values of other kinds it leaves to the type check.
Check = Callable[[str, Any], None]

#: Stands for a method's own options, in the order they are declared, in
#: :attr:`BaseDeltaConfig.parameter_order`.
OPTIONS = "*options"


def option(default: Any, doc: str, check: Check | None = None) -> Any:
    """Declare one option of a delta method: a config field with its default, documentation and check.

    Args:
        default: the default value; a list or dict is copied for every config.
        doc: what the option does (a line of the method class's Args section).
        check: validates a value (see :data:`Check`); the type is checked after it in any case.

    Returns:
        The :func:`dataclasses.field` to assign to the option's annotated name in a config class.
    """
    metadata = {"doc": doc, "check": check}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=functools.partial(copy.deepcopy, default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _check_type(value: Any, hint: Any) -> bool:
    if hint is Any:
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_check_type(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin in (list, tuple):
        (item,) = typing.get_args(hint)[:1] or (Any,)
        return isinstance(value, (list, tuple)) and all(_check_type(v, item) for v in value)
    if origin is dict:
        key_t, val_t = typing.get_args(hint) or (Any, Any)
        return isinstance(value, dict) and all(
            _check_type(k, key_t) and _check_type(v, val_t) for k, v in value.items()
        )
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _check_leave_out(name: str, value: Any) -> None:
    if isinstance(value, (list, tuple)) and any(not _check_type(v, int) or v < 0 for v in value):
        raise DeltaConfigError(f"{name} takes layer indices counted from 0 (e.g. [0, 1, 2]), not {list(value)!r}")


@dataclass
class BaseDeltaConfig:
    """Options every delta method has.

    Attributes:
        modified_modules: module keys (or common-structure roles) the delta modifies.
        exclude_modules: module keys whose matches (and their submodules) are never modified.
        unfrozen_modules: module keys left trainable by ``freeze_module``; ``"deltas"`` names the
            delta's own parameters.
        common_structure: whether ``modified_modules`` are common-structure roles (``attn.q``).
        backend: the name of a registered backend (:func:`opendelta_dist.backends.backend_names`); ``"hf"``.
        leave_out: layer indices, from 0 in every stack, left without a delta (static AdapterDrop,
            :mod:`opendelta_dist.adapterdrop`); None or empty for none.
    """

    delta_type: ClassVar[str] = ""
    #: The parameters of the method class after ``backbone_model``, in their positional order
    #: (OpenDelta's, which differs between methods); :data:`OPTIONS` stands for the method's own options but
    #: those named here (e.g. an option of this library's after OpenDelta's parameters).
    parameter_order: ClassVar[tuple[str, ...]] = (
        OPTIONS,
        "modified_modules",
        "exclude_modules",
        "unfrozen_modules",
        "common_structure",
        "interactive_modify",
        "backend",
        "leave_out",
    )

    modified_modules: list[str | list[str]] | None = None
    exclude_modules: list[str] | None = None
    unfrozen_modules: list[str] | None = None
    common_structure: bool = False
    backend: str = "hf"
    leave_out: list[int] | None = dataclasses.field(default=None, metadata={"check": _check_leave_out})

    def __post_init__(self) -> None:
        hints = get_type_hints(type(self))
        for f in fields(self):
            value = getattr(self, f.name)
            # kept as JSON gives it back: a tuple as a list, an int given for a float as that float
            if isinstance(value, tuple):
                value = list(value)
            elif hints[f.name] is float and type(value) is int:
                value = float(value)
            setattr(self, f.name, value)
            check = f.metadata.get("check")
            if check is not None:
                check(f.name, value)
            if not _check_type(value, hints[f.name]):
                raise DeltaConfigError(
                    f"option {f.name}={value!r} of delta_type {self.delta_type!r} must be of type "
                    f"{hints[f.name]}, not {type(value).__name__}"
                )

    @classmethod
    def method_options(cls) -> list[Field]:
        """The fields of the method's own options (those it adds to :class:`BaseDeltaConfig`'s), in order."""
        common = {f.name for f in fields(BaseDeltaConfig)}
        return [f for f in fields(cls) if f.name not in common]

    def to_dict(self) -> dict[str, Any]:
        """All options plus ``delta_type``, as JSON-ready values."""
        return {"delta_type": self.delta_type, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **overrides: Any) -> BaseDeltaConfig:
        """Build a config from a dict (e.g. a loaded ``config.json``).

        Args:
            config_dict: options; ``delta_type`` and checkpoint bookkeeping keys are accepted and
                set aside.
            overrides: options that replace those in ``config_dict``.

        Raises:
            DeltaConfigError: an option is unknown, of the wrong type, or ``delta_type`` differs.
        """
        merged = {**config_dict, **overrides}
        delta_type = merged.pop("delta_type", cls.delta_type)
        if delta_type != cls.delta_type:
            raise DeltaConfigError(f"{cls.__name__} is for delta_type {cls.delta_type!r}, got {delta_type!r}")
        names = [f.name for f in fields(cls)]
        unknown = [k for k in merged if k not in names and k not in METADATA_KEYS]
        if unknown:
            hints = []
            for k in unknown:
                close = difflib.get_close_matches(k, names, n=1)
                hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise DeltaConfigError(
                f"unknown option(s) for delta_type {cls.delta_type!r}: {', '.join(hints)}; "
                f"its options are: {', '.join(names)}"
            )
        return cls(**{k: v for k, v in merged.items() if k in names})


def check_positive_int(name: str, value: Any) -> None:
    """Raise :class:`~opendelta_dist.errors.DeltaConfigError` if the number ``value`` (option ``name``)
    is not a positive int."""
    if isinstance(value, (int, float)) and not (_check_type(value, int) and value >= 1):
        raise DeltaConfigError(f"{name} must be a positive integer, not {value!r}")


def check_positive(name: str, value: Any) -> None:
    """Raise :class:`~opendelta_dist.errors.DeltaConfigError` if the number ``value`` (option ``name``)
    is not above zero."""
    if isinstance(value, (int, float)) and not value > 0:
        raise DeltaConfigError(f"{name} must be positive, not {value!r}")


def in_range(low: float, high: float) -> Check:
    """A check that a number lies in ``[low, high)``.

    Args:
        low: the smallest value allowed.
        high: the bound above the values allowed.

    Returns:
        The :data:`Check`.
    """

    def check(name: str, value: Any) -> None:
        if isinstance(value, (int, float)) and not low <= value < high:
            raise DeltaConfigError(f"{name} must be in [{low}, {high}), not {value!r}")

    return check


def one_of(*choices: str) -> Check:
    """A check that a string is one of ``choices``.

    Args:
        choices: the values allowed.

    Returns:
        The :data:`Check`.
    """

    def check(name: str, value: Any) -> None:
        if isinstance(value, str) and value not in choices:
            raise DeltaConfigError(f"{name} must be one of {', '.join(choices)}, not {value!r}")

    return check
