"""Per-GPU memory of a training run, before running it: ``python -m opendelta_dist.estimate``.

    python -m opendelta_dist.estimate +recipe=lora_t5_11b world_size=8
    python -m opendelta_dist.estimate +recipe=lora_t5_11b engine=deepspeed engine.options.bf16=true world_size=8
    python -m opendelta_dist.estimate +recipe=lora_t5_11b world_size=1 micro_batch_size=8 input_tokens=512 \\
        target_tokens=128 model.dtype=bf16 format=json

The run configuration is composed exactly as ``launch/train.py`` composes it (Hydra, ``configs/`` and
``recipes/``), so ``+recipe=NAME``, ``engine=fsdp`` and any ``key=value`` override mean the same here.
The estimator's own keys, which are not part of a run's configuration, are:

======================  ======================================================================================
``world_size``          processes (GPUs) of the run; needed for every engine but ``single`` (it splits the
                        batch and, for fsdp and deepspeed, the model)
``micro_batch_size``    sequences per GPU per forward; default ``train.global_batch_size / (world_size x
                        train.grad_accum)``, as the launcher computes it
``input_tokens``        input (encoder) sequence length; default ``data.max_length`` (batches padded to it)
``target_tokens``       target (decoder) length of seq2seq models; default ``data.max_target_length``
``format``              ``table`` (default, a rich table) or ``json`` (machine-readable, for benchmarks)
======================  ======================================================================================

The backbone is built on the meta device (no memory, no download): its architecture comes from
``model.config`` (transformers config fields, ``model_type`` first), or from a ``config.json`` already on
this machine (a local directory, a ``pkg://`` package or the transformers cache). The delta is attached and
the backbone frozen as the recipe does it, so the parameter counts are exact. The memory is then computed
per category:

- **weights**: the frozen backbone on one GPU: whole (single, ddp, ZeRO-2) or sharded (fsdp, ZeRO-3), plus
  the compute-dtype copies an engine gathers (FSDP units, ZeRO-3 live parameters);
- **deltas**: the trainable parameters and their gradients, with the engine's gradient buffers;
- **optimizer**: AdamW's two moments, plus fp32 master weights where the engine keeps them; offloaded
  state is reported in the CPU column;
- **activations**: what autograd keeps for backward (every block's saved tensors, or with gradient
  checkpointing each block's input) plus the peak of one block's recomputation and backward;
- **workspace**: the logits and loss buffers where they exceed the block peak, the CUDA context and
  NCCL's buffers (constants, below).

Every figure is a model of the code paths of this repository's engines with torch 2.x and transformers
5.x on a GPU; the assumptions are stated in the docstrings of the functions that use them.
"""

from __future__ import annotations

import inspect
import json
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from opendelta_dist.errors import DeltaConfigError, OpenDeltaError

GIB = 1024**3

CUDA_CONTEXT_BYTES = 512 * 1024**2
"""CUDA context, kernels and cuBLAS workspaces of one process: outside ``torch.cuda.memory_allocated``."""
NCCL_BUFFER_BYTES = 256 * 1024**2
"""NCCL's communicator buffers per process when ``world_size > 1``: outside the torch allocator."""
ADAMW_STATES = 2
"""AdamW keeps two moments (``exp_avg``, ``exp_avg_sq``) per trainable element."""
FSDP_LIVE_UNITS = 2
"""FSDP2 holds the current block's gathered parameters and prefetches the next block's."""
SHARDED_ENGINES = ("fsdp", "deepspeed")
ESTIMATOR_KEYS = ("world_size", "micro_batch_size", "input_tokens", "target_tokens", "format")
FORMATS = ("table", "json")
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"

# DeepSpeed's defaults (deepspeed.runtime.zero.config) for what the engine does not set itself.
DS_REDUCE_BUCKET_SIZE = 500_000_000
DS_PREFETCH_BUCKET_SIZE = 50_000_000
DS_MAX_LIVE_PARAMETERS = 1_000_000_000
DS_PARAM_PERSISTENCE_THRESHOLD = 100_000


class EstimateError(DeltaConfigError):
    """The estimator cannot model what was asked (missing world size, unknown architecture, ...)."""


# ============================================================================================ configuration


