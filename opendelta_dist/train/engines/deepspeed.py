"""The ``deepspeed`` engine: DeepSpeed ZeRO stage 2 or 3, optionally offloading to CPU.

The DeepSpeed config is built here from the constructor's options and the :class:`OptimizerSpec`
(no JSON file); ``extra_config`` is merged over it for anything else. The optimizer is a torch one
over the trainable parameters only (so DeepSpeed compiles no ``fused_adam``); with optimizer offload
an AdamW spec becomes DeepSpeed's ``DeepSpeedCPUAdam`` (compiled on first use).

Where the state lives:

- stage 2: every rank holds the whole (mostly frozen) model; the delta's fp32 master weights,
  gradients and optimizer state are partitioned over the ranks.
- stage 3: the model's parameters, frozen ones included, are partitioned too; a parameter outside a
  forward is a ``[0]``-shaped placeholder, so :meth:`DeepSpeedEngine.gather_delta` gathers them.

With ``bf16`` the module computes in bf16 and the optimizer keeps fp32 master weights; the engine
reads and writes the delta through those masters, so a gathered delta holds the full fp32 values and
a loaded one resumes exactly.

How the protocol maps onto DeepSpeed: ``micro_step`` marks the last micro-batch of an optimizer step
as DeepSpeed's gradient accumulation boundary (``set_gradient_accumulation_boundary``), runs the
forward and ``engine.backward``, which divides the loss by ``gradient_accumulation_steps``
(``spec.grad_accum``; the engine does not divide it again) and reduces the gradients into their
partitions. ``optimizer_step`` calls ``engine.step()`` once, at that boundary: DeepSpeed clips to
``spec.max_grad_norm``, steps the ZeRO optimizer and the schedule (once per update) and zeroes the
gradients.

``save_training_state`` writes DeepSpeed's own checkpoint, without the frozen backbone: per rank its
partition of the fp32 master weights and optimizer state (AdamW: about ``12 bytes x delta size /
world size``), plus the trainable module weights (stage 2: one file, ``4 bytes x delta size`` in
fp32) and a few kB of metadata per file. Resuming it needs the same world size.

DeepSpeed compiles C++ ops on first use (``deepspeed_shm_comm`` when it joins the process group,
``cpu_adam`` with optimizer offload): set ``TORCH_EXTENSIONS_DIR`` to a folder that is kept so this
happens once per machine.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from opendelta_dist.basemodel import DeltaBase
from opendelta_dist.errors import BackendUnavailableError, DeltaCheckpointError, DeltaConfigError
from opendelta_dist.saving import load_delta_tensors
from opendelta_dist.train.engines.base import Engine, OptimizerSpec
from opendelta_dist.train.topology import Topology

CHECKPOINT_TAG = "engine"
SUPPORTED_STAGES = (2, 3)


def _import_deepspeed() -> ModuleType:
    try:
        return importlib.import_module("deepspeed")
    except ImportError as exc:
        raise BackendUnavailableError(
            f"the deepspeed engine needs DeepSpeed ({exc}): pip install 'opendelta-dist[deepspeed]'"
        ) from exc


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``base`` updated by ``extra``, nested dicts merged key by key (``extra`` wins)."""
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


