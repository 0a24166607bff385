"""What a run trains: a delta on a frozen backbone, or the whole model (full fine-tuning).

Full fine-tuning is the one run without a delta: ``delta=none`` (``delta_type: none``) attaches nothing
and leaves every parameter trainable; its checkpoints and final save hold the whole model
(``config.json`` + ``model.safetensors``, loadable with ``from_pretrained``).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from opendelta_dist.adapterdrop import RobustDrop, check_drop_range
from opendelta_dist.auto_delta import AutoDeltaConfig, AutoDeltaModel
from opendelta_dist.basemodel import DeltaBase
from opendelta_dist.config import BaseDeltaConfig
from opendelta_dist.errors import DeltaConfigError
from opendelta_dist.train.engines import engine_class, engine_names

#: keys of the ``delta`` group that set up training rather than the delta (they are not saved with it)
RECIPE_OPTIONS = ("robust_drop",)


def delta_summary(options: Mapping[str, Any]) -> str:
    """The delta of a run's ``delta`` group in a few words: its method and what AdapterDrop leaves out or drops."""
    parts = [f"leave_out {list(options['leave_out'])}"] if options.get("leave_out") else []
    if options.get("robust_drop") is not None:
        low, high = options["robust_drop"]
        parts.append(f"robust AdapterDrop of the lowest {low} to {high} layers per step")
    return f"{options.get('delta_type')}" + (f" ({'; '.join(parts)})" if parts else "")


FULL_FINE_TUNING = "none"
"""The ``delta_type`` of a run without a delta, in which every parameter trains (``configs/delta/none.yaml``)."""
MODEL_WEIGHTS = "model.safetensors"


def save_full_model(module: torch.nn.Module, path: Path) -> Path:
    """Write a whole model into the directory ``path``, atomically (assembled aside, then renamed).

    ``model.safetensors`` holds every tensor of ``module.state_dict()`` (tensors shared by several names,
    such as tied embeddings, once); ``config.json`` is the transformers config, when the model has one,
    so ``AutoModel...from_pretrained(path)`` loads the result. :func:`load_full_model` reads it back
    exactly.

    Args:
        module: the model (unwrapped, unsharded).
        path: the directory to write; an existing one is replaced.

    Returns:
        ``path``.
    """
    from safetensors.torch import save_model

    staging = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_model(module, str(staging / MODEL_WEIGHTS))
    config = getattr(module, "config", None)
    if config is not None and hasattr(config, "save_pretrained"):
        config.save_pretrained(staging)
    if path.exists():
        shutil.rmtree(path)
    os.replace(staging, path)
    return path


def load_full_model(module: torch.nn.Module, path: Path) -> None:
    """Copy the weights :func:`save_full_model` wrote into ``module`` (every tensor must fit).

    Raises:
        DeltaConfigError: ``path`` holds no whole model, or its tensors do not fit ``module``.
    """
    from safetensors.torch import load_model

    file = path / MODEL_WEIGHTS
    if not file.is_file():
        raise DeltaConfigError(f"{path} holds no {MODEL_WEIGHTS}: it is not a fully fine-tuned model's checkpoint")
    try:
        load_model(module, str(file), strict=True)
    except RuntimeError as error:
        raise DeltaConfigError(
            f"the weights in {file} do not fit this model ({error}); resume with the model the run started with"
        ) from error


def delta_config(options: dict[str, Any]) -> BaseDeltaConfig | None:
    """The run's delta configuration (the ``delta`` group), or None for full fine-tuning.

    Args:
        options: ``delta_type`` and the method's options; ``delta_type: none`` means no delta.

    Returns:
        The validated config of the delta method, or None when every parameter trains.

    Raises:
        DeltaConfigError: unknown ``delta_type`` or option, or options given with ``delta_type: none``.
    """
    if options.get("delta_type") != FULL_FINE_TUNING:
        return AutoDeltaConfig.from_dict({k: v for k, v in options.items() if k not in RECIPE_OPTIONS})
    extra = sorted(k for k, v in options.items() if k != "delta_type" and v is not None)
    if extra:
        raise DeltaConfigError(
            f"delta_type {FULL_FINE_TUNING!r} (full fine-tuning: no delta, every parameter trains) takes no "
            f"options, but {', '.join(extra)} are set; remove them, or choose a delta (e.g. delta=lora)"
        )
    return None


def attach_delta(
    model: torch.nn.Module, options: dict[str, Any], engine: str, backend: str = "hf", seed: int = 0
) -> DeltaBase | None:
    """Attach the configured delta to ``model`` and freeze everything else.

    Args:
        model: the backbone.
        options: the ``delta`` group (``delta_type`` and the method's options; ``robust_drop: [low, high]`` sets up
            robust AdapterDrop, :class:`~opendelta_dist.adapterdrop.RobustDrop`).
        engine: the name of the engine the run trains on.
        backend: the backend the engine's backbone takes deltas of (``Engine.delta_backend``).
        seed: the run's seed (robust AdapterDrop draws from it).

    Returns:
        The delta; None for full fine-tuning (``delta_type: none``: nothing frozen).

    Raises:
        DeltaConfigError: the delta configuration is invalid (see :func:`delta_config`), or full
            fine-tuning is asked on an engine that shards the model.
    """
    config = delta_config(options)
    if config is not None:
        if options.get("robust_drop") is not None:
            check_drop_range(options["robust_drop"])  # before the delta changes the backbone
            if not engine_class(engine).drops_layers_per_step:
                raise DeltaConfigError(
                    f"robust AdapterDrop (delta.robust_drop) is not supported on engine={engine} yet; drop layers "
                    "statically with delta.leave_out, or train on another engine"
                )
        delta = AutoDeltaModel.from_config(config, model, backend=backend)
        if options.get("robust_drop") is not None:
            delta.check_droppable(in_place_ok=not engine_class(engine).splits_model)
            RobustDrop(delta, *options["robust_drop"], seed=seed)
        delta.freeze_module(set_state_dict=False)
        return delta
    if not engine_class(engine).supports_full_fine_tuning:
        able = [name for name in engine_names() if engine_class(name).supports_full_fine_tuning]
        raise DeltaConfigError(
            f"full fine-tuning (delta_type {FULL_FINE_TUNING!r}) runs on the engines that keep the whole model "
            f"on every rank ({', '.join(able)}), not on engine={engine}; use engine=ddp, or train a delta with "
            "this engine"
        )
    model.requires_grad_(True)
    return None
