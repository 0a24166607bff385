"""Tokenizer wrappers: from wrapped pieces (``Template.wrap_one_example``) to model inputs (OpenPrompt 1.0.1).

Every piece is encoded on its own (``tokenizer.encode(text, add_special_tokens=False)``) and every flag of the
piece (``loss_ids``, ``shortenable_ids``, ``soft_token_ids``) is repeated for each of its sub-tokens; a soft
piece is the single id 0 (its embedding comes from the template). The piece texts ``<mask> <eos> <bos> <sep>
<cls> <pad>`` become the tokenizer's own tokens. Then the shortenable parts are truncated to fit
``max_seq_length``, the tokenizer's special tokens are added (flag positions there are -100, soft indices 0),
and ``attention_mask`` (and ``token_type_ids`` with ``create_token_type_ids``) is made. Rows are NOT padded:
:func:`~opendelta_dist.prompts.data.collate` pads each batch to its longest row.

Truncation cuts only shortenable tokens, each part from its end: ``tail`` walks the parts from the last,
``head`` from the first, ``balanced`` cuts each part in proportion to its length. Tokens whose ``loss_ids``
is 1 (the mask, the causal LM's predicting token, teacher-forced targets) are never cut; an example that
still does not fit raises :class:`~opendelta_dist.prompts.errors.WrappingError`.

The special tokens a tokenizer adds around one sequence are found by encoding a probe text with and without
them (:func:`special_token_frame`), which works with every transformers version (5.x tokenizers lack
``build_inputs_with_special_tokens`` and ``get_special_tokens_mask`` for raw ids).

The encoder-decoder wrappers (T5, T5-LM, BART) are in :mod:`opendelta_dist.prompts.seq2seq_wrappers`;
``load_plm`` and ``get_model_class`` in :mod:`opendelta_dist.prompts.plms`.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from opendelta_dist.prompts.errors import WrappingError

TRUNCATE_METHODS = ("tail", "head", "balanced")
_PROBES = ("a", "hello", "the", "0", "x", ".")


def special_token_frame(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The special-token ids a tokenizer puts before and after one sequence.

    Found by encoding a probe text with and without special tokens and locating the plain ids inside the
    full encoding, so it follows the tokenizer's actual post-processing (``add_bos_token`` and the like).

    Args:
        tokenizer: A Hugging Face tokenizer.

    Returns:
        ``(prefix_ids, suffix_ids)``, e.g. ``([cls], [sep])`` for BERT, ``([], [eos])`` for T5, ``([], [])``
        for GPT-2.

    Raises:
        WrappingError: if no probe text gives a usable encoding.
    """
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    for probe in _PROBES:
        plain = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
        if not plain:
            continue
        full = list(tokenizer(probe, add_special_tokens=True)["input_ids"])
        starts = [s for s in range(len(full) - len(plain) + 1) if full[s : s + len(plain)] == plain]
        # prefer the split whose added ids are all special tokens
        starts.sort(key=lambda s: not all(i in special for i in full[:s] + full[s + len(plain) :]))
        if starts:
            start = starts[0]
            return full[:start], full[start + len(plain) :]
    raise WrappingError(
        f"cannot tell which special tokens {type(tokenizer).__name__} adds: none of the probe texts {_PROBES} "
        "encodes to ids that appear in its encoding with special tokens; use a tokenizer that knows one of them"
    )


def _to_int(value: Any, name: str) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise WrappingError(f"{name} must be an int, got {value!r}; pass e.g. {name}=128") from None
    if number != value and not isinstance(value, str):
        raise WrappingError(f"{name} must be an int, got {value!r}; pass e.g. {name}=128")
    return number


