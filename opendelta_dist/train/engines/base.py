"""The protocol every engine implements, and the optimizer/schedule description they share.

The recipe drives an engine like this, once per optimizer step::

    for i, micro_batch in enumerate(micro_batches):
        loss = engine.micro_step(micro_batch, last=i == len(micro_batches) - 1)
    grad_norm = engine.optimizer_step()

``micro_step`` runs forward and backward (dividing the loss by the accumulation count and skipping
gradient synchronisation until the last micro-batch, where the engine supports it);
``optimizer_step`` clips, steps the optimizer and the schedule, and zeroes the gradients.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from opendelta_dist.basemodel import DeltaBase
from opendelta_dist.errors import DeltaConfigError
from opendelta_dist.train.topology import Topology

OPTIMIZERS = ("adamw", "sgd")


@dataclass
class OptimizerSpec:
    """What to optimise with, independent of the engine.

    Attributes:
        name: ``"adamw"`` or ``"sgd"``.
        lr: peak learning rate.
        weight_decay: decoupled weight decay (AdamW) or L2 (SGD).
        betas: AdamW betas.
        eps: AdamW epsilon.
        momentum: SGD momentum.
        scheduler: a transformers schedule name: ``linear``, ``cosine``, ``constant``,
            ``constant_with_warmup``, ...
        warmup_steps: optimizer steps of linear warm-up.
        total_steps: optimizer steps of the whole run (the decay's horizon).
        max_grad_norm: clip the global gradient norm to this (None: no clipping).
        grad_accum: micro-batches per optimizer step.
    """

    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    momentum: float = 0.0
    scheduler: str = "linear"
    warmup_steps: int = 0
    total_steps: int = 100
    max_grad_norm: float | None = 1.0
    grad_accum: int = 1

    def build_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        """A torch optimizer over ``params``.

        Raises:
            DeltaConfigError: unknown optimizer name.
        """
        if self.name == "adamw":
            return torch.optim.AdamW(
                params, lr=self.lr, betas=tuple(self.betas), eps=self.eps, weight_decay=self.weight_decay
            )
        if self.name == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        raise DeltaConfigError(f"unknown optimizer {self.name!r}; choose one of {', '.join(OPTIMIZERS)}")

    def build_scheduler(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        """The warm-up + decay schedule (transformers' ``get_scheduler``)."""
        from transformers import get_scheduler

        try:
            return get_scheduler(
                self.scheduler, optimizer, num_warmup_steps=self.warmup_steps, num_training_steps=self.total_steps
            )
        except ValueError as exc:
            raise DeltaConfigError(f"unknown scheduler {self.scheduler!r}: {exc}") from exc


class Engine(ABC):
    """Wraps/shards a backbone (with its delta attached and the rest frozen) and trains it.

    Args:
        topology: this process's rank, world size and device.
    """

    name: ClassVar[str]

    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        self.model: nn.Module | None = None  # what forward is called on (wrapped)
        self.module: nn.Module | None = None  # the backbone itself
        self.optimizer: Any = None
        self.scheduler: Any = None
        self.spec = OptimizerSpec()

    # ----------------------------------------------------------------- set-up

    @abstractmethod
    def prepare(self, module: nn.Module, delta: DeltaBase, spec: OptimizerSpec) -> None:
        """Wrap/shard ``module`` and build the optimizer over its trainable parameters only.

        ``module`` has its delta attached and is frozen except for the delta (and explicitly unfrozen
        parameters) when this is called.
        """

    @abstractmethod
    def optimized_parameters(self) -> list[nn.Parameter]:
        """The module's parameters the optimizer updates (for the inspector)."""

    # ----------------------------------------------------------------- training

    @abstractmethod
    def micro_step(self, batch: dict[str, torch.Tensor], last: bool) -> torch.Tensor:
        """Forward and backward of one micro-batch; returns the (detached, unscaled) loss."""

    @abstractmethod
    def optimizer_step(self) -> float | None:
        """Clip, step the optimizer and the schedule, zero the gradients; returns the gradient norm."""

    def eval_forward(self, batch: dict[str, torch.Tensor]) -> Any:
        """Forward without gradients, in eval mode is the caller's business."""
        assert self.model is not None
        with torch.no_grad():
            return self.model(**batch)

    def lr(self) -> float:
        """The current learning rate (first parameter group)."""
        return float(self.optimizer.param_groups[0]["lr"])

    # ----------------------------------------------------------------- state

    @abstractmethod
    def gather_delta(self, delta: DeltaBase) -> dict[str, torch.Tensor]:
        """The delta's full, unsharded tensors on CPU, keyed as in a delta checkpoint.

        Collective: every rank calls it; rank 0's result is complete (others may be empty).
        """

    @abstractmethod
    def load_delta(self, delta: DeltaBase, tensors: dict[str, torch.Tensor]) -> None:
        """Copy full tensors (a checkpoint's) into the delta, sharding them as the engine does. Collective."""

    @abstractmethod
    def save_training_state(self, directory: Path) -> None:
        """Write optimizer and schedule state under ``directory``. Collective."""

    @abstractmethod
    def load_training_state(self, directory: Path) -> None:
        """Read what :meth:`save_training_state` wrote. Collective."""

    def close(self) -> None:
        """Release what the engine holds (nothing by default)."""
        return None
