"""Tokenizer wrappers for encoder-decoder models: T5, LM-adapted T5 and BART.

``loss_ids`` is a DECODER flag here (the encoder has none). Two readings of it, as in OpenPrompt:

* without teacher forcing (classification) ``loss_ids`` is 1 at the decoder positions whose logits predict
  the mask, and the model output is read there;
* with teacher forcing (generation training) ``loss_ids`` is 1 on the decoder inputs that are targets; each
  is predicted by the logits one position earlier (``PromptForGeneration`` shifts by one).

``decoder_max_length`` ``-1`` (or ``None``), the ``PromptDataLoader`` default, sizes every decoder row to what
it holds (OpenPrompt 1.0.1 failed on -1). A positive value is a limit: a row that would need more decoder
tokens raises ``WrappingError`` (1.0.1 silently cut the teacher-forcing targets away). Decoder rows are not
padded; the collate function pads them to the longest row of the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from opendelta_dist.prompts.errors import WrappingError
from opendelta_dist.prompts.wrappers import TokenizerWrapper


class _DecoderLimit(TokenizerWrapper):
    """Shared decoder options and the decoder-length check."""

    def __init__(
        self,
        max_seq_length: int,
        tokenizer: Any,
        truncate_method: str = "tail",
        decoder_max_length: int | None = 128,
        decode_from_pad: bool = True,
        predict_eos_token: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(max_seq_length=max_seq_length, tokenizer=tokenizer, truncate_method=truncate_method, **kwargs)
        self.decoder_max_length = -1 if decoder_max_length is None else int(decoder_max_length)
        self.decode_from_pad = decode_from_pad
        self.predict_eos = predict_eos_token

    def _decoder_start(self, inputs: dict[str, Any]) -> tuple[list[int], list[int]]:
        """The decoder content's ids and loss flags, after the ``<pad>`` start token (``decode_from_pad``)."""
        ids, loss = list(inputs["decoder_input_ids"]), list(inputs["loss_ids"])
        if self.decode_from_pad:
            ids, loss = [self.tokenizer.pad_token_id, *ids], [0, *loss]
        return ids, loss

    def _check_decoder_length(self, needed: int, guid: Any) -> None:
        if 0 < self.decoder_max_length < needed:
            raise WrappingError(
                f"example guid={guid!r} needs {needed} decoder tokens (start token, mask sentinels, targets"
                f"{', eos' if self.predict_eos else ''}) but decoder_max_length={self.decoder_max_length}; raise "
                "decoder_max_length, or pass decoder_max_length=-1 to size the decoder to each row"
            )

    def _sentinel(self, index: int) -> int:
        """Id of ``<extra_id_{index}>``, the T5 sentinel that stands for the index-th mask."""
        name = f"<extra_id_{index}>"
        token_id = self.tokenizer.convert_tokens_to_ids(name)
        if token_id is None or token_id == self.tokenizer.unk_token_id:
            extras = list(getattr(self.tokenizer, "additional_special_tokens", None) or []) or list(
                getattr(self.tokenizer, "extra_special_tokens", None) or []
            )
            if index < len(extras):
                return self.tokenizer.convert_tokens_to_ids(str(extras[index]))
            raise WrappingError(
                f"{type(self.tokenizer).__name__} has no sentinel token {name} for mask number {index}; use a T5 "
                "tokenizer with enough <extra_id_k> tokens, or fewer masks"
            )
        return token_id

    def mask_token(self, i: int) -> str:
        """The sentinel token that stands for the i-th mask (``<extra_id_i>``).

        Args:
            i: The mask's index in the template.

        Returns:
            The token string.
        """
        return self.tokenizer.convert_ids_to_tokens(self._sentinel(i))

    def mask_token_ids(self, i: int) -> int:
        """The sentinel id that stands for the i-th mask.

        Args:
            i: The mask's index in the template.

        Returns:
            The token id.
        """
        return self._sentinel(i)


