"""``AutoDeltaConfig`` and ``AutoDeltaModel``: build any delta method from its ``delta_type``, or load a checkpoint.

Loading a checkpoint directory (:func:`load_delta`) works for three kinds of directory:

- this library's (``config.json`` with a ``format_version``, ``delta_model.safetensors``);
- OpenDelta 0.3.2's (``config.json`` without one, ``pytorch_model.bin``): the delta method converts
  OpenDelta's options and tensors into its own (``DeltaBase.opendelta_options`` and
  ``DeltaBase.opendelta_tensors``);
- another library's format that a delta method registered (:mod:`~opendelta_dist.registry`; LoRA reads
  HF PEFT adapters).
"""

from __future__ import annotations

import os
import warnings
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from opendelta_dist.config import BaseDeltaConfig
from opendelta_dist.errors import DeltaConfigError
from opendelta_dist.hub import resolve_checkpoint
from opendelta_dist.registry import (
    DELTA_METHODS,
    checkpoint_format,
    delta_method,
    delta_type_names,
    register_delta_method,
)
from opendelta_dist.saving import check_backbone, load_delta_tensors, read_config_file, read_tensors

if TYPE_CHECKING:
    from opendelta_dist.basemodel import DeltaBase

#: the options of from_finetuned that find the checkpoint (on the Hub), as opposed to the delta's options
HUB_OPTIONS = ("revision", "cache_dir", "token", "local_files_only", "force_download", "subfolder")

__all__ = [
    "DELTA_METHODS",
    "AutoDeltaConfig",
    "AutoDeltaModel",
    "delta_method",
    "delta_type_names",
    "load_delta",
    "read_config_file",
    "register_delta_method",
]


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
            raise DeltaConfigError(f"the config has no 'delta_type'; known types: {delta_type_names()}")
        cls = delta_method(config_dict["delta_type"])  # an alias (OpenDelta's name) finds the method too
        return cls.config_class.from_dict({**config_dict, "delta_type": cls.delta_type}, **kwargs)

    @classmethod
    def from_finetuned(cls, finetuned_delta_path: str | os.PathLike[str], **kwargs: Any) -> BaseDeltaConfig:
        """The config of a saved delta (its ``config.json``), in a directory or a Hub repository.

        ``kwargs``: the Hub options of :func:`~opendelta_dist.hub.resolve_checkpoint` (``revision``,
        ``cache_dir``, ``token``, ``local_files_only``, ...), and options overriding the saved ones.
        """
        hub_options = {k: kwargs.pop(k) for k in HUB_OPTIONS if k in kwargs}
        path = resolve_checkpoint(finetuned_delta_path, weights=False, **hub_options)  # the config alone
        foreign = checkpoint_format(path)
        if foreign is not None:
            raise DeltaConfigError(
                f"{finetuned_delta_path} holds a {foreign.name}, whose options are read with its tensors: load it with "
                "AutoDeltaModel.from_finetuned(path, backbone_model=...) and read delta.config"
            )
        return cls.from_dict(read_config_file(path), **kwargs)


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
    def from_finetuned(
        cls, finetuned_delta_path: str | os.PathLike[str], backbone_model: nn.Module, **kwargs: Any
    ) -> DeltaBase:
        """Load a saved delta of any method onto ``backbone_model``, from a directory or a Hub repository id;
        see ``DeltaBase.from_finetuned`` for the options."""
        return load_delta(finetuned_delta_path, backbone_model, **kwargs)


