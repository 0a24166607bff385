"""Prefix tuning: learned keys and values prepended in every modified self-attention (Li & Liang, 2021).

**Where the prefix enters.** A forward pre-hook on each modified attention module hands it, as its
cache argument (``cache`` or ``past_key_values``, whichever its forward declares: see
:mod:`opendelta_dist.transformers_calls`), a stand-in for its cache (:class:`PrefixedCache`): the
module computes its keys and values as usual (positions applied: rotary, relative or absolute),
updates the real cache through the stand-in, and gets back ``[prefix; cached + new]`` to attend over. So:

- the real cache never holds the prefix, and every forward adds it exactly once per layer: with
  ``generate()`` the prefill and each decoding step see the prefix once, and the cache length (which
  transformers derives positions from) stays the number of real tokens: GPT-2's absolute positions,
  Llama's rotary positions and T5's relative positions do not shift;
- the attention mask gets ``prefix_token_num`` always-attended columns in front; padded tokens stay
  masked. Where transformers leaves the mask out of a causal module (``sdpa`` without padding relies on
  ``is_causal``, which would misalign with the longer keys), an explicit causal mask is built;
- T5's relative position bias gets zero columns for the prefix (the prefix has no position), and the
  bias the module hands on to the next layers is cut back to the real keys.

**Which modules.** Self-attention only (default: the ``attn`` role, i.e. every layer's self-attention,
in the encoder and the decoder of encoder-decoder models). Cross-attention gets no prefix: its keys are
the encoder's output, cached once per generation and read back without going through the cache's
``update``; the encoder's self-attention prefixes already shape what the decoder attends to. Aiming
the delta at a cross-attention module is an error.

**Attention classes** are looked up in :data:`ATTENTION_SPECS` (first match wins), which gathers the
:class:`AttentionSpec` entries of every family in :mod:`opendelta_dist.families`; a new family whose
attention updates the cache it is handed with ``.update(key, value, layer_idx)`` is one entry there.

**Reparameterisation.** With ``reparameterize=True`` the per-layer keys and values are the output of a
shared network (an embedding of ``prefix_token_num`` vectors of ``embed_dim`` -> linear -> tanh ->
linear to every layer's keys and values), as in the paper; the network's tensors are what trains.
``save_finetuned`` stores the plain per-layer tensors the network computes, with a config that says
``reparameterize=False``: loading the checkpoint gives an equivalent delta holding those tensors.

**OpenDelta checkpoints** (``opendelta_compat=True``, which loading an OpenDelta 0.3.2 checkpoint sets
where OpenDelta computed otherwise, with a notice) compute as OpenDelta's prefix layers did, so the delta
gives the outputs it was trained to give:

- T5: OpenDelta's layer handed on no position bias, so only the first block of each stack (the one that
  computes T5's relative position bias) had one, in which the prefix keys sat at the positions before the
  real tokens; every later block ran with none (only the mask). This library's own: every block keeps
  T5's bias, and the prefix, which has no position, gets zero bias.
- BART (checkpoints saved with transformers >= 4.36, whose BART attention is SDPA by default): a decoder
  self-attention called without a padding mask got none from OpenDelta either, and SDPA's ``is_causal``
  aligns its causal mask with the first key, so query ``i`` attended only the first ``i + 1`` of
  ``[prefix; tokens]``: the first prefix tokens, then the real tokens up to ``i - prefix_token_num``.
  This library's own: every query attends the whole prefix and the real tokens up to itself (as
  OpenDelta did under eager attention, and wherever a mask was given).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from opendelta_dist.auto_delta import register_delta_method
from opendelta_dist.backends import Backend
from opendelta_dist.basemodel import DeltaBase
from opendelta_dist.config import BaseDeltaConfig, check_positive_int, option
from opendelta_dist.deltas.adapter import placement
from opendelta_dist.errors import DeltaCheckpointError, UnsupportedModuleError, warn_user
from opendelta_dist.families import ATTENTION_SPECS, AttentionSpec, attention_spec
from opendelta_dist.operations import (
    CallRewriter,
    HoldModule,
    Operation,
    RewriteCall,
    call_as_keywords,
    positional_names,
)
from opendelta_dist.transformers_calls import (
    CacheArgument,
    cache_argument,
    cached_length,
    relative_position_bias,
    self_attention_cache,
)

# ---------------------------------------------------------------------------------------------------
# The attention classes a prefix can enter: ATTENTION_SPECS, AttentionSpec and attention_spec come from
# the families (each family file lists its own).

#: Names under which transformers models keep their cross-attention modules.
_CROSS_ATTENTION_NAMES = ("EncDecAttention", "encoder_attn", "crossattention")
_ATTN_IMPLEMENTATIONS = ("eager", "sdpa")


def _supported_names() -> str:
    return ", ".join(s.class_name for s in ATTENTION_SPECS)


def find_attention(name: str, module: nn.Module) -> tuple[str, nn.Module, AttentionSpec]:
    """The self-attention module a prefix enters for the selected module ``name``.

    A block that wraps exactly one supported attention module (BERT's ``BertAttention`` around
    ``BertSelfAttention``) stands for that module.

    Returns:
        ``(name, module, spec)`` of the attention module.

    Raises:
        UnsupportedModuleError: the module is not a supported self-attention module.
    """
    spec = attention_spec(module)
    if spec is None:
        inner = [(f"{name}.{n}", c, s) for n, c in module.named_children() if (s := attention_spec(c)) is not None]
        if len(inner) == 1:
            name, module, spec = inner[0]
    if spec is None:
        raise UnsupportedModuleError(
            f"PrefixModel cannot add a prefix to {name!r}: it is a {type(module).__name__}, and the supported "
            f"attention classes are {_supported_names()}. Aim modified_modules at self-attention modules of those "
            "classes (or add an AttentionSpec for this class to opendelta_dist.deltas.prefix.ATTENTION_SPECS)."
        )
    if name.rpartition(".")[2] in _CROSS_ATTENTION_NAMES or getattr(module, "is_cross_attention", False):
        raise UnsupportedModuleError(
            f"{name!r} is a cross-attention module; PrefixModel adds prefixes to self-attention only "
            "(the default, the 'attn' role). Remove it from modified_modules."
        )
    implementation = getattr(getattr(module, "config", None), "_attn_implementation", None)
    if implementation is not None and implementation not in _ATTN_IMPLEMENTATIONS:
        raise UnsupportedModuleError(
            f"{name!r} uses attn_implementation={implementation!r}; PrefixModel works with "
            f"{' or '.join(_ATTN_IMPLEMENTATIONS)} attention. Build the model with attn_implementation='sdpa'."
        )
    return name, module, spec


# ---------------------------------------------------------------------------------------------------
# The prefix inside one attention call.


class PrefixedCache:
    """Stands in for an attention module's cache during one call: what ``update`` returns starts with
    the prefix, while the real cache (if any) stores only the real keys and values.

    Args:
        inner: the module's real (self-attention) cache, or None.
        key: the prefix keys, ``(heads, prefix_len, head_dim)``.
        value: the prefix values, same shape.
    """

    def __init__(self, inner: Any, key: torch.Tensor, value: torch.Tensor) -> None:
        self.inner = inner
        self.key = key
        self.value = value

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values to attend over: the prefix, then the cached and new ones."""
        if self.inner is not None:
            key_states, value_states = self.inner.update(key_states, value_states, layer_idx, *args, **kwargs)
        batch = key_states.shape[0]
        key = self.key.to(key_states.dtype).unsqueeze(0).expand(batch, -1, -1, -1)
        value = self.value.to(value_states.dtype).unsqueeze(0).expand(batch, -1, -1, -1)
        return torch.cat([key, key_states], dim=2), torch.cat([value, value_states], dim=2)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """The number of real tokens cached (the prefix is not counted)."""
        return self.inner.get_seq_length(layer_idx) if self.inner is not None else 0

    def __getattr__(self, name: str) -> Any:
        inner = self.__dict__.get("inner")
        if inner is None:
            raise AttributeError(name)
        return getattr(inner, name)