class T5TokenizerWrapper(_DecoderLimit):
    """Wrapper for T5: the k-th mask is ``<extra_id_k>`` in the encoder (which ends with ``</s>``).

    Decoder without teacher forcing: ``[<pad>, <extra_id_0>, <extra_id_1>, ...]``, ``loss_ids`` ``[0, 1, 1,
    ...]``. With teacher forcing: ``[<pad>, <extra_id_0>, tgt_0..., <extra_id_1>, tgt_1...]``, loss 1 on the
    target tokens and on ``<extra_id_k>`` for k > 0; ``predict_eos_token`` appends ``</s>`` with loss 1.
    Output keys: ``input_ids, attention_mask, decoder_input_ids, loss_ids`` (+ ``soft_token_ids``).

    Args:
        max_seq_length: Longest encoder row.
        tokenizer: The T5 tokenizer.
        truncate_method: See :class:`~opendelta_dist.prompts.wrappers.TokenizerWrapper`.
        decoder_max_length: Longest decoder row; ``-1``/``None``: as long as each row needs.
        decode_from_pad: Start the decoder with ``<pad>`` (T5's decoder start token).
        predict_eos_token: Append ``</s>`` (with loss) to the decoder.
        kwargs: More :class:`~opendelta_dist.prompts.wrappers.TokenizerWrapper` arguments.
    """

    def tokenize_one_example(self, wrapped_example: Sequence[Any], teacher_forcing: bool) -> dict[str, Any]:
        """Encode one wrapped example for T5.

        Args:
            wrapped_example: ``[pieces, others]``.
            teacher_forcing: Put the targets in the decoder.

        Returns:
            Unpadded lists per key.

        Raises:
            WrappingError: for a missing target, a missing sentinel or a row that does not fit.
        """
        pieces, others = self._split(wrapped_example)
        guid = others.get("guid")
        masks = sum(piece["text"] == self.template_mask_token for piece in pieces)
        targets = self._targets(others, masks) if teacher_forcing else []
        decoder_ids: list[int] = []
        decoder_loss: list[int] = []
        encoded: list[list[int]] = []
        used = 0
        for piece in pieces:
            if piece["text"] == self.template_mask_token and piece.get("soft_token_ids", 0) == 0:
                sentinel = self._sentinel(used)
                decoder_ids.append(sentinel)
                if teacher_forcing:
                    decoder_loss.append(1 if used > 0 else 0)
                    target = self.tokenizer.encode(" " + targets[used], add_special_tokens=False)
                    decoder_ids.extend(target)
                    decoder_loss.extend([1] * len(target))
                else:
                    decoder_loss.append(1)
                encoded.append([sentinel])
                used += 1
            else:
                encoded.append(self._piece_ids(piece, guid))
        decoder = self.truncate_decoder_inputs({"decoder_input_ids": decoder_ids, "loss_ids": decoder_loss}, guid)
        encoder = self._finish_encoder(self._collect(pieces, encoded, skip=("loss_ids",)), guid)
        return {**encoder, **decoder}

    def truncate_decoder_inputs(self, inputs: dict[str, list[int]], guid: Any = None) -> dict[str, list[int]]:
        """Add the decoder start (``<pad>``) and, with ``predict_eos_token``, ``</s>``; check the length.

        Nothing is cut: a row longer than ``decoder_max_length`` is an error.

        Args:
            inputs: ``decoder_input_ids`` and ``loss_ids`` of the decoder content.
            guid: The example's id, for the error message.

        Returns:
            The decoder row.

        Raises:
            WrappingError: if the row exceeds ``decoder_max_length``.
        """
        ids, loss = self._decoder_start(inputs)
        if self.predict_eos:
            ids, loss = [*ids, self.tokenizer.eos_token_id], [*loss, 1]
        self._check_decoder_length(len(ids), guid)
        return {"decoder_input_ids": ids, "loss_ids": loss}


class T5LMTokenizerWrapper(_DecoderLimit):
    """Wrapper for LM-adapted T5 (prompt tuning): the encoder holds the text before the first mask only
    (then ``</s>``).

    Decoder without teacher forcing: ``[<pad>, <extra_id_0>, </s>]``, ``loss_ids`` ``[0, 1, 0]``; with teacher
    forcing ``[<pad>, <extra_id_0>, tgt..., </s>]``, loss ``[0, 0, 1..., 1 if predict_eos_token else 0]``.

    Args: as :class:`T5TokenizerWrapper`.
    """

    def tokenize_one_example(self, wrapped_example: Sequence[Any], teacher_forcing: bool) -> dict[str, Any]:
        """Encode one wrapped example for LM-adapted T5.

        Args:
            wrapped_example: ``[pieces, others]``.
            teacher_forcing: Put the target in the decoder.

        Returns:
            Unpadded lists per key.

        Raises:
            WrappingError: for a missing target or a row that does not fit.
        """
        pieces, others = self._split(wrapped_example)
        guid = others.get("guid")
        targets = self._targets(others, 1) if teacher_forcing else []
        decoder_ids: list[int] = []
        decoder_loss: list[int] = []
        kept: list[dict[str, Any]] = []
        encoded: list[list[int]] = []
        for piece in pieces:
            if piece["text"] == self.template_mask_token and piece.get("soft_token_ids", 0) == 0:
                decoder_ids.append(self._sentinel(0))
                if teacher_forcing:
                    decoder_loss.append(0)
                    target = self.tokenizer.encode(" " + targets[0], add_special_tokens=False)
                    decoder_ids.extend(target)
                    decoder_loss.extend([1] * len(target))
                else:
                    decoder_loss.append(1)
                break
            kept.append(piece)
            encoded.append(self._piece_ids(piece, guid))
        decoder = self.truncate_decoder_inputs({"decoder_input_ids": decoder_ids, "loss_ids": decoder_loss}, guid)
        encoder = self._finish_encoder(self._collect(kept, encoded, skip=("loss_ids",)), guid)
        return {**encoder, **decoder}

    def truncate_decoder_inputs(self, inputs: dict[str, list[int]], guid: Any = None) -> dict[str, list[int]]:
        """Add the decoder start (``<pad>``) and ``</s>`` (with loss only under ``predict_eos_token``); check
        the length (nothing is cut).

        Args:
            inputs: ``decoder_input_ids`` and ``loss_ids`` of the decoder content.
            guid: The example's id, for the error message.

        Returns:
            The decoder row.

        Raises:
            WrappingError: if the row exceeds ``decoder_max_length``.
        """
        ids, loss = self._decoder_start(inputs)
        ids, loss = [*ids, self.tokenizer.eos_token_id], [*loss, 1 if self.predict_eos else 0]
        self._check_decoder_length(len(ids), guid)
        return {"decoder_input_ids": ids, "loss_ids": loss}


