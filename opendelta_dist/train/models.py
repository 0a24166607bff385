"""Backbones for training: transformers models from a checkpoint or from a config with random weights."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from opendelta_dist.errors import DeltaConfigError

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class ModelConfig:
    """Which backbone to build.

    Attributes:
        name_or_path: a local directory or hub name for ``from_pretrained``; None to build from ``config``.
        config: transformers config fields (``model_type`` first) for a random-weight model.
        task: ``"seq2seq"`` (``AutoModelForSeq2SeqLM``) or ``"classification"``
            (``AutoModelForSequenceClassification``).
        num_labels: classes, for classification.
        dtype: ``fp32``, ``bf16`` or ``fp16`` (T5 overflows in fp16: prefer bf16).
        init_device: ``cpu`` or ``meta`` (build without memory; an engine that shards materialises it).
        gradient_checkpointing: recompute activations in backward (``use_reentrant=False``, so gradients
            reach deltas even when the embeddings are frozen).
        tokenizer: a tokenizer path/name; None means the model's own, ``"byt5"`` one that needs no files.
    """

    name_or_path: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    task: str = "seq2seq"
    num_labels: int = 2
    dtype: str = "fp32"
    init_device: str = "cpu"
    gradient_checkpointing: bool = False
    tokenizer: str | None = None


def _auto_class(task: str) -> Any:
    import transformers

    if task == "seq2seq":
        return transformers.AutoModelForSeq2SeqLM
    if task == "classification":
        return transformers.AutoModelForSequenceClassification
    raise DeltaConfigError(f"unknown task {task!r}; choose 'seq2seq' or 'classification'")


def build_model(cfg: ModelConfig) -> nn.Module:
    """Build the backbone described by ``cfg``.

    Raises:
        DeltaConfigError: neither a checkpoint nor a config is given, or an option is unknown.
    """
    import transformers

    if cfg.dtype not in _DTYPES:
        raise DeltaConfigError(f"unknown dtype {cfg.dtype!r}; choose one of {', '.join(_DTYPES)}")
    dtype = _DTYPES[cfg.dtype]
    auto = _auto_class(cfg.task)
    extra = {"num_labels": cfg.num_labels} if cfg.task == "classification" else {}
    if cfg.name_or_path:
        if cfg.init_device == "meta":
            config = transformers.AutoConfig.from_pretrained(cfg.name_or_path, **extra)
            with torch.device("meta"):
                model = auto.from_config(config, dtype=dtype)
        else:
            model = auto.from_pretrained(cfg.name_or_path, dtype=dtype, **extra)
    elif cfg.config:
        options = dict(cfg.config)
        if "model_type" not in options:
            raise DeltaConfigError("model.config needs a 'model_type' (e.g. t5) to build a model from a config")
        config = transformers.AutoConfig.for_model(options.pop("model_type"), **options, **extra)
        with torch.device(cfg.init_device):
            model = auto.from_config(config, dtype=dtype)
    else:
        raise DeltaConfigError("set model.name_or_path (a checkpoint) or model.config (a random-weight model)")
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        # with frozen embeddings nothing entering the first block requires grad; make it require grad
        model.enable_input_require_grads()
    return model