def prefix_mask(
    mask: Any, prefix_len: int, q_len: int, past: int, causal: bool, dtype: torch.dtype, device: torch.device
) -> torch.Tensor | None:
    """An attention mask with ``prefix_len`` always-attended key columns in front.

    Args:
        mask: the module's 4-d mask (boolean: True attends; float: added to the scores), or None.
        prefix_len: the number of prefix tokens.
        q_len: the number of queries in this call.
        past: the number of real keys cached before this call.
        causal: the module is causal (a None mask then means "causal", which is made explicit).
        dtype: the dtype of a mask built here (the hidden states').
        device: where to build it.

    Raises:
        UnsupportedModuleError: the mask is not a 4-d tensor (e.g. flash-attention's 2-d masks).
    """
    if mask is None:
        if not causal or q_len == 1:
            return None  # every key is attended, the prefix included
        keys = torch.arange(past + q_len, device=device)
        allowed = keys[None, :] <= torch.arange(q_len, device=device)[:, None] + past
        mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)
        mask = mask[None, None]
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4:
        what = f"a {mask.dim()}-d tensor" if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise UnsupportedModuleError(
            f"PrefixModel extends 4-d attention masks, but the attention module got {what}; use "
            "attn_implementation='eager' or 'sdpa'"
        )
    fill = True if mask.dtype == torch.bool else 0
    return torch.cat([mask.new_full((*mask.shape[:-1], prefix_len), fill), mask], dim=-1)