class DeepSpeedEngine(Engine):
    """DeepSpeed ZeRO over the process group the topology joins.

    Args:
        topology: this process's rank, world size and device.
        stage: ZeRO stage, 2 (partition optimizer state and gradients) or 3 (parameters too).
        offload_optimizer: keep optimizer state and fp32 master weights on the CPU.
        offload_params: keep partitioned parameters on the CPU (stage 3 only).
        bf16: compute in bf16 with fp32 master weights.
        extra_config: DeepSpeed config keys merged over the generated config (nested dicts key by
            key), e.g. ``{"zero_optimization": {"stage3_param_persistence_threshold": 0}}``.

    Raises:
        DeltaConfigError: an unsupported stage, or parameter offload without stage 3.
    """

    name = "deepspeed"

    def __init__(
        self,
        topology: Topology,
        stage: int = 2,
        offload_optimizer: bool = False,
        offload_params: bool = False,
        bf16: bool = False,
        extra_config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(topology)
        if stage not in SUPPORTED_STAGES:
            raise DeltaConfigError(
                f"the deepspeed engine supports ZeRO stages {list(SUPPORTED_STAGES)}, not {stage!r}; "
                "stage 2 partitions what stage 1 does and more, at no extra cost for a delta"
            )
        if offload_params and stage != 3:
            raise DeltaConfigError("offload_params needs ZeRO stage 3 (stage=3): only stage 3 partitions parameters")
        self.stage = stage
        self.offload_optimizer = offload_optimizer
        self.offload_params = offload_params
        self.bf16 = bf16
        self.extra_config = dict(extra_config or {})
        self._own_process_group = False
        if topology.device.type == "cpu":
            # DeepSpeed picks its accelerator at import; its C++ ops compile once into a kept folder
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
            os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache/opendelta_dist/torch_extensions"))

    # ----------------------------------------------------------------- set-up

    def ds_config(self, spec: OptimizerSpec) -> dict[str, Any]:
        """The DeepSpeed config for ``spec``: accumulation, clipping, ZeRO, precision, then ``extra_config``."""
        zero: dict[str, Any] = {"stage": self.stage}
        if self.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu"}
        if self.offload_params:
            zero["offload_param"] = {"device": "cpu"}
        config: dict[str, Any] = {
            # the recipe batches the data itself; DeepSpeed only needs a consistent batch arithmetic
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": spec.grad_accum,
            "gradient_clipping": spec.max_grad_norm or 0.0,
            "zero_optimization": zero,
            "bf16": {"enabled": self.bf16},
            # SGD is not on DeepSpeed's list of tested ZeRO optimizers; it works like any torch optimizer
            "zero_allow_untested_optimizer": True,
        }
        if self.offload_optimizer and spec.name != "adamw":
            # DeepSpeed insists on its CPU Adam with offload; other torch optimizers step on the CPU too
            config["zero_force_ds_cpu_optimizer"] = False
        return _merge(config, self.extra_config)

    def build_optimizer(self, spec: OptimizerSpec, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        """The torch optimizer of ``spec``, or ``DeepSpeedCPUAdam`` for AdamW with optimizer offload."""
        if self.offload_optimizer and spec.name == "adamw":
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            return DeepSpeedCPUAdam(
                params,
                lr=spec.lr,
                betas=tuple(spec.betas),
                eps=spec.eps,
                weight_decay=spec.weight_decay,
                adamw_mode=True,
            )
        return spec.build_optimizer(params)

    def prepare(self, module: nn.Module, delta: DeltaBase, spec: OptimizerSpec) -> None:
        """Build the optimizer over the trainable parameters and hand module, optimizer and schedule to DeepSpeed.

        Raises:
            BackendUnavailableError: DeepSpeed is not installed.
        """
        deepspeed = _import_deepspeed()
        self._own_process_group = self.topology.ensure_process_group()
        self.spec = spec
        optimizer = self.build_optimizer(spec, [p for p in module.parameters() if p.requires_grad])
        engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=module,
            optimizer=optimizer,
            lr_scheduler=spec.build_scheduler,  # DeepSpeed builds it on the optimizer and steps it per update
            config=self.ds_config(spec),
            dist_init_required=False,
        )
        self.model = engine
        self.module = engine.module

    def optimized_parameters(self) -> list[nn.Parameter]:
        """The module's parameters the ZeRO optimizer updates (its low-precision groups, not the fp32 masters)."""
        groups = self.optimizer.fp16_groups if self.stage == 3 else self.optimizer.bit16_groups
        return [p for group in groups for p in group]

    # ----------------------------------------------------------------- training

    def micro_step(self, batch: dict[str, torch.Tensor], last: bool) -> torch.Tensor:
        """Forward and backward of one micro-batch.

        The last micro-batch of an optimizer step is marked as DeepSpeed's accumulation boundary
        (where stage 2/3 finish reducing gradients); DeepSpeed's ``backward`` divides the loss by the
        accumulation count, once.
        """
        assert self.model is not None
        self.model.set_gradient_accumulation_boundary(last)
        loss = self.model(**batch).loss
        self.model.backward(loss)
        return loss.detach()

    def optimizer_step(self) -> float | None:
        """DeepSpeed's ``step``: clip, update, schedule, zero the gradients.

        Returns:
            The global gradient norm before clipping.

        Raises:
            RuntimeError: the last micro-step was not marked ``last``.
        """
        assert self.model is not None
        if not self.model.is_gradient_accumulation_boundary():
            raise RuntimeError("optimizer_step() must follow a micro_step(..., last=True)")
        self.model.step()
        norm = self.model.get_global_grad_norm()
        return None if norm is None else float(norm)

    # ----------------------------------------------------------------- state

    def gather_delta(self, delta: DeltaBase) -> dict[str, torch.Tensor]:
        """The delta's full tensors on CPU, on every rank: the fp32 master weights of what the optimizer
        updates, the parameter itself (gathered from its stage 3 partitions) for any other delta tensor.

        Collective: every rank calls it.
        """
        from deepspeed.utils import safe_get_full_fp32_param

        named = list(delta.named_delta_tensors())
        tensors: dict[str, torch.Tensor] = {}
        for key, param in named:
            master = safe_get_full_fp32_param(param)  # collective, in the same order on every rank
            if master is not None:
                tensors[key] = master.detach().to("cpu", copy=True)
        rest = [(key, p) for key, p in named if key not in tensors]
        with _import_deepspeed().zero.GatheredParameters([p for _, p in rest]):
            tensors.update((key, p.detach().to("cpu", copy=True)) for key, p in rest)
        return {key: tensors[key] for key, _ in named}

    def load_delta(self, delta: DeltaBase, tensors: dict[str, torch.Tensor]) -> None:
        """Copy full tensors into the delta's parameters and into the optimizer's fp32 master weights.

        Every rank passes the same full tensors. Without the masters, the next step would start from
        the old values. Before :meth:`prepare` this is a plain copy (DeepSpeed then takes the values
        as its masters). Collective.

        Raises:
            DeltaCheckpointError: keys or shapes do not fit the delta.
        """
        from deepspeed.utils import safe_set_full_fp32_param

        named = list(delta.named_delta_tensors())
        # stage 3: every rank sees full parameters inside; rank 0's values are partitioned on exit
        with _import_deepspeed().zero.GatheredParameters([p for _, p in named], modifier_rank=0):
            load_delta_tensors(delta, tensors)
        for key, param in named:
            safe_set_full_fp32_param(param, tensors[key].to(torch.float32))

    def save_training_state(self, directory: Path) -> None:
        """DeepSpeed's checkpoint under ``directory/engine``: optimizer partitions, schedule, counters.

        Frozen parameters are left out; DeepSpeed still writes the (small) trainable module weights and
        its ``zero_to_fp32.py``/``zero_to_torch.py`` recovery scripts into ``directory``. Collective.
        """
        assert self.model is not None
        self.model.save_checkpoint(
            str(directory), tag=CHECKPOINT_TAG, save_latest=False, exclude_frozen_parameters=True
        )

    def load_training_state(self, directory: Path) -> None:
        """Read what :meth:`save_training_state` wrote (the same world size). Collective.

        The checkpoint holds only trainable module weights, hence the non-strict module load.
        DeepSpeed reads its files with ``torch.load(weights_only=False)``: load only files this
        engine wrote.

        Raises:
            DeltaCheckpointError: ``directory`` holds no DeepSpeed training state.
        """
        assert self.model is not None
        if not (directory / CHECKPOINT_TAG).is_dir():
            raise DeltaCheckpointError(f"{directory} holds no DeepSpeed training state (no {CHECKPOINT_TAG}/ folder)")
        path, _ = self.model.load_checkpoint(str(directory), tag=CHECKPOINT_TAG, load_module_strict=False)
        if path is None:
            raise DeltaCheckpointError(f"DeepSpeed could not load the training state in {directory / CHECKPOINT_TAG}")

    def close(self) -> None:
        """Release DeepSpeed's hooks and buffers, and a process group this engine opened itself."""
        if self.model is not None:
            self.model.destroy()
        if self._own_process_group and dist.is_initialized():
            dist.destroy_process_group()
            self._own_process_group = False
