"""The calling conventions of transformers that the library depends on, in one place.

Prefix tuning and soft prompts rewrite the arguments of transformers modules (attention layers, the
stacks that embed the input): they read and replace the cache a module is handed, and T5's relative
position bias. The training framework turns on activation checkpointing. These conventions change
between transformers releases:

====================  ==========================================================================
transformers          convention
====================  ==========================================================================
5.25 and later        a module is handed its cache as ``cache`` (``past_key_values`` deprecated)
5.15 to 5.24          ... as ``past_key_values``
5.23 and later        ``model.activation_checkpointing_enable(activation_checkpointing_kwargs=...)``
                      (``gradient_checkpointing_enable`` deprecated)
5.15 to 5.22          ``model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=...)``
====================  ==========================================================================

Which convention a module follows is read off the module itself (the names its ``forward`` declares,
the methods it has), never off the installed version: a module written against an older name keeps
working, and nothing here needs editing for a release that keeps one of these names.

The range starts at 5.15, where T5's attention moved to the attention-function interface: before it,
T5's first layer folded the attention mask into the position bias it handed on, which a prefix
cannot extend (setup.py's range; ``scripts/test-deps.sh oldest`` runs the suite there).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

#: The names under which transformers hands a module its cache, newest API generation first.
CACHE_ARGUMENTS: tuple[str, ...] = ("cache", "past_key_values", "past_key_value")


def _parameters(fn: Any) -> dict[str, inspect.Parameter]:
    try:
        return dict(inspect.signature(fn).parameters)
    except (TypeError, ValueError):  # a builtin or C callable: no introspectable signature
        return {}


@dataclass(frozen=True)
class CacheArgument:
    """How one module is handed its cache.

    Attributes:
        name: the name its ``forward`` declares (one of :data:`CACHE_ARGUMENTS`).
    """

    name: str

    def get(self, kwargs: dict[str, Any]) -> Any:
        """The cache in a call's keyword arguments (under the declared name, else a deprecated alias), or None."""
        for key in (self.name, *CACHE_ARGUMENTS):
            if kwargs.get(key) is not None:
                return kwargs[key]
        return None

    def set(self, kwargs: dict[str, Any], cache: Any) -> None:
        """Hand the module ``cache`` under its declared name (aliases are dropped so that only it is seen)."""
        for key in CACHE_ARGUMENTS:
            kwargs.pop(key, None)
        kwargs[self.name] = cache


def cache_argument(module: nn.Module) -> CacheArgument:
    """The cache argument of ``module.forward``: the first of :data:`CACHE_ARGUMENTS` it declares.

    A forward that declares none of them (it takes ``**kwargs`` only) is handed ``past_key_values``,
    the name every generation accepts.
    """
    params = _parameters(module.forward)
    return CacheArgument(next((n for n in CACHE_ARGUMENTS if n in params), "past_key_values"))


def self_attention_cache(cache: Any) -> Any:
    """The self-attention part of an encoder-decoder cache; any other cache (or None) as it is."""
    from transformers.cache_utils import EncoderDecoderCache

    return cache.self_attention_cache if isinstance(cache, EncoderDecoderCache) else cache


def cached_length(cache: Any, layer_idx: int = 0) -> int:
    """The number of tokens ``cache`` holds for ``layer_idx`` (0 without a cache)."""
    return int(cache.get_seq_length(layer_idx)) if cache is not None else 0


def relative_position_bias(module: nn.Module, q_len: int, past: int, device: torch.device) -> torch.Tensor:
    """T5's relative position bias of ``q_len`` queries after ``past`` cached tokens, over the real keys."""
    return module.compute_bias(q_len, past + q_len, device=device, past_seen_tokens=past)


def enable_activation_checkpointing(model: nn.Module, checkpoint_kwargs: dict[str, Any]) -> None:
    """Turn on activation checkpointing of a transformers model, through whichever entry point it has.

    With ``use_reentrant=False`` the embeddings' output is left without a gradient (transformers makes it
    require one): backward stops at the lowest block that trains.

    Args:
        model: a transformers ``PreTrainedModel``.
        checkpoint_kwargs: keyword arguments of ``torch.utils.checkpoint.checkpoint`` (e.g. ``use_reentrant``).
    """
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=checkpoint_kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpoint_kwargs)
    hooked = getattr(model, "_require_grads_hooks", None) or getattr(model, "_require_grads_hook", None)  # 5.25; older
    if not checkpoint_kwargs.get("use_reentrant", True) and hooked:
        # transformers makes the embeddings' output require a gradient, which only reentrant checkpointing
        # needs: it would make backward (and recomputation) run through every block down to the embeddings,
        # also below the lowest block that trains (a delta's leave_out, AdapterDrop)
        model.disable_input_require_grads()
