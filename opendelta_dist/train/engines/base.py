"""The protocol every engine implements, and the optimizer/schedule description they share.

The recipe drives an engine like this, once per optimizer step::

    for i, micro_batch in enumerate(micro_batches):
        loss = engine.micro_step(micro_batch, last=i == len(micro_batches) - 1)
    grad_norm = engine.optimizer_step()

``micro_step`` runs forward and backward (dividing the loss by the accumulation count and skipping
gradient synchronisation until the last micro-batch, where the engine supports it);
``optimizer_step`` clips, steps the optimizer and the schedule, and zeroes the gradients.

Besides training, an engine class answers what the code around it would otherwise have to know by the
engine's name: whether it can train without a delta (:attr:`Engine.supports_full_fine_tuning`), whether a
checkpoint can resume on it (:meth:`Engine.check_resume`), how it loads pretrained weights into a backbone
built on the meta device (:meth:`Engine.load_pretrained`), and its memory model for the estimator
(:meth:`Engine.memory_rows` and the declarations next to it).
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from opendelta_dist.basemodel import DeltaBase
from opendelta_dist.errors import DeltaConfigError
from opendelta_dist.train.engines.memory import Backbone, EngineMemory
from opendelta_dist.train.topology import Topology

OPTIMIZERS = ("adamw", "sgd")
PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
"""``engine.options.precision`` values: the dtype an engine computes in (null: the model's own dtype)."""


def check_precision(engine: str, precision: str | None, allowed: tuple[str, ...] = ("bf16",)) -> torch.dtype | None:
    """The compute dtype of ``engine.options.precision``, which every engine takes; None for null.

    Args:
        engine: the engine's name, for the message.
        precision: the configured value.
        allowed: the values this engine supports.

    Raises:
        DeltaConfigError: a value the engine does not support.
    """
    if precision is None:
        return None
    if precision not in allowed:
        raise DeltaConfigError(
            f"engine.options.precision={precision!r}: the {engine} engine computes in "
            f"{' or '.join(allowed)}, or in the model's own dtype (null)"
        )
    return PRECISION_DTYPES[precision]


TRAINING_STATE = "training_state.pt"
"""The file of the optimizer and schedule state of the engines that step a torch optimizer themselves."""


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

    Every constructor argument after ``topology`` is an engine option (``engine.options.NAME``) and has a
    default, which is what a run gets when its configuration leaves the option out.

    Args:
        topology: this process's rank, world size and device.
    """

    name: ClassVar[str]
    supports_full_fine_tuning: ClassVar[bool] = False
    """Every rank holds the whole, unsharded model, so a run without a delta can train and save it as it is."""
    single_process: ClassVar[bool] = False
    """The engine runs one process only."""
    splits_model: ClassVar[bool] = False
    """The engine partitions the model's parameters over the processes (not only the batch)."""
    drops_layers_per_step: ClassVar[bool] = True
    """Robust AdapterDrop (``delta.robust_drop``) is tested on the engine: a step may leave some delta parameters
    unused, and the lowest layers without backward."""
    precisions: ClassVar[tuple[str, ...]] = ("bf16",)
    """The values of ``engine.options.precision`` the engine supports (null, the model's dtype, always is)."""
    delta_backend: ClassVar[str] = "hf"
    """The backend of the deltas attached to this engine's backbone (:mod:`opendelta_dist.backends`)."""
    own_models: ClassVar[bool] = False
    """The engine builds the backbone with a model library of its own (:meth:`build_backbone`), not transformers:
    tasks that need a transformers language model around it (prompt tasks) do not run on it."""
    eager_attention: ClassVar[bool] = False
    """The engine's own model computes attention eagerly (keeps score-sized tensors for backward), where the
    memory estimator otherwise assumes a fused kernel."""
    recomputes_blocks: ClassVar[bool] = False
    """The engine's own model recomputes each block's activations in backward, whatever
    ``model.gradient_checkpointing`` says."""
    reads_checkpoints_by_layer: ClassVar[bool] = False
    """The engine reads a pretrained checkpoint one layer at a time into its shards (memory-mapped), where a
    meta-device backbone otherwise has rank 0 read the whole checkpoint into CPU memory."""

    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        self.model: nn.Module | None = None  # what forward is called on (wrapped)
        self.module: nn.Module | None = None  # the backbone itself
        self.optimizer: Any = None
        self.scheduler: Any = None
        self.spec = OptimizerSpec()

    @classmethod
    def option_defaults(cls) -> dict[str, Any]:
        """The engine's options (its constructor's arguments after ``topology``) with their defaults."""
        parameters = inspect.signature(cls.__init__).parameters
        return {key: p.default for key, p in parameters.items() if key not in ("self", "topology")}

    # ----------------------------------------------------------------- set-up

    @abstractmethod
    def prepare(self, module: nn.Module, delta: DeltaBase | None, spec: OptimizerSpec) -> None:
        """Wrap/shard ``module`` and build the optimizer over its trainable parameters only.

        Args:
            module: the backbone, with its delta attached and frozen except for the delta (and explicitly
                unfrozen parameters), or wholly trainable for full fine-tuning.
            delta: the attached delta; None for full fine-tuning (only on engines that
                :attr:`supports_full_fine_tuning`).
            spec: the optimizer and schedule.
        """

    def build_backbone(self, config: Any) -> nn.Module | None:
        """Build the backbone with the engine's own model implementation. Collective.

        Args:
            config: the recipe's :class:`~opendelta_dist.train.models.ModelConfig`.

        Returns:
            The backbone; None (the default) when the recipe builds transformers' model itself.
        """
        return None

    def backbone_checksum(self, model: nn.Module, delta: DeltaBase) -> tuple[str, Any]:
        """The checksum a saved delta records of its backbone (:func:`opendelta_dist.saving.backbone_checksum`),
        taken before :meth:`prepare` shards the weights. Collective where reading weights whole is."""
        from opendelta_dist.saving import backbone_checksum

        return backbone_checksum(model, delta.replaced_parameter_names())

    @classmethod
    def check_delta_options(cls, options: Mapping[str, Any]) -> None:
        """Refuse, before anything is built, a delta configuration the engine cannot train (none by default).

        Args:
            options: the run's ``delta`` group.

        Raises:
            DeltaConfigError: the option to change, and how.
        """
        return None

    def saved_delta_config(self) -> dict[str, Any]:
        """What a saved delta's ``config.json`` says differently from the delta's own config: the engines
        save whole tensors under transformers' names, so a checkpoint loads on transformers' model (the
        default: nothing differs, the delta is of the ``hf`` backend on that model already)."""
        return {}

    def load_pretrained(self, read_state_dict: Callable[[], dict[str, torch.Tensor]]) -> None:
        """Fill a backbone built on the meta device, after :meth:`prepare`, with pretrained weights. Collective.

        Args:
            read_state_dict: reads the backbone checkpoint's full state dict; the engine calls it on the
                ranks that need it (only rank 0, for an engine that shards the weights from there).

        Raises:
            DeltaConfigError: the engine does not load pretrained weights into a meta-built backbone (the
                default; the recipe then builds the backbone with its weights, ``model.init_device=cpu``).
        """
        raise DeltaConfigError(
            "model.init_device=meta with pretrained weights needs an engine that loads them into its shards "
            f"(engine=fsdp); the {self.name} engine does not. Use model.init_device=cpu with this engine."
        )

    @abstractmethod
    def optimized_parameters(self) -> list[nn.Parameter]:
        """The module's parameters the optimizer updates (for the inspector)."""

    def optimized_numel(self) -> int:
        """Elements of :meth:`optimized_parameters`, each counted at its full (unpartitioned) size."""
        return sum(p.numel() for p in self.optimized_parameters())

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

    training_state_format: ClassVar[str | None] = None
    """What :meth:`save_training_state` writes, named: engines with the same name read each other's (None: only
    the engine's own; see :func:`opendelta_dist.train.engines.reads_training_state`)."""

    @classmethod
    def check_resume(cls, saved_state: Mapping[str, Any], topology: Topology) -> None:
        """Refuse a checkpoint this engine cannot resume on ``topology`` (any, by default).

        Args:
            saved_state: the checkpoint's trainer state (``engine`` and ``world_size`` that wrote it, ...).
            topology: this run's processes.

        Raises:
            DeltaConfigError: the reason the checkpoint cannot resume here, and what to do instead.
        """
        return None

    def close(self) -> None:
        """Release what the engine holds (nothing by default)."""
        return None

    # ----------------------------------------------------------------- memory model (for the estimator)

    @classmethod
    def compute_dtype(cls, options: Mapping[str, Any], model_dtype: torch.dtype) -> torch.dtype:
        """The dtype the engine computes (and keeps activations) in: ``precision``'s, else the model's own.

        Args:
            options: the engine's options (:meth:`option_defaults` with the configured ones over them).
            model_dtype: the dtype the backbone is built in.

        Returns:
            The compute dtype.

        Raises:
            DeltaConfigError: a ``precision`` the engine does not support.
        """
        return check_precision(cls.name, options.get("precision"), cls.precisions) or model_dtype

    @classmethod
    @abstractmethod
    def memory_rows(cls, backbone: Backbone, world_size: int, options: Mapping[str, Any]) -> EngineMemory:
        """The bytes per GPU (and in CPU memory) of the weights, the deltas and the optimizer state.

        Args:
            backbone: the backbone with its delta attached and frozen, as counted by the estimator.
            world_size: the run's processes.
            options: the engine's options (:meth:`option_defaults` with the configured ones over them).

        Returns:
            The rows, and the buffers the engine adds to the workspace.
        """

    @classmethod
    def memory_notes(cls, options: Mapping[str, Any]) -> list[str]:
        """Assumptions of the memory model worth reading next to its figures (none by default).

        Args:
            options: the engine's options.

        Returns:
            One sentence per note.
        """
        return []


class TorchOptimizerEngine(Engine):
    """An engine that steps a torch optimizer and schedule itself (not inside a framework's own engine).

    It shares the micro-step, the optimizer step (clip, step, schedule, zero) and the file the training
    state goes to; subclasses wrap/shard the module in :meth:`prepare` and decide how gradients are
    synchronised (:meth:`no_sync`) and how the state is gathered and sent.
    """

    training_state_format: ClassVar[str | None] = "torch-optimizer"

    def build_optimizer(self, module: nn.Module, spec: OptimizerSpec) -> None:
        """Build the optimizer of ``spec`` over the module's trainable parameters, and its schedule."""
        self.spec = spec
        self.optimizer = spec.build_optimizer([p for p in module.parameters() if p.requires_grad])
        self.scheduler = spec.build_scheduler(self.optimizer)

    def optimized_parameters(self) -> list[nn.Parameter]:
        """Every parameter of every optimizer group."""
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def no_sync(self, last: bool) -> AbstractContextManager[Any]:
        """A context that skips gradient synchronisation before the last micro-batch (none here)."""
        return nullcontext()

    def compute_context(self) -> AbstractContextManager[Any]:
        """The context forward runs in (e.g. autocast to the engine's precision); none by default."""
        return nullcontext()

    def micro_step(self, batch: dict[str, torch.Tensor], last: bool) -> torch.Tensor:
        """Forward + backward with the loss divided by the accumulation count."""
        assert self.model is not None
        with self.no_sync(last):
            with self.compute_context():
                loss = self.model(**batch).loss
            (loss / self.spec.grad_accum).backward()
        return loss.detach()

    def optimizer_step(self) -> float | None:
        """Clip the global gradient norm, step, schedule, zero; returns the norm before clipping.

        With sharded (DTensor) gradients ``clip_grad_norm_`` computes the norm as a DTensor over all
        ranks; its full value is the global norm.
        """
        from torch.distributed.tensor import DTensor

        norm = None
        if self.spec.max_grad_norm is not None:
            total = torch.nn.utils.clip_grad_norm_(self.optimized_parameters(), self.spec.max_grad_norm)
            norm = float(total.full_tensor() if isinstance(total, DTensor) else total)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def write_training_state(self, directory: Path, optimizer_state: dict[str, Any]) -> None:
        """Rank 0 writes ``optimizer_state`` and the schedule's state to ``directory / TRAINING_STATE``."""
        if self.topology.is_main:
            state = {"optimizer": optimizer_state, "scheduler": self.scheduler.state_dict()}
            torch.save(state, directory / TRAINING_STATE)

    def read_training_state(self, directory: Path, map_location: torch.device | str) -> dict[str, Any]:
        """Read what :meth:`write_training_state` wrote (tensors only: no code is unpickled); the schedule
        resumes from it here, the optimizer state is returned for the engine to place."""
        state = torch.load(directory / TRAINING_STATE, map_location=map_location, weights_only=True)
        self.scheduler.load_state_dict(state["scheduler"])
        return state["optimizer"]
