"""One directory holds a trained prompt model: its delta and its prompt (template and verbalizer).

Layout::

    config.json               the delta's checkpoint (opendelta_dist.saving; written by delta.save_finetuned),
    delta_model.safetensors   present when a delta was saved with the prompt
    prompt_config.json        how to rebuild the prompt (below)
    prompt.safetensors        the prompt's own tensors

``prompt_config.json``::

    {
      "format": "opendelta_dist.prompt", "format_version": 1,
      "model": {"class": "PromptForClassification", "freeze_plm": false, "plm_eval_mode": false,
                "gen_config": {...}},                 # gen_config: PromptForGeneration only
      "template": {"class": "MixedTemplate", "text": "<the template string, or a list of piece dicts>",
                   "placeholder_mapping": {...}, "options": {"num_tokens": 20, ...}},
      "verbalizer": {"class": "ManualVerbalizer", "classes": [...], "num_classes": 2,
                     "label_words": [["good"], ["bad"]], "options": {"prefix": " ", ...},
                     "calibrated": false},            # null for a model without verbalizer
      "delta": true,                                  # whether config.json + delta_model.safetensors belong to it
      "tensors_file": "prompt.safetensors", "tensors_sha256": "..."
    }

``label_words`` are the words as given (before the verbalizer's prefix), in class order. ``options`` are the
constructor arguments the object keeps as attributes of the same name (JSON values only).

``prompt.safetensors`` holds ``template.<name>`` and ``verbalizer.<name>`` for every tensor of the template's
and the verbalizer's state dicts that is not the language model's (a template's ``raw_embedding`` is the
model's input embedding and is never saved): soft token embeddings, a SoftVerbalizer's head, the label-word id
tables (checked on load: a different tokenizer is refused), and ``verbalizer._calibrate_logits`` when the
verbalizer was calibrated.

:func:`load_prompt` builds the template and the verbalizer on the fresh backbone first (as a script builds them
before attaching its delta), then attaches the saved delta (``AutoDeltaModel.from_finetuned``), then loads
the prompt's tensors, so the rebuilt prompt model computes exactly what the saved one did.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from opendelta_dist.auto_delta import AutoDeltaModel
from opendelta_dist.basemodel import DeltaBase
from opendelta_dist.operations import delta_parameter_ids, pristine_named_parameters
from opendelta_dist.prompts.errors import PromptError
from opendelta_dist.prompts.generation_verbalizer import GenerationVerbalizer
from opendelta_dist.prompts.pipeline import PromptForClassification, PromptForGeneration, PromptModel
from opendelta_dist.prompts.soft_templates import MixedTemplate, SoftTemplate
from opendelta_dist.prompts.soft_verbalizer import SoftVerbalizer
from opendelta_dist.prompts.templates import ManualTemplate
from opendelta_dist.prompts.verbalizers import ManualVerbalizer, One2oneVerbalizer
from opendelta_dist.saving import _file_sha256, _fsync_dir, write_json_atomic, write_safetensors_atomic

PROMPT_CONFIG_NAME = "prompt_config.json"
PROMPT_TENSORS_NAME = "prompt.safetensors"
PROMPT_FORMAT = "opendelta_dist.prompt"
PROMPT_FORMAT_VERSION = 1
CALIBRATION_KEY = "verbalizer._calibrate_logits"

#: the classes a saved prompt names, by name (others are passed to load_prompt as ``classes``)
KNOWN_CLASSES: dict[str, type] = {
    cls.__name__: cls
    for cls in (
        ManualTemplate,
        MixedTemplate,
        SoftTemplate,
        ManualVerbalizer,
        One2oneVerbalizer,
        SoftVerbalizer,
        GenerationVerbalizer,
        PromptModel,
        PromptForClassification,
        PromptForGeneration,
    )
}
# constructor arguments saved otherwise than as options (or given again on load)
_NOT_OPTIONS = frozenset(
    {"self", "model", "plm", "tokenizer", "text", "soft_embeds", "classes", "num_classes", "label_words"}
)


def _json_value(value: Any, what: str) -> Any:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        raise PromptError(
            f"{what} is {value!r}, which cannot be written to JSON: a saved prompt keeps strings, numbers, "
            "booleans, lists and dicts only (a callable such as a template's post_processing cannot be saved; "
            "express it in the data instead)"
        ) from None
    return value


def _options(obj: nn.Module) -> dict[str, Any]:
    """The constructor arguments ``obj`` keeps as attributes of the same name."""
    options = {}
    for name, param in inspect.signature(type(obj).__init__).parameters.items():
        if name in _NOT_OPTIONS or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD) or not hasattr(obj, name):
            continue
        options[name] = _json_value(getattr(obj, name), f"{type(obj).__name__}'s {name}")
    return options


def _template_text(template: nn.Module) -> Any:
    """The template's text: as given when the template keeps it (``raw_text``), else its parsed pieces.

    A template with soft tokens holds one piece per soft token; each becomes ``{"soft": None, "soft_id": k}``
    where soft index ``k`` first appears and ``{"soft_id": k}`` after, which numbers the tokens as before
    (indices are given in order of first appearance) and shares them where they were shared.
    """
    text = getattr(template, "raw_text", None)
    if text is None and template.text is not None:
        soft_ids = getattr(template, "soft_token_ids", None) or [0] * len(template.text)
        text, seen = [], set()
        for piece, soft_id in zip(template.text, soft_ids):
            if soft_id:
                text.append({"soft_id": soft_id} if soft_id in seen else {"soft": None, "soft_id": soft_id})
                seen.add(soft_id)
            else:
                text.append(dict(piece))
    return _json_value(text, f"the text of {type(template).__name__}")


def _owned_tensors(module: nn.Module, foreign: set[int], prefix: str) -> dict[str, torch.Tensor]:
    """``module``'s state-dict tensors that are not in ``foreign`` (the language model's), keyed ``prefix.name``."""
    return {f"{prefix}.{k}": v for k, v in module.state_dict(keep_vars=True).items() if id(v) not in foreign}


def _plm_tensor_ids(plm: nn.Module) -> set[int]:
    tensors = [*plm.parameters(), *plm.buffers(), *(p for _, p in pristine_named_parameters(plm))]
    return {id(t) for t in tensors}


def save_prompt(
    directory: str | os.PathLike[str], prompt_model: nn.Module, delta_model: DeltaBase | None = None
) -> Path:
    """Save a prompt model's prompt, and its delta, into one directory (see the module docstring).

    Args:
        directory: the directory (created if missing; the files are replaced atomically).
        prompt_model: a :class:`~opendelta_dist.prompts.PromptForClassification`,
            :class:`~opendelta_dist.prompts.PromptForGeneration` or :class:`~opendelta_dist.prompts.PromptModel`.
        delta_model: the delta attached to the prompt model's language model (saved with its own
            ``save_finetuned``); None when the language model has no delta.

    Returns:
        The directory.

    Raises:
        PromptError: the language model carries a delta but none was given (or the given one belongs to
            another model), or the template or verbalizer holds something that cannot be saved.
    """
    path = Path(directory)
    inner = prompt_model.prompt_model if hasattr(prompt_model, "prompt_model") else prompt_model
    plm, template = inner.plm, inner.template
    verbalizer = getattr(prompt_model, "verbalizer", None)
    if delta_model is None and delta_parameter_ids(plm):
        raise PromptError(
            "the language model carries a delta, which would be lost: pass it as save_prompt(directory, "
            "prompt_model, delta_model=delta)"
        )
    if delta_model is not None and (delta_model.backbone_model is not plm or not delta_model.attached):
        raise PromptError("delta_model is not attached to this prompt model's language model: pass the delta on it")
    model_entry: dict[str, Any] = {
        "class": type(prompt_model).__name__,
        "freeze_plm": bool(inner.freeze_plm),
        "plm_eval_mode": bool(inner.plm_eval_mode),
    }
    if isinstance(prompt_model, PromptForGeneration):
        model_entry["gen_config"] = _json_value(prompt_model.gen_config, "gen_config")
    config: dict[str, Any] = {
        "format": PROMPT_FORMAT,
        "format_version": PROMPT_FORMAT_VERSION,
        "model": model_entry,
        "template": {
            "class": type(template).__name__,
            "text": _template_text(template),
            "placeholder_mapping": _json_value(getattr(template, "placeholder_mapping", None), "placeholder_mapping"),
            "options": {k: v for k, v in _options(template).items() if k != "placeholder_mapping"},
        },
        "verbalizer": None,
        "delta": delta_model is not None,
        "tensors_file": PROMPT_TENSORS_NAME,
    }
    foreign = _plm_tensor_ids(plm)
    tensors = _owned_tensors(template, foreign, "template")
    if verbalizer is not None:
        calibration = getattr(verbalizer, "_calibrate_logits", None)
        config["verbalizer"] = {
            "class": type(verbalizer).__name__,
            "classes": _json_value(verbalizer.classes, "the verbalizer's classes"),
            "num_classes": verbalizer.num_classes,
            "label_words": _json_value(getattr(verbalizer, "raw_label_words", None), "the label words"),
            "options": _options(verbalizer),
            "calibrated": calibration is not None,
        }
        tensors.update(_owned_tensors(verbalizer, foreign, "verbalizer"))
        if calibration is not None:
            tensors[CALIBRATION_KEY] = calibration
    path.mkdir(parents=True, exist_ok=True)
    if delta_model is not None:
        delta_model.save_finetuned(path)
    meta = {"format": PROMPT_FORMAT, "format_version": str(PROMPT_FORMAT_VERSION)}
    config["tensors_sha256"] = write_safetensors_atomic(tensors, path / PROMPT_TENSORS_NAME, meta)
    write_json_atomic(path / PROMPT_CONFIG_NAME, config)
    _fsync_dir(path)
    return path


def read_prompt_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``prompt_config.json`` of a saved prompt.

    Raises:
        PromptError: no such file, not JSON, or a format this version cannot read.
    """
    file = Path(directory) / PROMPT_CONFIG_NAME
    if not file.is_file():
        raise PromptError(f"no {PROMPT_CONFIG_NAME} in {directory}: give a directory written by save_prompt")
    try:
        config = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PromptError(f"{file} is not valid JSON ({exc}): the save is corrupted, save the prompt again") from exc
    if not isinstance(config, dict) or config.get("format") != PROMPT_FORMAT:
        raise PromptError(f"{file} is not a saved prompt (no 'format': {PROMPT_FORMAT!r})")
    if int(config.get("format_version", 0)) > PROMPT_FORMAT_VERSION:
        raise PromptError(
            f"{file} has format version {config['format_version']}, newer than this library reads "
            f"({PROMPT_FORMAT_VERSION}): upgrade opendelta_dist"
        )
    return config


