"""Evaluation metrics: accuracy for classification, exact match for seq2seq, summed over all ranks.

Every metric is kept as integer counts ``(correct, total)`` on each rank and only divided at the
end, after the counts of all ranks are summed: the result is the same for any world size.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import transformers
from torch import nn

from opendelta_dist.train.data import IGNORE_INDEX


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """Count arg-max predictions equal to the labels; labels equal to -100 are not counted.

    Args:
        logits: ``[..., num_classes]`` scores.
        labels: ``[...]`` class ids (the shape of ``logits`` without its last dimension).

    Returns:
        ``(correct, total)``.

    Raises:
        ValueError: the shapes do not fit.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not fit labels {tuple(labels.shape)}")
    counted = labels != IGNORE_INDEX
    correct = (logits.argmax(dim=-1) == labels) & counted
    return int(correct.sum()), int(counted.sum())


def teacher_forced_exact_match(logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """Count sequences whose every target token is the arg-max under teacher forcing.

    This equals the exact match of greedy decoding when the targets end with the end-of-sequence
    token (decoding reproduces a target exactly when each next token is the arg-max given the right
    prefix), and it needs a single forward, the same on every rank, so sharded engines never wait
    on each other the way a ``generate`` loop of data-dependent length would make them.

    Args:
        logits: ``[batch, target_length, vocab]`` decoder scores.
        labels: ``[batch, target_length]`` target ids, ``-100`` where padded.

    Returns:
        ``(correct, total)`` over sequences.
    """
    hits = ((logits.argmax(dim=-1) == labels) | (labels == IGNORE_INDEX)).all(dim=-1)
    return int(hits.sum()), int(labels.shape[0])


def normalise_text(text: str) -> str:
    """The form compared by :func:`exact_match`: lower case, whitespace runs as one space, no outer spaces.

    Args:
        text: a prediction or reference.

    Returns:
        The normalised text.
    """
    return " ".join(text.split()).lower()


def exact_match(predictions: list[str], references: list[str]) -> tuple[int, int]:
    """Count predictions equal to their reference after :func:`normalise_text` (case and spacing ignored).

    Args:
        predictions: generated texts.
        references: target texts, in the same order.

    Returns:
        ``(correct, total)``.

    Raises:
        ValueError: the lists differ in length.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    correct = sum(normalise_text(p) == normalise_text(r) for p, r in zip(predictions, references))
    return correct, len(references)


@torch.no_grad()
def seq2seq_predictions(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    tokenizer: transformers.PreTrainedTokenizerBase,
    max_new_tokens: int,
) -> list[str]:
    """Greedy-decode a batch and return the texts (special tokens removed).

    Call it on the unwrapped model (``ddp_model.module``; for sharded engines, the module whose
    forward the engine has wrapped): wrappers such as DDP have no ``generate``. Put the model in
    ``eval()`` mode first. Under FSDP or ZeRO-3 every rank must call it with a batch.

    Args:
        model: a transformers encoder-decoder model.
        batch: a collated batch (``input_ids`` and ``attention_mask`` are used).
        tokenizer: decodes the generated ids.
        max_new_tokens: at most this many generated tokens (``DataConfig.max_target_length`` fits).

    Returns:
        One prediction per example.

    Raises:
        TypeError: ``model`` has no ``generate`` (a wrapper was passed).
    """
    if not hasattr(model, "generate"):
        raise TypeError(f"{type(model).__name__} has no generate(); pass the unwrapped model (e.g. ddp_model.module)")
    generated = model.generate(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
    )
    return tokenizer.batch_decode(generated, skip_special_tokens=True)


def reference_texts(labels: torch.Tensor, tokenizer: transformers.PreTrainedTokenizerBase) -> list[str]:
    """Decode collated seq2seq ``labels`` back to text, the way predictions are decoded.

    Decoding both sides with the same tokenizer compares like with like; with the byte-level
    tokenizer the result is the target text exactly (targets are never truncated, see
    ``DataConfig.max_target_length``).

    Args:
        labels: ``[batch, length]`` target ids padded with -100.
        tokenizer: the tokenizer that made them.

    Returns:
        One reference per example.
    """
    ids = labels.masked_fill(labels == IGNORE_INDEX, tokenizer.pad_token_id or 0)
    return tokenizer.batch_decode(ids, skip_special_tokens=True)


class MetricAccumulator:
    """Sums ``correct``, ``total``, ``loss_sum`` and ``loss_count`` over batches, then over ranks."""

    def __init__(self, metric_name: str) -> None:
        """Start from zero.

        Args:
            metric_name: the key of the task metric in :meth:`compute` (a task's ``metric``).
        """
        self.metric_name = metric_name
        self.reset()

    def reset(self) -> None:
        """Zero all sums."""
        self.correct = 0
        self.total = 0
        self.loss_sum = 0.0
        self.loss_count = 0

    def update(self, correct: int = 0, total: int = 0, loss_sum: float = 0.0, loss_count: int = 0) -> None:
        """Add one batch.

        Args:
            correct: correct predictions in the batch.
            total: predictions counted in the batch.
            loss_sum: the batch's loss times ``loss_count`` (e.g. a mean loss times the batch size).
            loss_count: how many items ``loss_sum`` covers.
        """
        self.correct += correct
        self.total += total
        self.loss_sum += loss_sum
        self.loss_count += loss_count

    def compute(self, device: torch.device | str = "cpu") -> dict[str, float]:
        """The loss and the metric over all batches and, when ``torch.distributed`` is initialised, all ranks.

        With a process group every rank must call it (it is a collective ``all_reduce``); all ranks
        get the same result. The local sums are not changed.

        Args:
            device: where the reduced tensor lives (``cuda`` for NCCL, ``cpu`` for gloo).

        Returns:
            ``{"loss": loss_sum / loss_count, metric_name: correct / total}``; NaN where a count is 0.
        """
        sums = torch.tensor(
            [self.correct, self.total, self.loss_sum, self.loss_count], dtype=torch.float64, device=device
        )
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(sums, op=dist.ReduceOp.SUM)
        correct, total, loss_sum, loss_count = sums.tolist()
        return {
            "loss": loss_sum / loss_count if loss_count else float("nan"),
            self.metric_name: correct / total if total else float("nan"),
        }