class BartTokenizerWrapper(_DecoderLimit):
    """Wrapper for BART (and other denoising encoder-decoders whose tokenizer has a ``<mask>`` token).

    BART is pretrained to rebuild a text from a copy in which a span was replaced by ``<mask>``, so:

    * the encoder gets the template with the tokenizer's mask token at each mask (``<s> ... </s>``);
    * the decoder gets the rebuilt text shifted right: ``[decoder_start] + encoder ids`` (without teacher
      forcing) or ``[decoder_start] + the encoder ids with each mask replaced by " " + its tgt_text`` (with
      teacher forcing); the decoder start is ``decoder_start_token_id`` (default: the tokenizer's eos, as
      BART's config has it);
    * ``loss_ids`` (decoder) is 1, without teacher forcing, at the position of each mask, whose logits
      predict the word there; with teacher forcing it is 1 on the target tokens of the decoder input
      (and on the final ``</s>`` with ``predict_eos_token``), each predicted one position earlier.

    Soft tokens (id 0 in the encoder, embedded by the template) are copied into the decoder as id 0.

    Args:
        max_seq_length: Longest encoder row.
        tokenizer: The BART tokenizer.
        truncate_method: See :class:`~opendelta_dist.prompts.wrappers.TokenizerWrapper`.
        decoder_max_length: Longest decoder row; ``-1``/``None`` (default): as long as each row needs.
        predict_eos_token: Put loss on the final ``</s>`` of teacher-forced rows.
        decoder_start_token_id: The decoder's first token (default ``tokenizer.eos_token_id``).
        kwargs: More :class:`~opendelta_dist.prompts.wrappers.TokenizerWrapper` arguments.
    """

    def __init__(
        self,
        max_seq_length: int,
        tokenizer: Any,
        truncate_method: str = "tail",
        decoder_max_length: int | None = -1,
        predict_eos_token: bool = False,
        decoder_start_token_id: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            max_seq_length=max_seq_length,
            tokenizer=tokenizer,
            truncate_method=truncate_method,
            decoder_max_length=decoder_max_length,
            predict_eos_token=predict_eos_token,
            **kwargs,
        )
        self.decoder_start_token_id = (
            tokenizer.eos_token_id if decoder_start_token_id is None else decoder_start_token_id
        )

    def tokenize_one_example(self, wrapped_example: Sequence[Any], teacher_forcing: bool) -> dict[str, Any]:
        """Encode one wrapped example for BART.

        Args:
            wrapped_example: ``[pieces, others]``.
            teacher_forcing: Put the targets in the decoder.

        Returns:
            Unpadded lists per key.

        Raises:
            WrappingError: without a mask token, for a missing target or a row that does not fit.
        """
        pieces, others = self._split(wrapped_example)
        guid = others.get("guid")
        masks = sum(piece["text"] == self.template_mask_token for piece in pieces)
        targets = self._targets(others, masks) if teacher_forcing else []
        mask_id = self.tokenizer.mask_token_id
        if mask_id is None:
            raise WrappingError(
                f"{type(self.tokenizer).__name__} has no mask token; BartTokenizerWrapper needs a denoising "
                "tokenizer with <mask> (use T5TokenizerWrapper for T5)"
            )
        encoded = [
            [mask_id]
            if piece["text"] == self.template_mask_token and piece.get("soft_token_ids", 0) == 0
            else self._piece_ids(piece, guid)
            for piece in pieces
        ]
        # the encoder keeps loss_ids until here so that truncation never cuts a mask and the masks can be found
        encoder = self._finish_encoder(self._collect(pieces, encoded), guid)
        mask_flags = encoder.pop("loss_ids")
        rebuilt: list[int] = []
        loss_at: list[int] = []
        used = 0
        for token, flag in zip(encoder["input_ids"], mask_flags):
            if flag == 1 and token == mask_id and teacher_forcing:
                target = self.tokenizer.encode(" " + targets[used], add_special_tokens=False)
                loss_at.extend(range(len(rebuilt) + 1, len(rebuilt) + 1 + len(target)))
                rebuilt.extend(target)
                used += 1
                continue
            if flag == 1 and token == mask_id:
                loss_at.append(len(rebuilt))
            rebuilt.append(token)
        decoder_ids = [self.decoder_start_token_id, *rebuilt]
        loss = [0] * len(decoder_ids)
        for position in loss_at:
            loss[position] = 1
        if teacher_forcing and self.predict_eos and rebuilt and rebuilt[-1] == self.tokenizer.eos_token_id:
            loss[-1] = 1
        self._check_decoder_length(len(decoder_ids), guid)
        return {**encoder, "decoder_input_ids": decoder_ids, "loss_ids": loss}
