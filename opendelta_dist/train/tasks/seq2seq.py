"""``seq2seq`` (text to text): an encoder-decoder LM head, teacher-forced cross entropy, exact match."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from opendelta_dist.train.data import IGNORE_INDEX, TokenizedDataset, collate
from opendelta_dist.train.metrics import seq2seq_predictions, teacher_forced_exact_match
from opendelta_dist.train.tasks.base import EvalSums, Task


class Seq2Seq(Task):
    """Text in, text out: ``AutoModelForSeq2SeqLM``; the targets (with end-of-sequence) are the labels."""

    name = "seq2seq"
    metric = "exact_match"
    targets = "text"

    @classmethod
    def model_head(cls, model_type: str | None) -> str:
        """``seq2seq`` for every model type."""
        return "seq2seq"

    def dataset(self, rows: list[dict[str, Any]], tokenizer: Any) -> Dataset:
        """Rows tokenized up front; targets longer than ``data.max_target_length`` are refused."""
        return TokenizedDataset(rows, tokenizer, self.data, targets="text")

    def collate(self, items: list[dict[str, Any]], tokenizer: Any) -> dict[str, torch.Tensor]:
        """Right padding to the longest row; padded label positions are -100."""
        return collate(items, tokenizer.pad_token_id or 0)

    def eval_sums(self, output: Any, batch: Mapping[str, torch.Tensor]) -> EvalSums:
        """Per-example mean token cross entropy and teacher-forced exact match."""
        logits, labels = output.logits.float(), batch["labels"]
        token_losses = nn.functional.cross_entropy(
            logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none"
        )
        losses = token_losses.sum(-1) / (labels != IGNORE_INDEX).sum(-1).clamp(min=1)
        correct, total = teacher_forced_exact_match(logits, labels)
        return correct, total, float(losses.sum()), int(losses.numel())

    @torch.no_grad()
    def predict(self, module: nn.Module, batch: Mapping[str, torch.Tensor], tokenizer: Any) -> list[Any]:
        """Greedy-decoded text (at most ``data.max_target_length`` tokens)."""
        return seq2seq_predictions(module, dict(batch), tokenizer, self.data.max_target_length)
