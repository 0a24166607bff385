"""Soft prompts: ``soft_token_num`` learned embeddings put in front of the input embeddings (Lester et al., 2021).

**Where the prompt enters.** A forward pre-hook on the stack that embeds the input (the encoder of an
encoder-decoder model, else the innermost module holding the input embeddings whose forward takes
``inputs_embeds`` and ``attention_mask``: ``GPT2Model``, ``BertModel``, ``OPTDecoder``, ...) embeds
``input_ids`` itself and passes ``inputs_embeds`` with the prompt right before each row's first real
token: at the start of the row, or after its left padding (so a left-padded row keeps the distances
between prompt and text that relative and rotary positions see). The inputs named in
``other_expand_ids`` (default ``attention_mask`` with 1, ``token_type_ids`` with 0) get the same columns;
explicit ``position_ids`` get positions ``0 .. soft_token_num - 1`` for the prompt and the real tokens'
positions shifted after it. The prompt is always attended; padded tokens stay masked.

**generate() and caches.** The prompt is inserted once, when the stack's cache is empty (the prefill).
On later calls (a cache holding the prompt and earlier tokens) only the attention mask is made to cover
the cached prompt, and explicit positions are shifted; the model's own positions come from the cache
length, which counts the prompt, so cached and uncached runs compute the same thing.

**Outputs.**

- Decoder-only and encoder-only models: the stack's ``last_hidden_state`` loses the prompt positions
  on the prefill, so heads see only the real tokens: causal-LM logits have the input's length and
  ``labels`` are used as they are (``model(**batch).loss`` is the usual loss of the returned logits;
  the prompt itself is never a prediction target). ``hidden_states``/``attentions``, when requested,
  keep the prompt positions. BERT's pooler reads position 0, which is the first prompt token of a
  row that is not left-padded.
- Encoder-decoder models: only the encoder input is extended; the encoder output keeps the prompt
  positions (the decoder cross-attends to them) and a hook on the decoder extends the
  ``encoder_attention_mask`` it gets to cover them. Decoder inputs, logits and ``labels`` are unchanged.

**OpenDelta checkpoints** (``opendelta_compat=True``, which loading an OpenDelta 0.3.2 checkpoint sets,
with a notice) put the prompt where OpenDelta's did, at the very start of each row (before any left
padding), and an encoder-only model's output keeps the prompt positions as OpenDelta's did: a head
outside the stack (RoBERTa's classification head) reads the first soft token, as it was trained to, and
token-level outputs have the prompt's positions in front. A decoder-only model's output keeps the real
tokens' positions only: its predictions there are OpenDelta's, and ``labels`` still line up.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from opendelta_dist.addressing import named_backbone_modules
from opendelta_dist.auto_delta import register_delta_method
from opendelta_dist.backends import backend_of
from opendelta_dist.basemodel import DeltaBase
from opendelta_dist.config import BaseDeltaConfig, check_positive, check_positive_int, option
from opendelta_dist.errors import DeltaConfigError, UnsupportedModuleError, warn_user
from opendelta_dist.operations import CallRewriter, Operation, RewriteCall, call_as_keywords, positional_names
from opendelta_dist.transformers_calls import CacheArgument, cache_argument, cached_length

DEFAULT_EXPAND_IDS = {"attention_mask": 1, "token_type_ids": 0}
_SPECIAL_TOKEN_KEYS = (
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "unk_token_id",
    "sep_token_id",
    "cls_token_id",
    "mask_token_id",
    "decoder_start_token_id",
)


def _take(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``t[b, index[b, j], ...]`` for every row ``b`` and column ``j``."""
    index = index.view(*index.shape, *([1] * (t.dim() - 2))).expand(*index.shape, *t.shape[2:])
    return t.gather(1, index)


