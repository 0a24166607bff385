"""Examples and features: ``InputExample`` (raw text) and ``InputFeatures`` (model inputs of one row or a batch).

Both keep OpenPrompt 1.0.1's names, fields and methods. ``InputFeatures`` is a real ``dict`` holding only its
non-``None`` keys (so ``dict(features)``, ``{**features}``, pickling, ``copy`` and ``DataParallel``'s scatter see
the same content as ``features.keys()``), restricted to OpenPrompt's fixed key set; each key is also readable
and writable as an attribute, and reading a known key that is not set gives ``None``.

Rows are not padded; :func:`collate` pads a batch to its longest row (ids with the pad id, the other
sequences with 0).
"""

from __future__ import annotations

import copy
import json
import pickle
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data._utils.collate import default_collate


class InputExample:
    """A raw example: text segments, a label or a target text, and free ``meta`` information.

    Args:
        guid: A unique identifier of the example.
        text_a: The first text segment.
        text_b: A second text segment (``None`` is treated as empty by the templates).
        label: The label id for classification.
        meta: Extra named strings a template reads with ``{"meta": "key"}`` (``None`` becomes ``{}``).
        tgt_text: The target text (or one per mask) for generation / teacher forcing.
    """

    def __init__(
        self,
        guid: Any = None,
        text_a: str | None = "",
        text_b: str | None = "",
        label: Any = None,
        meta: dict[str, Any] | None = None,
        tgt_text: str | list[str] | None = None,
    ) -> None:
        self.guid = guid
        self.text_a = text_a
        self.text_b = text_b
        self.label = label
        self.meta = meta if meta else {}
        self.tgt_text = tgt_text

    def __repr__(self) -> str:
        return self.to_json_string()

    def keys(self, keep_none: bool = False) -> list[str]:
        """Names of the attributes whose value is not ``None`` (all of them with ``keep_none``).

        Args:
            keep_none: Also list attributes whose value is ``None``.

        Returns:
            Attribute names in definition order.
        """
        return [key for key, value in self.__dict__.items() if keep_none or value is not None]

    def to_dict(self) -> dict[str, Any]:
        """A deep copy of the example's attributes as a dict.

        Returns:
            ``{"guid": ..., "text_a": ..., ...}``.
        """
        return copy.deepcopy(self.__dict__)

    def to_json_string(self) -> str:
        """The example as indented JSON with sorted keys and a trailing newline.

        Returns:
            The JSON text.
        """
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"

    @staticmethod
    def load_examples(path: str) -> list[InputExample]:
        """Load examples written by :meth:`save_examples` (a pickle: open only files you trust).

        Args:
            path: The file path.

        Returns:
            The examples.
        """
        with open(path, "rb") as handle:
            return pickle.load(handle)

    @staticmethod
    def save_examples(examples: list[InputExample], path: str) -> None:
        """Write examples to a pickle file.

        Args:
            examples: The examples.
            path: The file path.
        """
        with open(path, "wb") as handle:
            pickle.dump(examples, handle)


