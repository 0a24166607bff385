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

With ``precision: bf16`` the module computes in bf16 and the optimizer keeps fp32 master weights; the engine
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
``cpu_adam`` with optimizer offload) into ``TORCH_EXTENSIONS_DIR``: the set-up (``scripts/install.sh``)
compiles both into ``.venv/torch_extensions``, which ``scripts/env.sh`` names; elsewhere, point it at a
folder that is kept so this happens once per machine.
"""

from __future__ import annotations

import importlib
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from opendelta_dist.basemodel import DeltaBase
from opendelta_dist.errors import BackendUnavailableError, DeltaCheckpointError, DeltaConfigError
from opendelta_dist.saving import load_delta_tensors
from opendelta_dist.train.engines.base import Engine, OptimizerSpec, check_precision
from opendelta_dist.train.engines.memory import ADAMW_STATES, Backbone, EngineMemory, Row, ceil_div, dtype_name
from opendelta_dist.train.topology import Topology

_RENAMED_COLLECTIVES = r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated"

CHECKPOINT_TAG = "engine"
SUPPORTED_STAGES = (2, 3)

# DeepSpeed's defaults (deepspeed.runtime.zero.config) for what the engine does not set itself.
DS_REDUCE_BUCKET_SIZE = 500_000_000
DS_PREFETCH_BUCKET_SIZE = 50_000_000
DS_MAX_LIVE_PARAMETERS = 1_000_000_000
DS_PARAM_PERSISTENCE_THRESHOLD = 100_000


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
        precision: ``"bf16"`` to compute in bf16 with fp32 master weights; None for the model's dtype.
        extra_config: DeepSpeed config keys merged over the generated config (nested dicts key by
            key), e.g. ``{"zero_optimization": {"stage3_param_persistence_threshold": 0}}``.

    Raises:
        DeltaConfigError: an unsupported stage, or parameter offload without stage 3.
    """

    name = "deepspeed"
    splits_model = True

    def __init__(
        self,
        topology: Topology,
        stage: int = 2,
        offload_optimizer: bool = False,
        offload_params: bool = False,
        precision: str | None = None,
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
        self.bf16 = check_precision(self.name, precision, self.precisions) is not None
        self.precision = precision
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

    def prepare(self, module: nn.Module, delta: DeltaBase | None, spec: OptimizerSpec) -> None:
        """Build the optimizer over the trainable parameters and hand module, optimizer and schedule to DeepSpeed.

        Raises:
            BackendUnavailableError: DeepSpeed is not installed.
        """
        deepspeed = _import_deepspeed()
        # DeepSpeed calls the collectives torch 2.13 renamed (all_gather_single, reduce_scatter_single) from many
        # places, each warning once: hundreds of lines that bury the training log, and nothing a user can change
        warnings.filterwarnings("ignore", message=_RENAMED_COLLECTIVES, category=FutureWarning)
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

    def optimized_numel(self) -> int:
        """Elements of the optimized parameters: ``ds_numel`` of a stage 3 parameter (a ``[0]``-shaped
        placeholder outside a forward), else its own."""
        return sum(getattr(p, "ds_numel", p.numel()) for p in self.optimized_parameters())

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

    @classmethod
    def check_resume(cls, saved_state: Mapping[str, Any], topology: Topology) -> None:
        """Refuse this engine's checkpoint on another number of processes: its optimizer state is partitioned.

        Args:
            saved_state: the checkpoint's trainer state.
            topology: this run's processes.

        Raises:
            DeltaConfigError: the checkpoint was written by this engine with another world size.
        """
        if saved_state.get("engine") == cls.name and saved_state.get("world_size") != topology.world_size:
            raise DeltaConfigError(
                f"DeepSpeed's optimizer state is partitioned for {saved_state.get('world_size')} ranks and this run "
                f"has {topology.world_size}. Resume with the same number of processes, or start from its delta "
                "alone (a new run_dir)."
            )

    def close(self) -> None:
        """Release DeepSpeed's hooks and buffers, and a process group this engine opened itself."""
        if self.model is not None:
            self.model.destroy()
        _forget_process_groups()
        if self._own_process_group and dist.is_initialized():
            dist.destroy_process_group()
            self._own_process_group = False

    # ----------------------------------------------------------------- memory model

    @classmethod
    def memory_rows(cls, backbone: Backbone, world_size: int, options: Mapping[str, Any]) -> EngineMemory:
        """ZeRO-2 or ZeRO-3, with DeepSpeed's defaults for what the engine does not set.

        With ``precision: bf16`` the whole module is cast to bf16 (frozen parameters too) and computes in it; the
        optimizer keeps fp32 master weights of its partition either way. Stage 2: every GPU holds the whole
        model; each holds 1/world of the trainable parameters' gradients (compute dtype), fp32 masters, AdamW
        moments and, during the step, the fp32 gradient of its master partition. Stage 3 partitions the
        parameters too, except tensors below ``stage3_param_persistence_threshold`` elements (norms, LoRA
        matrices), which every GPU keeps whole; gathered parameters of the running block stay live for its
        backward (``stage3_max_reuse_distance``) plus a prefetch bucket, at most ``stage3_max_live_parameters``;
        gradient partitions are kept in fp32. Both stages allocate the gradient reduction bucket
        (``reduce_bucket_size`` elements, two with ``overlap_comm`` in stage 2) when ``contiguous_gradients``.
        Optimizer offload moves masters, moments and fp32 gradient partitions to CPU; parameter offload moves
        the ZeRO-3 parameter partitions.

        Args:
            backbone: the backbone, as counted by the estimator.
            world_size: the run's processes.
            options: the engine's options.

        Returns:
            The weights, deltas and optimizer rows, and the gradient bucket in the workspace.
        """
        c, w, stage = backbone.counts, world_size, int(options.get("stage", 2))
        zero = dict((options.get("extra_config") or {}).get("zero_optimization") or {})
        compute = cls.compute_dtype(options, backbone.model_dtype)
        cb = compute.itemsize
        frozen = c.frozen_numel * cb if options.get("precision") else c.frozen_bytes
        n_t = c.trainable_numel
        masters = (4 + 4 * ADAMW_STATES) * ceil_div(n_t, w)
        offload_opt = bool(options.get("offload_optimizer"))
        bucket = int(zero.get("reduce_bucket_size", DS_REDUCE_BUCKET_SIZE)) * cb
        overlap = bool(zero.get("overlap_comm", stage == 3))
        bucket *= 2 if stage == 2 and overlap else 1
        bucket = bucket if zero.get("contiguous_gradients", True) else 0
        if stage == 2:
            grads = ceil_div(n_t, w) * cb
            rows = [
                Row("weights", frozen, 0, f"the whole frozen backbone in {dtype_name(compute)}"),
                Row(
                    "deltas", n_t * cb + grads, 0, f"trainable parameters in {dtype_name(compute)}, 1/{w} of gradients"
                ),
            ]
            optimizer = masters + 4 * ceil_div(n_t, w)
        else:
            threshold = int(zero.get("stage3_param_persistence_threshold", DS_PARAM_PERSISTENCE_THRESHOLD))
            persistent_frozen, persistent_trainable = _persistent(backbone, threshold)
            persistent = persistent_frozen * cb
            partitioned = ceil_div((c.frozen_numel - persistent_frozen) * cb, w)
            prefetch = int(zero.get("stage3_prefetch_bucket_size", DS_PREFETCH_BUCKET_SIZE))
            max_live = int(zero.get("stage3_max_live_parameters", DS_MAX_LIVE_PARAMETERS))
            largest = max((b.numel for b in backbone.blocks), default=0)
            live = min(max_live, largest + prefetch) * cb
            offload_params = bool(options.get("offload_params"))
            trainable = persistent_trainable * cb + ceil_div((n_t - persistent_trainable) * cb, w)
            grad_partitions = 4 * ceil_div(n_t, w)
            rows = [
                Row(
                    "weights",
                    live + persistent + (0 if offload_params else partitioned),
                    partitioned if offload_params else 0,
                    f"1/{w} partition in {dtype_name(compute)}, small tensors whole, one block gathered + prefetch",
                ),
                Row(
                    "deltas",
                    trainable + (0 if offload_opt else grad_partitions),
                    grad_partitions if offload_opt else 0,
                    f"trainable parameters (small ones whole), 1/{w} of fp32 gradients",
                ),
            ]
            optimizer = masters
        rows.append(
            Row(
                "optimizer",
                0 if offload_opt else optimizer,
                optimizer if offload_opt else 0,
                f"fp32 masters and AdamW moments of 1/{w} of the trainable parameters"
                + (", on CPU" if offload_opt else ""),
            )
        )
        return EngineMemory(rows, {"ZeRO gradient bucket": bucket})


def _persistent(backbone: Backbone, threshold: int) -> tuple[int, int]:
    """Frozen and trainable elements in tensors below ZeRO-3's persistence threshold."""
    frozen = trainable = 0
    for numel, trains in backbone.parameter_sizes:
        if numel < threshold:
            if trains:
                trainable += numel
            else:
                frozen += numel
    return frozen, trainable


def _forget_process_groups() -> None:
    """Drop the process groups DeepSpeed keeps in module globals (its clone of the world group, the data-parallel
    group): once the run's process group is destroyed they are stale, and a later run in the same process (a
    sweep's next point) would be handed a group that no longer exists."""
    from deepspeed.utils import groups

    for name in ("_WORLD_GROUP", "_DATA_PARALLEL_GROUP", "_ZERO_PARAM_INTRA_PARALLEL_GROUP"):
        if hasattr(groups, name):
            setattr(groups, name, None)
