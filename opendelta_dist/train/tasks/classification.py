"""``classification``: a sequence-classification head on the backbone, cross entropy, accuracy."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from opendelta_dist.train.data import TokenizedDataset, collate
from opendelta_dist.train.metrics import accuracy
from opendelta_dist.train.tasks.base import EvalSums, Task


def class_sums(logits: torch.Tensor, labels: torch.Tensor) -> EvalSums:
    """Evaluation sums of class logits ``[batch, classes]``: per-example cross entropy and accuracy."""
    logits = logits.float()
    losses = nn.functional.cross_entropy(logits, labels, reduction="none")
    correct, total = accuracy(logits, labels)
    return correct, total, float(losses.sum()), int(losses.numel())


class Classification(Task):
    """Text in, one class out: ``AutoModelForSequenceClassification`` with ``model.num_labels`` classes."""

    name = "classification"
    metric = "accuracy"
    targets = "class"

    @classmethod
    def model_head(cls, model_type: str | None) -> str:
        """``classification`` for every model type."""
        return "classification"

    def dataset(self, rows: list[dict[str, Any]], tokenizer: Any) -> Dataset:
        """Rows tokenized up front (``input_ids``, ``attention_mask``, the class id as ``labels``)."""
        return TokenizedDataset(rows, tokenizer, self.data, targets="class")

    def collate(self, items: list[dict[str, Any]], tokenizer: Any) -> dict[str, torch.Tensor]:
        """Right padding to the longest row."""
        return collate(items, tokenizer.pad_token_id or 0)

    def eval_sums(self, output: Any, batch: Mapping[str, torch.Tensor]) -> EvalSums:
        """Per-example cross entropy and accuracy."""
        return class_sums(output.logits, batch["labels"])

    @torch.no_grad()
    def predict(self, module: nn.Module, batch: Mapping[str, torch.Tensor], tokenizer: Any) -> list[Any]:
        """The arg-max class, by name where ``data.label_names`` names the classes."""
        classes = module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.argmax(-1)
        names = self.data.label_names
        return [names[int(c)] if names else int(c) for c in classes]
