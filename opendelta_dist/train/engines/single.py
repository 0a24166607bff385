"""The ``single`` engine: one process, plain PyTorch. The base of ``ddp``."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from opendelta_dist.basemodel import DeltaBase
from opendelta_dist.saving import load_delta_tensors
from opendelta_dist.train.engines.base import Engine, OptimizerSpec

TRAINING_STATE = "training_state.pt"


class SingleEngine(Engine):
    """Trains the module as it is, on this process's device."""

    name = "single"

    def prepare(self, module: nn.Module, delta: DeltaBase, spec: OptimizerSpec) -> None:
        """Move the module to the device and build the optimizer over its trainable parameters."""
        self.spec = spec
        self.module = module.to(self.topology.device)
        self.model = self.wrap(self.module)
        self.optimizer = spec.build_optimizer([p for p in self.module.parameters() if p.requires_grad])
        self.scheduler = spec.build_scheduler(self.optimizer)

    def wrap(self, module: nn.Module) -> nn.Module:
        """The module forward is called on (subclasses wrap it)."""
        return module

    def optimized_parameters(self) -> list[nn.Parameter]:
        """Every parameter of every optimizer group."""
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def no_sync(self, last: bool) -> Any:
        """A context that skips gradient synchronisation before the last micro-batch (none here)."""
        return nullcontext()

    def micro_step(self, batch: dict[str, torch.Tensor], last: bool) -> torch.Tensor:
        """Forward + backward with the loss divided by the accumulation count."""
        assert self.model is not None
        with self.no_sync(last):
            loss = self.model(**batch).loss
            (loss / self.spec.grad_accum).backward()
        return loss.detach()

    def optimizer_step(self) -> float | None:
        """Clip, step, schedule, zero."""
        norm = None
        if self.spec.max_grad_norm is not None:
            norm = float(torch.nn.utils.clip_grad_norm_(self.optimized_parameters(), self.spec.max_grad_norm))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def gather_delta(self, delta: DeltaBase) -> dict[str, torch.Tensor]:
        """The delta's tensors, copied to CPU."""
        return {k: p.detach().to("cpu", copy=True) for k, p in delta.named_delta_tensors()}

    def load_delta(self, delta: DeltaBase, tensors: dict[str, torch.Tensor]) -> None:
        """Copy full tensors into the delta."""
        load_delta_tensors(delta, tensors)

    def save_training_state(self, directory: Path) -> None:
        """Rank 0 writes optimizer and schedule state (they are replicated)."""
        if self.topology.is_main:
            state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}
            torch.save(state, directory / TRAINING_STATE)

    def load_training_state(self, directory: Path) -> None:
        """Every rank reads the replicated state (tensors only: no code is unpickled)."""
        state = torch.load(directory / TRAINING_STATE, map_location=self.topology.device, weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
