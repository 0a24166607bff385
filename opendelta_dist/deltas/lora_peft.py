"""LoRA deltas in HF PEFT's adapter format, both ways (beside :mod:`~opendelta_dist.deltas.lora`, which uses it).

A PEFT LoRA directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` with keys
``base_model.model.<module>.lora_A.weight`` (r, in) and ``...lora_B.weight`` (out, r), plus
``base_model.model.<module>.<param>`` for the ``modules_to_save`` it trains in full. The update is
``B A * lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``), the same as
:class:`~opendelta_dist.deltas.lora.LoraModel`'s, so the conversion is a renaming of tensors:

- :func:`save_peft` writes a LoRA delta so that ``peft.PeftModel.from_pretrained(backbone, dir)``
  computes what the delta computes;
- :func:`load_peft` builds a :class:`LoraModel` from such a directory; it is registered as a checkpoint
  format (:data:`PEFT_FORMAT`), so ``from_finetuned`` calls it for a directory that has
  ``adapter_config.json`` and no ``config.json``.

PEFT features with no LoRA-delta equivalent (DoRA, per-layer ranks, trained biases, ...) are refused
by name rather than converted approximately.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from opendelta_dist.backends import WeightLayout, full_tensor
from opendelta_dist.errors import DeltaCheckpointError, DeltaConfigError
from opendelta_dist.operations import InsertParallel, UnfreezeParameter
from opendelta_dist.registry import CheckpointFormat, delta_method, register_checkpoint_format
from opendelta_dist.saving import load_delta_tensors, write_json_atomic, write_safetensors_atomic

if TYPE_CHECKING:
    from opendelta_dist.deltas.lora import LoraModel

PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."

# options of a PEFT LoRA config that change the computation, with the value that means "not used"
_UNSUPPORTED: dict[str, Any] = {
    "use_dora": False,
    "rank_pattern": {},
    "alpha_pattern": {},
    "bias": "none",
    "lora_bias": False,
    "layer_replication": None,
    "target_parameters": None,
    "trainable_token_indices": None,
    "use_qalora": False,
    "alora_invocation_tokens": None,
}


#: transformers' auto-class mappings -> PEFT's task types (what AutoPeftModelFor... reads)
_PEFT_TASKS = {
    "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES": "SEQ_2_SEQ_LM",
    "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES": "CAUSAL_LM",
    "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES": "SEQ_CLS",
    "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES": "TOKEN_CLS",
    "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES": "QUESTION_ANS",
    "MODEL_MAPPING_NAMES": "FEATURE_EXTRACTION",
}


def peft_task_type(backbone: nn.Module) -> str | None:
    """PEFT's ``task_type`` for the backbone's class (``SEQ_2_SEQ_LM`` for ``T5ForConditionalGeneration``, ...),
    None for a model transformers' auto classes do not list."""
    from transformers.models.auto import modeling_auto

    name = type(backbone).__name__
    for mapping, task in _PEFT_TASKS.items():
        classes = getattr(modeling_auto, mapping).values()
        if any(name == c or (isinstance(c, tuple | list) and name in c) for c in classes):
            return task
    return None