def load_delta(
    finetuned_delta_path: str | os.PathLike[str],
    backbone_model: nn.Module,
    expected_cls: type[DeltaBase] | None = None,
    delta_config: BaseDeltaConfig | dict[str, Any] | None = None,
    check_hash: bool = True,
    state_dict: dict[str, torch.Tensor] | None = None,
    **kwargs: Any,
) -> DeltaBase:
    """Build a saved delta on ``backbone_model`` and load its tensors; see ``DeltaBase.from_finetuned``.

    Args:
        finetuned_delta_path: the checkpoint directory, or a Hub repository id
            (:func:`~opendelta_dist.hub.resolve_checkpoint`).
        backbone_model: the model to modify.
        expected_cls: the delta method the caller asked for (None: any).
        delta_config: a config to use instead of the checkpoint's ``config.json``.
        check_hash: refuse a backbone other than the one the delta was saved with.
        state_dict: tensors to load instead of the checkpoint's weights file.
        kwargs: the Hub options of :func:`~opendelta_dist.hub.resolve_checkpoint` (``revision``,
            ``cache_dir``, ``token``, ``local_files_only``, ``force_download``, ``subfolder``), and options
            overriding those of the config.

    Raises:
        DeltaCheckpointError: the checkpoint is missing, corrupted or does not fit the backbone.
        DeltaHubError: the Hub repository, its revision or a cached copy could not be found or reached.
        DeltaConfigError: the checkpoint holds another delta method than ``expected_cls``.

    The backbone is left in evaluation mode, as OpenDelta's ``from_finetuned`` and transformers'
    ``from_pretrained`` leave theirs (``model.train()`` before training on). On any error it is left as it was.
    """
    hub_options = {k: kwargs.pop(k) for k in HUB_OPTIONS if k in kwargs}
    path = resolve_checkpoint(finetuned_delta_path, **hub_options)
    foreign = checkpoint_format(path) if delta_config is None else None
    if foreign is not None:
        if state_dict is not None:
            raise DeltaConfigError(f"{path} holds a {foreign.name}, read from its own files: drop state_dict")
        _check_expected(delta_method(foreign.delta_type), expected_cls, f"{path} holds a {foreign.name}")
        delta = foreign(path, backbone_model, **kwargs)
        backbone_model.eval()
        return delta
    file_config = read_config_file(path)
    legacy = "format_version" not in file_config
    tensors = dict(state_dict) if state_dict is not None else read_tensors(path, file_config)
    if legacy:
        file_config = delta_method(file_config["delta_type"]).opendelta_options(file_config, backbone_model)
        if not tensors:  # OpenDelta's positions matched no module (e.g. its LoRA defaults on GPT-2): a no-op
            file_config = {**file_config, "modified_modules": [], "common_structure": False}
    if delta_config is None:
        config_dict = file_config
    elif isinstance(delta_config, BaseDeltaConfig):
        config_dict = delta_config.to_dict()
    else:
        config_dict = dict(delta_config)
    cls = delta_method(config_dict.get("delta_type", ""))
    _check_expected(cls, expected_cls, f"{path} holds a {cls.delta_type!r} delta")
    if kwargs.get("leave_out"):  # left out at load time too (AdapterHub's load_adapter(leave_out=)): the union
        kwargs["leave_out"] = sorted({*(config_dict.get("leave_out") or []), *kwargs["leave_out"]})
    config = cls.config_class.from_dict(config_dict, **kwargs)
    if check_hash and not legacy:
        check_backbone(file_config, backbone_model)
    delta = cls.from_config(config, backbone_model)
    stacked = [
        op.module_name for op in delta.operations if getattr(op, "child_name", None) not in (None, op.delta_name)
    ]
    if stacked:
        warnings.warn(
            f"{path}: the backbone carries {'an' if cls.delta_type[:1] in 'aeiou' else 'a'} {cls.delta_type} delta "
            f"on {stacked[0]!r}"
            f"{f' and {len(stacked) - 1} more modules' if len(stacked) > 1 else ''} already, and both apply now; "
            "if that one is this checkpoint loaded before, detach it first (delta.detach()) or load onto a fresh "
            "backbone",
            UserWarning,
            stacklevel=3,
        )
    try:
        if legacy:
            tensors = delta.opendelta_tensors(tensors, path)
        load_delta_tensors(delta, delta.without_left_out(tensors), source=str(path))
    except BaseException:
        delta.detach()
        raise
    backbone_model.eval()  # as OpenDelta's and transformers' loading: dropout off; model.train() to train on
    return delta


def _check_expected(cls: type[DeltaBase], expected_cls: type[DeltaBase] | None, holds: str) -> None:
    if expected_cls is not None and not issubclass(cls, expected_cls):
        raise DeltaConfigError(f"{holds}; load it with {cls.__name__} or AutoDeltaModel, not {expected_cls.__name__}")