class TokenizerWrapper:
    """Base of the tokenizer wrappers: piece encoding, truncation, special tokens.

    Args:
        max_seq_length: Longest (encoder) row, special tokens included.
        tokenizer: The Hugging Face tokenizer.
        truncate_method: ``"tail"``, ``"head"`` or ``"balanced"`` (see the module docstring).
        create_token_type_ids: Also output ``token_type_ids`` (all 0).
        kwargs: Accepted as in OpenPrompt, and ignored with a warning naming them.

    Raises:
        WrappingError: on an unknown ``truncate_method`` or a non-integer ``max_seq_length``.
    """

    template_mask_token = "<mask>"
    template_eos_token = "<eos>"
    template_bos_token = "<bos>"
    template_sep_token = "<sep>"
    template_cls_token = "<cls>"
    template_pad_token = "<pad>"

    def __init__(
        self,
        max_seq_length: int,
        tokenizer: Any,
        truncate_method: str = "tail",
        create_token_type_ids: bool = False,
        **kwargs: Any,
    ) -> None:
        if kwargs:
            warnings.warn(f"{type(self).__name__} takes no argument {', '.join(kwargs)}; ignored", stacklevel=2)
        self.max_seq_length = _to_int(max_seq_length, "max_seq_length")
        if self.max_seq_length < 1:
            raise WrappingError(f"max_seq_length must be positive, got {max_seq_length}; pass e.g. 128")
        self.tokenizer = tokenizer
        if truncate_method not in TRUNCATE_METHODS:
            raise WrappingError(
                f"unknown truncate_method {truncate_method!r}; choose one of {', '.join(TRUNCATE_METHODS)}"
            )
        self.truncate_method = truncate_method
        self.truncate_fct: Callable[..., dict[str, list[list[int]]]] = {
            "tail": self.truncate_from_tail,
            "head": self.truncate_from_head,
            "balanced": self.balanced_truncate,
        }[truncate_method]
        self.create_token_type_ids = create_token_type_ids
        self.num_truncated_sentences = 0
        self.total_passed_sentences = 0
        self._frame: tuple[list[int], list[int]] | None = None

    # --- tokenizer facts -------------------------------------------------------------------------------
    @property
    def truncate_rate(self) -> float | None:
        """Share of the examples seen so far that needed truncation (``None`` before the first)."""
        if self.total_passed_sentences == 0:
            return None
        return self.num_truncated_sentences / self.total_passed_sentences

    @property
    def special_tokens_maps(self) -> dict[str, str | None]:
        """The template's special piece texts and the tokenizer's tokens for them (``None``: it has none)."""
        tok = self.tokenizer
        return {
            self.template_mask_token: getattr(tok, "mask_token", None),
            self.template_eos_token: getattr(tok, "eos_token", None),
            self.template_bos_token: getattr(tok, "bos_token", None),
            self.template_sep_token: getattr(tok, "sep_token", None),
            self.template_cls_token: getattr(tok, "cls_token", None),
            self.template_pad_token: getattr(tok, "pad_token", None),
        }

    @property
    def special_frame(self) -> tuple[list[int], list[int]]:
        """``(prefix_ids, suffix_ids)`` the tokenizer adds around a sequence (see :func:`special_token_frame`)."""
        if self._frame is None:
            self._frame = special_token_frame(self.tokenizer)
        return self._frame

    @property
    def num_special_tokens_to_add(self) -> int:
        """How many special tokens the tokenizer adds to one sequence."""
        prefix, suffix = self.special_frame
        return len(prefix) + len(suffix)

    # --- pieces ----------------------------------------------------------------------------------------
    def tokenize_one_example(self, wrapped_example: Sequence[Any], teacher_forcing: bool) -> dict[str, Any]:
        """Turn one wrapped example into unpadded model inputs.

        Args:
            wrapped_example: ``[pieces, others]`` from ``Template.wrap_one_example``.
            teacher_forcing: Fill the mask with ``tgt_text`` (generation training).

        Raises:
            NotImplementedError: in the base class.
        """
        raise NotImplementedError(f"{type(self).__name__} does not tokenize; use MLMTokenizerWrapper, ...")

    @staticmethod
    def _split(wrapped_example: Sequence[Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        pieces, others = wrapped_example
        return copy.deepcopy(list(pieces)), dict(others)

    @staticmethod
    def _targets(others: Mapping[str, Any], masks: int) -> list[str]:
        target = others.get("tgt_text")
        guid = others.get("guid")
        if target is None:
            raise WrappingError(
                f"teacher forcing fills the mask with tgt_text, but example guid={guid!r} has none; set "
                "InputExample(tgt_text=...) or pass a GenerationVerbalizer to the data loader"
            )
        targets = [target] if isinstance(target, str) else list(target)
        if len(targets) < masks:
            raise WrappingError(
                f"example guid={guid!r} has {masks} masks but {len(targets)} tgt_text entries; give one target per mask"
            )
        return targets

    def _token_for(self, text: str, guid: Any) -> str:
        token = self.special_tokens_maps.get(text, text)
        if token is None:
            raise WrappingError(
                f"the template uses {text} but {type(self.tokenizer).__name__} has no such token (example "
                f"guid={guid!r}); add it to the tokenizer or remove it from the template"
            )
        return token

    def _piece_ids(self, piece: Mapping[str, Any], guid: Any = None) -> list[int]:
        if piece.get("soft_token_ids", 0) != 0:
            return [0]  # a soft token: its embedding comes from the template, any id does
        return list(self.tokenizer.encode(self._token_for(piece["text"], guid), add_special_tokens=False))

    @staticmethod
    def _collect(
        pieces: Sequence[Mapping[str, Any]], encoded: Sequence[list[int]], skip: Sequence[str] = ()
    ) -> dict[str, list[list[int]]]:
        """Parts per key: the ids of every piece, and each flag repeated over the piece's ids."""
        keys = [key for key in dict.fromkeys(k for piece in pieces for k in piece) if key != "text" and key not in skip]
        parts: dict[str, list[list[int]]] = defaultdict(list)
        for piece, ids in zip(pieces, encoded):
            parts["input_ids"].append(list(ids))
            for key in keys:
                parts[key].append([piece.get(key, 0)] * len(ids))
        return parts

    # --- truncation ------------------------------------------------------------------------------------
    @staticmethod
    def _cuttable(input_dict: Mapping[str, list[list[int]]]) -> list[list[int]]:
        """Per part, the positions truncation may remove: shortenable tokens whose loss flag is not 1."""
        shortenable = input_dict.get("shortenable_ids")
        loss = input_dict.get("loss_ids")
        cuttable = []
        for index, ids in enumerate(input_dict["input_ids"]):
            cuttable.append(
                [
                    j
                    for j in range(len(ids))
                    if shortenable is not None
                    and shortenable[index][j] == 1
                    and not (loss is not None and loss[index][j] == 1)
                ]
            )
        return cuttable

    @staticmethod
    def _remove(input_dict: Mapping[str, list[list[int]]], cuts: Sequence[int]) -> dict[str, list[list[int]]]:
        cuttable = TokenizerWrapper._cuttable(input_dict)
        removed = [set(positions[len(positions) - n :]) if n else set() for positions, n in zip(cuttable, cuts)]
        out: dict[str, list[list[int]]] = defaultdict(list)
        for key, parts in input_dict.items():
            out[key] = [[v for j, v in enumerate(part) if j not in gone] for part, gone in zip(parts, removed)]
        return out

    @staticmethod
    def _walk(input_dict: Mapping[str, list[list[int]]], n: int, order: Sequence[int]) -> dict[str, list[list[int]]]:
        available = [len(positions) for positions in TokenizerWrapper._cuttable(input_dict)]
        cuts = [0] * len(available)
        for index in order:
            if n <= 0:
                break
            cuts[index] = min(n, available[index])
            n -= cuts[index]
        return TokenizerWrapper._remove(input_dict, cuts)

    @staticmethod
    def truncate_from_tail(input_dict: Mapping[str, list[list[int]]], num_tokens_to_truncate: int = 0) -> dict:
        """Cut ``num_tokens_to_truncate`` shortenable tokens, walking the parts from the last one, each
        from its end.

        Args:
            input_dict: Parts per key (``input_ids``, ``shortenable_ids``, ``loss_ids``, ...).
            num_tokens_to_truncate: How many tokens to cut.

        Returns:
            The truncated parts per key.
        """
        order = range(len(input_dict["input_ids"]) - 1, -1, -1)
        return TokenizerWrapper._walk(input_dict, num_tokens_to_truncate, order)

    @staticmethod
    def truncate_from_head(input_dict: Mapping[str, list[list[int]]], num_tokens_to_truncate: int = 0) -> dict:
        """Cut shortenable tokens walking the parts from the first one, each still from its end (as
        OpenPrompt: ``head`` means "first part first").

        Args:
            input_dict: Parts per key.
            num_tokens_to_truncate: How many tokens to cut.

        Returns:
            The truncated parts per key.
        """
        return TokenizerWrapper._walk(input_dict, num_tokens_to_truncate, range(len(input_dict["input_ids"])))

    @staticmethod
    def balanced_truncate(input_dict: Mapping[str, list[list[int]]], num_tokens_to_truncate: int = 0) -> dict:
        """Cut every shortenable part in proportion to its length: ``ceil(len_i / total * n)``, capped so the
        cuts add up to ``n`` (earlier parts first), each part from its end. Empty parts are cut by 0.

        Args:
            input_dict: Parts per key.
            num_tokens_to_truncate: How many tokens to cut.

        Returns:
            The truncated parts per key.
        """
        available = [len(positions) for positions in TokenizerWrapper._cuttable(input_dict)]
        total = sum(available)
        if total == 0 or num_tokens_to_truncate <= 0:
            return TokenizerWrapper._remove(input_dict, [0] * len(available))
        n = min(num_tokens_to_truncate, total)
        cuts, used = [], 0
        for length in available:
            share = min(math.ceil(length / total * n), length, n - used)
            cuts.append(share)
            used += share
        return TokenizerWrapper._remove(input_dict, cuts)

    def truncate(self, encoder_inputs: Mapping[str, list[list[int]]]) -> dict[str, list[list[int]]]:
        """Truncate the parts so that, with the special tokens, they fit ``max_seq_length``.

        Args:
            encoder_inputs: Parts per key.

        Returns:
            The (possibly) truncated parts.
        """
        total = sum(len(part) for part in encoder_inputs["input_ids"])
        excess = total - self.max_seq_length + self.num_special_tokens_to_add
        self.total_passed_sentences += 1
        if excess <= 0:
            return dict(encoder_inputs)
        self.num_truncated_sentences += 1
        return self.truncate_fct(input_dict=encoder_inputs, num_tokens_to_truncate=excess)

    @staticmethod
    def concate_parts(input_dict: Mapping[str, list[list[int]]]) -> dict[str, list[int]]:
        """Join the parts of every key.

        Args:
            input_dict: Parts per key.

        Returns:
            One flat list per key.
        """
        return {key: [value for part in parts for value in part] for key, parts in input_dict.items()}

    def add_special_tokens(self, encoder_inputs: Mapping[str, list[int]]) -> dict[str, list[int]]:
        """Add the tokenizer's special tokens around the ids; flags get -100 there (soft indices 0).

        Args:
            encoder_inputs: Flat lists per key.

        Returns:
            The lists with the special positions added.
        """
        prefix, suffix = self.special_frame
        out = {}
        for key, values in encoder_inputs.items():
            if key == "input_ids":
                out[key] = [*prefix, *values, *suffix]
            else:
                fill = 0 if key == "soft_token_ids" else -100
                out[key] = [fill] * len(prefix) + list(values) + [fill] * len(suffix)
        return out

    def _finish_encoder(self, parts: Mapping[str, list[list[int]]], guid: Any) -> dict[str, list[int]]:
        """Truncate, drop ``shortenable_ids``, join, add special tokens and masks; check the length."""
        parts = self.truncate(encoder_inputs=parts)
        parts.pop("shortenable_ids", None)
        inputs = self.add_special_tokens(self.concate_parts(parts))
        length = len(inputs["input_ids"])
        if length > self.max_seq_length:
            raise WrappingError(
                f"example guid={guid!r} has {length} tokens after truncating its shortenable parts, more than "
                f"max_seq_length={self.max_seq_length} (the template text, masks and predicting tokens are never "
                'cut); raise max_seq_length, shorten the template, or mark more pieces {"shortenable": True}'
            )
        inputs["attention_mask"] = [1] * length
        if self.create_token_type_ids:
            inputs["token_type_ids"] = [0] * length
        return inputs


class MLMTokenizerWrapper(TokenizerWrapper):
    """Wrapper for masked language models (BERT, RoBERTa, ALBERT, ELECTRA): the mask piece is the
    tokenizer's mask token and ``loss_ids`` is 1 there.

    Output keys: ``input_ids, attention_mask, loss_ids`` (+ ``soft_token_ids``, ``token_type_ids``,
    ``encoded_tgt_text`` for examples with ``tgt_text``).

    Args: see :class:`TokenizerWrapper`.
    """

    add_input_keys = ["input_ids", "attention_mask", "token_type_ids"]

    @property
    def mask_token(self) -> str:
        """The tokenizer's mask token."""
        return self.tokenizer.mask_token

    @property
    def mask_token_ids(self) -> int:
        """The tokenizer's mask token id."""
        return self.tokenizer.mask_token_id

    def tokenize_one_example(self, wrapped_example: Sequence[Any], teacher_forcing: bool) -> dict[str, Any]:
        """Encode one wrapped example for a masked LM.

        Args:
            wrapped_example: ``[pieces, others]``.
            teacher_forcing: Must be False.

        Returns:
            Unpadded lists per key.

        Raises:
            WrappingError: with teacher forcing, without a mask token, or if the example cannot fit.
        """
        pieces, others = self._split(wrapped_example)
        guid = others.get("guid")
        if teacher_forcing:
            raise WrappingError(
                "a masked language model predicts at the mask and cannot be teacher-forced; use teacher_forcing="
                "False, or a causal LM (LMTokenizerWrapper) or T5 (T5TokenizerWrapper) for generation"
            )
        encoded = []
        for piece in pieces:
            if piece["text"] == self.template_mask_token and piece.get("soft_token_ids", 0) == 0:
                if self.tokenizer.mask_token_id is None:
                    raise WrappingError(
                        f"{type(self.tokenizer).__name__} has no mask token, so MLMTokenizerWrapper cannot place "
                        "the template's mask; use LMTokenizerWrapper for a causal LM"
                    )
                encoded.append([self.tokenizer.mask_token_id])
            else:
                encoded.append(self._piece_ids(piece, guid))
        inputs: dict[str, Any] = self._finish_encoder(self._collect(pieces, encoded), guid)
        target = others.get("tgt_text")
        if target is not None:
            targets = [target] if isinstance(target, str) else list(target)
            inputs["encoded_tgt_text"] = [self.tokenizer.encode(t, add_special_tokens=False) for t in targets]
        return inputs


class LMTokenizerWrapper(TokenizerWrapper):
    """Wrapper for causal language models (GPT-2, OPT, Llama, ...).

    Without teacher forcing the text stops at the first mask and ``loss_ids`` is 1 on the last token before
    it, whose next-token logits predict the mask; that token is never truncated. With teacher forcing each
    mask becomes ``" " + tgt_text + " "`` (all its tokens get loss 1) and the rest of the template follows;
    ``predict_eos_token`` appends the eos token with loss 1. Soft tokens without text are kept (1.0.1 dropped
    them here). Output keys: ``input_ids, attention_mask, loss_ids, input_ids_len`` (+ ``soft_token_ids``).

    Args:
        max_seq_length: Longest row.
        tokenizer: The tokenizer.
        truncate_method: See :class:`TokenizerWrapper`.
        predict_eos_token: Append eos (with loss) to teacher-forced rows.
        kwargs: ``create_token_type_ids`` and others, as in :class:`TokenizerWrapper`.
    """

    def __init__(
        self,
        max_seq_length: int,
        tokenizer: Any,
        truncate_method: str = "tail",
        predict_eos_token: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(max_seq_length=max_seq_length, tokenizer=tokenizer, truncate_method=truncate_method, **kwargs)
        self.predict_eos = predict_eos_token

    def tokenize_one_example(self, wrapped_example: Sequence[Any], teacher_forcing: bool) -> dict[str, Any]:
        """Encode one wrapped example for a causal LM.

        Args:
            wrapped_example: ``[pieces, others]``.
            teacher_forcing: Fill the masks with ``tgt_text`` instead of stopping at the first mask.

        Returns:
            Unpadded lists per key, and ``input_ids_len``.

        Raises:
            WrappingError: if the mask has no text before it, a target is missing, or the example cannot fit.
        """
        pieces, others = self._split(wrapped_example)
        guid = others.get("guid")
        masks = sum(piece["text"] == self.template_mask_token for piece in pieces)
        targets = self._targets(others, masks) if teacher_forcing else []
        eos = self.tokenizer.eos_token
        if self.predict_eos and pieces and eos is not None and not pieces[-1]["text"].endswith(eos):
            pieces.append({"text": eos, "shortenable_ids": 0, "loss_ids": 1})
        kept: list[dict[str, Any]] = []
        encoded: list[list[int]] = []
        predicting = None  # index of the part whose last token predicts the mask
        used = 0
        for index, piece in enumerate(pieces):
            soft = piece.get("soft_token_ids", 0) != 0
            if not piece["text"] and not soft:
                continue
            if piece["text"] == eos and self.predict_eos and index > 0 and pieces[index - 1].get("loss_ids") == 1:
                piece["loss_ids"] = 1
            if piece["text"] == self.template_mask_token and not soft:
                if not teacher_forcing:
                    predicting = next((i for i in range(len(encoded) - 1, -1, -1) if encoded[i]), None)
                    if predicting is None:
                        raise WrappingError(
                            f"example guid={guid!r}: a causal LM predicts the mask from the text before it, but "
                            "the template puts nothing before the mask; put the mask after the input text, e.g. "
                            '\'{"placeholder":"text_a"} It was {"mask"}\''
                        )
                    break
                piece["text"] = " " + targets[used] + " "
                used += 1
            kept.append(piece)
            encoded.append(self._piece_ids(piece, guid))
        parts = self._collect(kept, encoded)
        if predicting is not None:
            parts["loss_ids"][predicting][-1] = 1
        inputs: dict[str, Any] = self._finish_encoder(parts, guid)
        inputs["input_ids_len"] = len(inputs["input_ids"])
        return inputs