def _attended(mask: torch.Tensor) -> torch.Tensor:
    """Which keys a 4-d mask lets each query attend (boolean: True; additive: 0)."""
    return mask if mask.dtype == torch.bool else mask == 0


def top_left_causal_mask(
    mask: Any, prefix_len: int, q_len: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor | None:
    """OpenDelta's decoder mask under SDPA (see the module docstring): query ``i`` attends the first ``i + 1``
    keys of ``[prefix; tokens]``; or None where OpenDelta had a padding mask (``mask`` masks more than the
    causal mask of a call without cache), which it extended as :func:`prefix_mask` does.

    Args:
        mask: the module's mask for a call without cache, or None.
        prefix_len: the number of prefix tokens.
        q_len: the number of queries (and real keys).
        dtype: the dtype of an additive mask built here.
        device: where to build it.
    """
    causal = torch.ones(q_len, q_len, dtype=torch.bool, device=device).tril()
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dim() != 4 or mask.shape[-2:] != (q_len, q_len):
            return None
        if not torch.equal(_attended(mask), causal.expand_as(mask)):
            return None  # padding: OpenDelta's layer got a mask and extended it
        dtype = mask.dtype
    allowed = torch.ones(q_len, prefix_len + q_len, dtype=torch.bool, device=device).tril()
    if dtype == torch.bool:
        return allowed[None, None]
    out = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)
    return out[None, None]


#: The attention classes whose OpenDelta 0.3.2 prefix layers ran under SDPA's ``is_causal`` without a mask
#: from this transformers version on (``BartSdpaAttention``, the default from 4.36), with its mask misaligned
OPENDELTA_SDPA_SINCE: dict[str, tuple[int, int]] = {"BartAttention": (4, 36)}


def _version(text: Any) -> tuple[int, ...] | None:
    numbers = re.findall(r"\d+", text) if isinstance(text, str) else []
    return tuple(int(n) for n in numbers[:2]) if len(numbers) >= 2 else None


def opendelta_differs(module: nn.Module, spec: AttentionSpec, transformers_version: Any) -> bool:
    """Whether OpenDelta 0.3.2's prefix computed otherwise than this library's in ``module`` (see the module
    docstring), for a checkpoint saved with ``transformers_version`` (None or unreadable: the newest)."""
    if spec.relative_position_bias:
        return True
    since = OPENDELTA_SDPA_SINCE.get(spec.class_name)
    version = _version(transformers_version)
    return since is not None and bool(getattr(module, "is_causal", False)) and (version is None or version >= since)