def _read_tensors(path: Path, config: dict[str, Any]) -> dict[str, torch.Tensor]:
    file = path / config.get("tensors_file", PROMPT_TENSORS_NAME)
    if not file.is_file() or _file_sha256(file) != config.get("tensors_sha256"):
        raise PromptError(
            f"{file} is missing or does not match the sha256 in {PROMPT_CONFIG_NAME} (an interrupted or corrupted "
            "save): save the prompt again"
        )
    try:
        return load_file(file)
    except (SafetensorError, OSError) as exc:
        raise PromptError(f"{file} cannot be read ({exc}): save the prompt again") from exc


def _class(name: str, classes: Mapping[str, type] | None) -> type:
    found = {**KNOWN_CLASSES, **(classes or {})}.get(name)
    if found is None:
        raise PromptError(
            f"the saved prompt uses the class {name!r}, which this library does not know: pass it to "
            f"load_prompt(..., classes={{{name!r}: {name}}})"
        )
    return found


def _build(cls: type, given: dict[str, Any], plm: nn.Module) -> Any:
    accepted = inspect.signature(cls.__init__).parameters
    kwargs = {k: v for k, v in given.items() if k in accepted}
    for name in ("model", "plm"):
        if name in accepted:
            kwargs[name] = plm
    return cls(**kwargs)


