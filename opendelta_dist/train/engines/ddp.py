"""The ``ddp`` engine: every rank holds the whole model; gradients of the delta are all-reduced."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from opendelta_dist.basemodel import DeltaBase
from opendelta_dist.train.engines.base import OptimizerSpec
from opendelta_dist.train.engines.single import SingleEngine


class DDPEngine(SingleEngine):
    """PyTorch ``DistributedDataParallel``; frozen parameters get no gradient buckets."""

    name = "ddp"
    single_process = False

    def prepare(self, module: nn.Module, delta: DeltaBase | None, spec: OptimizerSpec) -> None:
        """As :meth:`SingleEngine.prepare`; a delta whose used parameters vary per step (robust AdapterDrop) makes
        DDP look for the unused ones after each forward (they keep no gradient, on every rank alike)."""
        self.varying = delta is not None and delta.robust_drop is not None
        super().prepare(module, delta, spec)

    def wrap(self, module: nn.Module) -> nn.Module:
        """Wrap in DDP (with one process, train as is)."""
        if not self.topology.distributed:
            return module
        device_ids = [self.topology.device.index] if self.topology.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=device_ids, find_unused_parameters=self.varying)

    def no_sync(self, last: bool) -> AbstractContextManager[Any]:
        """Skip the all-reduce on all but the last micro-batch of an optimizer step."""
        if last or not isinstance(self.model, DistributedDataParallel):
            return nullcontext()
        return self.model.no_sync()
