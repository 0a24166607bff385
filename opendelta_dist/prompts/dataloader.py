"""``PromptDataLoader`` (OpenPrompt 1.0.1's signature and defaults) and the pieces it is made of, usable on
their own: :func:`example_to_features` wraps and tokenizes one example, :func:`collate` /
:func:`make_collate` pad a batch to its longest row.

A distributed run keeps its own ``DataLoader`` and sampler (which shard rows over ranks)::

    dataset = [example_to_features(e, template, wrapper) for e in examples]
    loader = DataLoader(dataset, batch_size=8, sampler=DistributedSampler(dataset), collate_fn=make_collate(tokenizer))

Unlike 1.0.1, rows are padded per batch to the longest row (not to ``max_seq_length``; rows are still
truncated to it), and ``decoder_max_length=-1`` sizes encoder-decoder rows to their content.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from torch.utils.data import DataLoader, RandomSampler

from opendelta_dist.prompts.data import InputExample, InputFeatures, collate
from opendelta_dist.prompts.errors import WrappingError
from opendelta_dist.prompts.wrappers import TokenizerWrapper

__all__ = ["PromptDataLoader", "collate", "example_to_features", "make_collate", "wrapper_init_kwargs"]


def wrapper_init_kwargs(wrapper_class: type, candidates: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Split keyword arguments into those a wrapper class's ``__init__`` names and the rest.

    Args:
        wrapper_class: A tokenizer-wrapper class.
        candidates: Arguments on offer.

    Returns:
        ``(accepted, dropped_names)``.
    """
    names = set()
    for cls in wrapper_class.__mro__:
        init = cls.__dict__.get("__init__")
        if init is None:
            continue
        for parameter in inspect.signature(init).parameters.values():
            if parameter.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY):
                names.add(parameter.name)
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(init).parameters.values()):
            break  # this __init__ does not pass extra keywords further up
    accepted = {key: value for key, value in candidates.items() if key in names}
    return accepted, [key for key in candidates if key not in names]


def example_to_features(
    example: InputExample,
    template: Any,
    tokenizer_wrapper: TokenizerWrapper,
    verbalizer: Any = None,
    teacher_forcing: bool = False,
) -> InputFeatures:
    """Wrap one example with the template (and verbalizer) and tokenize it into an unpadded feature row.

    Args:
        example: The example (a verbalizer with ``wrap_one_example``, such as ``GenerationVerbalizer``, may
            fill its ``tgt_text`` first, as in OpenPrompt).
        template: The template.
        tokenizer_wrapper: The tokenizer wrapper.
        verbalizer: Optional verbalizer.
        teacher_forcing: Fill the masks with ``tgt_text``.

    Returns:
        An ``InputFeatures`` of 1-D tensors (plus ``guid``, ``label``, ``tgt_text`` when the example has them).

    Raises:
        TemplateError: from the template.
        WrappingError: from the wrapper.
    """
    if verbalizer is not None and hasattr(verbalizer, "wrap_one_example"):
        example = verbalizer.wrap_one_example(example)
    wrapped = template.wrap_one_example(example)
    return _features(tokenizer_wrapper.tokenize_one_example(wrapped, teacher_forcing), wrapped[1])


def _features(tokenized: Mapping[str, Any], others: Mapping[str, Any]) -> InputFeatures:
    known = set(InputFeatures.all_keys)
    extra = {key: value for key, value in others.items() if key in known and key not in tokenized}
    return InputFeatures(**tokenized, **extra).to_tensor()


def make_collate(tokenizer: Any) -> Callable[[Sequence[Mapping[str, Any]]], InputFeatures]:
    """A collate function padding ``input_ids``/``decoder_input_ids`` with the tokenizer's pad id.

    Args:
        tokenizer: A tokenizer or a tokenizer wrapper (its ``pad_token_id``; 0 when it has none).

    Returns:
        ``collate`` with ``pad_token_id`` bound (picklable, for ``DataLoader`` workers).
    """
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    return functools.partial(collate, pad_token_id=getattr(tokenizer, "pad_token_id", None))