def _load_tensors(module: nn.Module, tensors: dict[str, torch.Tensor], prefix: str, foreign: set[int]) -> None:
    """Load ``prefix.*`` tensors into ``module``; tensors the language model owns are not expected."""
    own = {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".") and k != CALIBRATION_KEY}
    current = module.state_dict(keep_vars=True)
    expected = {k for k, v in current.items() if id(v) not in foreign}
    missing, unexpected = sorted(expected - set(own)), sorted(set(own) - expected)
    if missing or unexpected:
        raise PromptError(
            f"the saved {prefix} tensors do not fit the rebuilt {type(module).__name__}: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}; the save belongs to another configuration"
        )
    for key in sorted(expected):
        target, value = current[key], own[key]
        if tuple(target.shape) != tuple(value.shape):
            raise PromptError(
                f"the saved {prefix} tensor {key!r} has shape {tuple(value.shape)}, the rebuilt one "
                f"{tuple(target.shape)}: the save belongs to another model or configuration"
            )
        if not target.is_floating_point() and not torch.equal(target.cpu(), value):
            raise PromptError(
                f"{prefix} {key!r} differs from the saved one: the tokenizer gives the label words other ids "
                "than the one the prompt was trained with; load it with that tokenizer"
            )
    module.load_state_dict({k: own[k] for k in expected}, strict=False)