def compose(overrides: Sequence[str]) -> dict[str, Any]:
    """The run configuration ``launch/train.py`` would run with ``overrides``, as plain Python.

    Args:
        overrides: Hydra overrides (``+recipe=lora_t5_11b``, ``engine=fsdp``, ``model.dtype=bf16``).

    Returns:
        The composed and resolved configuration.

    Raises:
        EstimateError: an unknown recipe, engine or other config group option, or a key that does not exist.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if not CONFIG_DIR.is_dir():
        raise EstimateError(f"no configs/ directory at {CONFIG_DIR}: run the estimator from a source checkout")
    _check_group_choices(overrides)
    try:
        with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
            cfg = hydra_compose("config", overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as exc:
        lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()] or [type(exc).__name__]
        raise EstimateError(f"the configuration does not compose: {' '.join(lines[:2])}") from exc
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def _check_group_choices(overrides: Sequence[str]) -> None:
    """Name the available choices when an override picks an option of a config group that does not exist."""
    for item in overrides:
        key, sep, value = item.partition("=")
        group = key.lstrip("+~")
        folder = CONFIG_DIR / group
        if not sep or "." in group or not folder.is_dir():
            continue
        choices = sorted(p.stem for p in folder.glob("*.yaml"))
        if value not in choices:
            raise EstimateError(f"unknown {group} {value!r}; choose one of {', '.join(choices)} ({folder})")


def split_arguments(argv: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """Separate the estimator's own ``key=value`` arguments from the Hydra overrides.

    Returns:
        The estimator's keys (see the module docstring) and the remaining overrides.
    """
    own: dict[str, str] = {}
    overrides: list[str] = []
    for item in argv:
        key, sep, value = item.partition("=")
        if sep and key in ESTIMATOR_KEYS:
            own[key] = value
        else:
            overrides.append(item)
    return own, overrides


# ============================================================================================ the backbone


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

    if model_cfg.dtype not in DTYPES:
        raise EstimateError(f"unknown model.dtype {model_cfg.dtype!r}; choose one of {', '.join(DTYPES)}")
    config = _architecture_config(model_cfg)
    with torch.device("meta"):
        return auto_model_class(model_cfg.task).from_config(config, dtype=DTYPES[model_cfg.dtype])


def attach_delta(model: nn.Module, cfg: Mapping[str, Any]) -> Any:
    """Attach the configured delta and freeze the rest exactly as the training recipe does.

    Returns:
        The delta (None for full fine-tuning, ``delta=none``).

    Raises:
        DeltaConfigError: the delta configuration is invalid for this backbone or engine.
    """
    from opendelta_dist.train.recipe import attach_delta as attach

    return attach(model, dict(cfg["delta"]), str(cfg["engine"]["name"]))


# ============================================================================================ parameters


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass
class ParameterCounts:
    """Every parameter a GPU may hold, counted once (tied weights once), by dtype.

    Attributes:
        frozen: element counts of the parameters that do not train (the backbone's, originals that a delta
            copied, a delta's fixed tensors), by dtype.
        trainable: element counts of the parameters the optimizer updates, by dtype.
        delta: elements owned by delta modules (trainable or fixed).
        unfrozen_backbone: the backbone's own parameters left trainable (``unfrozen_modules``, full fine-tuning).
        copies: trainable delta parameters that start as copies of backbone parameters (whose originals stay).
    """

    frozen: dict[torch.dtype, int] = field(default_factory=dict)
    trainable: dict[torch.dtype, int] = field(default_factory=dict)
    delta: int = 0
    unfrozen_backbone: int = 0
    copies: int = 0

    @property
    def frozen_numel(self) -> int:
        """Frozen elements."""
        return sum(self.frozen.values())

    @property
    def trainable_numel(self) -> int:
        """Trainable elements."""
        return sum(self.trainable.values())

    @property
    def frozen_bytes(self) -> int:
        """Bytes of the frozen parameters in their own dtypes."""
        return sum(n * dtype.itemsize for dtype, n in self.frozen.items())

    @property
    def trainable_bytes(self) -> int:
        """Bytes of the trainable parameters in their own dtypes."""
        return sum(n * dtype.itemsize for dtype, n in self.trainable.items())

    def as_dict(self) -> dict[str, Any]:
        """Plain values for JSON: counts by dtype name and the totals."""
        return {
            "frozen": {_dtype_name(d): n for d, n in self.frozen.items()},
            "trainable": {_dtype_name(d): n for d, n in self.trainable.items()},
            "frozen_bytes": self.frozen_bytes,
            "trainable_bytes": self.trainable_bytes,
            "delta": self.delta,
            "unfrozen_backbone": self.unfrozen_backbone,
            "copies": self.copies,
        }


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
    for op in getattr(delta, "_operations", []):
        target = getattr(op, "target", None)
        if isinstance(op, UnfreezeParameter) and target is not None:
            original = original_parameter(target, op.param_name)
            if original is not None and original is not op.parameter:
                counts.copies += op.parameter.numel()
    return counts


# ============================================================================================ architecture


@dataclass(frozen=True)
class Architecture:
    """What the activation formulas need to know about a backbone.

    Attributes:
        family: ``t5``, ``bert`` (also RoBERTa, XLM-R), ``gpt2`` or ``llama`` (also Mistral, Qwen2).
        d_model: hidden size.
        n_heads: attention heads (grouped-query attention's key/value heads are expanded to these).
        head_dim: size of one head (T5's ``d_kv``).
        d_ff: feed-forward inner size.
        vocab_size: vocabulary size (the LM head's width).
        activation: the feed-forward activation's transformers name (``relu``, ``gelu_new``, ``silu``, ...).
        gated: the feed-forward is gated (T5 v1.1 ``gated-gelu``, Llama's SwiGLU).
        dropout: the hidden dropout probability (residual, feed-forward and embedding dropout).
        use_cache: GPT-2 copies keys and values into its cache in a forward without checkpointing.
    """

    family: str
    d_model: int
    n_heads: int
    head_dim: int
    d_ff: int
    vocab_size: int
    activation: str
    gated: bool
    dropout: float
    use_cache: bool = False

    @property
    def attention_dim(self) -> int:
        """Width of the concatenated heads (the attention output projection's input)."""
        return self.n_heads * self.head_dim


FAMILIES = {
    "t5": "t5",
    "mt5": "t5",
    "bert": "bert",
    "roberta": "bert",
    "xlm-roberta": "bert",
    "gpt2": "gpt2",
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
}


def architecture_of(config: Any) -> Architecture:
    """Read an :class:`Architecture` from a transformers config.

    Raises:
        EstimateError: the model type has no activation formula here.
    """
    family = FAMILIES.get(getattr(config, "model_type", ""))
    if family == "t5":
        return Architecture(
            family=family,
            d_model=config.d_model,
            n_heads=config.num_heads,
            head_dim=config.d_kv,
            d_ff=config.d_ff,
            vocab_size=config.vocab_size,
            activation=config.dense_act_fn,
            gated=config.is_gated_act,
            dropout=config.dropout_rate,
        )
    if family == "gpt2":
        return Architecture(
            family=family,
            d_model=config.n_embd,
            n_heads=config.n_head,
            head_dim=config.n_embd // config.n_head,
            d_ff=config.n_inner or 4 * config.n_embd,
            vocab_size=config.vocab_size,
            activation=config.activation_function,
            gated=False,
            dropout=config.resid_pdrop,
            use_cache=bool(config.use_cache),
        )
    if family in ("bert", "llama"):
        heads = config.num_attention_heads
        return Architecture(
            family=family,
            d_model=config.hidden_size,
            n_heads=heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            d_ff=config.intermediate_size,
            vocab_size=config.vocab_size,
            activation=config.hidden_act,
            gated=family == "llama",
            dropout=config.hidden_dropout_prob if family == "bert" else 0.0,
        )
    raise EstimateError(
        f"no activation formula for model_type {getattr(config, 'model_type', None)!r}; the estimator knows "
        f"{', '.join(sorted(FAMILIES))}"
    )


# Which input tensor of a block each linear layer reads ("site"), by the layer's name inside the block. A
# site's tensor is kept for backward when a linear layer reading it trains or carries a LoRA.
_SITES = {
    "t5": [
        (r"layer\.0\.SelfAttention\.[qkv]", "attn_in"),
        (r"layer\.0\.SelfAttention\.o", "attn_out"),
        (r"layer\.1\.EncDecAttention\.q", "cross_in"),
        (r"layer\.1\.EncDecAttention\.[kv]", "encoder_out"),
        (r"layer\.1\.EncDecAttention\.o", "cross_out"),
        (r"layer\.\d\.DenseReluDense\.wi(_0|_1)?", "ff_in"),
        (r"layer\.\d\.DenseReluDense\.wo", "ff_mid"),
    ],
    "bert": [
        (r"attention\.self\.(query|key|value)", "attn_in"),
        (r"attention\.output\.dense", "attn_out"),
        (r"intermediate\.dense", "ff_in"),
        (r"output\.dense", "ff_mid"),
    ],
    "gpt2": [
        (r"attn\.c_attn", "attn_in"),
        (r"attn\.c_proj", "attn_out"),
        (r"mlp\.c_fc", "ff_in"),
        (r"mlp\.c_proj", "ff_mid"),
    ],
    "llama": [
        (r"self_attn\.[qkv]_proj", "attn_in"),
        (r"self_attn\.o_proj", "attn_out"),
        (r"mlp\.(gate|up)_proj", "ff_in"),
        (r"mlp\.down_proj", "ff_mid"),
    ],
}


@dataclass(frozen=True)
class BlockInfo:
    """One transformer block as the formulas see it.

    Attributes:
        name: the block's module name.
        kind: ``encoder`` or ``decoder`` (T5's decoder blocks have cross-attention; decoder-only models'
            blocks are ``encoder`` blocks with a causal mask).
        sites: the block's input sites whose tensor is kept for backward (see ``_SITES``).
        lora_rank: per site, the summed ranks of the LoRA layers reading it.
        delta_per_token: elements per token that other delta modules keep (their inputs and hidden layers).
        norm_weight_trains: a normalisation weight of the block trains (full fine-tuning).
        unit_numel: parameters of the block's FSDP unit (the block without its delta modules).
        numel: all parameters of the block.
        first: the block is the first of its stack (its input is the embedding output).
    """

    name: str
    kind: str
    sites: frozenset[str]
    lora_rank: Mapping[str, int]
    delta_per_token: int
    norm_weight_trains: bool
    unit_numel: int
    numel: int
    first: bool = False


def _is_linear(module: nn.Module) -> bool:
    weight = module._parameters.get("weight")
    return weight is not None and weight.dim() == 2 and not isinstance(module, nn.Embedding)


def describe_blocks(model: nn.Module, family: str) -> list[BlockInfo]:
    """The transformer blocks of ``model`` in forward order, with what their backward keeps.

    Args:
        model: the backbone with its delta attached and frozen.
        family: its :attr:`Architecture.family`.

    Returns:
        One :class:`BlockInfo` per block.
    """
    from opendelta_dist.addressing import is_delta_module
    from opendelta_dist.deltas.lora import LowRankLinear
    from opendelta_dist.train.engines.fsdp import delta_submodules, transformer_blocks

    names = {id(m): n for n, m in model.named_modules()}
    infos = []
    for block in transformer_blocks(model):
        sites: set[str] = set()
        ranks: dict[str, int] = {}
        delta_per_token = 0
        delta_ids = {id(p) for sub in delta_submodules(block) for p in sub.parameters()}
        for local, module in block.named_modules():
            if is_delta_module(module) and not isinstance(module, LowRankLinear):
                weights = [p for p in module.parameters() if p.dim() == 2 and p.requires_grad]
                # each trainable matrix keeps its input, and the activation between two keeps its own
                delta_per_token += sum(p.shape[1] for p in weights) + sum(min(p.shape) for p in weights[1:])
            if not _is_linear(module) or is_delta_module(module):
                continue
            site = next((s for pattern, s in _SITES[family] if re.fullmatch(pattern, local)), None)
            loras = [m for m in module.children() if isinstance(m, LowRankLinear)]
            if site is None or not (module.weight.requires_grad or loras):
                continue
            sites.add(site)
            ranks[site] = ranks.get(site, 0) + sum(m.r for m in loras)
        # a norm keeps its normalised input only for its weight's gradient (a trainable bias needs none)
        norm_trains = any(
            "norm" in type(m).__name__.lower() and getattr(m._parameters.get("weight"), "requires_grad", False)
            for m in block.modules()
        )
        numel = sum(p.numel() for p in block.parameters())
        infos.append(
            BlockInfo(
                name=names[id(block)],
                kind="decoder" if family == "t5" and names[id(block)].startswith("decoder.") else "encoder",
                sites=frozenset(sites),
                lora_rank=ranks,
                delta_per_token=delta_per_token,
                norm_weight_trains=norm_trains,
                unit_numel=numel - sum(p.numel() for p in block.parameters() if id(p) in delta_ids),
                numel=numel,
                first=names[id(block)].rsplit(".", 1)[-1] == "0",
            )
        )
    return infos


# ============================================================================================ activations


@dataclass(frozen=True)
class Shapes:
    """The batch one GPU processes per forward.

    Attributes:
        batch: sequences (the micro batch).
        input_tokens: input (encoder) length; every batch is assumed padded to it.
        target_tokens: target (decoder) length of a seq2seq model, 0 otherwise.
        bytes: bytes of the compute dtype.
    """

    batch: int
    input_tokens: int
    target_tokens: int
    bytes: int


def activation_saves(activation: str) -> int:
    """How many ``tokens x d_ff`` tensors an activation function keeps for backward.

    ``relu`` keeps its output, ``gelu``/``gelu_pytorch_tanh``/``silu`` their input (one fused kernel each);
    ``gelu_new`` (transformers' Python tanh formula) keeps its input, the ``tanh`` output and the two factors
    of its last product; ``quick_gelu`` its input and the sigmoid. Unknown names count as one.
    """
    return {"gelu_new": 4, "quick_gelu": 2}.get(activation, 1)


def rms_norm_saves(tokens: int, d_model: int, nbytes: int, weight_trains: bool) -> int:
    """Bytes an RMS norm (T5's, Llama's) keeps besides its input.

    It squares an fp32 copy of its input (kept when the input is not fp32 already), keeps the fp32 reciprocal
    root per token, and keeps the normalised tensor when its weight trains.
    """
    upcast = tokens * d_model * 4 if nbytes < 4 else 0
    return upcast + tokens * 4 + (tokens * d_model * nbytes if weight_trains else 0)


def layer_norm_saves(tokens: int) -> int:
    """Bytes ``nn.LayerNorm`` keeps besides its input: the fp32 mean and reciprocal deviation per token."""
    return 2 * tokens * 4


def fused_attention_saves(
    batch: int, heads: int, q_len: int, k_len: int, head_dim: int, nbytes: int, mask_elements: int
) -> int:
    """Bytes a fused scaled-dot-product attention (flash / memory-efficient kernel) keeps for backward.

    Query, key, value and output (in the compute dtype), the fp32 log-sum-exp per query and head, and the
    additive mask it was given (T5's position bias folded into it). No ``q_len x k_len`` probabilities are
    stored: attention dropout is regenerated from a seed. (The eager path and CPU attention with dropout
    store the probabilities instead; this estimate is for the fused GPU kernels.)
    """
    qo = 2 * batch * heads * q_len * head_dim * nbytes
    kv = 2 * batch * heads * k_len * head_dim * nbytes
    return qo + kv + batch * heads * q_len * 4 + mask_elements * nbytes


def dropout_saves(tokens: int, width: int, rate: float) -> int:
    """Bytes a dropout keeps: its boolean mask (one byte per element) when it is active."""
    return tokens * width if rate > 0 else 0


def _site(block: BlockInfo, site: str, tokens: int, width: int, nbytes: int) -> int:
    """Bytes kept for a site: its tensor (when a linear layer reading it trains) and its LoRAs' hidden ranks.

    Pass ``width=0`` for a site whose tensor is kept anyway: the attention output projection reads the fused
    kernel's output, which the kernel keeps (its ``(batch, tokens, heads, head_dim)`` layout makes the
    transposed ``.contiguous()`` a view).
    """
    if site not in block.sites:
        return 0
    return tokens * width * nbytes + tokens * block.lora_rank.get(site, 0) * nbytes


def _feed_forward(arch: Architecture, block: BlockInfo, tokens: int, nbytes: int) -> dict[str, int]:
    """The feed-forward's activation, its dropout, and the output projection's input when it must be kept.

    A gated feed-forward also keeps the linear branch and the activation's output (the two factors of the
    gate's product). The output projection's input is kept anyway when it is a ReLU output without dropout.
    """
    f = arch.d_ff
    saves = activation_saves(arch.activation) + (2 if arch.gated else 0)
    terms = {"feed-forward activation": saves * tokens * f * nbytes}
    # only T5 drops out between the activation and the output projection
    terms["feed-forward dropout"] = dropout_saves(tokens, f, arch.dropout) if arch.family == "t5" else 0
    kept = not arch.gated and arch.activation == "relu" and arch.dropout == 0
    mid = _site(block, "ff_mid", tokens, f, nbytes)
    terms["feed-forward output input"] = mid - (tokens * f * nbytes if kept and mid else 0)
    return terms


def t5_block_saves(arch: Architecture, block: BlockInfo, shapes: Shapes, checkpointing: bool) -> dict[str, int]:
    """Bytes one T5 block keeps for backward, by term.

    Pre-norm sub-layers (RMS norm, attention or feed-forward, dropout, residual add). The encoder's
    self-attention mask is the padded ``batch x heads x input x input`` position bias; the decoder's
    self-attention mask is the causal ``heads x target x target`` bias (batches carry no decoder padding
    mask); cross-attention's is ``batch x heads x target x input``. Frozen linear layers keep nothing of
    their own; a site's input is kept when a layer reading it trains or has a LoRA.
    """
    b, p = shapes.batch, shapes.bytes
    n = shapes.target_tokens if block.kind == "decoder" else shapes.input_tokens
    t, d, h = b * n, arch.d_model, arch.n_heads
    norm = rms_norm_saves(t, d, p, block.norm_weight_trains)
    self_mask = h * n * n if block.kind == "decoder" else b * h * n * n
    grad_in = checkpointing or not block.first
    terms = {
        "block input": t * d * p if grad_in else 0,
        "self-attention norm": norm if grad_in else 0,
        "self-attention input": _site(block, "attn_in", t, d, p),
        "self-attention": fused_attention_saves(b, h, n, n, arch.head_dim, p, self_mask),
        "self-attention output input": _site(block, "attn_out", t, 0, p),
        "self-attention dropout": dropout_saves(t, d, arch.dropout),
    }
    if block.kind == "decoder":
        s = shapes.input_tokens
        terms |= {
            "cross-attention block input": t * d * p,
            "cross-attention norm": norm,
            "cross-attention input": _site(block, "cross_in", t, d, p),
            "cross-attention": fused_attention_saves(b, h, n, s, arch.head_dim, p, b * h * n * s),
            "cross-attention output input": _site(block, "cross_out", t, 0, p),
            "cross-attention key/value LoRA": _site(block, "encoder_out", b * s, 0, p),
            "cross-attention dropout": dropout_saves(t, d, arch.dropout),
        }
    terms |= {
        "feed-forward block input": t * d * p,
        "feed-forward norm": norm,
        "feed-forward input": _site(block, "ff_in", t, d, p),
        **_feed_forward(arch, block, t, p),
        "feed-forward output dropout": dropout_saves(t, d, arch.dropout),
        "other deltas": t * block.delta_per_token * p,
    }
    return terms


def bert_block_saves(arch: Architecture, block: BlockInfo, shapes: Shapes, checkpointing: bool) -> dict[str, int]:
    """Bytes one BERT-style (post-norm) block keeps for backward, by term.

    The block's input is the previous block's normalised output: kept only when the attention projections
    train or carry a LoRA. The padding mask becomes a ``batch x 1 x input x input`` additive mask per block.
    """
    b, p, n = shapes.batch, shapes.bytes, shapes.input_tokens
    t, d = b * n, arch.d_model
    return {
        "block input": _site(block, "attn_in", t, d, p),
        "self-attention": fused_attention_saves(b, arch.n_heads, n, n, arch.head_dim, p, b * n * n),
        "self-attention output input": _site(block, "attn_out", t, 0, p),
        "self-attention dropout": dropout_saves(t, d, arch.dropout),
        "attention norm": t * d * p + layer_norm_saves(t),
        "feed-forward input": _site(block, "ff_in", t, d, p),
        **_feed_forward(arch, block, t, p),
        "feed-forward output dropout": dropout_saves(t, d, arch.dropout),
        "feed-forward norm": t * d * p + layer_norm_saves(t),
        "other deltas": t * block.delta_per_token * p,
    }


def gpt2_block_saves(arch: Architecture, block: BlockInfo, shapes: Shapes, checkpointing: bool) -> dict[str, int]:
    """Bytes one GPT-2 (pre-norm, ``Conv1D``) block keeps for backward, by term.

    Query, key and value are views of one projection output (as large as the three); with the key/value
    cache on (no gradient checkpointing) key and value are also copied into the cache.
    """
    b, p, n = shapes.batch, shapes.bytes, shapes.input_tokens
    t, d = b * n, arch.d_model
    cache = 2 * t * arch.attention_dim * p if arch.use_cache and not checkpointing else 0
    attention = fused_attention_saves(b, arch.n_heads, n, n, arch.head_dim, p, b * n * n) + cache
    return {
        "block input": t * d * p + layer_norm_saves(t) if checkpointing or not block.first else 0,
        "self-attention input": _site(block, "attn_in", t, d, p),
        "self-attention": attention,
        "self-attention output input": _site(block, "attn_out", t, 0, p),
        "self-attention dropout": dropout_saves(t, d, arch.dropout),
        "feed-forward block input": t * d * p + layer_norm_saves(t),
        "feed-forward input": _site(block, "ff_in", t, d, p),
        **_feed_forward(arch, block, t, p),
        "feed-forward output dropout": dropout_saves(t, d, arch.dropout),
        "other deltas": t * block.delta_per_token * p,
    }


def llama_block_saves(arch: Architecture, block: BlockInfo, shapes: Shapes, checkpointing: bool) -> dict[str, int]:
    """Bytes one Llama-style (pre-RMS-norm, rotary, SwiGLU) block keeps for backward, by term.

    Keys and values are expanded to every query head before the attention kernel (grouped-query attention
    costs no less activation memory here); the padding mask is ``batch x 1 x input x input`` per block.
    """
    b, p, n = shapes.batch, shapes.bytes, shapes.input_tokens
    t, d = b * n, arch.d_model
    norm = rms_norm_saves(t, d, p, block.norm_weight_trains)
    grad_in = checkpointing or not block.first
    return {
        "block input": t * d * p if grad_in else 0,
        "self-attention norm": norm if grad_in else 0,
        "self-attention input": _site(block, "attn_in", t, d, p),
        "self-attention": fused_attention_saves(b, arch.n_heads, n, n, arch.head_dim, p, b * n * n),
        "self-attention output input": _site(block, "attn_out", t, 0, p),
        "feed-forward block input": t * d * p,
        "feed-forward norm": norm,
        "feed-forward input": _site(block, "ff_in", t, d, p),
        **_feed_forward(arch, block, t, p),
        "other deltas": t * block.delta_per_token * p,
    }


def block_saves(arch: Architecture, block: BlockInfo, shapes: Shapes, checkpointing: bool) -> dict[str, int]:
    """Bytes one block keeps for backward, by term, for the block's family.

    The input of a stack's first block is the embedding output, which needs no gradient unless gradient
    checkpointing is on (the launcher then makes it require one): without checkpointing that block's first
    norm keeps nothing of its input.
    """
    family = {"t5": t5_block_saves, "bert": bert_block_saves, "gpt2": gpt2_block_saves, "llama": llama_block_saves}
    return family[arch.family](arch, block, shapes, checkpointing)


def block_backward_transient(arch: Architecture, block: BlockInfo, shapes: Shapes) -> int:
    """The gradients alive at once while one block runs backward, on top of what it keeps.

    The gradient of the block's output and of its residual stream (two ``tokens x d_model``), plus the
    larger of the feed-forward's two inner gradients (``tokens x d_ff`` each; three for a gated one) and the
    attention's query, key, value and output gradients.
    """
    p = shapes.bytes
    n = shapes.target_tokens if block.kind == "decoder" else shapes.input_tokens
    t = shapes.batch * n
    ff = (3 if arch.gated else 2) * t * arch.d_ff * p
    attention = 4 * t * arch.attention_dim * p
    return 2 * t * arch.d_model * p + max(ff, attention)


def outside_block_saves(
    arch: Architecture, blocks: Sequence[BlockInfo], shapes: Shapes, checkpointing: bool
) -> dict[str, int]:
    """Bytes kept for backward outside the blocks: final norms and, with gradient checkpointing (when the
    embedding output requires a gradient), the embeddings' norm or dropout and the inputs every checkpointed
    block shares.

    T5 with checkpointing shares the encoder output, the position biases (``heads x input x input``,
    ``heads x target x target``, ``heads x target x input``) and the boolean padding masks; the other
    families share their boolean padding mask. Without checkpointing the encoder output is kept only when
    a cross-attention key/value projection trains or has a LoRA.
    """
    b, p, s = shapes.batch, shapes.bytes, shapes.input_tokens
    d, h, te = arch.d_model, arch.n_heads, b * s
    terms: dict[str, int] = {}
    if arch.family == "t5":
        tt = shapes.batch * shapes.target_tokens
        tgt = shapes.target_tokens
        norms = rms_norm_saves(te, d, p, False) + rms_norm_saves(tt, d, p, False)
        terms["embedding dropout"] = dropout_saves(te + tt, d, arch.dropout) if checkpointing else 0
        terms["final norms"] = (te + tt) * d * p + norms + dropout_saves(te + tt, d, arch.dropout)
        cross_kv = any("encoder_out" in blk.sites for blk in blocks)
        terms["encoder output"] = te * d * p if checkpointing or cross_kv else 0
        if checkpointing:
            terms["position biases"] = h * (s * s + tgt * tgt + tgt * s) * p
            terms["padding masks"] = b * s * s + b * tgt * s
        return terms
    t = te
    if arch.family == "bert":
        norm = t * d * p + layer_norm_saves(t) + dropout_saves(t, d, arch.dropout)
        terms["embeddings norm"] = norm if checkpointing else 0
    elif arch.family == "gpt2":
        terms["embedding dropout"] = dropout_saves(t, d, arch.dropout) if checkpointing else 0
        terms["final norm"] = t * d * p + layer_norm_saves(t)
    else:
        terms["final norm"] = t * d * p + rms_norm_saves(t, d, p, False)
        terms["rotary cos/sin"] = 2 * s * arch.head_dim * p
    if checkpointing:
        terms["padding mask"] = b * s * s
    return terms


def loss_buffers(arch: Architecture, shapes: Shapes, seq2seq: bool) -> int:
    """Bytes of the logits and the loss at their peak (seq2seq models; a classifier's logits are tiny).

    The LM head's ``batch x target x vocab`` logits, the cross-entropy's log-softmax (kept for backward), then
    in backward the log-softmax's gradient and the logits' gradient: three such tensors at once, in the
    compute dtype (T5 takes the loss of its logits without an fp32 copy).
    """
    if not seq2seq:
        return 0
    return 3 * shapes.batch * shapes.target_tokens * arch.vocab_size * shapes.bytes


@dataclass
class ActivationEstimate:
    """Activation memory of one training step on one GPU.

    Attributes:
        kept: bytes kept across the step (every block's saved tensors, or with checkpointing the blocks'
            inputs), with the tensors kept outside the blocks.
        recompute: bytes of the largest block's recomputed saved tensors (gradient checkpointing), else 0.
        backward: bytes of that block's gradients alive at once during its backward (without checkpointing:
            less what the blocks after it had freed by then).
        loss: bytes of the logits and loss buffers at their peak.
        terms: the largest block's saved tensors by term, and the outside terms.
    """

    kept: int
    recompute: int
    backward: int
    loss: int
    terms: dict[str, int]

    @property
    def block_peak(self) -> int:
        """Kept activations plus the largest block's recomputation and backward."""
        return self.kept + self.recompute + self.backward

    @property
    def loss_excess(self) -> int:
        """Bytes the loss buffers add above the block peak (they are not alive at the same time)."""
        return max(0, self.loss - self.recompute - self.backward)


def estimate_activations(
    arch: Architecture, blocks: Sequence[BlockInfo], shapes: Shapes, checkpointing: bool, seq2seq: bool
) -> ActivationEstimate:
    """Activation memory of a training step, with or without gradient checkpointing.

    Without checkpointing every block's saved tensors stay until its backward; the peak adds the gradients
    of one block's backward less what the blocks after it freed (or the loss buffers, whichever is larger).
    With non-reentrant checkpointing each block keeps only its inputs (its output is the next block's
    input); in backward one block at a time recomputes its forward, keeping its saved tensors again, and
    runs its backward.

    Args:
        arch: the backbone's architecture.
        blocks: its blocks (:func:`describe_blocks`).
        shapes: the micro batch.
        checkpointing: gradient checkpointing of every block.
        seq2seq: the model computes an LM loss over ``target_tokens`` (else a classifier's).

    Returns:
        The estimate.
    """
    per_block = [block_saves(arch, blk, shapes, checkpointing) for blk in blocks]
    outside = outside_block_saves(arch, blocks, shapes, checkpointing)
    transients = [block_backward_transient(arch, blk, shapes) for blk in blocks]
    if checkpointing:
        # the block's input is the checkpoint's own input: recomputing does not allocate it again
        peaks = [sum(t.values()) - t["block input"] + tr for t, tr in zip(per_block, transients, strict=True)]
        worst = max(range(len(blocks)), key=peaks.__getitem__)
        recompute = sum(per_block[worst].values()) - per_block[worst]["block input"]
        kept = sum(block_input_bytes(arch, blk, shapes) for blk in blocks) + sum(outside.values())
    else:
        # backward runs the blocks in reverse and frees each block's saved tensors after its backward: a
        # block's gradients rise above the start of backward by its transient less what later blocks freed
        kept = sum(sum(t.values()) for t in per_block) + sum(outside.values())
        recompute, freed = 0, 0
        for i in reversed(range(len(blocks))):
            transients[i], freed = max(0, transients[i] - freed), freed + sum(per_block[i].values())
        worst = max(range(len(blocks)), key=transients.__getitem__)
    terms = {f"{blocks[worst].kind} block: {k}": v for k, v in per_block[worst].items() if v}
    terms |= {f"outside blocks: {k}": v for k, v in outside.items() if v}
    return ActivationEstimate(kept, recompute, transients[worst], loss_buffers(arch, shapes, seq2seq), terms)


def block_input_bytes(arch: Architecture, block: BlockInfo, shapes: Shapes) -> int:
    """Bytes of a block's input hidden states: what a checkpointed block keeps."""
    n = shapes.target_tokens if block.kind == "decoder" else shapes.input_tokens
    return shapes.batch * n * arch.d_model * shapes.bytes


# ============================================================================================ engines


@dataclass
class Row:
    """One category of the breakdown.

    Attributes:
        name: ``weights``, ``deltas``, ``optimizer``, ``activations`` or ``workspace``.
        gpu: bytes on each GPU.
        cpu: bytes in CPU memory per process (offloaded state).
        note: what the figure holds, in words.
    """

    name: str
    gpu: int
    cpu: int
    note: str


@dataclass(frozen=True)
class Backbone:
    """What the engine models need to know about the backbone and its delta.

    Attributes:
        counts: the parameter counts.
        blocks: the transformer blocks.
        root_numel: parameters outside every block and delta module (embeddings, final norms, heads).
        persistent_frozen: frozen elements in tensors below ZeRO-3's persistence threshold.
        persistent_trainable: trainable elements in tensors below ZeRO-3's persistence threshold.
        model_dtype: the dtype the backbone is built in (``model.dtype``).
    """

    counts: ParameterCounts
    blocks: Sequence[BlockInfo]
    root_numel: int
    persistent_frozen: int
    persistent_trainable: int
    model_dtype: torch.dtype


def _engine_defaults() -> dict[str, dict[str, Any]]:
    """Every modelled engine's constructor options with their defaults, read from the engine classes."""
    from opendelta_dist.train.engines.ddp import DDPEngine
    from opendelta_dist.train.engines.deepspeed import DeepSpeedEngine
    from opendelta_dist.train.engines.fsdp import FSDPEngine
    from opendelta_dist.train.engines.single import SingleEngine

    classes = {"single": SingleEngine, "ddp": DDPEngine, "fsdp": FSDPEngine, "deepspeed": DeepSpeedEngine}
    return {
        name: {
            key: param.default
            for key, param in inspect.signature(cls.__init__).parameters.items()
            if key not in ("self", "topology") and param.default is not inspect.Parameter.empty
        }
        for name, cls in classes.items()
    }


def engine_options(name: str, options: Mapping[str, Any] | None) -> tuple[dict[str, Any], list[str]]:
    """The engine's constructor options: the configured ones over the constructor's defaults.

    An option of another engine (a recipe written for fsdp sets ``engine.options.mixed_precision`` for
    whichever engine is chosen) is set aside and named, so that ``engine=NAME`` can be compared on any recipe.

    Returns:
        The options, and the names of the options set aside.

    Raises:
        EstimateError: an engine without a memory model, or an option no engine takes.
    """
    engines = _engine_defaults()
    if name not in engines:
        raise EstimateError(f"no memory model for engine {name!r}; the estimator knows {', '.join(engines)}")
    defaults = engines[name]
    unknown = sorted(set(options or {}) - set(defaults))
    foreign = [key for key in unknown if any(key in other for other in engines.values())]
    typos = [key for key in unknown if key not in foreign]
    if typos:
        raise EstimateError(
            f"engine {name!r} takes no option {', '.join(typos)}; its options are {', '.join(defaults) or 'none'}"
        )
    return {**defaults, **{k: v for k, v in (options or {}).items() if k not in foreign}}, foreign


def compute_dtype(engine: str, options: Mapping[str, Any], model_dtype: torch.dtype) -> torch.dtype:
    """The dtype an engine computes (and keeps activations) in.

    ``single`` and ``ddp`` compute in the model's dtype (no autocast); ``fsdp`` in its ``mixed_precision``
    dtype when set; ``deepspeed`` in bf16 with ``bf16`` (it casts the module).
    """
    from opendelta_dist.train.engines.fsdp import MIXED_PRECISION

    if engine == "fsdp":
        return MIXED_PRECISION.get(options.get("mixed_precision") or "", model_dtype)
    if engine == "deepspeed" and options.get("bf16"):
        return torch.bfloat16
    return model_dtype


def replicated_engine_rows(backbone: Backbone, world_size: int, ddp: bool) -> list[Row]:
    """``single`` and ``ddp``: every GPU holds the whole model in its own dtype and computes in it.

    Gradients exist for the trainable parameters only, in their dtype; DDP (with more than one process)
    also keeps its all-reduce buckets, one more gradient-sized copy (``gradient_as_bucket_view`` off).
    AdamW keeps its moments in the parameters' dtype.
    """
    c = backbone.counts
    buckets = c.trainable_bytes if ddp and world_size > 1 else 0
    return [
        Row("weights", c.frozen_bytes, 0, f"the whole frozen backbone in {_dtypes(c.frozen)}"),
        Row(
            "deltas",
            2 * c.trainable_bytes + buckets,
            0,
            "trainable parameters and their gradients" + (", DDP all-reduce buckets" if buckets else ""),
        ),
        Row("optimizer", ADAMW_STATES * c.trainable_bytes, 0, "AdamW moments in the parameters' dtype"),
    ]


def fsdp_engine_rows(backbone: Backbone, world_size: int, options: Mapping[str, Any]) -> list[Row]:
    """``fsdp`` (FSDP2): parameters, gradients and optimizer state sharded over the ranks.

    Each block is a unit, each delta module a unit, the rest the root unit. A unit's parameters are gathered
    in the compute dtype (bf16 with ``mixed_precision``, else their own) around its forward and backward;
    with ``reshard_after_forward`` two block units are gathered at once (the running one and the prefetched
    one) and the root unit stays gathered, else every unit stays gathered after forward. Gathering copies
    into a new buffer even on one rank. Gradients are sharded in the parameters' dtype (reduced in fp32);
    the delta units' gathered parameters and unsharded gradients are counted whole (an upper bound: they are
    a few MB). ``cpu_offload`` moves the shards, their gradients and the optimizer to CPU memory.
    """
    c, w = backbone.counts, world_size
    compute = compute_dtype("fsdp", options, backbone.model_dtype)
    units = [b.unit_numel for b in backbone.blocks]
    live = FSDP_LIVE_UNITS * max(units, default=0) if options.get("reshard_after_forward") else sum(units)
    gathered = (live + backbone.root_numel) * compute.itemsize
    offload = bool(options.get("cpu_offload"))
    shards = _ceil_div(c.frozen_bytes, w)
    delta_shards = 2 * _ceil_div(c.trainable_bytes, w)
    delta_gathered = 2 * c.trainable_numel * compute.itemsize
    optimizer = ADAMW_STATES * _ceil_div(c.trainable_bytes, w)
    units_note = "2 block units" if options.get("reshard_after_forward") else "every unit"
    return [
        Row(
            "weights",
            gathered + (0 if offload else shards),
            shards if offload else 0,
            f"1/{w} shard in {_dtypes(c.frozen)}, plus {units_note} and the root gathered in {_dtype_name(compute)}",
        ),
        Row(
            "deltas",
            delta_gathered + (0 if offload else delta_shards),
            delta_shards if offload else 0,
            f"1/{w} shards of trainable parameters and gradients, gathered copies and unsharded gradients",
        ),
        Row(
            "optimizer",
            0 if offload else optimizer,
            optimizer if offload else 0,
            f"AdamW moments of 1/{w} of the trainable parameters" + (", on CPU" if offload else ""),
        ),
    ]


def deepspeed_engine_rows(backbone: Backbone, world_size: int, options: Mapping[str, Any]) -> tuple[list[Row], int]:
    """``deepspeed`` (ZeRO-2 or ZeRO-3), with DeepSpeed's defaults for what the engine does not set.

    With ``bf16`` the whole module is cast to bf16 (frozen parameters too) and computes in it; the
    optimizer keeps fp32 master weights of its partition either way. Stage 2: every GPU holds the whole
    model; each holds 1/world of the trainable parameters' gradients (compute dtype), fp32 masters, AdamW
    moments and, during the step, the fp32 gradient of its master partition. Stage 3 partitions the
    parameters too, except tensors below ``stage3_param_persistence_threshold`` elements (norms, LoRA
    matrices), which every GPU keeps whole; gathered parameters of the running block stay live for its
    backward (``stage3_max_reuse_distance``) plus a prefetch bucket, at most ``stage3_max_live_parameters``;
    gradient partitions are kept in fp32. Both stages allocate the gradient reduction bucket
    (``reduce_bucket_size`` elements, two with ``overlap_comm`` in stage 2) when ``contiguous_gradients``.
    Optimizer offload moves masters, moments and fp32 gradient partitions to CPU; parameter offload moves
    the ZeRO-3 parameter partitions.

    Returns:
        The weights, deltas and optimizer rows, and the bytes of the gradient bucket (workspace).
    """
    c, w, stage = backbone.counts, world_size, int(options.get("stage", 2))
    zero = dict((options.get("extra_config") or {}).get("zero_optimization") or {})
    compute = compute_dtype("deepspeed", options, backbone.model_dtype)
    cb = compute.itemsize
    frozen = c.frozen_numel * cb if options.get("bf16") else c.frozen_bytes
    n_t = c.trainable_numel
    masters = (4 + 4 * ADAMW_STATES) * _ceil_div(n_t, w)
    offload_opt = bool(options.get("offload_optimizer"))
    bucket = int(zero.get("reduce_bucket_size", DS_REDUCE_BUCKET_SIZE)) * cb
    overlap = bool(zero.get("overlap_comm", stage == 3))
    bucket *= 2 if stage == 2 and overlap else 1
    bucket = bucket if zero.get("contiguous_gradients", True) else 0
    if stage == 2:
        grads = _ceil_div(n_t, w) * cb
        rows = [
            Row("weights", frozen, 0, f"the whole frozen backbone in {_dtype_name(compute)}"),
            Row("deltas", n_t * cb + grads, 0, f"trainable parameters in {_dtype_name(compute)}, 1/{w} of gradients"),
        ]
        optimizer = masters + 4 * _ceil_div(n_t, w)
    else:
        persistent = backbone.persistent_frozen * cb
        partitioned = _ceil_div((c.frozen_numel - backbone.persistent_frozen) * cb, w)
        prefetch = int(zero.get("stage3_prefetch_bucket_size", DS_PREFETCH_BUCKET_SIZE))
        max_live = int(zero.get("stage3_max_live_parameters", DS_MAX_LIVE_PARAMETERS))
        largest = max((b.numel for b in backbone.blocks), default=0)
        live = min(max_live, largest + prefetch) * cb
        offload_params = bool(options.get("offload_params"))
        trainable = backbone.persistent_trainable * cb + _ceil_div((n_t - backbone.persistent_trainable) * cb, w)
        grad_partitions = 4 * _ceil_div(n_t, w)
        rows = [
            Row(
                "weights",
                live + persistent + (0 if offload_params else partitioned),
                partitioned if offload_params else 0,
                f"1/{w} partition in {_dtype_name(compute)}, small tensors whole, one block gathered + prefetch",
            ),
            Row(
                "deltas",
                trainable + (0 if offload_opt else grad_partitions),
                grad_partitions if offload_opt else 0,
                f"trainable parameters (small ones whole), 1/{w} of fp32 gradients",
            ),
        ]
        optimizer = masters
    rows.append(
        Row(
            "optimizer",
            0 if offload_opt else optimizer,
            optimizer if offload_opt else 0,
            f"fp32 masters and AdamW moments of 1/{w} of the trainable parameters"
            + (", on CPU" if offload_opt else ""),
        )
    )
    return rows, bucket


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _dtypes(counts: Mapping[torch.dtype, int]) -> str:
    return "+".join(_dtype_name(d) for d in counts) or "no dtype"


# ============================================================================================ the estimate


@dataclass
class MemoryEstimate:
    """The per-GPU memory breakdown of one run configuration.

    Attributes:
        setup: what was estimated (model, delta, engine, world size, batch, lengths, dtypes, checkpointing).
        parameters: the parameter counts.
        rows: weights, deltas, optimizer, activations, workspace.
        activations: the activation model's parts.
        notes: assumptions worth reading next to the figures.
    """

    setup: dict[str, Any]
    parameters: ParameterCounts
    rows: list[Row]
    activations: ActivationEstimate
    notes: list[str]

    @property
    def total(self) -> int:
        """Bytes per GPU: everything, the CUDA context and NCCL's buffers included."""
        return sum(r.gpu for r in self.rows)

    @property
    def constants(self) -> int:
        """Bytes outside the torch allocator (CUDA context, NCCL)."""
        return CUDA_CONTEXT_BYTES + (NCCL_BUFFER_BYTES if self.setup["world_size"] > 1 else 0)

    @property
    def allocated(self) -> int:
        """Bytes the torch allocator holds at the peak: comparable with ``torch.cuda.max_memory_allocated``."""
        return self.total - self.constants

    def row(self, name: str) -> Row:
        """The row called ``name``."""
        return next(r for r in self.rows if r.name == name)

    def as_dict(self) -> dict[str, Any]:
        """Plain values for JSON (bytes, with GiB beside the totals)."""
        a = self.activations
        return {
            "setup": self.setup,
            "parameters": self.parameters.as_dict(),
            "rows": {r.name: {"gpu_bytes": r.gpu, "cpu_bytes": r.cpu, "note": r.note} for r in self.rows},
            "activations": {
                "kept_bytes": a.kept,
                "recompute_bytes": a.recompute,
                "backward_bytes": a.backward,
                "loss_bytes": a.loss,
                "terms": a.terms,
            },
            "allocated_peak_bytes": self.allocated,
            "total_bytes": self.total,
            "cpu_bytes": sum(r.cpu for r in self.rows),
            "allocated_peak_gib": round(self.allocated / GIB, 3),
            "total_gib": round(self.total / GIB, 3),
            "notes": self.notes,
        }


def _resolve_world_size(engine: str, world_size: int | None) -> int:
    if engine == "single":
        if world_size not in (None, 1):
            raise EstimateError(f"engine=single runs one process, not world_size={world_size}; use engine=ddp or fsdp")
        return 1
    if world_size is None:
        raise EstimateError(
            f"engine={engine} splits the batch{' and the model' if engine in SHARDED_ENGINES else ''} over the "
            "processes: give world_size=N (GPUs in the run: nodes x --nproc_per_node), e.g. world_size=8"
        )
    if world_size < 1:
        raise EstimateError(f"world_size must be at least 1, not {world_size}")
    return world_size


def _zero_persistent(model: nn.Module, threshold: int) -> tuple[int, int]:
    """Frozen and trainable elements in tensors below ZeRO-3's persistence threshold."""
    frozen = trainable = 0
    for p in {id(p): p for p in model.parameters()}.values():
        if p.numel() < threshold:
            if p.requires_grad:
                trainable += p.numel()
            else:
                frozen += p.numel()
    return frozen, trainable


def estimate_memory(
    cfg: Mapping[str, Any],
    world_size: int | None = None,
    micro_batch_size: int | None = None,
    input_tokens: int | None = None,
    target_tokens: int | None = None,
) -> MemoryEstimate:
    """Estimate the per-GPU memory of training the composed run configuration ``cfg``.

    Args:
        cfg: a run configuration (what :func:`compose` returns).
        world_size: processes of the run; needed unless the engine is ``single``.
        micro_batch_size: sequences per GPU per forward; default from ``train`` as the launcher computes it.
        input_tokens: input length; default ``data.max_length``.
        target_tokens: target length of seq2seq models; default ``data.max_target_length``.

    Returns:
        The estimate.

    Raises:
        OpenDeltaError: (an :class:`EstimateError` and others) the configuration cannot be estimated.
    """
    from opendelta_dist.operations import delta_parameter_ids
    from opendelta_dist.train.data import DataConfig, check_batch
    from opendelta_dist.train.engines.fsdp import delta_submodules, transformer_blocks
    from opendelta_dist.train.models import DTYPES, ModelConfig

    engine = str(cfg["engine"]["name"])
    options, foreign = engine_options(engine, cfg["engine"].get("options"))
    world = _resolve_world_size(engine, world_size)
    train = cfg["train"]
    micro = micro_batch_size or check_batch(int(train["global_batch_size"]), world, int(train.get("grad_accum", 1)))
    model_cfg = ModelConfig(**cfg["model"])
    data = DataConfig(**cfg["data"])
    seq2seq = model_cfg.task == "seq2seq"

    model = build_meta_backbone(model_cfg)
    delta = attach_delta(model, cfg)
    counts = count_parameters(model, delta)
    arch = architecture_of(model.config)
    blocks = describe_blocks(model, arch.family)
    if not blocks:
        raise EstimateError(f"found no transformer blocks in the {arch.family} backbone; cannot estimate activations")

    in_blocks = {id(p) for blk in transformer_blocks(model) for p in blk.parameters()}
    in_deltas = {id(p) for sub in delta_submodules(model) for p in sub.parameters()} | delta_parameter_ids(model)
    root = sum(p.numel() for p in model.parameters() if id(p) not in in_blocks | in_deltas)
    model_dtype = DTYPES[model_cfg.dtype]
    threshold = int(
        ((options.get("extra_config") or {}).get("zero_optimization") or {}).get(
            "stage3_param_persistence_threshold", DS_PARAM_PERSISTENCE_THRESHOLD
        )
    )
    backbone = Backbone(counts, blocks, root, *_zero_persistent(model, threshold), model_dtype)

    bucket = 0
    if engine == "fsdp":
        rows = fsdp_engine_rows(backbone, world, options)
    elif engine == "deepspeed":
        rows, bucket = deepspeed_engine_rows(backbone, world, options)
    else:
        rows = replicated_engine_rows(backbone, world, engine == "ddp")
    compute = compute_dtype(engine, options, model_dtype)

    shapes = Shapes(
        micro,
        input_tokens or data.max_length,
        (target_tokens or data.max_target_length) if seq2seq else 0,
        compute.itemsize,
    )
    checkpointing = model_cfg.gradient_checkpointing
    acts = estimate_activations(arch, blocks, shapes, checkpointing, seq2seq)
    rows.append(Row("activations", acts.block_peak, 0, _activation_note(acts, checkpointing, compute)))
    nccl = NCCL_BUFFER_BYTES if world > 1 else 0
    workspace_parts = [f"CUDA context {CUDA_CONTEXT_BYTES / GIB:.2f}"]
    if nccl:
        workspace_parts.append(f"NCCL {nccl / GIB:.2f}")
    if bucket:
        workspace_parts.append(f"ZeRO gradient bucket {bucket / GIB:.2f}")
    if acts.loss_excess:
        workspace_parts.append(f"logits+loss beyond the block peak {acts.loss_excess / GIB:.2f}")
    elif acts.loss:
        workspace_parts.append(f"logits+loss ({acts.loss / GIB:.2f}) fit under the block peak")
    rows.append(
        Row("workspace", CUDA_CONTEXT_BYTES + nccl + bucket + acts.loss_excess, 0, "GiB: " + ", ".join(workspace_parts))
    )
    setup = {
        "model": model_cfg.name_or_path or model.config.model_type,
        "family": arch.family,
        "task": model_cfg.task,
        "delta": cfg["delta"].get("delta_type"),
        "engine": engine,
        "engine_options": {k: v for k, v in options.items() if k != "extra_config" or v},
        "world_size": world,
        "micro_batch_size": micro,
        "input_tokens": shapes.input_tokens,
        "target_tokens": shapes.target_tokens,
        "model_dtype": model_cfg.dtype,
        "compute_dtype": _dtype_name(compute),
        "gradient_checkpointing": checkpointing,
    }
    notes = _notes(model_cfg, engine, options, counts)
    if foreign:
        notes.insert(
            0,
            f"set aside engine.options {', '.join(foreign)}: not options of {engine} (the launcher would refuse "
            "them; override them away with ~engine.options.NAME)",
        )
    return MemoryEstimate(setup, counts, rows, acts, notes)


def _activation_note(acts: ActivationEstimate, checkpointing: bool, compute: torch.dtype) -> str:
    kept = f"{acts.kept / GIB:.2f} kept"
    if checkpointing:
        return (
            f"GiB, {_dtype_name(compute)}: {kept} (block inputs), {acts.recompute / GIB:.2f} one block recomputed, "
            f"{acts.backward / GIB:.2f} its backward"
        )
    return f"GiB, {_dtype_name(compute)}: {kept} (every block's saved tensors), {acts.backward / GIB:.2f} one backward"


def _notes(model_cfg: Any, engine: str, options: Mapping[str, Any], counts: ParameterCounts) -> list[str]:
    notes = [
        "activations assume batches padded to input_tokens (target_tokens) and fused SDPA attention kernels "
        "(flash / memory-efficient) as on a GPU",
        f"workspace counts {CUDA_CONTEXT_BYTES / GIB:.2f} GiB of CUDA context (not in torch.cuda.max_memory_allocated)"
        " and no allocator fragmentation (reserved memory can exceed the figures by a few percent)",
    ]
    if model_cfg.init_device == "meta" and model_cfg.name_or_path:
        notes.append(
            f"loading {model_cfg.name_or_path} into the shards, rank 0 also reads the whole checkpoint into CPU memory "
            f"({counts.frozen_bytes / GIB:.1f} GiB in {model_cfg.dtype})"
        )
    if engine == "fsdp" and not options.get("mixed_precision"):
        notes.append("fsdp without mixed_precision computes in the parameters' dtype")
    return notes


# ============================================================================================ command line


def render_table(estimate: MemoryEstimate) -> Any:
    """A rich table of the breakdown: one row per category, GiB per GPU and in CPU memory, and the totals."""
    from rich.table import Table

    s = estimate.setup
    title = (
        f"{s['model']} + {s['delta']} on {s['engine']} x{s['world_size']}: micro batch {s['micro_batch_size']}, "
        f"{s['input_tokens']}" + (f" -> {s['target_tokens']}" if s["target_tokens"] else "") + " tokens, "
        f"model.dtype {s['model_dtype']}, {s['compute_dtype']} compute"
        + (", gradient checkpointing" if s["gradient_checkpointing"] else "")
    )
    table = Table(title=title, title_justify="left")
    table.add_column("per GPU")
    table.add_column("GiB", justify="right")
    table.add_column("CPU GiB", justify="right")
    table.add_column("what")
    for r in estimate.rows:
        table.add_row(r.name, f"{r.gpu / GIB:.2f}", f"{r.cpu / GIB:.2f}" if r.cpu else "", r.note)
    table.add_section()
    cpu = sum(r.cpu for r in estimate.rows)
    table.add_row(
        "total",
        f"{estimate.total / GIB:.2f}",
        f"{cpu / GIB:.2f}" if cpu else "",
        f"torch allocated peak {estimate.allocated / GIB:.2f} GiB (without CUDA context and NCCL)",
    )
    return table


def _parameters_line(counts: ParameterCounts) -> str:
    frozen = ", ".join(f"{n:,} {_dtype_name(d)}" for d, n in counts.frozen.items())
    trainable = ", ".join(f"{n:,} {_dtype_name(d)}" for d, n in counts.trainable.items()) or "none"
    return f"parameters: frozen {frozen}; trainable {trainable} (delta {counts.delta:,}, copies {counts.copies:,})"


def _int_option(own: Mapping[str, str], key: str) -> int | None:
    if key not in own:
        return None
    try:
        value = int(own[key])
    except ValueError:
        raise EstimateError(f"{key} must be an integer, not {own[key]!r}") from None
    if value < 1:
        raise EstimateError(f"{key} must be at least 1, not {value}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """Print the estimate for the run configuration on the command line; see the module docstring.

    Returns:
        0, or 1 after printing one line that says what is wrong and how to fix it.
    """
    from rich.console import Console

    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(__doc__)
        return 0
    try:
        own, overrides = split_arguments(args)
        fmt = own.get("format", "table")
        if fmt not in FORMATS:
            raise EstimateError(f"format must be one of {', '.join(FORMATS)}, not {fmt!r}")
        estimate = estimate_memory(
            compose(overrides),
            world_size=_int_option(own, "world_size"),
            micro_batch_size=_int_option(own, "micro_batch_size"),
            input_tokens=_int_option(own, "input_tokens"),
            target_tokens=_int_option(own, "target_tokens"),
        )
    except OpenDeltaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if fmt == "json":
        print(json.dumps(estimate.as_dict(), indent=2))
        return 0
    console = Console(width=max(Console().width, 140))
    console.print(render_table(estimate))
    console.print(_parameters_line(estimate.parameters), highlight=False)
    for note in estimate.notes:
        console.print(f"- {note}", highlight=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
