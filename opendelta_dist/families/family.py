"""What a model family description holds, and the helpers the family files share.

A :class:`Family` says, for the transformers model types that share one module layout:

- **roles**: where each common-structure role (:mod:`opendelta_dist.structure`) is, as a regular expression
  over module names;
- **attention**: the attention classes a prefix can enter (:mod:`opendelta_dist.deltas.prefix`);
- **estimator**: how the memory estimator (:mod:`opendelta_dist.estimate`) reads the family's architecture
  and which block input each linear layer reads.

This module imports nothing of the package: every other part reads families, families read nothing back.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

# ============================================================================================ attention


@dataclass(frozen=True)
class AttentionSpec:
    """How a prefix enters one attention class.

    The class must take a cache argument (one of
    :data:`~opendelta_dist.transformers_calls.CACHE_ARGUMENTS`), update it with ``.update(key, value,
    layer_idx)`` (also when it is given without a real cache) and attend over what that returns, as
    transformers' attention modules do.

    Attributes:
        module_path: the module defining the class (imported only when looked up).
        class_name: the attention class.
        heads: ``(key/value heads, head size)`` of an instance.
        mask_arg: the name of its attention-mask argument.
        cross_args: arguments that, when given, make a call cross-attention.
        relative_position_bias: it takes T5's ``position_bias`` argument and returns it second.
    """

    module_path: str
    class_name: str
    heads: Callable[[nn.Module], tuple[int, int]]
    mask_arg: str = "attention_mask"
    cross_args: tuple[str, ...] = ()
    relative_position_bias: bool = False

    def attention_class(self) -> type | None:
        """The class, or None when this transformers version has no such class."""
        try:
            return getattr(importlib.import_module(self.module_path), self.class_name)
        except (ImportError, AttributeError):
            return None


def num_heads_and_head_dim(m: nn.Module) -> tuple[int, int]:
    """``(num_heads, head_dim)``: the heads of GPT-2's, BART's and OPT's attention modules."""
    return m.num_heads, m.head_dim


# ============================================================================================ estimator


@dataclass(frozen=True)
class Architecture:
    """What the estimator's activation formulas need to know about a backbone.

    Attributes:
        family: the block formulas that apply: ``t5``, ``bert`` (also RoBERTa, XLM-R), ``gpt2`` or ``llama``
            (also Mistral, Qwen2).
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


def hidden_size_architecture(config: Any, family: str, gated: bool, dropout: float) -> Architecture:
    """The :class:`Architecture` of a config with BERT's and Llama's field names (``hidden_size``,
    ``num_attention_heads``, optional ``head_dim``, ``intermediate_size``, ``hidden_act``)."""
    heads = config.num_attention_heads
    return Architecture(
        family=family,
        d_model=config.hidden_size,
        n_heads=heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        d_ff=config.intermediate_size,
        vocab_size=config.vocab_size,
        activation=config.hidden_act,
        gated=gated,
        dropout=dropout,
    )


@dataclass(frozen=True)
class EstimatorSpec:
    """How the memory estimator reads one family.

    Attributes:
        name: the block formulas of :mod:`opendelta_dist.estimate.activations` that apply
            (:attr:`Architecture.family`).
        model_types: the transformers model types the estimator reads this way (it can list types whose
            roles the family does not name).
        architecture: reads the :class:`Architecture` from a transformers config.
        sites: which input tensor of a block (its "site") each linear layer reads: ``(pattern, site)``
            pairs, the pattern a full match of the layer's name inside the block, the first match winning.
            A site's tensor is kept for backward when a linear layer reading it trains or carries a LoRA.
    """

    name: str
    model_types: tuple[str, ...]
    architecture: Callable[[Any], Architecture]
    sites: tuple[tuple[str, str], ...]


# ============================================================================================ the family


@dataclass(frozen=True)
class Family:
    """One model family: the transformers model types that share one module layout.

    Attributes:
        name: the family's name (its file in :mod:`opendelta_dist.families`).
        model_types: the transformers ``model_type`` values whose modules :attr:`roles` names.
        roles: common-structure role -> regular expression over module names (matched on a dotted suffix).
        opendelta_roles: roles OpenDelta 0.3.2 placed differently, used to read its checkpoints where they were.
        attention: the attention classes of the family a prefix can enter (in lookup order).
        estimator: how the memory estimator reads the family, None where it has no formulas for it.
    """

    name: str
    model_types: tuple[str, ...]
    roles: Mapping[str, str]
    opendelta_roles: Mapping[str, str] = field(default_factory=dict)
    attention: tuple[AttentionSpec, ...] = ()
    estimator: EstimatorSpec | None = None


def self_attention_roles(
    block: str, attn: str, q: str, k: str, v: str, proj: str, ff: str, w1: str, w2: str, norm: str
) -> dict[str, str]:
    """The self-attention, feed-forward and norm roles of a family whose blocks' names match ``block``.

    ``attn``, ``ff``, ``w1`` and ``w2`` are names inside a block, ``q``, ``k``, ``v`` and ``proj`` names inside
    ``attn``; ``norm`` matches the normalisation layers' whole names. The blocks themselves are the ``layer`` role
    (``<stack>.<index>``: what AdapterDrop counts, :mod:`opendelta_dist.adapterdrop`).
    """
    return {
        "layer": block,
        "attn": rf"{block}\.{attn}",
        "attn.q": rf"{block}\.{attn}\.{q}",
        "attn.k": rf"{block}\.{attn}\.{k}",
        "attn.v": rf"{block}\.{attn}\.{v}",
        "attn.proj": rf"{block}\.{attn}\.{proj}",
        "ff": rf"{block}\.{ff}",
        "ff.w1": rf"{block}\.{w1}",
        "ff.w2": rf"{block}\.{w2}",
        "layer_norm": norm,
    }


def cross_attention_roles(block: str, attn: str, q: str, k: str, v: str, proj: str) -> dict[str, str]:
    """The cross-attention roles of the blocks matching ``block``."""
    return {
        "crossattn": rf"{block}\.{attn}",
        "crossattn.q": rf"{block}\.{attn}\.{q}",
        "crossattn.k": rf"{block}\.{attn}\.{k}",
        "crossattn.v": rf"{block}\.{attn}\.{v}",
        "crossattn.proj": rf"{block}\.{attn}\.{proj}",
    }
