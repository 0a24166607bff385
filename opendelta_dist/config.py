"""Delta configurations: every option of a delta method, validated, and a JSON round trip.

Each delta method has a dataclass config (``LoraConfig``, ...) deriving from
:class:`BaseDeltaConfig`. ``from_dict`` refuses unknown options (with a "did you mean") and values of
the wrong type instead of silently dropping them, so every option survives ``to_dict``/``from_dict``.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, fields
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


@dataclass
class BaseDeltaConfig:
    """Options every delta method has.

    Attributes:
        modified_modules: module keys (or common-structure roles) the delta modifies.
        exclude_modules: module keys whose matches (and their submodules) are never modified.
        unfrozen_modules: module keys left trainable by ``freeze_module``; ``"deltas"`` names the
            delta's own parameters.
        common_structure: whether ``modified_modules`` are common-structure roles (``attn.q``).
        backend: ``"hf"`` or ``"bmt"``.
    """

    delta_type: ClassVar[str] = ""

    modified_modules: list[str | list[str]] | None = None
    exclude_modules: list[str] | None = None
    unfrozen_modules: list[str] | None = None
    common_structure: bool = False
    backend: str = "hf"

    def __post_init__(self) -> None:
        hints = get_type_hints(type(self))
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                value = list(value)
                setattr(self, f.name, value)
            if not _check_type(value, hints[f.name]):
                raise DeltaConfigError(
                    f"option {f.name}={value!r} of delta_type {self.delta_type!r} must be of type "
                    f"{hints[f.name]}, not {type(value).__name__}"
                )

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
    """Raise :class:`~opendelta_dist.errors.DeltaConfigError` unless ``value`` (option ``name``) is a positive int."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise DeltaConfigError(f"{name} must be a positive integer, not {value!r}")
