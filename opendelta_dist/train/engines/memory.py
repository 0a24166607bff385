"""The data an engine's memory model reads and writes, shared by the engines and the estimator.

The estimator (:mod:`opendelta_dist.estimate`) counts a backbone's parameters and describes its blocks as a
:class:`Backbone`; each engine turns it into the per-GPU rows of weights, deltas and optimizer state
(:meth:`~opendelta_dist.train.engines.base.Engine.memory_rows`). This module imports nothing from the engines,
the recipe or the estimator, so that each of them can import it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

ADAMW_STATES = 2
"""AdamW keeps two moments (``exp_avg``, ``exp_avg_sq``) per trainable element."""


def dtype_name(dtype: torch.dtype) -> str:
    """``float32`` for ``torch.float32``."""
    return str(dtype).removeprefix("torch.")


def dtypes_label(counts: Mapping[torch.dtype, int]) -> str:
    """The dtypes of ``counts`` joined with ``+`` (``float32+bfloat16``), or ``no dtype``."""
    return "+".join(dtype_name(d) for d in counts) or "no dtype"


def ceil_div(a: int, b: int) -> int:
    """``a / b`` rounded up: the largest of ``b`` equal partitions of ``a``."""
    return -(-a // b)


@dataclass
class ParameterCounts:
    """Every parameter a GPU may hold, counted once (tied weights once), by dtype.

    Attributes:
        frozen: element counts of the parameters that do not train (the backbone's, originals that a delta
            copied, a delta's fixed tensors), by dtype.
        trainable: element counts of the parameters the optimizer updates, by dtype.
        delta: elements owned by delta modules (trainable or fixed).
        unfrozen_backbone: the backbone's own parameters left trainable (``unfrozen_modules``, full fine-tuning).
        copies: trainable delta parameters that start as copies of backbone parameters (whose originals stay).
    """

    frozen: dict[torch.dtype, int] = field(default_factory=dict)
    trainable: dict[torch.dtype, int] = field(default_factory=dict)
    delta: int = 0
    unfrozen_backbone: int = 0
    copies: int = 0

    @property
    def frozen_numel(self) -> int:
        """Frozen elements."""
        return sum(self.frozen.values())

    @property
    def trainable_numel(self) -> int:
        """Trainable elements."""
        return sum(self.trainable.values())

    @property
    def frozen_bytes(self) -> int:
        """Bytes of the frozen parameters in their own dtypes."""
        return sum(n * dtype.itemsize for dtype, n in self.frozen.items())

    @property
    def trainable_bytes(self) -> int:
        """Bytes of the trainable parameters in their own dtypes."""
        return sum(n * dtype.itemsize for dtype, n in self.trainable.items())

    def as_dict(self) -> dict[str, Any]:
        """Plain values for JSON: counts by dtype name and the totals."""
        return {
            "frozen": {dtype_name(d): n for d, n in self.frozen.items()},
            "trainable": {dtype_name(d): n for d, n in self.trainable.items()},
            "frozen_bytes": self.frozen_bytes,
            "trainable_bytes": self.trainable_bytes,
            "delta": self.delta,
            "unfrozen_backbone": self.unfrozen_backbone,
            "copies": self.copies,
        }


class BlockSize(Protocol):
    """The sizes of one transformer block (the estimator's ``BlockInfo`` has them)."""

    @property
    def unit_numel(self) -> int:
        """Parameters of the block without its delta modules (the block's FSDP unit)."""
        ...

    @property
    def numel(self) -> int:
        """All parameters of the block."""
        ...

    @property
    def kind(self) -> str:
        """``encoder`` or ``decoder``."""
        ...

    @property
    def first(self) -> bool:
        """The block is the first of its stack."""
        ...


@dataclass(frozen=True)
class Backbone:
    """What the engines' memory models need to know about the backbone and its delta.

    Attributes:
        counts: the parameter counts.
        blocks: the transformer blocks, in forward order.
        root_numel: parameters outside every block and delta module (embeddings, final norms, heads).
        parameter_sizes: elements and trainability (``requires_grad``) of every parameter the module holds
            now (each once), for engines that treat tensors by their size.
        model_dtype: the dtype the backbone is built in (``model.dtype``).
        tied_head_numel: parameters the LM head shares with the input embeddings (counted once above); 0 when
            the model has no tied head.
    """

    counts: ParameterCounts
    blocks: Sequence[BlockSize]
    root_numel: int
    parameter_sizes: Sequence[tuple[int, bool]]
    model_dtype: torch.dtype
    tied_head_numel: int = 0


@dataclass
class Row:
    """One category of the breakdown.

    Attributes:
        name: ``weights``, ``deltas``, ``optimizer``, ``activations`` or ``workspace``.
        gpu: bytes on each GPU.
        cpu: bytes in CPU memory per process (offloaded state).
        note: what the figure holds, in words.
    """

    name: str
    gpu: int
    cpu: int
    note: str


@dataclass
class EngineMemory:
    """What an engine holds per GPU, besides activations and the process's fixed workspace.

    Attributes:
        rows: the ``weights``, ``deltas`` and ``optimizer`` rows.
        workspace: buffers the engine adds to the workspace, in bytes by what they are (e.g. a gradient bucket).
    """

    rows: list[Row]
    workspace: dict[str, int] = field(default_factory=dict)
