"""The ``single`` engine: one process, plain PyTorch. The base of ``ddp``."""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from opendelta_dist.backends import full_tensor
from opendelta_dist.basemodel import DeltaBase
from opendelta_dist.saving import load_delta_tensors
from opendelta_dist.train.engines.base import OptimizerSpec, TorchOptimizerEngine, check_precision
from opendelta_dist.train.engines.memory import ADAMW_STATES, Backbone, EngineMemory, Row, dtypes_label


class SingleEngine(TorchOptimizerEngine):
    """Trains the module as it is, on this process's device.

    Args:
        topology: this process's rank, world size and device.
        precision: ``"bf16"`` to run forward under autocast to bf16 (parameters, gradients and optimizer
            state stay in their own dtype); None to compute in the parameters' dtype.
    """

    name = "single"
    supports_full_fine_tuning = True
    single_process = True

    def __init__(self, topology: Any, precision: str | None = None) -> None:
        super().__init__(topology)
        self.precision = precision
        self.autocast_dtype = check_precision(self.name, precision, self.precisions)

    def compute_context(self) -> AbstractContextManager[Any]:
        """Autocast to ``precision`` where it is set."""
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.topology.device.type, dtype=self.autocast_dtype)

    def eval_forward(self, batch: dict[str, torch.Tensor]) -> Any:
        """Forward without gradients, under the training's autocast."""
        with self.compute_context():
            return super().eval_forward(batch)

    def prepare(self, module: nn.Module, delta: DeltaBase | None, spec: OptimizerSpec) -> None:
        """Move the module to the device and build the optimizer over its trainable parameters."""
        self.module = module.to(self.topology.device)
        self.model = self.wrap(self.module)
        self.build_optimizer(self.module, spec)

    def wrap(self, module: nn.Module) -> nn.Module:
        """The module forward is called on (subclasses wrap it)."""
        return module

    def gather_delta(self, delta: DeltaBase) -> dict[str, torch.Tensor]:
        """The delta's whole tensors, copied to CPU."""
        return {k: full_tensor(p).to("cpu", copy=True) for k, p in delta.named_delta_tensors()}

    def load_delta(self, delta: DeltaBase, tensors: dict[str, torch.Tensor]) -> None:
        """Copy full tensors into the delta."""
        load_delta_tensors(delta, tensors)

    def save_training_state(self, directory: Path) -> None:
        """Rank 0 writes optimizer and schedule state (they are replicated)."""
        self.write_training_state(directory, self.optimizer.state_dict())

    def load_training_state(self, directory: Path) -> None:
        """Every rank reads the replicated state."""
        self.optimizer.load_state_dict(self.read_training_state(directory, self.topology.device))

    @classmethod
    def memory_rows(cls, backbone: Backbone, world_size: int, options: Mapping[str, Any]) -> EngineMemory:
        """Every GPU holds the whole model in its own dtype and computes in it.

        Gradients exist for the trainable parameters only, in their dtype; with more than one process
        (``ddp``) DDP also keeps its all-reduce buckets, one more gradient-sized copy
        (``gradient_as_bucket_view`` off). AdamW keeps its moments in the parameters' dtype.

        Args:
            backbone: the backbone, as counted by the estimator.
            world_size: the run's processes.
            options: the engine's options (none change the memory).

        Returns:
            The rows; nothing in the workspace.
        """
        c = backbone.counts
        buckets = c.trainable_bytes if world_size > 1 else 0
        return EngineMemory(
            [
                Row("weights", c.frozen_bytes, 0, f"the whole frozen backbone in {dtypes_label(c.frozen)}"),
                Row(
                    "deltas",
                    2 * c.trainable_bytes + buckets,
                    0,
                    "trainable parameters and their gradients" + (", DDP all-reduce buckets" if buckets else ""),
                ),
                Row("optimizer", ADAMW_STATES * c.trainable_bytes, 0, "AdamW moments in the parameters' dtype"),
            ]
        )