def insert_at(t: torch.Tensor, lead: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``t`` (batch, length, ...) with ``values`` (batch, n, ...) inserted in each row ``b`` before
    position ``lead[b]``."""
    n, length = values.shape[1], t.shape[1]
    cols = torch.arange(length + n, device=t.device).expand(t.shape[0], -1)
    rel = cols - lead[:, None]
    inside = (rel >= 0) & (rel < n)
    own = _take(t, torch.where(rel < 0, cols, cols - n).clamp(0, max(length - 1, 0)))
    new = _take(values, rel.clamp(0, n - 1))
    return torch.where(inside.view(*inside.shape, *([1] * (t.dim() - 2))), new, own)


def remove_at(t: torch.Tensor, lead: torch.Tensor, n: int) -> torch.Tensor:
    """``t`` without the ``n`` positions that :func:`insert_at` put before ``lead``."""
    cols = torch.arange(t.shape[1] - n, device=t.device).expand(t.shape[0], -1)
    return _take(t, torch.where(cols < lead[:, None], cols, cols + n))


def leading_padding(mask: Any, batch: int, device: torch.device) -> torch.Tensor:
    """The number of padded positions at the start of each row of a 2-d attention mask (zeros without one)."""
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        return (mask.long().cumsum(-1) == 0).sum(-1)
    return torch.zeros(batch, dtype=torch.long, device=device)


def _extend(
    name: str, value: torch.Tensor, fill: int, lead: torch.Tensor, n: int, q_len: int, total: int, prefill: bool
) -> torch.Tensor:
    """``value`` (batch, length) covering all ``total`` positions of this call's keys.

    Raises:
        ValueError: ``value`` is not 2-d or its length fits neither the real tokens nor all tokens.
    """
    if value.dim() != 2:
        raise ValueError(
            f"SoftPromptModel extends 2-d {name} tensors (batch, length), got shape {tuple(value.shape)}; pass a "
            "2-d mask (static or compiled caches that need 4-d masks are not supported)"
        )
    length = value.shape[1]
    if length == total or (not prefill and length == q_len):
        return value  # covers the prompt already, or describes only the new tokens (token_type_ids)
    if length == total - n:
        value = value.expand(lead.shape[0], -1)
        return insert_at(value, lead, value.new_full((value.shape[0], n), fill))
    raise ValueError(
        f"{name} has length {length}, but this call has {total - n} real positions "
        f"({q_len} new" + (f", {total - n - q_len} cached" if not prefill else "") + ")"
    )


class SoftPrompt(CallRewriter):
    """The learned prompt (``soft_embeds``, ``(soft_token_num, hidden)``) and the rewriting of the
    calls of the stack that embeds the input (see the module docstring).

    Args:
        soft_embeds: the initial prompt.
        embedding: the stack's input embedding (not owned: used to embed ``input_ids``).
        params: the names of the stack's positional parameters.
        cache: how the stack is handed its cache.
        other_expand_ids: inputs to extend, with the value of their prompt columns.
        drop_prompt_output: drop the prompt positions from the stack's ``last_hidden_state``.
        at_start: put the prompt at the start of each row, before any left padding (OpenDelta's place).
    """

    def __init__(
        self,
        soft_embeds: nn.Parameter,
        embedding: nn.Module,
        params: tuple[str, ...],
        cache: CacheArgument,
        other_expand_ids: dict[str, int],
        drop_prompt_output: bool,
        at_start: bool = False,
    ) -> None:
        super().__init__()
        self.soft_embeds = soft_embeds
        self.__dict__["embedding"] = embedding  # the backbone's, not the delta's
        self.params = params
        self.cache = cache
        self.other_expand_ids = dict(other_expand_ids)
        self.drop_prompt_output = drop_prompt_output
        self.at_start = at_start
        # where the call in flight put the prompt in each row, if it is a prefill (the stack is not re-entered)
        self._placed: torch.Tensor | None = None

    @property
    def soft_token_num(self) -> int:
        """The number of prompt tokens (asked of the backend: on a sharded one, reading the prompt gathers it)."""
        prompt = self._parameters["soft_embeds"]
        return backend_of(prompt).full_shape(prompt)[0]

    def before_call(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Insert the prompt on the prefill; extend the masks (and explicit positions) on every call."""
        args, kwargs = call_as_keywords(self.params, args, kwargs)
        n = self.soft_token_num
        ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
        first = embeds if embeds is not None else ids
        if first is None:
            raise ValueError(f"{type(module).__name__} was called without input_ids or inputs_embeds")
        batch, q_len = first.shape[:2]
        past = cached_length(self.cache.get(kwargs))
        prefill = past == 0
        # the prompt goes right before each row's first real token: after left padding, not before it,
        # so a padded row keeps the distances between prompt and text (relative and rotary positions)
        lead = leading_padding(None if self.at_start else kwargs.get("attention_mask"), batch, first.device)
        if prefill:
            if embeds is None:
                embeds = self.embedding(ids)
            prompt = self.soft_embeds.to(embeds.dtype).unsqueeze(0).expand(batch, -1, -1)
            kwargs["inputs_embeds"] = insert_at(embeds, lead, prompt)
            if "input_ids" in kwargs:
                kwargs["input_ids"] = None
        total = past + q_len + (n if prefill else 0)
        for name, fill in self.other_expand_ids.items():
            value = kwargs.get(name)
            if isinstance(value, torch.Tensor):
                kwargs[name] = _extend(name, value, fill, lead, n, q_len, total, prefill)
        positions = kwargs.get("position_ids")
        if isinstance(positions, torch.Tensor) and positions.dim() == 2:
            positions = positions + n  # the real tokens come after the prompt's positions 0 .. n - 1
            if prefill:
                own = torch.arange(n, device=positions.device, dtype=positions.dtype).expand(batch, n)
                positions = insert_at(positions.expand(batch, -1), lead, own)
            kwargs["position_ids"] = positions
        self._placed = lead if prefill else None
        return args, kwargs

    def after_call(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        """Drop the prompt positions from the last hidden state of a prefill (decoder-/encoder-only)."""
        lead, self._placed = self._placed, None
        if lead is None or not self.drop_prompt_output:
            return output
        n = self.soft_token_num
        if isinstance(output, tuple):
            return (remove_at(output[0], lead, n), *output[1:])
        key = next(iter(output))
        output[key] = remove_at(output[key], lead, n)
        return output


class EncoderPromptMask(CallRewriter):
    """On a decoder: extend the ``encoder_attention_mask`` it gets over the encoder's prompt positions.

    Args:
        soft_token_num: the number of prompt tokens in the encoder output.
        params: the names of the decoder's positional parameters.
        fill: the mask value of the prompt positions.
        at_start: the encoder put the prompt at the start of each row (see :class:`SoftPrompt`).
    """

    def __init__(self, soft_token_num: int, params: tuple[str, ...], fill: int, at_start: bool = False) -> None:
        super().__init__()
        self.soft_token_num = soft_token_num
        self.params = params
        self.fill = fill
        self.at_start = at_start

    def before_call(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Insert prompt columns into a 2-d mask ``soft_token_num`` shorter than the encoder output, where
        the encoder put the prompt (after each row's left padding, or at its start)."""
        args, kwargs = call_as_keywords(self.params, args, kwargs)
        states, mask = kwargs.get("encoder_hidden_states"), kwargs.get("encoder_attention_mask")
        n = self.soft_token_num
        fits = isinstance(states, torch.Tensor) and isinstance(mask, torch.Tensor) and mask.dim() == 2
        if fits and mask.shape[1] == states.shape[1] - n:
            lead = leading_padding(None if self.at_start else mask, mask.shape[0], mask.device)
            kwargs["encoder_attention_mask"] = insert_at(mask, lead, mask.new_full((mask.shape[0], n), self.fill))
        return args, kwargs


@dataclass
class SoftPromptConfig(BaseDeltaConfig):
    """Options of :class:`SoftPromptModel`."""

    delta_type: ClassVar[str] = "soft_prompt"
    #: this library's option after OpenDelta's parameters, so that OpenDelta's positional order still binds
    parameter_order: ClassVar[tuple[str, ...]] = (*BaseDeltaConfig.parameter_order, "opendelta_compat")

    soft_token_num: int = option(100, "the number of prompt tokens.", check_positive_int)
    init_range: float = option(
        0.5, "without ``token_init``, the prompt starts uniform(-init_range, init_range).", check_positive
    )
    token_init: bool = option(
        True,
        "start the prompt as the embeddings of the first non-special vocabulary tokens (cycled if the "
        "vocabulary is smaller than the prompt).",
    )
    other_expand_ids: dict[str, int] = option(  # noqa: RUF009 (option() copies the dict for every config)
        DEFAULT_EXPAND_IDS,
        "inputs of shape (batch, length) to extend with the prompt, and the value of their prompt columns.",
    )
    opendelta_compat: bool = option(
        False,
        "place the prompt and shape the output as OpenDelta 0.3.2 did (the prompt at the start of each row; an "
        "encoder-only model's output keeps the prompt positions, so a classification head reads the first soft "
        "token; see the module docstring). Loading an OpenDelta checkpoint sets it; pass "
        "``opendelta_compat=False`` to ``from_finetuned`` for this library's own placement and output.",
    )


def _causal(stack: nn.Module) -> bool:
    """Whether the stack's attention is causal (a decoder-only model's, whose heads read every position)."""
    return any(getattr(m, "is_causal", False) is True for m in stack.modules())


def input_embeddings(module: nn.Module) -> nn.Module | None:
    """``module.get_input_embeddings()``, or None when it has none."""
    getter = getattr(module, "get_input_embeddings", None)
    if not callable(getter):
        return None
    try:
        embedding = getter()
    except (NotImplementedError, AttributeError):
        return None
    return embedding if isinstance(embedding, nn.Module) else None


def input_stack(model: nn.Module, embedding: nn.Module) -> nn.Module | None:
    """The module of ``model`` (or ``model``) that embeds the input: the innermost one holding
    ``embedding`` whose forward takes ``inputs_embeds`` and ``attention_mask`` (``GPT2Model``,
    ``BertModel``, ``OPTDecoder``: the one every head calls, not necessarily ``base_model``)."""
    found = None
    for _, module in named_backbone_modules(model):
        params = inspect.signature(module.forward).parameters
        takes_both = "inputs_embeds" in params and "attention_mask" in params
        if takes_both and any(m is embedding for m in module.modules()):
            found = module  # modules come outermost first: the last match is the innermost
    return found


@register_delta_method
class SoftPromptModel(DeltaBase):
    """Prompt tuning: ``soft_token_num`` learned input embeddings in front of every input's tokens.

    The backbone is a transformers model, or a module holding one: by default (``modified_modules``
    None or ``[]``) the backbone itself is prompted, else ``modified_modules`` is one key naming the
    transformers model inside it. The backend is ``"hf"`` only.

    Raises:
        DeltaConfigError: an option has an invalid value.
        UnsupportedModuleError: the model has no input embeddings, or its stack takes no ``inputs_embeds``.
    """

    delta_type: ClassVar[str] = "soft_prompt"
    config_class = SoftPromptConfig
    config: SoftPromptConfig
    default_modified_modules: ClassVar[list[Any]] = []
    required_capabilities: ClassVar[frozenset[str]] = frozenset({"transformers"})

    def _prompted_model(self, backbone: nn.Module, modified_modules: list[Any]) -> nn.Module:
        if not modified_modules:
            return backbone
        names = self.select(modified_modules)
        if len(names) != 1:
            raise DeltaConfigError(
                f"SoftPromptModel prompts one model: modified_modules={list(modified_modules)} selects {len(names)} "
                f"modules ({', '.join(names[:4])}); name the transformers model to prompt, or leave it empty"
            )
        return backbone.get_submodule(names[0])

    @classmethod
    def opendelta_options(cls, options: dict[str, Any], backbone: nn.Module) -> dict[str, Any]:
        """OpenDelta saved a placeholder ``modified_modules=["root"]``: it is dropped; the prompt is placed, and
        the output shaped, as OpenDelta did (``opendelta_compat``)."""
        options = dict(options)
        options.pop("modified_modules", None)
        options["common_structure"] = False
        options["opendelta_compat"] = True
        return super().opendelta_options(options, backbone)

    def opendelta_tensors(self, tensors: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
        """OpenDelta's ``soft_prompt_layer.soft_embeds`` is the one tensor of the delta."""
        own = [key for key, _ in self.named_delta_tensors()]
        found = [v for k, v in tensors.items() if k.endswith("soft_embeds")]
        return {own[0]: found[0]} if len(found) == 1 and len(own) == 1 else tensors

    def build_operations(self, backbone: nn.Module, modified_modules: list[Any]) -> list[Operation]:
        """A :class:`SoftPrompt` on the stack that embeds the input, and for encoder-decoder models an
        :class:`EncoderPromptMask` on the decoder."""
        options = self.config
        model = self._prompted_model(backbone, modified_modules)
        embedding = input_embeddings(model)
        if embedding is None:
            raise UnsupportedModuleError(
                f"SoftPromptModel puts learned embeddings in front of the model's input, but {type(model).__name__} "
                "has no input embeddings (get_input_embeddings() is missing or returns None). Use a transformers "
                "model, or name the transformers model inside your module with modified_modules=['<its name>']."
            )
        config = getattr(model, "config", None)
        encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
        if encoder_decoder:
            stack, decoder = model.get_encoder(), model.get_decoder()
        else:
            stack, decoder = input_stack(model, embedding), None
        if stack is None or "inputs_embeds" not in inspect.signature(stack.forward).parameters:
            raise UnsupportedModuleError(
                f"SoftPromptModel passes the prompt as inputs_embeds, but no module of {type(model).__name__} that "
                "holds its input embeddings takes both inputs_embeds and attention_mask"
            )
        limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        if isinstance(limit, int) and options.soft_token_num >= limit:
            raise DeltaConfigError(
                f"soft_token_num={options.soft_token_num} leaves no room for input tokens: {type(model).__name__} has "
                f"{limit} positions; use a smaller soft_token_num"
            )
        own = input_embeddings(stack)  # the table the stack itself embeds with, where it has one
        embedding = own if own is not None else embedding
        names = {id(m): n for n, m in named_backbone_modules(backbone)}
        compat = options.opendelta_compat
        # OpenDelta's output kept the prompt positions: emulated where a head outside the stack reads them
        keep_prompt = compat and not encoder_decoder and not _causal(stack)
        prompt = SoftPrompt(
            self.backend_mapping.parameter_from(self._initial_prompt(embedding, config)),
            embedding,
            positional_names(stack),
            cache_argument(stack),
            options.other_expand_ids,
            drop_prompt_output=not encoder_decoder and not keep_prompt,
            at_start=compat,
        )
        ops: list[Operation] = [RewriteCall(names[id(stack)], prompt, "soft_prompt")]
        if decoder is not None:
            fill = options.other_expand_ids.get("attention_mask", 1)
            mask = EncoderPromptMask(options.soft_token_num, positional_names(decoder), fill, at_start=compat)
            ops.append(RewriteCall(names[id(decoder)], mask, "soft_prompt"))
        if compat:
            kept = (
                "; the output keeps the prompt positions in front, so a head reading the first position reads the "
                "first soft token (this library's own: the real tokens' positions only)"
                if keep_prompt
                else ""
            )
            warn_user(
                "SoftPromptModel places the prompt as OpenDelta 0.3.2 did (opendelta_compat=True, set for OpenDelta "
                "checkpoints), so that the checkpoint gives the outputs it was trained to give: at the start of each "
                f"row, before any left padding (this library's own: right before the first real token){kept}. Pass "
                "opendelta_compat=False (e.g. AutoDeltaModel.from_finetuned(path, backbone_model=model, "
                "opendelta_compat=False)) for this library's own."
            )
        return ops

    def _initial_prompt(self, embedding: nn.Module, config: Any) -> torch.Tensor:
        weight = getattr(embedding, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise UnsupportedModuleError(
                f"SoftPromptModel needs an embedding table (a 2-d weight), but the input embeddings are a "
                f"{type(embedding).__name__}"
            )
        options = self.config
        if not options.token_init:
            return torch.empty(
                options.soft_token_num, weight.shape[1], device=weight.device, dtype=weight.dtype
            ).uniform_(-options.init_range, options.init_range)
        special: set[int] = set()
        for key in _SPECIAL_TOKEN_KEYS:
            value = getattr(config, key, None)
            special.update(value if isinstance(value, (list, tuple)) else [value])
        vocabulary = [i for i in range(weight.shape[0]) if i not in special]
        ids = torch.tensor(
            [vocabulary[i % len(vocabulary)] for i in range(options.soft_token_num)], device=weight.device
        )
        with torch.no_grad():
            # through the embedding module, so scaled embeddings (BART) start at the scale they are used at
            return embedding(ids).detach().clone()