def load_prompt(
    directory: str | os.PathLike[str],
    plm: nn.Module,
    tokenizer: Any,
    classes: Mapping[str, type] | None = None,
    check_hash: bool = True,
) -> nn.Module:
    """Rebuild a prompt model saved by :func:`save_prompt` onto a fresh language model.

    Args:
        directory: the directory written by :func:`save_prompt`.
        plm: the language model, as it was before the delta was attached (same weights).
        tokenizer: its tokenizer (the one the prompt was trained with).
        classes: template, verbalizer or prompt-model classes of your own, by the name the save records.
        check_hash: refuse a language model other than the one the delta was saved with.

    Returns:
        The prompt model (the saved class), with the delta attached to ``plm``; the delta is its
        ``delta_model`` attribute (None without delta; not a submodule).

    Raises:
        PromptError: a missing, corrupted or unknown save, or one that does not fit ``plm``/``tokenizer``.
        DeltaCheckpointError: the delta cannot be loaded onto ``plm``.
    """
    path = Path(directory)
    config = read_prompt_config(path)
    tensors = _read_tensors(path, config)
    foreign = _plm_tensor_ids(plm)
    entry = config["template"]
    template = _build(
        _class(entry["class"], classes),
        {
            "tokenizer": tokenizer,
            "text": entry["text"],
            "placeholder_mapping": entry["placeholder_mapping"],
            **entry["options"],
        },
        plm,
    )
    _load_tensors(template, tensors, "template", foreign)
    verbalizer = None
    if config["verbalizer"] is not None:
        entry = config["verbalizer"]
        verbalizer = _build(
            _class(entry["class"], classes),
            {
                "tokenizer": tokenizer,
                "classes": entry["classes"],
                "num_classes": entry["num_classes"],
                "label_words": entry["label_words"],
                **entry["options"],
            },
            plm,
        )
        _load_tensors(verbalizer, tensors, "verbalizer", foreign)
        if CALIBRATION_KEY in tensors:
            verbalizer.register_calibrate_logits(tensors[CALIBRATION_KEY].to(_device(plm)))
    delta = AutoDeltaModel.from_finetuned(path, backbone_model=plm, check_hash=check_hash) if config["delta"] else None
    model = config["model"]
    cls = _class(model["class"], classes)
    options = {"freeze_plm": model["freeze_plm"], "plm_eval_mode": model["plm_eval_mode"]}
    if issubclass(cls, PromptForGeneration):
        prompt_model = cls(plm, template, gen_config=model.get("gen_config"), tokenizer=tokenizer, **options)
    elif verbalizer is not None:
        prompt_model = cls(plm, template, verbalizer, **options)
    else:
        prompt_model = cls(plm, template, **options)
    prompt_model.__dict__["delta_model"] = delta
    return prompt_model


def _device(module: nn.Module) -> torch.device:
    first = next(module.parameters(), None)
    return first.device if first is not None else torch.device("cpu")
