"""What the engine tests share: the tiny T5, the batches of each step, a random delta."""

from __future__ import annotations

import torch
from transformers import T5ForConditionalGeneration

from opendelta_dist.basemodel import DeltaBase
from tests.models import T5_CONFIG

WORLD = 2
PER_RANK = 2  # sequences per rank and step: two micro-batches of one
CONFIG = T5_CONFIG


def tiny_t5(meta: bool = False) -> T5ForConditionalGeneration:
    """The tiny T5 (the same weights on every call, unless built on the meta device)."""
    torch.manual_seed(0)
    with torch.device("meta" if meta else "cpu"):
        return T5ForConditionalGeneration(CONFIG)


def global_batch(step: int) -> dict[str, torch.Tensor]:
    """The ``WORLD * PER_RANK`` sequences of optimizer step ``step``; every label counts in the loss."""
    gen = torch.Generator().manual_seed(1000 + step)
    n = WORLD * PER_RANK
    return {
        "input_ids": torch.randint(2, 99, (n, 7), generator=gen),
        "labels": torch.randint(2, 99, (n, 5), generator=gen),
    }


def micro_batches(step: int, rank: int) -> list[dict[str, torch.Tensor]]:
    """This rank's share of the global batch, one sequence per micro-batch."""
    batch = global_batch(step)
    return [{k: v[i : i + 1] for k, v in batch.items()} for i in range(rank * PER_RANK, (rank + 1) * PER_RANK)]


def random_delta(delta: DeltaBase) -> dict[str, torch.Tensor]:
    """Full tensors unlike the initial ones (LoRA's B and new biases start at zero), the same on every rank."""
    gen = torch.Generator().manual_seed(7)
    return {k: 0.1 * torch.randn(tuple(p.shape), generator=gen) for k, p in delta.named_delta_tensors()}
