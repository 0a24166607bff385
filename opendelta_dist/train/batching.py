"""Batches of a run: the global batch split over ranks and accumulation steps, and a sampler that gives every
rank its own rows, resumable at any step (its position is part of a checkpoint)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from opendelta_dist.train.data import DataError, collate

# ----------------------------------------------------------------------------------------- batching


def check_batch(global_batch_size: int, world_size: int, grad_accum: int) -> int:
    """The per-rank micro batch size that makes ``global_batch_size`` examples per optimizer step.

    Args:
        global_batch_size: examples per optimizer step, over all ranks and accumulation steps.
        world_size: number of ranks.
        grad_accum: micro batches accumulated per optimizer step.

    Returns:
        ``global_batch_size // (world_size * grad_accum)``.

    Raises:
        DataError: a value is not positive, or the global batch does not divide.
    """
    for name, value in (
        ("global batch", global_batch_size),
        ("world size", world_size),
        ("gradient accumulation", grad_accum),
    ):
        if value < 1:
            raise DataError(f"{name} must be at least 1, got {value}")
    per_step = world_size * grad_accum
    if global_batch_size % per_step:
        lower = global_batch_size // per_step * per_step
        options = f"{lower} or {lower + per_step}" if lower else f"{per_step}"
        raise DataError(
            f"global batch {global_batch_size} is not divisible by world size {world_size} x gradient "
            f"accumulation {grad_accum}; choose a global batch that is a multiple of {per_step} "
            f"(e.g. {options}), or change the gradient accumulation"
        )
    return global_batch_size // per_step


class ShardedBatchSampler:
    """Batches of dataset indices for one rank, the same on every run and resumable mid-epoch.

    Each epoch orders the indices by a permutation seeded with ``seed + epoch`` (or in order when
    ``shuffle=False``) and cuts the order into global batches of ``batch_size * world_size``
    consecutive indices; rank ``r`` takes positions ``[r * batch_size, (r + 1) * batch_size)`` of each.
    All ranks therefore see disjoint examples and the same number of batches.

    With ``drop_last=False`` (evaluation) every example is used exactly once: the last, smaller
    global batch is split as evenly as possible (shares differ by at most one); when it has fewer
    examples than ranks it is merged into the global batch before it, so no rank gets an empty
    batch and a rank's last batch may hold up to ``batch_size + 1`` examples.

    Epochs and resuming: the sampler counts ``batches_done`` in the current epoch; a batch counts as
    done as soon as it is handed out (exact with ``num_workers=0``, which fetches nothing ahead).
    When an iteration runs to the end of the epoch, the sampler moves to the next epoch by itself,
    so a training loop is simply::

        while step < max_steps:
            for batch in loader:  # one pass = the rest of the current epoch
                ...

    Leaving the ``for`` early keeps the position; the next ``iter`` continues the same epoch.
    ``state_dict()`` saved after a step and ``load_state_dict()`` in a fresh process continue with
    the very next batch. Use one iterator at a time.
    """

    def __init__(
        self,
        num_examples: int,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        shuffle: bool = True,
        drop_last: bool = True,
    ) -> None:
        """Check the shape of the run.

        Args:
            num_examples: size of the dataset.
            batch_size: examples per batch on this rank.
            rank: this rank, ``0 <= rank < world_size``.
            world_size: number of ranks.
            seed: base of the per-epoch permutation seed (``seed + epoch``).
            shuffle: permute the indices each epoch.
            drop_last: drop the last global batch when it is not full (training).

        Raises:
            DataError: a bad rank or size, or too few examples for one batch on every rank.
        """
        if batch_size < 1 or world_size < 1:
            raise DataError(f"batch size and world size must be at least 1, got {batch_size} and {world_size}")
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside world size {world_size}")
        global_batch = batch_size * world_size
        if drop_last and num_examples < global_batch:
            raise DataError(
                f"{num_examples} examples are fewer than one global batch of {global_batch} "
                f"({batch_size} per rank x {world_size} ranks), so an epoch would be empty; "
                "lower the batch size or use more data"
            )
        if num_examples < world_size:
            raise DataError(f"{num_examples} examples cannot give each of {world_size} ranks a batch; use more data")
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.epoch = 0
        self.batches_done = 0

    def _global_batches(self) -> list[tuple[int, int]]:
        """``(start, size)`` of each global batch in the epoch's order."""
        global_batch = self.batch_size * self.world_size
        full, rest = divmod(self.num_examples, global_batch)
        batches = [(i * global_batch, global_batch) for i in range(full)]
        if rest and not self.drop_last:
            if rest < self.world_size and batches:  # too few to give every rank one: join the previous batch
                start, size = batches.pop()
                batches.append((start, size + rest))
            else:
                batches.append((full * global_batch, rest))
        return batches

    def _epoch_batches(self) -> list[list[int]]:
        """This rank's batches of the current epoch."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_examples, generator=generator).tolist()
        else:
            order = list(range(self.num_examples))
        batches = []
        for start, size in self._global_batches():
            share, extra = divmod(size, self.world_size)
            first = start + self.rank * share + min(self.rank, extra)  # ranks below `extra` take one more
            batches.append(order[first : first + share + (self.rank < extra)])
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        """Yield the remaining batches of the current epoch, then move to the next epoch."""
        if self.batches_done >= len(self):  # a state saved right after an epoch's last batch
            self.set_epoch(self.epoch + 1)
        for batch in self._epoch_batches()[self.batches_done :]:
            self.batches_done += 1  # counted before handing out: a checkpoint taken after this step skips it
            yield batch
        self.set_epoch(self.epoch + 1)

    def __len__(self) -> int:
        """Batches per epoch (the whole epoch, not what is left of it)."""
        return len(self._global_batches())

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` from its first batch.

        Args:
            epoch: the epoch number (its permutation is seeded with ``seed + epoch``).
        """
        self.epoch = epoch
        self.batches_done = 0

    def state_dict(self) -> dict[str, int]:
        """The position: ``{"epoch": int, "batches_done": int}`` (batches of that epoch handed out)."""
        return {"epoch": self.epoch, "batches_done": self.batches_done}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a position saved by :meth:`state_dict`.

        Args:
            state: ``{"epoch": int, "batches_done": int}``.

        Raises:
            DataError: the state does not fit this sampler (missing keys, or more batches than an epoch has).
        """
        try:
            epoch, done = int(state["epoch"]), int(state["batches_done"])
        except (KeyError, TypeError, ValueError) as error:
            raise DataError(f"sampler state {state!r} needs integer 'epoch' and 'batches_done'") from error
        if epoch < 0 or not 0 <= done <= len(self):
            raise DataError(
                f"sampler state {state!r} does not fit an epoch of {len(self)} batches; was the checkpoint "
                "written with another data set, batch size or world size?"
            )
        self.epoch = epoch
        self.batches_done = done


def build_dataloader(
    dataset: Dataset,
    batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
    shuffle: bool,
    pad_token_id: int,
    drop_last: bool | None = None,
    collate_fn: Callable[[list[Any]], Any] | None = None,
) -> DataLoader:
    """A loader of padded batches for one rank, driven by a :class:`ShardedBatchSampler`.

    Args:
        dataset: a :class:`TokenizedDataset` (or any sized dataset of such items).
        batch_size: examples per batch on this rank.
        rank: this rank.
        world_size: number of ranks.
        seed: sampler seed.
        shuffle: permute each epoch (training) or keep order (evaluation).
        pad_token_id: the tokenizer's pad id.
        drop_last: drop the ragged last global batch; ``None`` means the same as ``shuffle``
            (training drops it, evaluation keeps every example).
        collate_fn: makes a batch of items (a task's ``collate``); None pads token ids with ``pad_token_id``.

    Returns:
        The loader (``num_workers=0``); its sampler is ``loader.batch_sampler``.

    Raises:
        DataError: as :class:`ShardedBatchSampler`.
    """
    sampler = ShardedBatchSampler(
        len(dataset),  # type: ignore[arg-type]
        batch_size,
        rank,
        world_size,
        seed,
        shuffle=shuffle,
        drop_last=shuffle if drop_last is None else drop_last,
    )
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate_fn or functools.partial(collate, pad_token_id=pad_token_id),
        num_workers=0,
    )