class PrefixReparameterization(nn.Module):
    """The shared network whose output is every modified layer's prefix keys and values.

    ``embedding`` (prefix_len, embed_dim) -> ``down`` (embed_dim -> mid_dim) -> tanh -> ``up``
    (mid_dim -> the keys and values of all layers, 2 * heads * head_dim per layer and token).

    Args:
        prefix_len: the number of prefix tokens.
        embed_dim: the size of the prefix embedding.
        mid_dim: the hidden size of the network.
        layers: ``(heads, head_dim)`` of each modified layer, in order.
        backend: makes the parameters.
        device: where to put them.
        dtype: their dtype.
    """

    def __init__(
        self,
        prefix_len: int,
        embed_dim: int,
        mid_dim: int,
        layers: list[tuple[int, int]],
        backend: Backend,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.prefix_len = prefix_len
        self.layers = list(layers)
        sizes = [2 * heads * dim for heads, dim in self.layers]
        self.offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        # the embedding starts normal(0, 1), the linear layers as ``nn.Linear``
        self.embedding = backend.parameter((prefix_len, embed_dim), nn.init.normal_, device, dtype)
        self.down = backend.linear(embed_dim, mid_dim, True, device, dtype)
        self.up = backend.linear(mid_dim, sum(sizes), True, device, dtype)

    def key_value(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The prefix keys and values of layer ``index``, each ``(heads, prefix_len, head_dim)``."""
        heads, dim = self.layers[index]
        rows = slice(self.offsets[index], self.offsets[index] + 2 * heads * dim)
        hidden = torch.tanh(self.down(self.embedding))
        # only this layer's rows of the output projection: each layer pays for its own keys and values
        out = F.linear(hidden, self.up.weight[rows], self.up.bias[rows])
        key, value = out.view(self.prefix_len, 2, heads, dim).permute(1, 2, 0, 3).unbind(0)
        return key, value


#: plain prefixes start normal(0, 0.02)
PREFIX_INIT = partial(nn.init.normal_, std=0.02)


class PrefixLayer(CallRewriter):
    """The prefix of one attention module, and the rewriting of its calls (see the module docstring).

    Holds ``key`` and ``value`` parameters of shape ``(heads, prefix_len, head_dim)``, or, with a
    ``network``, takes them from that (shared) network.

    Args:
        spec: how the prefix enters the module's class.
        params: the names of the module's positional parameters.
        cache: how the module is handed its cache.
        heads: key/value heads of the module.
        head_dim: their size.
        prefix_len: the number of prefix tokens.
        backend: makes the parameters.
        device: where to put them.
        dtype: their dtype.
        network: the reparameterisation network to take the keys and values from.
        index: this layer's index in the network.
        opendelta_compat: compute as OpenDelta 0.3.2's layer for this module did (see the module docstring).
    """

    def __init__(
        self,
        spec: AttentionSpec,
        params: tuple[str, ...],
        cache: CacheArgument,
        heads: int,
        head_dim: int,
        prefix_len: int,
        backend: Backend,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
        network: PrefixReparameterization | None = None,
        index: int = 0,
        opendelta_compat: bool = False,
    ) -> None:
        super().__init__()
        self.opendelta_compat = opendelta_compat
        self.spec = spec
        self.params = params
        self.cache = cache
        self.prefix_len = prefix_len
        self.index = index
        # the network belongs to the whole delta (a child of the backbone root), not to this layer
        self.__dict__["network"] = network
        if network is None:
            shape = (heads, prefix_len, head_dim)
            self.key = backend.parameter(shape, PREFIX_INIT, device, dtype)
            self.value = backend.parameter(shape, PREFIX_INIT, device, dtype)

    def key_value(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's prefix keys and values, each ``(heads, prefix_len, head_dim)``."""
        if self.network is not None:
            return self.network.key_value(self.index)
        return self.key, self.value

    def before_call(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Give the module the prefixed cache, the extended mask (and T5's extended position bias)."""
        args, kwargs = call_as_keywords(self.params, args, kwargs)
        for name in self.spec.cross_args:
            if kwargs.get(name) is not None:
                raise UnsupportedModuleError(
                    f"a {type(module).__name__} with a prefix was called as cross-attention ({name} given); "
                    "PrefixModel adds prefixes to self-attention only"
                )
        hidden = args[0] if args else kwargs["hidden_states"]
        q_len = hidden.shape[-2]
        inner = self_attention_cache(self.cache.get(kwargs))
        past = cached_length(inner, getattr(module, "layer_idx", None) or 0)
        key, value = self.key_value()
        self.cache.set(kwargs, PrefixedCache(inner, key, value))
        causal = bool(kwargs.get("is_causal", getattr(module, "is_causal", False)))
        mask = kwargs.get(self.spec.mask_arg)
        quirk = None
        if self.opendelta_compat and causal and not past and q_len > 1 and self.spec.class_name in OPENDELTA_SDPA_SINCE:
            # OpenDelta under SDPA (see the module docstring): a prefill without padding mask, misaligned
            quirk = top_left_causal_mask(mask, self.prefix_len, q_len, hidden.dtype, hidden.device)
        if quirk is not None:
            kwargs[self.spec.mask_arg] = quirk
        else:
            kwargs[self.spec.mask_arg] = prefix_mask(
                mask, self.prefix_len, q_len, past, causal, hidden.dtype, hidden.device
            )
        if self.spec.relative_position_bias:
            self._position_bias(module, kwargs, q_len, past, hidden.device)
        return args, kwargs

    def _position_bias(
        self, module: nn.Module, kwargs: dict[str, Any], q_len: int, past: int, device: torch.device
    ) -> None:
        """T5's position bias over the prefix and the real keys: zero for the prefix columns; or, emulating
        OpenDelta, the block's own relative bias with the prefix at the positions before the tokens (a block
        without one gets none: the module makes zeros)."""
        relative = getattr(module, "has_relative_attention_bias", False)
        if self.opendelta_compat:
            bias = relative_position_bias(module, q_len, past + self.prefix_len, device) if relative else None
            kwargs["position_bias"] = bias
            return
        bias = kwargs.get("position_bias")
        if bias is None and relative:
            # computed here over the real keys only: computed by the module, it would count the prefix
            bias = relative_position_bias(module, q_len, past, device)
        if bias is not None:
            kwargs["position_bias"] = F.pad(bias, (self.prefix_len, 0))

    def after_call(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        """Hand T5's position bias on without the prefix columns (the next layers add their own); emulating
        OpenDelta, hand on none."""
        if self.spec.relative_position_bias:
            bias = None if self.opendelta_compat else output[1][..., self.prefix_len :]
            return (output[0], bias, *output[2:])
        return output


# ---------------------------------------------------------------------------------------------------
# The delta method.


@dataclass
class PrefixConfig(BaseDeltaConfig):
    """Options of :class:`PrefixModel`."""

    delta_type: ClassVar[str] = "prefix"
    #: this library's option after OpenDelta's parameters, so that OpenDelta's positional order still binds
    parameter_order: ClassVar[tuple[str, ...]] = (*BaseDeltaConfig.parameter_order, "opendelta_compat")

    prefix_token_num: int = option(6, "the number of prefix tokens per layer.", check_positive_int)
    reparameterize: bool = option(
        True,
        "compute the prefixes with a shared network while training (see the module docstring); "
        "``save_finetuned`` then stores the plain prefixes it computes.",
    )
    embed_dim: int = option(512, "the network's prefix-embedding size.", check_positive_int)
    mid_dim: int = option(512, "the network's hidden size.", check_positive_int)
    opendelta_compat: bool = option(
        False,
        "compute as OpenDelta 0.3.2's prefix layers did where they differ from this library's (T5's position "
        "bias, the mask of BART's decoder under SDPA; see the module docstring). Loading an OpenDelta checkpoint "
        "sets it where that changes the outputs; pass ``opendelta_compat=False`` to ``from_finetuned`` for this "
        "library's own computation.",
    )


@register_delta_method
class PrefixModel(DeltaBase):
    """Prefix tuning: ``prefix_token_num`` learned keys and values prepended in each modified
    self-attention module. Supported attention classes: :data:`ATTENTION_SPECS` (BERT, RoBERTa,
    GPT-2, BART, OPT, T5, Llama), with ``eager`` or ``sdpa`` attention.

    ``modified_modules`` are keys of the self-attention modules to modify; by default every
    self-attention (the ``attn`` role). The backend is ``"hf"`` only.

    Raises:
        DeltaConfigError: an option has an invalid value.
        UnsupportedModuleError: a selected module is not a supported self-attention module.
    """

    delta_type: ClassVar[str] = "prefix"
    config_class = PrefixConfig
    config: PrefixConfig
    default_modified_modules: ClassVar[list[Any]] = ["attn"]
    required_capabilities: ClassVar[frozenset[str]] = frozenset({"transformers"})

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # the prefix operations in order (each one's index into the network), and the network
        self._layers: list[RewriteCall] = []
        self._network: PrefixReparameterization | None = None
        super().__init__(*args, **kwargs)

    @classmethod
    def opendelta_options(cls, options: dict[str, Any], backbone: nn.Module) -> dict[str, Any]:
        """OpenDelta's per-layer prefixes are read as they are (see :meth:`opendelta_tensors`), and computed as
        OpenDelta did (``opendelta_compat``) where the backbone has attention it computed otherwise, for the
        transformers version the checkpoint was saved with."""
        version = options.get("transformers_version")
        differs = any(
            opendelta_differs(m, spec, version) for m in backbone.modules() if (spec := attention_spec(m)) is not None
        )
        converted = {**options, "reparameterize": False, "opendelta_compat": differs}
        return super().opendelta_options(converted, backbone)

    def opendelta_tensors(self, tensors: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
        """Each attention layer's ``prefix.past_key`` / ``past_value`` (tokens, heads x head size) become
        ``prefix.key`` / ``value`` (heads, tokens, head size).

        A checkpoint saved with ``reparameterize=True`` (OpenDelta's default) holds OpenDelta's
        reparameterisation network instead (``reparams.wte``, ``reparams.control_trans``): it is evaluated
        once, as OpenDelta evaluates it before every forward, into those per-layer prefixes.

        Raises:
            DeltaCheckpointError: the network's output does not split into this delta's layers.
        """
        network = {k.partition("reparams.")[2]: v for k, v in tensors.items() if _is_reparams_key(k)}
        if network:
            tensors = {
                **{k: v for k, v in tensors.items() if not _is_reparams_key(k)},
                **self._opendelta_network_prefixes(network, path),
            }
        own = dict(self.named_delta_tensors())
        converted = {}
        for key, value in tensors.items():
            for theirs, ours in ((".prefix.past_key", ".prefix.key"), (".prefix.past_value", ".prefix.value")):
                if key.endswith(theirs):
                    module = key.removesuffix(theirs)
                    key = module + ours
                    # OpenDelta hooks BERT-like prefixes on the attention block, ours on its self-attention
                    inside = [k for k in own if k.startswith(f"{module}.") and k.endswith(ours)]
                    if key not in own and len(inside) == 1:
                        key = inside[0]
                    if key in own:
                        heads, tokens, size = self.backend_mapping.full_shape(own[key])
                        value = value.reshape(tokens, heads, size).transpose(0, 1)
            converted[key] = value
        return converted

    def _opendelta_network_prefixes(self, network: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
        """OpenDelta's ``ReparameterizeFunction`` evaluated: ``control_trans(wte(arange(tokens)))`` viewed as
        (tokens, 2 x layers, hidden) and split into each layer's key and value, in the order of its layers."""
        layers = [k.removesuffix(".prefix.key") for k, _ in self.named_delta_tensors() if k.endswith(".prefix.key")]
        try:
            with torch.no_grad():
                hidden = torch.tanh(
                    F.linear(network["wte.weight"], network["control_trans.0.weight"], network["control_trans.0.bias"])
                )
                out = F.linear(hidden.float(), network["control_trans.2.weight"], network["control_trans.2.bias"])
        except (KeyError, RuntimeError) as exc:
            raise DeltaCheckpointError(
                f"{path} holds an OpenDelta prefix reparameterisation network this library cannot read ({exc})"
            ) from exc
        tokens, width = out.shape
        if not layers or width % (2 * len(layers)):
            raise DeltaCheckpointError(
                f"{path}: OpenDelta's prefix network makes {width} values per token, which do not split into keys "
                f"and values for the {len(layers)} attention layers of this delta; it belongs to another backbone"
            )
        past = out.view(tokens, 2 * len(layers), width // (2 * len(layers))).permute(1, 0, 2)
        prefixes = {}
        for i, module in enumerate(layers):
            prefixes[f"{module}.prefix.past_key"] = past[2 * i].clone()
            prefixes[f"{module}.prefix.past_value"] = past[2 * i + 1].clone()
        return prefixes

    def build_operations(self, backbone: nn.Module, modified_modules: list[Any]) -> list[Operation]:
        """One :class:`RewriteCall` per attention module, plus (reparameterised) the shared network,
        held by the backbone root as ``prefix_network``."""
        targets: dict[str, tuple[nn.Module, AttentionSpec]] = {}
        for selected in self.select(modified_modules):
            name, module, spec = find_attention(selected, backbone.get_submodule(selected))
            targets.setdefault(name, (module, spec))
        ops: list[Operation] = []
        config = self.config
        if config.reparameterize:
            device, dtype = placement(next(iter(targets.values()))[0])
            shapes = [spec.heads(module) for module, spec in targets.values()]
            self._network = PrefixReparameterization(
                config.prefix_token_num, config.embed_dim, config.mid_dim, shapes, self.backend_mapping, device, dtype
            )
            ops.append(HoldModule("", self._network, "prefix_network"))
        for name, (module, _) in targets.items():
            ops.extend(self.update_module(name, module, None))
        if config.opendelta_compat:
            self._notice_opendelta_compat(targets)
        return ops

    def _notice_opendelta_compat(self, targets: dict[str, tuple[nn.Module, AttentionSpec]]) -> None:
        """Say (a UserWarning) what of OpenDelta's computation is emulated here, and how to switch it off."""
        what = []
        if any(spec.relative_position_bias for _, spec in targets.values()):
            what.append(
                "T5's relative position bias in the first block of each stack only, the prefix at the positions "
                "before the tokens (this library's own: every block keeps it, the prefix gets none)"
            )
        if any(
            spec.class_name in OPENDELTA_SDPA_SINCE and getattr(m, "is_causal", False) for m, spec in targets.values()
        ):
            what.append(
                "the causal mask of a decoder self-attention without padding aligned with the first prefix key, as "
                "SDPA's is_causal did for OpenDelta on transformers >= 4.36 (this library's own: every query attends "
                "the whole prefix)"
            )
        if what:
            warn_user(
                "PrefixModel computes as OpenDelta 0.3.2 did (opendelta_compat=True, set for OpenDelta checkpoints), "
                f"so that the checkpoint gives the outputs it was trained to give: {'; and '.join(what)}. Pass "
                "opendelta_compat=False (e.g. AutoDeltaModel.from_finetuned(path, backbone_model=model, "
                "opendelta_compat=False)) for this library's own computation."
            )

    def update_module(self, name: str, module: nn.Module, io_dims: tuple[int, int] | None) -> list[Operation]:
        """The prefix of the attention module ``name`` (the next layer of the network, if any)."""
        name, module, spec = find_attention(name, module)
        heads, head_dim = spec.heads(module)
        device, dtype = placement(module)
        layer = PrefixLayer(
            spec,
            positional_names(module),
            cache_argument(module),
            heads,
            head_dim,
            self.config.prefix_token_num,
            self.backend_mapping,
            device=device,
            dtype=dtype,
            network=self._network,
            index=len(self._layers),
            opendelta_compat=self.config.opendelta_compat,
        )
        op = RewriteCall(name, layer, "prefix")
        self._layers.append(op)
        return [op]

    def plain_prefix_tensors(self) -> dict[str, torch.Tensor]:
        """Every layer's prefix keys and values as plain tensors, under the checkpoint keys of a
        ``reparameterize=False`` delta (``<attention>.prefix.key`` / ``.value``)."""
        tensors: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for op in self._layers:
                key, value = op.delta_module.key_value()  # type: ignore[operator]
                tensors[f"{op.module_name}.{op.delta_name}.key"] = key.detach().clone()
                tensors[f"{op.module_name}.{op.delta_name}.value"] = value.detach().clone()
        return tensors

    def save_finetuned(
        self,
        finetuned_delta_path: str | Path = "./delta_checkpoints/",
        save_config: bool = True,
        state_dict: dict[str, torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> Path:
        """Save the delta; a reparameterised one is saved as the plain prefixes its network computes.

        Args:
            finetuned_delta_path: the checkpoint directory.
            save_config: write ``config.json``.
            state_dict: tensors keyed as :meth:`named_delta_tensors` (the network's, when
                reparameterised) to save as they are, with this delta's config.
            kwargs: as :meth:`DeltaBase.save_finetuned`.

        Returns:
            The checkpoint directory.
        """
        if not self.config.reparameterize or state_dict is not None:
            return super().save_finetuned(finetuned_delta_path, save_config, state_dict, **kwargs)
        live = self.config
        self.config = dataclasses.replace(live, reparameterize=False)  # the config of what is saved
        try:
            return super().save_finetuned(finetuned_delta_path, save_config, self.plain_prefix_tensors(), **kwargs)
        finally:
            self.config = live


def _is_reparams_key(key: str) -> bool:
    return key.startswith("reparams.") or ".reparams." in key