class PromptDataLoader:
    """Wraps every example with the template, tokenizes it, and batches the rows (OpenPrompt 1.0.1's API).

    Examples are wrapped and tokenized once, in ``__init__`` (``wrapped_dataset``, ``tensor_dataset``);
    batches are ``InputFeatures`` padded to their longest row.

    Args:
        dataset: A list (or sized iterable) of ``InputExample``.
        template: The template.
        tokenizer_wrapper: A ready tokenizer wrapper; otherwise one is built from the next two.
        tokenizer: The tokenizer.
        tokenizer_wrapper_class: The wrapper class (``load_plm`` returns it).
        verbalizer: Optional; its ``wrap_one_example`` runs first when it has one.
        max_seq_length: Longest (encoder) row.
        batch_size: Rows per batch.
        shuffle: Shuffle every epoch.
        teacher_forcing: Fill the masks with ``tgt_text`` (generation training).
        decoder_max_length: Longest decoder row; ``-1``: as long as each row needs.
        predict_eos_token: Predict the eos token (generation).
        truncate_method: ``"tail"``, ``"head"`` or ``"balanced"``.
        drop_last: Drop the last incomplete batch.
        kwargs: More wrapper arguments (e.g. ``create_token_type_ids``); those the wrapper does not take are
            dropped with a warning.

    Raises:
        WrappingError: without a wrapper or the means to build one, or for an empty dataset.
    """

    def __init__(
        self,
        dataset: Iterable[InputExample],
        template: Any,
        tokenizer_wrapper: TokenizerWrapper | None = None,
        tokenizer: Any = None,
        tokenizer_wrapper_class: type[TokenizerWrapper] | None = None,
        verbalizer: Any = None,
        max_seq_length: int = 512,
        batch_size: int = 1,
        shuffle: bool = False,
        teacher_forcing: bool = False,
        decoder_max_length: int = -1,
        predict_eos_token: bool = False,
        truncate_method: str = "tail",
        drop_last: bool = False,
        **kwargs: Any,
    ) -> None:
        if not hasattr(dataset, "__iter__") or not hasattr(dataset, "__len__"):
            raise WrappingError(
                f"the dataset must be a list or another sized iterable of InputExample, got {type(dataset).__name__}"
            )
        self.raw_dataset = dataset
        self.template = template
        self.verbalizer = verbalizer
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.teacher_forcing = teacher_forcing
        if tokenizer_wrapper is None:
            if tokenizer_wrapper_class is None:
                raise WrappingError(
                    "PromptDataLoader needs tokenizer_wrapper, or tokenizer_wrapper_class and tokenizer (load_plm "
                    "returns the wrapper class as its fourth value)"
                )
            if tokenizer is None:
                raise WrappingError("tokenizer_wrapper_class is given without a tokenizer; pass tokenizer=...")
            offered = {
                "max_seq_length": max_seq_length,
                "truncate_method": truncate_method,
                "decoder_max_length": decoder_max_length,
                "predict_eos_token": predict_eos_token,
                "tokenizer": tokenizer,
            }
            accepted, _ = wrapper_init_kwargs(tokenizer_wrapper_class, {**offered, **kwargs})
            _, dropped = wrapper_init_kwargs(tokenizer_wrapper_class, kwargs)
            if dropped:
                warnings.warn(
                    f"{tokenizer_wrapper_class.__name__} takes no argument {', '.join(dropped)}; ignored",
                    stacklevel=2,
                )
            tokenizer_wrapper = tokenizer_wrapper_class(**accepted)
        self.tokenizer_wrapper = tokenizer_wrapper
        self.wrapped_dataset: list[Any] = []
        self.tensor_dataset: list[InputFeatures] = []
        self.wrap()
        self.tokenize()
        self.dataloader = DataLoader(
            self.tensor_dataset,
            batch_size=batch_size,
            sampler=RandomSampler(self.tensor_dataset) if shuffle else None,
            collate_fn=make_collate(self.tokenizer_wrapper),
            drop_last=drop_last,
        )

    def wrap(self) -> None:
        """Wrap every example with the verbalizer (if it wraps) and the template into ``wrapped_dataset``.

        Raises:
            WrappingError: for an empty dataset.
        """
        if len(self.raw_dataset) == 0:  # type: ignore[arg-type]
            raise WrappingError("the dataset to wrap is empty; give PromptDataLoader at least one InputExample")
        for example in self.raw_dataset:
            if self.verbalizer is not None and hasattr(self.verbalizer, "wrap_one_example"):
                example = self.verbalizer.wrap_one_example(example)
            self.wrapped_dataset.append(self.template.wrap_one_example(example))

    def tokenize(self) -> None:
        """Tokenize every wrapped example into ``tensor_dataset`` (unpadded ``InputFeatures`` rows)."""
        for wrapped in self.wrapped_dataset:
            tokenized = self.tokenizer_wrapper.tokenize_one_example(wrapped, self.teacher_forcing)
            self.tensor_dataset.append(_features(tokenized, wrapped[1]))

    def __len__(self) -> int:
        return len(self.dataloader)

    def __iter__(self) -> Iterator[InputFeatures]:
        return iter(self.dataloader)