def save_peft(delta: LoraModel, path: str | Path, base_model_name_or_path: str | None = None) -> Path:
    """Write a LoRA delta in PEFT's format (``adapter_config.json`` + ``adapter_model.safetensors``).

    Backbone layers the delta trains in full (``unfrozen_modules``) become PEFT ``modules_to_save``.

    Args:
        delta: the LoRA delta.
        path: the directory to write (created if missing; the two files are replaced atomically).
        base_model_name_or_path: recorded in the config; default the backbone's ``name_or_path``.

    Returns:
        The directory.

    Raises:
        DeltaConfigError: the delta is not a LoRA delta, or it modifies both ``nn.Linear`` and
            ``Conv1D`` layers (one PEFT config cannot describe both).
    """
    if delta.delta_type != "lora":
        raise DeltaConfigError(
            f"PEFT's adapter format holds LoRA deltas only; this is a {delta.delta_type!r} delta. "
            "Save it with save_finetuned() instead."
        )
    tensors: dict[str, torch.Tensor] = {}
    targets: list[str] = []
    fan_in_fan_out: set[bool] = set()
    unfrozen: set[str] = set()
    for op in delta.operations:
        if isinstance(op, InsertParallel):
            targets.append(op.module_name)
            layer = op.delta_module
            tensors[f"{PEFT_PREFIX}{op.module_name}.lora_A.weight"] = full_tensor(layer._parameters["lora_A"])
            tensors[f"{PEFT_PREFIX}{op.module_name}.lora_B.weight"] = full_tensor(layer._parameters["lora_B"])
            module = delta.backbone_model.get_submodule(op.module_name)
            # transformers' Conv1D stores (in, out)
            fan_in_fan_out.add(delta.backend_mapping.weight_layout(module) is WeightLayout.IN_OUT)
        elif isinstance(op, UnfreezeParameter):
            unfrozen.add(op.module_name)
            tensors[f"{PEFT_PREFIX}{op.module_name}.{op.param_name}"] = full_tensor(op.parameter)
    if len(fan_in_fan_out) > 1:
        raise DeltaConfigError(
            "the delta modifies both nn.Linear and Conv1D layers, which PEFT cannot describe in one config "
            "(fan_in_fan_out); save the two kinds as separate deltas"
        )
    name = base_model_name_or_path
    if name is None:
        name = getattr(getattr(delta.backbone_model, "config", None), "_name_or_path", None) or None
    config = {
        "peft_type": "LORA",
        "task_type": peft_task_type(delta.backbone_model),
        "base_model_name_or_path": name,
        "r": delta.config.lora_r,
        "lora_alpha": delta.config.lora_alpha,
        "lora_dropout": delta.config.lora_dropout,
        "target_modules": sorted(targets),
        "modules_to_save": sorted(unfrozen) or None,
        "fan_in_fan_out": fan_in_fan_out == {True},
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors_atomic(tensors, out / PEFT_WEIGHTS_NAME, {"format": "pt"})
    write_json_atomic(out / PEFT_CONFIG_NAME, config)
    return out


def is_peft_directory(path: Path) -> bool:
    """Whether ``path`` holds a PEFT adapter and no delta config of this library (a ``config.json`` beside it
    may be the base model's, as in a repository that holds both)."""
    if not (path / PEFT_CONFIG_NAME).is_file():
        return False
    try:
        return "delta_type" not in json.loads((path / "config.json").read_text())
    except FileNotFoundError:
        return True
    except (OSError, ValueError, TypeError):
        return False  # read as this library's, whose reader names what is wrong


def load_peft(path: str | Path, backbone_model: nn.Module, **kwargs: Any) -> LoraModel:
    """Build the LoRA delta saved by PEFT at ``path`` on ``backbone_model`` and load its tensors.

    Args:
        path: a PEFT LoRA directory.
        backbone_model: the model PEFT's adapter was trained on (PEFT's own wrapper is not needed).
        kwargs: options of :class:`LoraModel` overriding those read from the PEFT config.

    Returns:
        The attached delta.

    Raises:
        DeltaCheckpointError: the directory is not a PEFT LoRA adapter, uses a PEFT feature that a
            LoRA delta does not have, or does not fit the backbone. The backbone is left as it was.
    """
    directory = Path(path)
    config = _read_peft_config(directory)
    tensors = _read_peft_tensors(directory)
    lora: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    full: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        name = key.removeprefix(PEFT_PREFIX)
        for part in ("lora_A", "lora_B"):
            for suffix in (f".{part}.weight", f".{part}.default.weight"):
                if name.endswith(suffix):
                    lora[name.removesuffix(suffix)][part] = value
                    break
            else:
                continue
            break
        else:
            full[name] = value
    incomplete = sorted(m for m, parts in lora.items() if len(parts) != 2)
    if not lora or incomplete:
        what = f"modules with only one of lora_A/lora_B: {incomplete[:3]}" if incomplete else "no LoRA tensors"
        raise DeltaCheckpointError(f"{directory / PEFT_WEIGHTS_NAME} is not a complete PEFT LoRA adapter ({what})")
    ranks = {parts["lora_A"].shape[0] for parts in lora.values()}
    r = int(config["r"])
    if ranks != {r}:
        raise DeltaCheckpointError(f"{directory} declares r={r} but its tensors have ranks {sorted(ranks)}")
    alpha = config.get("lora_alpha", 8)
    if config.get("use_rslora", False):
        alpha = alpha * math.sqrt(r)  # rsLoRA scales by alpha / sqrt(r), which is (alpha sqrt(r)) / r
    unfrozen_modules = sorted({name.rpartition(".")[0] for name in full})
    options: dict[str, Any] = {
        "lora_r": r,
        "lora_alpha": alpha,
        "lora_dropout": float(config.get("lora_dropout", 0.0)),
        "modified_modules": sorted(lora),
        "unfrozen_modules": ["deltas", *unfrozen_modules],
        **kwargs,
    }
    delta = delta_method("lora")(backbone_model, **options)
    ours = {f"{m}.lora.lora_A": parts["lora_A"] for m, parts in lora.items()}
    ours.update({f"{m}.lora.lora_B": parts["lora_B"] for m, parts in lora.items()})
    ours.update(full)
    try:
        load_delta_tensors(delta, delta.without_left_out(ours), source=str(directory))  # leave_out= given
    except BaseException:
        delta.detach()
        raise
    return delta


def _read_peft_config(directory: Path) -> dict[str, Any]:
    file = directory / PEFT_CONFIG_NAME
    try:
        config = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DeltaCheckpointError(f"{file} cannot be read as JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise DeltaCheckpointError(f"{file} is not a JSON object")
    if config.get("peft_type") != "LORA":
        raise DeltaCheckpointError(
            f"{directory} holds a PEFT {config.get('peft_type')!r} adapter; only PEFT LoRA adapters load as deltas"
        )
    used = [k for k, off in _UNSUPPORTED.items() if config.get(k) not in (off, None)]
    if used:
        raise DeltaCheckpointError(
            f"{directory} uses PEFT options that a LoRA delta does not have: "
            f"{', '.join(f'{k}={config[k]!r}' for k in used)}. Merge or retrain it without them."
        )
    if "r" not in config:
        raise DeltaCheckpointError(f"{file} has no rank 'r'")
    return config


def _read_peft_tensors(directory: Path) -> dict[str, torch.Tensor]:
    file = directory / PEFT_WEIGHTS_NAME
    if not file.is_file():
        raise DeltaCheckpointError(
            f"no {PEFT_WEIGHTS_NAME} in {directory}; save the PEFT model with safe_serialization=True (the default)"
        )
    try:
        return load_file(file)
    except (SafetensorError, OSError) as exc:
        raise DeltaCheckpointError(f"{file} is truncated or corrupted ({exc})") from exc


#: makes ``from_finetuned`` read PEFT LoRA directories
PEFT_FORMAT = CheckpointFormat("PEFT LoRA adapter", "lora", is_peft_directory, load_peft)
register_checkpoint_format(PEFT_FORMAT)
