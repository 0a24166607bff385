"""``AutoDeltaConfig`` and ``AutoDeltaModel``: build any delta method from its ``delta_type``."""

from __future__ import annotations

import difflib
import importlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from opendelta_dist.errors import DeltaCheckpointError, DeltaConfigError

if TYPE_CHECKING:
    from opendelta_dist.basemodel import DeltaBase
    from opendelta_dist.config import BaseDeltaConfig

#: delta_type -> delta method class, filled by :func:`register_delta_method`
DELTA_METHODS: dict[str, type[DeltaBase]] = {}


def register_delta_method(cls: type[DeltaBase]) -> type[DeltaBase]:
    """Class decorator: make a delta method known to the auto classes under its ``delta_type``."""
    if not cls.delta_type or cls.config_class.delta_type != cls.delta_type:
        raise DeltaConfigError(f"{cls.__name__} and its config class must declare the same delta_type")
    DELTA_METHODS[cls.delta_type] = cls
    return cls


def delta_method(delta_type: str) -> type[DeltaBase]:
    """The delta method class of ``delta_type``.

    Raises:
        DeltaConfigError: no method has that delta_type.
    """
    importlib.import_module("opendelta_dist.deltas")  # registers the built-in methods
    if delta_type not in DELTA_METHODS:
        close = difflib.get_close_matches(str(delta_type), list(DELTA_METHODS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise DeltaConfigError(
            f"unknown delta_type {delta_type!r}{hint}; known delta types: {', '.join(sorted(DELTA_METHODS))}"
        )
    return DELTA_METHODS[delta_type]


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The dict in a checkpoint's ``config.json`` (``path`` is the directory or the file).

    Raises:
        DeltaCheckpointError: the file is missing or not a JSON object.
    """
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise DeltaCheckpointError(f"no delta config at {file}: a delta checkpoint directory holds a config.json")
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DeltaCheckpointError(f"{file} is not valid JSON ({exc}); the checkpoint is corrupted") from exc
    if not isinstance(data, dict) or "delta_type" not in data:
        raise DeltaCheckpointError(f"{file} is not a delta config: it has no 'delta_type'")
    return data


class AutoDeltaConfig:
    """Builds the config class of a delta method from its ``delta_type``."""

    def __init__(self) -> None:
        raise TypeError("use AutoDeltaConfig.from_dict(...) or AutoDeltaConfig.from_finetuned(...)")

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> BaseDeltaConfig:
        """A config from a dict holding ``delta_type`` and options.

        Raises:
            DeltaConfigError: ``delta_type`` is missing or unknown, or an option is unknown.
        """
        if "delta_type" not in config_dict:
            raise DeltaConfigError(f"the config has no 'delta_type'; known types: {sorted(delta_type_names())}")
        return delta_method(config_dict["delta_type"]).config_class.from_dict(config_dict, **kwargs)

    @classmethod
    def from_finetuned(cls, finetuned_delta_path: str | Path, **kwargs: Any) -> BaseDeltaConfig:
        """The config of a saved delta (its ``config.json``)."""
        return cls.from_dict(read_config_file(finetuned_delta_path), **kwargs)


class AutoDeltaModel:
    """Builds any delta method from a config or a checkpoint."""

    def __init__(self) -> None:
        raise TypeError("use AutoDeltaModel.from_config(...) or AutoDeltaModel.from_finetuned(...)")

    @classmethod
    def from_config(
        cls, config: BaseDeltaConfig | dict[str, Any], backbone_model: nn.Module, **kwargs: Any
    ) -> DeltaBase:
        """Build the delta described by ``config`` on ``backbone_model``."""
        if isinstance(config, dict):
            config = AutoDeltaConfig.from_dict(config)
        return delta_method(config.delta_type).from_config(config, backbone_model, **kwargs)

    @classmethod
    def from_finetuned(cls, finetuned_delta_path: str | Path, backbone_model: nn.Module, **kwargs: Any) -> DeltaBase:
        """Load a saved delta of any method onto ``backbone_model``; see ``DeltaBase.from_finetuned``."""
        from opendelta_dist.saving import load_delta

        return load_delta(finetuned_delta_path, backbone_model, **kwargs)


def delta_type_names() -> list[str]:
    """The known delta types."""
    importlib.import_module("opendelta_dist.deltas")
    return sorted(DELTA_METHODS)
