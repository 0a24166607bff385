"""The backbone the estimator models: built on the meta device, delta attached, parameters counted."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from opendelta_dist.estimate.errors import EstimateError
from opendelta_dist.train.engines.memory import ParameterCounts


def _architecture_config(model_cfg: Any) -> Any:
    """The transformers config of the backbone, without any download.

    Raises:
        EstimateError: the architecture is not available on this machine.
    """
    from opendelta_dist.train.models import model_architecture

    if not (model_cfg.config or model_cfg.name_or_path):
        raise EstimateError("set model.config (with a model_type) or model.name_or_path to estimate a model")
    try:
        return model_architecture(model_cfg, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise EstimateError(
            f"the architecture of {model_cfg.name_or_path!r} is not available offline: add its transformers config "
            "fields under model.config (model_type first), as configs/model/t5_11b.yaml does, or set "
            "model.name_or_path to a local directory holding its config.json"
        ) from exc


def build_meta_backbone(model_cfg: Any) -> nn.Module:
    """Build the backbone of ``model_cfg`` (a :class:`~opendelta_dist.train.models.ModelConfig`) on the meta
    device: every parameter has its real shape and dtype and no memory.

    Raises:
        EstimateError: the architecture is not available offline, or the dtype is unknown.
    """
    from opendelta_dist.train.models import DTYPES, auto_model_class
    from opendelta_dist.train.tasks import task_class

    if model_cfg.dtype not in DTYPES:
        raise EstimateError(f"unknown model.dtype {model_cfg.dtype!r}; choose one of {', '.join(DTYPES)}")
    config = _architecture_config(model_cfg)
    with torch.device("meta"):
        head = task_class(model_cfg.task).model_head(config.model_type)
        return auto_model_class(head).from_config(config, dtype=DTYPES[model_cfg.dtype])


def attach_delta(model: nn.Module, cfg: Mapping[str, Any]) -> Any:
    """Attach the configured delta and freeze the rest exactly as the training recipe does.

    Returns:
        The delta (None for full fine-tuning, ``delta=none``).

    Raises:
        DeltaConfigError: the delta configuration is invalid for this backbone or engine.
    """
    from opendelta_dist.train.tuning import attach_delta as attach

    return attach(model, dict(cfg["delta"]), str(cfg["engine"]["name"]))


def count_parameters(model: nn.Module, delta: Any = None) -> ParameterCounts:
    """Count the parameters of a backbone with its delta attached (meta or real tensors alike).

    The backbone's own parameters are taken as if no delta were attached (a parameter a delta replaced by a
    trainable copy stays in memory), plus every parameter the module holds now.

    Args:
        model: the backbone, delta attached and frozen.
        delta: the delta (None for full fine-tuning).

    Returns:
        The counts.
    """
    from opendelta_dist.operations import (
        UnfreezeParameter,
        delta_parameter_ids,
        original_parameter,
        pristine_named_parameters,
    )

    unique: dict[int, nn.Parameter] = {id(p): p for _, p in pristine_named_parameters(model)}
    backbone = set(unique)
    unique.update((id(p), p) for p in model.parameters())
    delta_ids = delta_parameter_ids(model)
    counts = ParameterCounts()
    for key, param in unique.items():
        bucket = counts.trainable if param.requires_grad else counts.frozen
        bucket[param.dtype] = bucket.get(param.dtype, 0) + param.numel()
        if key in delta_ids:
            counts.delta += param.numel()
        elif key in backbone and param.requires_grad:
            counts.unfrozen_backbone += param.numel()
    for op in delta.operations if delta is not None else ():
        target = getattr(op, "target", None)
        if isinstance(op, UnfreezeParameter) and target is not None:
            original = original_parameter(target, op.param_name)
            if original is not None and original is not op.parameter:
                counts.copies += op.parameter.numel()
    return counts