class InputFeatures(dict):
    """Model inputs of one example or of a batch, as a dict over a fixed set of keys.

    The keys are those of OpenPrompt 1.0.1 (:attr:`all_keys`): ``input_ids, inputs_embeds, attention_mask,
    token_type_ids, label, decoder_input_ids, decoder_inputs_embeds, soft_token_ids, past_key_values, loss_ids,
    guid, tgt_text, encoded_tgt_text, input_ids_len``. Setting a key to ``None`` removes it; setting an unknown
    key raises ``KeyError`` (add keys with :meth:`add_keys`). ``use_cache`` is an attribute, not a key. Like
    ``dict``, it can also be built from one mapping or list of ``(key, value)`` pairs.

    Args:
        input_ids: Token ids.
        inputs_embeds: Input embeddings (set by soft templates in ``process_batch``).
        attention_mask: 1 for real tokens, 0 for padding.
        token_type_ids: Segment ids.
        label: The label.
        decoder_input_ids: Decoder token ids (encoder-decoder models).
        decoder_inputs_embeds: Decoder input embeddings.
        soft_token_ids: Soft-token index per position (0: not a soft token).
        past_key_values: Prefix key/values (prefix tuning).
        loss_ids: 1 where the model output is read (or the loss taken), 0 elsewhere, -100 on special tokens.
        guid: The example id.
        tgt_text: The target text.
        use_cache: Passed to generation; kept as an attribute.
        encoded_tgt_text: Token ids of the target text(s).
        input_ids_len: The row length before padding (decoder-only generation).
        kwargs: Any other key: refused.

    Raises:
        KeyError: for a key outside the fixed set, naming the known keys.
    """

    tensorable_keys: list[str] = [
        "input_ids",
        "inputs_embeds",
        "attention_mask",
        "token_type_ids",
        "label",
        "decoder_input_ids",
        "decoder_inputs_embeds",
        "soft_token_ids",
        "past_key_values",
        "loss_ids",
    ]
    all_keys: list[str] = [*tensorable_keys, "guid", "tgt_text", "encoded_tgt_text", "input_ids_len"]
    not_tensorable_keys: list[str] = []

    def __init__(
        self,
        input_ids: Any = None,
        inputs_embeds: Any = None,
        attention_mask: Any = None,
        token_type_ids: Any = None,
        label: Any = None,
        decoder_input_ids: Any = None,
        decoder_inputs_embeds: Any = None,
        soft_token_ids: Any = None,
        past_key_values: Any = None,
        loss_ids: Any = None,
        guid: Any = None,
        tgt_text: Any = None,
        use_cache: bool | None = None,
        encoded_tgt_text: Any = None,
        input_ids_len: Any = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        object.__setattr__(self, "use_cache", use_cache)
        if _is_key_value_pairs(input_ids):
            # InputFeatures(mapping) / InputFeatures(pairs), as dict() takes them (DataParallel's scatter does this)
            kwargs = {**dict(input_ids), **kwargs}
            input_ids = kwargs.pop("input_ids", None)
        named = {
            "input_ids": input_ids,
            "inputs_embeds": inputs_embeds,
            "attention_mask": attention_mask,
            "token_type_ids": token_type_ids,
            "label": label,
            "decoder_input_ids": decoder_input_ids,
            "decoder_inputs_embeds": decoder_inputs_embeds,
            "soft_token_ids": soft_token_ids,
            "past_key_values": past_key_values,
            "loss_ids": loss_ids,
            "guid": guid,
            "tgt_text": tgt_text,
            "encoded_tgt_text": encoded_tgt_text,
            "input_ids_len": input_ids_len,
        }
        for key, value in {**named, **kwargs}.items():
            self[key] = value

    # --- the key set ------------------------------------------------------------------------------------
    @classmethod
    def add_tensorable_keys(cls, *args: str) -> None:
        """Add keys whose values :meth:`to_tensor` converts (also added to :attr:`all_keys`).

        Args:
            args: The key names.
        """
        cls.tensorable_keys.extend(key for key in args if key not in cls.tensorable_keys)
        cls.add_keys(*args)

    @classmethod
    def add_not_tensorable_keys(cls, *args: str) -> None:
        """Add keys whose values stay as they are (also added to :attr:`all_keys`).

        Args:
            args: The key names.
        """
        cls.not_tensorable_keys.extend(key for key in args if key not in cls.not_tensorable_keys)
        cls.add_keys(*args)

    @classmethod
    def add_keys(cls, *args: str) -> None:
        """Allow more keys.

        Args:
            args: The key names.
        """
        cls.all_keys.extend(key for key in args if key not in cls.all_keys)

    def _check_key(self, key: str) -> None:
        if key not in self.all_keys:
            raise KeyError(
                f"InputFeatures has no key {key!r}; its keys are {', '.join(self.all_keys)}. Use one of them, or "
                f"register a new one first with InputFeatures.add_keys({key!r})"
            )

    # --- dict behaviour ---------------------------------------------------------------------------------
    def __setitem__(self, key: str, value: Any) -> None:
        self._check_key(key)
        if value is None:
            super().pop(key, None)
        else:
            super().__setitem__(key, value)

    def __getitem__(self, key: str) -> Any:
        if key in self.all_keys:
            return super().get(key)
        return super().__getitem__(key)

    def __getattr__(self, name: str) -> Any:
        if name in type(self).all_keys:
            return super().get(name)
        raise AttributeError(f"'InputFeatures' object has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self.all_keys:
            self[name] = value
        else:
            object.__setattr__(self, name, value)

    def __delattr__(self, name: str) -> None:
        if name in self.all_keys:
            super().pop(name, None)
        else:
            object.__delattr__(self, name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __repr__(self) -> str:
        return self.to_json_string()

    def update(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        """Set several keys (each checked as in ``features[key] = value``).

        Args:
            args: At most one mapping or iterable of pairs.
            kwargs: More keys.
        """
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def setdefault(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        """Return ``features[key]``, first setting it to ``default`` when it is not set.

        Args:
            key: A known key.
            default: The value to set.

        Returns:
            The value.
        """
        if self[key] is None:
            self[key] = default
        return self[key]

    def copy(self) -> InputFeatures:  # type: ignore[override]
        """A shallow copy (tensors are shared).

        Returns:
            A new ``InputFeatures``.
        """
        new = InputFeatures(**dict(self.items()))
        object.__setattr__(new, "use_cache", self.use_cache)
        return new

    def __copy__(self) -> InputFeatures:
        return self.copy()

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_features, (dict(self.items()), self.__dict__.copy()))

    def keys(self, keep_none: bool = False) -> list[str]:  # type: ignore[override]
        """The keys that are set, in :attr:`all_keys` order (every known key with ``keep_none``).

        Args:
            keep_none: Also list the keys that are not set.

        Returns:
            Key names.
        """
        if keep_none:
            return list(self.all_keys)
        return [key for key in self.all_keys if dict.__contains__(self, key)]

    def values(self, keep_none: bool = False) -> list[Any]:  # type: ignore[override]
        """The values of :meth:`keys`.

        Args:
            keep_none: Also give ``None`` for the keys that are not set.

        Returns:
            Values in key order.
        """
        return [self[key] for key in self.keys(keep_none=keep_none)]

    def items(self) -> list[tuple[str, Any]]:  # type: ignore[override]
        """``(key, value)`` pairs of the keys that are set, in key order.

        Returns:
            The pairs.
        """
        return [(key, self[key]) for key in self.keys()]

    def to_dict(self, keep_none: bool = False) -> dict[str, Any]:
        """A plain dict of the keys that are set (every known key with ``keep_none``).

        Args:
            keep_none: Also give ``None`` for the keys that are not set.

        Returns:
            The dict.
        """
        return {key: self[key] for key in self.keys(keep_none=keep_none)}

    def to_json_string(self, keep_none: bool = False) -> str:
        """The features as one line of JSON (tensors as nested lists).

        Args:
            keep_none: Also write ``null`` for the keys that are not set.

        Returns:
            The JSON text with a trailing newline.
        """
        data = {}
        for key in self.keys(keep_none=keep_none):
            value = self[key]
            data[key] = value.detach().cpu().tolist() if isinstance(value, torch.Tensor) else value
        return json.dumps(data, ensure_ascii=False, default=str) + "\n"

    # --- tensors ----------------------------------------------------------------------------------------
    def to_tensor(self, device: str | torch.device | None = None) -> InputFeatures:
        """Convert the tensorable keys to tensors, in place.

        Args:
            device: Where to create them (the CPU by default; OpenPrompt ignored this argument).

        Returns:
            ``self``.
        """
        for key in self.tensorable_keys:
            value = self[key]
            if value is not None and not isinstance(value, torch.Tensor):
                self[key] = torch.tensor(value, device=device)
        return self

    def to(self, device: str | torch.device = "cuda:0") -> InputFeatures:
        """Move the tensor values to ``device``, in place.

        Args:
            device: The target device.

        Returns:
            ``self``.
        """
        for key in self.keys():
            value = self[key]
            if isinstance(value, torch.Tensor):
                self[key] = value.to(device)
        return self

    def cuda(self, device: str | torch.device = "cuda:0") -> InputFeatures:
        """Move the tensor values to a CUDA device, in place (as ``Tensor.cuda``).

        Args:
            device: The CUDA device.

        Returns:
            ``self``.
        """
        return self.to(device)

    @staticmethod
    def collate_fct(batch: Sequence[Mapping[str, Any]]) -> InputFeatures:
        """Collate rows into a batch padded to the longest row; ids are padded with 0.

        Use :func:`collate` with the tokenizer's ``pad_token_id`` (``PromptDataLoader`` does) to pad ids with
        the pad token; padded positions have ``attention_mask`` 0 either way.

        Args:
            batch: The rows.

        Returns:
            The batch.
        """
        return collate(batch)


def _is_key_value_pairs(value: Any) -> bool:
    if isinstance(value, Mapping):
        return True
    return (
        isinstance(value, (list, tuple))
        and len(value) > 0
        and all(isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str) for item in value)
    )


def _rebuild_features(items: dict[str, Any], attributes: dict[str, Any]) -> InputFeatures:
    features = InputFeatures(**items)
    for name, value in attributes.items():
        object.__setattr__(features, name, value)
    return features


#: Keys padded with the tokenizer's pad id; every other sequence key is padded with 0.
ID_KEYS = ("input_ids", "decoder_input_ids")
#: Keys collated as plain lists (their rows may differ in shape).
LIST_KEYS = ("tgt_text", "encoded_tgt_text")


def collate(batch: Sequence[Mapping[str, Any]], pad_token_id: int | None = 0) -> InputFeatures:
    """Collate feature rows into one ``InputFeatures`` batch, padding to the longest row (right padding).

    Sequence keys (1-D lists or tensors) are padded to the batch's longest row: ``input_ids`` and
    ``decoder_input_ids`` with ``pad_token_id``, the others (``attention_mask``, ``loss_ids``,
    ``soft_token_ids``, ``token_type_ids``) with 0. ``tgt_text`` and ``encoded_tgt_text`` stay lists; other
    values go through ``default_collate`` (a list when they cannot be stacked).

    Args:
        batch: Rows (``InputFeatures`` or dicts), e.g. from ``example_to_features``.
        pad_token_id: The id for padded ``input_ids``/``decoder_input_ids`` (``None``: 0).

    Returns:
        The batch.

    Raises:
        ValueError: for an empty batch.
    """
    if not batch:
        raise ValueError("collate got an empty batch; give it at least one row")
    pad_id = 0 if pad_token_id is None else int(pad_token_id)
    keys = [key for key in batch[0] if batch[0][key] is not None]
    out: dict[str, Any] = {}
    for key in keys:
        values = [row.get(key) for row in batch]
        if key in LIST_KEYS or any(value is None for value in values):
            out[key] = list(values)
        elif _is_sequence_row(values[0]):
            out[key] = pad_rows(values, pad_id if key in ID_KEYS else 0)
        else:
            try:
                out[key] = default_collate(values)
            except (TypeError, RuntimeError):
                out[key] = list(values)
    return InputFeatures(**out)


def _is_sequence_row(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.dim() == 1
    return isinstance(value, (list, tuple)) and all(isinstance(item, int) for item in value)


def pad_rows(rows: Iterable[Sequence[int] | torch.Tensor], pad_value: int) -> torch.Tensor:
    """Stack 1-D rows into a ``[batch, longest]`` tensor, right-padded with ``pad_value``.

    Args:
        rows: Lists or 1-D tensors of ints.
        pad_value: The fill value.

    Returns:
        A long tensor (the dtype of tensor rows is kept).
    """
    tensors = [row if isinstance(row, torch.Tensor) else torch.tensor(list(row), dtype=torch.long) for row in rows]
    longest = max(tensor.shape[0] for tensor in tensors)
    out = tensors[0].new_full((len(tensors), longest), pad_value)
    for index, tensor in enumerate(tensors):
        out[index, : tensor.shape[0]] = tensor
    return out
