"""Templates with trainable soft tokens: ``MixedTemplate`` (soft tokens inside the text) and ``SoftTemplate``
(prompt tuning: soft embeddings prepended to the input), with OpenPrompt 1.0.1's arguments.

Soft tokens of ``MixedTemplate`` are written ``{"soft"}`` (one new token), ``{"soft": "it is"}`` (one token per
sub-token of the text, initialised from the model's embedding of that sub-token), ``{"soft": None,
"duplicate": n}`` (n new tokens), ``{"soft": None, "duplicate": n, "same": True}`` (one token repeated n
times) and ``{"soft_id": k}`` (shares the embeddings of the soft piece that defined group ``k``). Soft indices
start at 1; 0 means "not a soft token". ``process_batch`` builds ``inputs_embeds`` from the model's input
embedding and ``soft_embedding`` (an ``nn.Embedding(1 + num_soft_token, hidden)``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from opendelta_dist.prompts.data import InputExample
from opendelta_dist.prompts.errors import TemplateError
from opendelta_dist.prompts.templates import Template, default_loss_ids, default_shortenable_ids


class MixedTemplate(Template):
    """A template mixing hard text and trainable soft tokens.

    The parsed ``text`` holds one piece per soft token (``{"soft": surface_text}``, ``""`` for tokens without
    text). The model's input embedding is kept as ``raw_embedding`` (a submodule, as in OpenPrompt, so it
    appears in this template's parameters and ``state_dict`` under ``raw_embedding.weight``).

    Args:
        model: The language model (its input embedding initialises text-given soft tokens).
        tokenizer: The model's tokenizer.
        text: The template string or list of piece dicts.
        placeholder_mapping: See :class:`~opendelta_dist.prompts.templates.Template`.

    Raises:
        TemplateError: on an invalid template, no mask, or a ``soft_id`` used before it is defined.
    """

    registered_inputflag_names: list[str] = ["soft_token_ids", "loss_ids", "shortenable_ids"]

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        text: Any = None,
        placeholder_mapping: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(tokenizer=tokenizer, placeholder_mapping=placeholder_mapping)
        self.raw_embedding = model.get_input_embeddings()
        self.embedding_size = self.raw_embedding.weight.shape[-1]
        self.num_soft_token = 0
        self.text = text

    def get_default_soft_token_ids(self) -> list[int]:
        """The soft index of every piece (0 for hard pieces), as computed by :meth:`prepare`.

        Returns:
            One index per piece.
        """
        return list(self._soft_ids)

    def on_text_set(self) -> None:
        """Parse the text, then expand the soft pieces and build ``soft_embedding`` (:meth:`prepare`)."""
        self.text = self.parse_text(self.text)
        self.prepare()

    def prepare(self) -> None:
        """Expand soft pieces to one piece per soft token, number them and build ``soft_embedding``.

        ``{"soft": None}`` (also ``{"soft"}``) makes one new token, ``{"soft": None, "duplicate": n}`` n new
        tokens (``"same": True``: one token used n times), ``{"soft": "text"}`` one token per sub-token of
        the text, each initialised from the model's embedding of that sub-token. A ``soft_id`` names the
        group: its first use defines it (``{"soft": ..., "soft_id": k}``), later ``{"soft_id": k}`` reuse
        the same indices. For example ``{"soft"} {"soft": "the", "soft_id": 1} {"soft"} {"soft_id": 1}
        {"mask"}`` numbers its pieces ``[1, 2, 3, 2, 0]``.

        Raises:
            TemplateError: if ``{"soft_id": k}`` without ``"soft"`` comes before group k is defined.
        """
        pieces: list[dict[str, Any]] = []
        soft_ids: list[int] = []
        groups: dict[int, tuple[list[int], list[str]]] = {}
        init_rows: dict[int, int] = {}
        count = 0
        for piece in self.text:
            if "soft" not in piece and "soft_id" not in piece:
                pieces.append(piece)
                soft_ids.append(0)
                continue
            group = piece.get("soft_id")
            if group is not None and group in groups:
                ids, surfaces = groups[group]
            elif "soft" not in piece:
                raise TemplateError(
                    f"soft_id {group} is used before it is defined in {self._describe(self.text)}; define it "
                    f'first with {{"soft": None, "soft_id": {group}}} (or {{"soft": "some words", "soft_id": '
                    f'{group}}}), then refer to it with {{"soft_id": {group}}}'
                )
            elif piece["soft"] is None:
                repeat = piece.get("duplicate", 1)
                if piece.get("same", False):
                    ids = [count + 1] * repeat
                    count += 1
                else:
                    ids = list(range(count + 1, count + repeat + 1))
                    count += repeat
                surfaces = [""] * repeat
            else:
                token_ids = self.tokenizer(piece["add_prefix_space"] + piece["soft"], add_special_tokens=False)[
                    "input_ids"
                ]
                if not token_ids:
                    raise TemplateError(
                        f"the soft text {piece['soft']!r} tokenises to nothing; give words the tokenizer knows, or "
                        'write {"soft"} for a soft token without initial text'
                    )
                surfaces = list(self.tokenizer.convert_ids_to_tokens(token_ids))
                ids = list(range(count + 1, count + len(token_ids) + 1))
                init_rows.update(zip(ids, token_ids))
                count += len(token_ids)
            if group is not None and group not in groups:
                groups[group] = (ids, surfaces)
            pieces.extend({"soft": surface} for surface in surfaces)
            soft_ids.extend(ids)
        self.num_soft_token = count
        self._soft_ids = soft_ids
        self._text = pieces
        self._check_template_format()
        self.soft_token_ids = soft_ids
        self.soft_embedding = nn.Embedding(1 + count, self.embedding_size)
        with torch.no_grad():
            for soft_id, token_id in init_rows.items():
                self.soft_embedding.weight[soft_id] = self.raw_embedding.weight[token_id].to(
                    self.soft_embedding.weight.dtype
                )

    def _piece_text(self, piece: Mapping[str, Any], example: InputExample) -> str:
        if "soft" in piece:
            return piece["soft"] or ""
        return super()._piece_text(piece, example)

    def process_batch(self, batch: Any) -> Any:
        """Replace ``input_ids`` by ``inputs_embeds``: soft positions from ``soft_embedding``, the others
        from the model's input embedding.

        Args:
            batch: A batch with ``input_ids`` and ``soft_token_ids``.

        Returns:
            The batch, with ``input_ids`` removed (set to ``None``) and ``inputs_embeds`` set.
        """
        raw = self.raw_embedding(batch["input_ids"])
        soft_ids = batch["soft_token_ids"].to(raw.device)
        soft = self.soft_embedding(soft_ids).to(raw.dtype)
        batch["input_ids"] = None
        batch["inputs_embeds"] = torch.where((soft_ids > 0).unsqueeze(-1), soft, raw)
        return batch


class SoftTemplate(Template):
    """Prompt tuning (Lester et al., 2021): ``num_tokens`` trainable embeddings prepended to every input.

    The model's own input embedding stays trainable (OpenPrompt 1.0.1 froze it here; freeze the model with
    ``freeze_plm`` or a delta model's ``freeze_module`` instead). With ``text=None`` the hard template is
    ``{"placeholder":"text_a"} {"mask"}``, or ``{"placeholder":"text_a"} {"placeholder":"text_b"} {"mask"}`` for
    an example whose ``text_b`` is not empty.

    Args:
        model: The language model.
        tokenizer: The model's tokenizer.
        text: The hard template (see ``ManualTemplate``), or ``None`` for the default above.
        soft_embeds: Initial soft embeddings ``[num_tokens, hidden]`` (copied into a parameter).
        num_tokens: Number of soft tokens (ignored when ``soft_embeds`` is given).
        initialize_from_vocab: Initialise from the first ``num_tokens`` rows of the input embedding (else
            uniform in ``[-random_range, random_range]``).
        random_range: See ``initialize_from_vocab``.
        placeholder_mapping: See :class:`~opendelta_dist.prompts.templates.Template`.

    Raises:
        TemplateError: on an invalid template, soft pieces in ``text``, or a wrong ``soft_embeds`` shape.
    """

    registered_inputflag_names: list[str] = ["loss_ids", "shortenable_ids"]

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        text: Any = None,
        soft_embeds: torch.Tensor | None = None,
        num_tokens: int = 20,
        initialize_from_vocab: bool = True,
        random_range: float = 0.5,
        placeholder_mapping: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(tokenizer=tokenizer, placeholder_mapping=placeholder_mapping)
        self.raw_embedding = model.get_input_embeddings()
        config = getattr(model, "config", None)
        self.model_is_encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
        self.random_range = random_range
        self.initialize_from_vocab = initialize_from_vocab
        self.text = text
        self._default_pieces = {
            has_b: self.parse_text(
                '{"placeholder":"text_a"} {"placeholder":"text_b"} {"mask"}'
                if has_b
                else '{"placeholder":"text_a"} {"mask"}'
            )
            for has_b in (False, True)
        }
        hidden = self.raw_embedding.weight.shape[-1]
        if soft_embeds is not None:
            if soft_embeds.dim() != 2 or soft_embeds.shape[-1] != hidden:
                raise TemplateError(
                    f"soft_embeds has shape {tuple(soft_embeds.shape)}; give a [num_tokens, {hidden}] tensor "
                    "(the model's hidden size)"
                )
            self.num_tokens = soft_embeds.shape[0]
            self.soft_embeds = nn.Parameter(soft_embeds.detach().clone())
        else:
            self.num_tokens = num_tokens
            if num_tokens > 0:
                self.generate_parameters()

    def on_text_set(self) -> None:
        """Parse the text; soft pieces are refused (the soft tokens are the prepended embeddings)."""
        pieces = self.parse_text(self.text)
        if any("soft" in piece or "soft_id" in piece for piece in pieces):
            raise TemplateError(
                "SoftTemplate prepends its soft tokens itself and takes a hard template; remove the soft pieces "
                "or use MixedTemplate for soft tokens inside the text"
            )
        self.text = pieces

    def wrap_one_example(self, example: InputExample) -> list[Any]:
        """Fill the template (or the default one when ``text`` is ``None``) with one example.

        Args:
            example: The example.

        Returns:
            ``[pieces, others]`` as :meth:`Template.wrap_one_example`.
        """
        if self.text is not None:
            return super().wrap_one_example(example)
        pieces = self._default_pieces[bool(getattr(example, "text_b", None))]
        flags = {"loss_ids": default_loss_ids(pieces), "shortenable_ids": default_shortenable_ids(pieces)}
        return self._wrap(pieces, flags, example)

    def generate_parameters(self) -> None:
        """Create ``soft_embeds``: the first ``num_tokens`` vocabulary embeddings, or uniform random values."""
        weight = self.raw_embedding.weight
        if self.initialize_from_vocab:
            values = weight[: self.num_tokens].detach().clone()
        else:
            values = torch.empty(self.num_tokens, weight.shape[1], dtype=weight.dtype, device=weight.device)
            values.uniform_(-self.random_range, self.random_range)
        self.soft_embeds = nn.Parameter(values)

    def process_batch(self, batch: Any) -> Any:
        """Prepend the soft embeddings to ``inputs_embeds`` and ones to ``attention_mask`` (zeros to
        ``token_type_ids``).

        Args:
            batch: A batch with ``input_ids``.

        Returns:
            The batch, with ``input_ids`` removed and ``inputs_embeds`` set.
        """
        embeds = self.raw_embedding(batch["input_ids"])
        size = embeds.shape[0]
        if self.num_tokens > 0:
            soft = self.soft_embeds.to(embeds.dtype).unsqueeze(0).expand(size, -1, -1)
            embeds = torch.cat([soft, embeds], dim=1)
            for key, fill in (("attention_mask", 1), ("token_type_ids", 0)):
                value = batch.get(key)
                if value is not None:
                    prefix = value.new_full((size, self.num_tokens), fill)
                    batch[key] = torch.cat([prefix, value], dim=-1)
        batch["input_ids"] = None
        batch["inputs_embeds"] = embeds
        return batch

    def post_processing_outputs(self, outputs: Any) -> Any:
        """Drop the logits of the prepended positions (decoder-only and encoder-only models), so that
        ``loss_ids`` index the logits again.

        Args:
            outputs: The model outputs (with ``logits``).

        Returns:
            The outputs.
        """
        if not self.model_is_encoder_decoder and self.num_tokens > 0:
            outputs.logits = outputs.logits[:, self.num_tokens :, :]
        return outputs
