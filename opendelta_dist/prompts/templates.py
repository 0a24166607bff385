"""Templates: turn an ``InputExample`` into pieces of text with per-piece flags (OpenPrompt 1.0.1 API).

``Template`` is the base (``wrap_one_example``, ``process_batch``, ``post_processing_outputs``, the ``text``
property) and ``ManualTemplate`` its hard-text form. The soft templates (``MixedTemplate``,
``SoftTemplate``) are in :mod:`opendelta_dist.prompts.soft_templates`.

``wrap_one_example(example)`` returns ``[pieces, others]`` as OpenPrompt does: ``pieces`` is a list of dicts,
each with the piece's ``text`` and one value per name in ``registered_inputflag_names`` (``loss_ids``,
``shortenable_ids``, and ``soft_token_ids`` for the mixed template), which the tokenizer wrapper broadcasts to
every sub-token of the piece; ``others`` holds the example's other non-``None`` fields (``guid``, ``label``,
``tgt_text``).

Unlike OpenPrompt 1.0.1, setting ``text`` again re-parses it and recomputes every flag (1.0.1 kept the flag
lists of the old text), ``text_b=None`` is the empty string, and a template is checked when it is built:
unknown keys or placeholders, Python code in a block and a missing mask raise ``TemplateError`` then.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from opendelta_dist.prompts.data import InputExample
from opendelta_dist.prompts.errors import TemplateError
from opendelta_dist.prompts.template_language import fill_piece, parse_any, piece_kind

#: OpenPrompt's default ``placeholder_mapping``.
DEFAULT_PLACEHOLDER_MAPPING: dict[str, str] = {"<text_a>": "text_a", "<text_b>": "text_b"}

#: ``InputExample`` fields a ``{"placeholder": ...}`` piece may read (``meta`` is read with ``{"meta": key}``).
PLACEHOLDER_FIELDS = tuple(name for name in InputExample().keys(keep_none=True) if name != "meta")

#: The text a mask piece renders to; the tokenizer wrappers replace it with the model's mask.
MASK_TEXT = "<mask>"


def default_loss_ids(pieces: Sequence[Mapping[str, Any]]) -> list[int]:
    """1 for each mask piece, 0 for the others.

    Args:
        pieces: Parsed template pieces.

    Returns:
        One flag per piece.
    """
    return [1 if "mask" in piece else 0 for piece in pieces]


def default_shortenable_ids(pieces: Sequence[Mapping[str, Any]]) -> list[int]:
    """1 for the pieces truncation may cut: placeholders, or any piece with ``"shortenable": True``.

    Args:
        pieces: Parsed template pieces.

    Returns:
        One flag per piece (``meta`` pieces are not shortenable unless they say so).
    """
    return [
        (1 if piece["shortenable"] else 0) if "shortenable" in piece else (1 if "placeholder" in piece else 0)
        for piece in pieces
    ]


class Template(nn.Module):
    """Base class of the templates.

    A subclass sets ``text`` in its constructor; the ``text`` setter parses it (``on_text_set``), recomputes
    the flags and checks that the template has a mask.

    Args:
        tokenizer: The model's tokenizer.
        placeholder_mapping: Placeholder names the template may use for ``InputExample`` fields (default
            ``{"<text_a>": "text_a", "<text_b>": "text_b"}``); ``{"placeholder": "<text_a>"}`` reads ``text_a``.

    Raises:
        TemplateError: if a mapping value is not an ``InputExample`` field.
    """

    registered_inputflag_names: list[str] = ["loss_ids", "shortenable_ids"]

    def __init__(self, tokenizer: Any, placeholder_mapping: Mapping[str, str] | None = None) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        mapping = dict(DEFAULT_PLACEHOLDER_MAPPING if placeholder_mapping is None else placeholder_mapping)
        for name, field in mapping.items():
            if field not in PLACEHOLDER_FIELDS:
                raise TemplateError(
                    f"placeholder_mapping maps {name!r} to {field!r}, which is not an InputExample field; map it to "
                    f"one of {', '.join(PLACEHOLDER_FIELDS)}"
                )
        self.placeholder_mapping = mapping
        self._in_on_text_set = False
        self._text: list[dict[str, Any]] | None = None
        self.mixed_token_start = "{"
        self.mixed_token_end = "}"

    # --- text ------------------------------------------------------------------------------------------
    @property
    def text(self) -> Any:
        """The parsed template: a list of piece dicts (``None`` before a text is set).

        Setting it (a template string or a list of piece dicts) parses it, runs ``on_text_set`` and drops the
        flag lists computed for the previous text.
        """
        return self._text

    @text.setter
    def text(self, text: Any) -> None:
        if not self._in_on_text_set:
            for name in self.registered_inputflag_names:
                setattr(self, name, None)
        self._text = text
        if not self._in_on_text_set:  # the text as the user gave it (saved by save_prompt); None for piece lists
            self.raw_text = text if isinstance(text, str) else None
        if text is None:
            return
        if not self._in_on_text_set:
            self.safe_on_text_set()
        self._check_template_format()

    def safe_on_text_set(self) -> None:
        """Run :meth:`on_text_set`; setting ``text`` inside it does not run it again."""
        self._in_on_text_set = True
        try:
            self.on_text_set()
        finally:
            self._in_on_text_set = False

    def on_text_set(self) -> None:
        """Hook run when ``text`` is set: parse the raw text into pieces (subclasses add more)."""
        self.text = self.parse_text(self.text)

    def parse_text(self, text: Any) -> list[dict[str, Any]]:
        """Parse a template string or list of piece dicts, resolving placeholder names.

        Args:
            text: ``'{"placeholder":"text_a"} It was {"mask"}.'`` or a list of piece dicts.

        Returns:
            The piece dicts (see :mod:`opendelta_dist.prompts.template_language`).

        Raises:
            TemplateError: on a syntax error, an unknown key or an unknown placeholder.
        """
        pieces = parse_any(text)
        for piece in pieces:
            if "placeholder" in piece:
                piece["placeholder"] = self._placeholder_field(piece["placeholder"])
        return pieces

    def _placeholder_field(self, name: str) -> str:
        if name in self.placeholder_mapping:
            return self.placeholder_mapping[name]
        if name in PLACEHOLDER_FIELDS or name in self.placeholder_mapping.values():
            return name
        known = sorted({*PLACEHOLDER_FIELDS, *self.placeholder_mapping})
        raise TemplateError(
            f"unknown placeholder {name!r}; a placeholder names an InputExample field or a placeholder_mapping key: "
            f'{", ".join(known)} (extra values go in the example\'s meta dict, read with {{"meta": "key"}})'
        )

    def _check_template_format(self) -> None:
        pieces = self.text
        parsed = isinstance(pieces, list) and all(isinstance(piece, dict) for piece in pieces)
        if parsed and not any("mask" in piece for piece in pieces):
            raise TemplateError(
                f'the template has no mask: {self._describe(pieces)}; add a {{"mask"}} where the model '
                "predicts the label word (or the target text)"
            )

    @staticmethod
    def _describe(pieces: Sequence[Mapping[str, Any]]) -> str:
        return repr([{k: v for k, v in piece.items() if k != "post_processing"} for piece in pieces])

    def from_file(self, path: str, choice: int = 0) -> Template:
        """Set ``text`` from line ``choice`` of a text file (one template per line).

        Args:
            path: The file.
            choice: The 0-based line number.

        Returns:
            ``self``.

        Raises:
            TemplateError: if the file has no such line.
        """
        with open(path, encoding="utf-8") as handle:
            lines = handle.readlines()
        if not 0 <= choice < len(lines):
            raise TemplateError(f"{path} has {len(lines)} template lines, no line {choice}; pick choice < {len(lines)}")
        self.text = lines[choice].rstrip()
        return self

    # --- flags -----------------------------------------------------------------------------------------
    def get_default_loss_ids(self) -> list[int]:
        """The ``loss_ids`` flag of every piece: 1 for mask pieces.

        Returns:
            One flag per piece.
        """
        return default_loss_ids(self.text)

    def get_default_shortenable_ids(self) -> list[int]:
        """The ``shortenable_ids`` flag of every piece: 1 for placeholders (or ``"shortenable": True``).

        Returns:
            One flag per piece.
        """
        return default_shortenable_ids(self.text)

    def get_default_soft_token_ids(self) -> list[int]:
        """Soft-token indices; templates with soft tokens define them.

        Raises:
            NotImplementedError: in templates without soft tokens.
        """
        raise NotImplementedError(
            f'{type(self).__name__} has no soft tokens; use MixedTemplate for templates with {{"soft"}} pieces'
        )

    def _flag(self, name: str) -> list[int]:
        value = getattr(self, name, None)
        if value is None:
            default = getattr(self, f"get_default_{name}", None)
            if default is None:
                raise TemplateError(
                    f"{type(self).__name__} registers the flag {name!r} but has no value for it; set "
                    f"template.{name} = [...] (one value per piece) or define get_default_{name}()"
                )
            value = default()
            setattr(self, name, value)
        return value

    # --- wrapping --------------------------------------------------------------------------------------
    def incorporate_text_example(self, example: InputExample, text: Any = None) -> list[str]:
        """The text of every piece for one example.

        Args:
            example: The example.
            text: Pieces to use instead of ``self.text``.

        Returns:
            One string per piece: placeholders and meta values with their prefix space, ``"<mask>"`` for a
            mask, the special token's name, the soft token's text (``""`` here).

        Raises:
            TemplateError: for a missing meta key or a non-string value (naming the example's guid).
        """
        pieces = self.text if text is None else text
        return [self._piece_text(piece, example) for piece in pieces]

    def _piece_text(self, piece: Mapping[str, Any], example: InputExample) -> str:
        filled = fill_piece(piece, example)
        if filled is not None:
            return filled
        kind = piece_kind(piece)
        if kind == "mask":
            return MASK_TEXT
        if kind == "special":
            return piece["special"]
        return ""

    def wrap_one_example(self, example: InputExample) -> list[Any]:
        """Fill the template with one example.

        Args:
            example: The example.

        Returns:
            ``[pieces, others]``: ``pieces`` a list of ``{"text": ..., <flag>: ...}`` dicts, ``others`` the
            example's other non-``None`` fields (``guid``, ``label``, ``tgt_text``).

        Raises:
            TemplateError: if no text is set, ``example`` is not an ``InputExample``, or a value is missing.
        """
        if self.text is None:
            raise TemplateError(
                f'{type(self).__name__} has no text; pass text=\'{{"placeholder":"text_a"}} It was {{"mask"}}.\' '
                "when building it, or set template.text"
            )
        flags = {name: self._flag(name) for name in self.registered_inputflag_names}
        return self._wrap(self.text, flags, example)

    def _wrap(self, pieces: Sequence[Mapping[str, Any]], flags: Mapping[str, list[int]], example: Any) -> list[Any]:
        if not isinstance(example, InputExample):
            raise TemplateError(
                f"wrap_one_example takes an InputExample, got {type(example).__name__}; build one with "
                "InputExample(guid=..., text_a=..., text_b=..., label=...)"
            )
        texts = self.incorporate_text_example(example, list(pieces))
        for name, values in flags.items():
            if len(values) != len(texts):
                raise TemplateError(
                    f"template flag {name!r} has {len(values)} values for {len(texts)} pieces; give one value per "
                    f"piece or leave template.{name} = None to compute it"
                )
        wrapped = [
            {"text": text, **{name: values[index] for name, values in flags.items()}}
            for index, text in enumerate(texts)
        ]
        filled_fields = {*self.placeholder_mapping.values(), "text_a", "text_b", "meta"}
        others = {key: getattr(example, key) for key in example.keys(keep_none=False) if key not in filled_fields}
        return [wrapped, others]

    # --- model-side hooks ------------------------------------------------------------------------------
    def process_batch(self, batch: Any) -> Any:
        """Change a batch before the model sees it (soft templates build ``inputs_embeds``); identity here.

        Args:
            batch: An ``InputFeatures`` batch.

        Returns:
            The batch.
        """
        return batch

    def post_processing_outputs(self, outputs: Any) -> Any:
        """Change the model outputs (soft templates drop their prepended positions); identity here.

        Args:
            outputs: The model's outputs.

        Returns:
            The outputs.
        """
        return outputs


class ManualTemplate(Template):
    """A template of hard text, placeholders, meta values, special tokens and masks.

    Args:
        tokenizer: The model's tokenizer.
        text: The template, e.g. ``'{"placeholder":"text_a"} It was {"mask"}.'``, or a list of piece dicts.
        placeholder_mapping: See :class:`Template`.

    Raises:
        TemplateError: on an invalid template, a template without mask, or soft tokens (use ``MixedTemplate``).
    """

    registered_inputflag_names: list[str] = ["loss_ids", "shortenable_ids"]

    def __init__(self, tokenizer: Any, text: Any = None, placeholder_mapping: Mapping[str, str] | None = None) -> None:
        super().__init__(tokenizer=tokenizer, placeholder_mapping=placeholder_mapping)
        self.text = text

    def on_text_set(self) -> None:
        """Parse the text; soft tokens are refused (they need ``MixedTemplate``'s embeddings)."""
        pieces = self.parse_text(self.text)
        soft = [piece for piece in pieces if "soft" in piece or "soft_id" in piece]
        if soft:
            raise TemplateError(
                f"{type(self).__name__} has no trainable soft tokens but the template holds {self._describe(soft)}; "
                "use MixedTemplate(model=plm, tokenizer=tokenizer, text=...) for soft tokens"
            )
        self.text = pieces
