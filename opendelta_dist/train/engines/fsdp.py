"""The ``fsdp`` engine: PyTorch FSDP2 (``fully_shard``), for backbones too big for one device.

How the model is cut into FSDP units, bottom-up (a unit's parameters are all-gathered together
before its forward and its gradients reduce-scattered together after its backward):

1. every delta module in the backbone (a LoRA ``lora``, an adapter, a BitFit ``BiasLayer``) that runs as a module
   (one that only rewrites its target's call, a prefix or a soft prompt, stays in its target's unit);
2. every transformer block (:func:`transformer_blocks`: the elements of the ``nn.ModuleList`` that
   holds the repeated layers, e.g. T5's ``encoder.block.N``), with what the delta modules left: the
   block's frozen weights, and parameters a delta unfroze in place (BitFit's biases);
3. the root, with the rest (embeddings, final norms, the LM head).

Why the delta modules get units of their own: FSDP2 shards every parameter separately (a DTensor
sharded on dim 0) and gives only the parameters that require a gradient a gradient, so frozen
parameters cost no gradient memory even in a unit with trainable ones (FSDP1's flat parameters did
not allow that). What separate units buy is that the frozen block units never reduce gradients at
all, and a delta's reduce-scatter is a small collective of its own, right after its backward,
independent of the backbone's dtype. Parameters a delta unfreezes *in place*
(:class:`~opendelta_dist.operations.UnfreezeParameter`) live in the backbone module's own parameter
slot and so share that module's unit: they are the only trainable parameters in a frozen unit, and
the tests check that the frozen parameters next to them get no gradient.

After sharding, the module's parameters are new DTensor parameters. A child delta module's are its
own (FSDP2 swaps them in that module), but an ``UnfreezeParameter`` keeps its parameter in a holder
module outside the backbone: the engine points that holder at the DTensor now in the slot, so
``delta.named_delta_tensors()`` reports the live, sharded parameters.

A backbone built on the ``meta`` device (no memory) is sharded as it is, then every rank allocates
only its shards (``to_empty``) and initialises them: transformers models by their
``_init_weights`` (:func:`initialise_backbone`), other modules by ``reset_parameters()``, delta
modules by their own initialisation. This gives random weights: a checkpoint must be loaded into the shards afterwards.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from opendelta_dist.addressing import is_delta_module
from opendelta_dist.basemodel import DeltaBase
from opendelta_dist.errors import DeltaCheckpointError, DeltaConfigError
from opendelta_dist.operations import CallRewriter, HoldModule, Operation, UnfreezeParameter, original_parameter
from opendelta_dist.saving import load_delta_tensors
from opendelta_dist.train.engines.base import TRAINING_STATE, OptimizerSpec, TorchOptimizerEngine, check_precision
from opendelta_dist.train.engines.memory import (
    ADAMW_STATES,
    Backbone,
    EngineMemory,
    Row,
    ceil_div,
    dtype_name,
    dtypes_label,
)
from opendelta_dist.train.topology import Topology

LIVE_UNITS = 2
"""FSDP2 holds the current block's gathered parameters and prefetches the next block's."""


def transformer_blocks(module: nn.Module) -> list[nn.Module]:
    """The repeated layers of ``module``: the elements of each outermost ``nn.ModuleList`` that is a
    stack of layers (one element, or elements whose class repeats) and that hold parameters.

    Delta modules are not searched, and a block is not searched for blocks inside it.
    """
    blocks: list[nn.Module] = []
    for child in module.children():
        if is_delta_module(child):
            continue
        if isinstance(child, nn.ModuleList) and _is_layer_stack(child):
            blocks.extend(m for m in child if any(True for _ in m.parameters()))
        else:
            blocks.extend(transformer_blocks(child))
    return blocks


def _is_layer_stack(modules: nn.ModuleList) -> bool:
    counts = Counter(type(m) for m in modules)
    return len(modules) == 1 or any(n > 1 for n in counts.values())


def delta_submodules(module: nn.Module, held: frozenset[int] = frozenset()) -> Iterator[nn.Module]:
    """The delta modules attached inside ``module`` (the top of each delta's subtree) that run as modules.

    A delta module that rewrites its target's call (a prefix's keys and values, a soft prompt's embeddings:
    :class:`~opendelta_dist.operations.CallRewriter`) or that only holds parameters other delta modules read
    (``held``: the modules of :class:`~opendelta_dist.operations.HoldModule` operations, e.g. a prefix's shared
    network) is never called itself, so FSDP would never gather its parameters: it stays in the unit of the
    module it is attached to, gathered with it.
    """
    for child in module.children():
        if is_delta_module(child):
            if not isinstance(child, CallRewriter) and id(child) not in held:
                yield child
        else:
            yield from delta_submodules(child, held)


def initialise_backbone(module: nn.Module, init: Callable[[nn.Module], None] | None = None) -> None:
    """Initialise a backbone's parameters (not its deltas') as it initialises them when it is built.

    Every module of a transformers model goes through ``_init_weights`` of the nearest enclosing
    ``PreTrainedModel``, submodules first, as ``PreTrainedModel.initialize_weights()`` does. That method
    itself cannot be used after ``fully_shard``: the FSDP subclass of the model lives in a torch module,
    so transformers takes the model for custom code and skips every module without parameters of its
    own (T5's attention modules, which initialise their projections, and the model itself). Modules of
    other backbones are initialised by their ``reset_parameters()``.

    Args:
        module: the module to initialise.
        init: the ``_init_weights`` of the enclosing ``PreTrainedModel``, if any.
    """
    from transformers import PreTrainedModel

    if isinstance(module, PreTrainedModel):
        init = module._init_weights
    for child in module.children():
        if not is_delta_module(child):
            initialise_backbone(child, init)
    if init is not None:
        init(module)
    elif callable(getattr(module, "reset_parameters", None)):
        module.reset_parameters()


def _operations(delta: DeltaBase | None) -> tuple[Operation, ...]:
    """The delta's operations (none for full fine-tuning)."""
    return delta.operations if delta is not None else ()


def _unfrozen_in_place(delta: DeltaBase | None) -> list[UnfreezeParameter]:
    """The delta's installed operations whose parameter is the one in the backbone's slot now."""
    return [
        op
        for op in _operations(delta)
        if isinstance(op, UnfreezeParameter)
        and op.target is not None
        and op.target._parameters.get(op.param_name) is op.parameter
    ]


class FSDPEngine(TorchOptimizerEngine):
    """FSDP2 over the process group the topology joins: parameters, gradients and optimizer state sharded.

    Args:
        topology: this process's rank, world size and device.
        reshard_after_forward: free the gathered parameters of the delta and block units after their
            forward and gather them again for backward (less memory, more communication). The root
            unit keeps them, as its backward comes first.
        precision: ``"bf16"`` to gather parameters and compute in bf16 while the sharded
            parameters, gradients and optimizer state stay in their own dtype (fp32) and gradients
            are reduced in fp32; None to compute in the parameters' dtype.
        cpu_offload: keep the sharded parameters, gradients and optimizer state in CPU memory and
            step the optimizer there.

    Raises:
        DeltaConfigError: an unknown ``precision``.
    """

    name = "fsdp"
    training_state_format = None  # the full optimizer state keyed by parameter names: its own
    splits_model = True

    def __init__(
        self,
        topology: Topology,
        reshard_after_forward: bool = True,
        precision: str | None = None,
        cpu_offload: bool = False,
    ) -> None:
        super().__init__(topology)
        check_precision(self.name, precision, self.precisions)
        self.reshard_after_forward = reshard_after_forward
        self.precision = precision
        self.cpu_offload = cpu_offload
        self._own_process_group = False

    # ----------------------------------------------------------------- set-up

    def _shard_options(self) -> dict[str, Any]:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy

        mesh = init_device_mesh(self.topology.device.type, (dist.get_world_size(),))
        dtype = check_precision(self.name, self.precision, self.precisions)
        offload = CPUOffloadPolicy(pin_memory=self.topology.device.type == "cuda") if self.cpu_offload else None
        return {
            "mesh": mesh,
            "mp_policy": MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32 if dtype else None),
            "offload_policy": offload or OffloadPolicy(),
        }

    def prepare(self, module: nn.Module, delta: DeltaBase | None, spec: OptimizerSpec) -> None:
        """Shard ``module`` (delta modules, then blocks, then the root; see the module docstring),
        materialise it if it was built on the meta device, and build the optimizer over its trainable
        (sharded) parameters.

        Raises:
            DeltaConfigError: the backbone is on the meta device and the delta trains copies of
                backbone parameters (which do not exist yet), or a delta module cannot be initialised.
        """
        from torch.distributed.fsdp import fully_shard

        on_meta = any(p.is_meta for p in module.parameters())
        if on_meta and delta is not None:
            _refuse_copies_on_meta(delta)
        self._own_process_group = self.topology.ensure_process_group()
        in_place = _unfrozen_in_place(delta)
        options = self._shard_options()
        held = frozenset(id(op.delta_module) for op in _operations(delta) if isinstance(op, HoldModule))
        for sub in delta_submodules(module, held):
            fully_shard(sub, reshard_after_forward=self.reshard_after_forward, **options)
        for block in transformer_blocks(module):
            fully_shard(block, reshard_after_forward=self.reshard_after_forward, **options)
        fully_shard(module, **options)
        for op in in_place:  # the holder outside the backbone takes the sharded parameter now in the slot
            op.delta_module._parameters[op.param_name] = op.target._parameters[op.param_name]
        if on_meta:
            self._materialise(module, delta)
        self.module = self.model = module
        self.build_optimizer(module, spec)

    def _materialise(self, module: nn.Module, delta: DeltaBase | None) -> None:
        """Allocate this rank's shards of a meta-device module and initialise them."""
        module.to_empty(device=torch.device("cpu") if self.cpu_offload else self.topology.device)
        with torch.no_grad():
            initialise_backbone(module)
            for op in _operations(delta):
                if isinstance(op, UnfreezeParameter):
                    nn.init.zeros_(op.parameter)  # an empty slot filled (copies were refused before sharding)
                else:  # as the method made them: its backend recorded each parameter's init function
                    assert delta is not None
                    delta.backend_mapping.reset_module(op.delta_module)

    def load_pretrained(self, read_state_dict: Callable[[], dict[str, torch.Tensor]]) -> None:
        """Fill a meta-built, sharded backbone with pretrained weights read by rank 0 only.

        Rank 0 reads the checkpoint's full state dict (other ranks pass an empty dict); each tensor is
        broadcast and every rank keeps its shard, so only one process ever holds the whole model.
        The delta's own parameters are not in a backbone checkpoint and keep their initialisation.
        Collective.

        Args:
            read_state_dict: reads the backbone checkpoint's full state dict (called on rank 0 only).
        """
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        assert self.module is not None
        state_dict = read_state_dict() if self.topology.is_main else {}
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
        set_model_state_dict(self.module, state_dict, options=options)

    # ----------------------------------------------------------------- training

    def no_sync(self, last: bool) -> AbstractContextManager[Any]:
        """Reduce-scatter gradients only on the last micro-batch of an optimizer step.

        Before it, gradients accumulate unsharded on each rank (only the delta's: frozen parameters
        have none).
        """
        assert self.model is not None
        self.model.set_requires_gradient_sync(last)
        return nullcontext()

    # ----------------------------------------------------------------- state

    def _reshard(self) -> None:
        # parameters a forward left gathered (the root's, or all with reshard_after_forward=False)
        # are sharded again, so every module holds its sharded DTensor parameters
        from torch.distributed.fsdp import FSDPModule

        assert self.module is not None
        for sub in self.module.modules():
            if isinstance(sub, FSDPModule):
                sub.reshard()

    def gather_delta(self, delta: DeltaBase) -> dict[str, torch.Tensor]:
        """The delta's full, unsharded tensors on CPU, on every rank (all-gathered). Collective."""
        from torch.distributed.tensor import DTensor

        self._reshard()
        tensors: dict[str, torch.Tensor] = {}
        for key, param in delta.named_delta_tensors():  # the same order on every rank
            value = param.detach()
            if isinstance(value, DTensor):
                value = value.to(self.topology.device).full_tensor()  # offloaded shards gather on the device
            tensors[key] = value.to("cpu", copy=True)
        return tensors

    def load_delta(self, delta: DeltaBase, tensors: dict[str, torch.Tensor]) -> None:
        """Copy full tensors (the same on every rank) into the delta's shards. Collective.

        Raises:
            DeltaCheckpointError: keys or shapes do not fit the delta.
        """
        from torch.distributed.tensor import DTensor, distribute_tensor

        self._reshard()
        placed = dict(tensors)
        for key, param in delta.named_delta_tensors():
            value = tensors.get(key)
            if isinstance(param, DTensor) and value is not None and value.shape == param.shape:
                # every rank holds the full tensor: each cuts its own shard, nothing is sent
                value = value.detach().to(param.dtype)
                placed[key] = distribute_tensor(value, param.device_mesh, param.placements, src_data_rank=None)
        load_delta_tensors(delta, placed)

    def save_training_state(self, directory: Path) -> None:
        """Rank 0 writes the full (gathered) optimizer state, keyed by parameter names, and the schedule.

        Collective: every rank takes part in gathering the optimizer state.
        """
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        assert self.module is not None
        self._reshard()
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        self.write_training_state(directory, get_optimizer_state_dict(self.module, self.optimizer, options=options))

    def load_training_state(self, directory: Path) -> None:
        """Rank 0 reads what :meth:`save_training_state` wrote and sends every rank its shards. Collective.

        Any world size can load it. Only tensors are unpickled (``weights_only=True``).

        Raises:
            DeltaCheckpointError: ``directory`` holds no training state.
        """
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        assert self.module is not None
        file = directory / TRAINING_STATE
        if not file.is_file():  # every rank sees the shared directory
            raise DeltaCheckpointError(f"{directory} holds no FSDP training state (no {TRAINING_STATE})")
        self._reshard()
        optimizer = self.read_training_state(directory, "cpu")
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_optimizer_state_dict(
            self.module, self.optimizer, optimizer if self.topology.is_main else {}, options=options
        )

    def close(self) -> None:
        """Leave a process group this engine opened itself (a single process)."""
        if self._own_process_group and dist.is_initialized():
            dist.destroy_process_group()
            self._own_process_group = False

    # ----------------------------------------------------------------- memory model

    @classmethod
    def memory_rows(cls, backbone: Backbone, world_size: int, options: Mapping[str, Any]) -> EngineMemory:
        """Parameters, gradients and optimizer state sharded over the ranks.

        Each block is a unit, each delta module a unit, the rest the root unit. A unit's parameters are
        gathered in the compute dtype (bf16 with ``precision``, else their own) around its forward and
        backward; with ``reshard_after_forward`` two block units are gathered at once (the running one and the
        prefetched one) and the root unit stays gathered, else every unit stays gathered after forward.
        Gathering copies into a new buffer even on one rank. Gradients are sharded in the parameters' dtype
        (reduced in fp32); the delta units' gathered parameters and unsharded gradients are counted whole (an
        upper bound: they are a few MB). ``cpu_offload`` moves the shards, their gradients and the optimizer
        to CPU memory.

        Args:
            backbone: the backbone, as counted by the estimator.
            world_size: the run's processes.
            options: the engine's options.

        Returns:
            The rows; nothing in the workspace.
        """
        c, w = backbone.counts, world_size
        compute = cls.compute_dtype(options, backbone.model_dtype)
        units = [b.unit_numel for b in backbone.blocks]
        live = LIVE_UNITS * max(units, default=0) if options.get("reshard_after_forward") else sum(units)
        gathered = (live + backbone.root_numel) * compute.itemsize
        offload = bool(options.get("cpu_offload"))
        shards = ceil_div(c.frozen_bytes, w)
        delta_shards = 2 * ceil_div(c.trainable_bytes, w)
        delta_gathered = 2 * c.trainable_numel * compute.itemsize
        optimizer = ADAMW_STATES * ceil_div(c.trainable_bytes, w)
        units_note = "2 block units" if options.get("reshard_after_forward") else "every unit"
        return EngineMemory(
            [
                Row(
                    "weights",
                    gathered + (0 if offload else shards),
                    shards if offload else 0,
                    f"1/{w} shard in {dtypes_label(c.frozen)}, plus {units_note} and the root gathered in "
                    f"{dtype_name(compute)}",
                ),
                Row(
                    "deltas",
                    delta_gathered + (0 if offload else delta_shards),
                    delta_shards if offload else 0,
                    f"1/{w} shards of trainable parameters and gradients, gathered copies and unsharded gradients",
                ),
                Row(
                    "optimizer",
                    0 if offload else optimizer,
                    optimizer if offload else 0,
                    f"AdamW moments of 1/{w} of the trainable parameters" + (", on CPU" if offload else ""),
                ),
            ]
        )

    @classmethod
    def memory_notes(cls, options: Mapping[str, Any]) -> list[str]:
        """Without ``precision`` the engine computes in the parameters' dtype: say so.

        Args:
            options: the engine's options.

        Returns:
            The notes.
        """
        if options.get("precision"):
            return []
        return [f"{cls.name} without precision computes in the parameters' dtype"]


def _refuse_copies_on_meta(delta: DeltaBase) -> None:
    """Raise if the delta trains copies of backbone parameters, which a meta-device backbone has no values for."""
    copies = [
        f"{op.module_name}.{op.param_name}"
        for op in delta.operations
        if isinstance(op, UnfreezeParameter)
        and op.target is not None
        and original_parameter(op.target, op.param_name) is not None
    ]
    if copies:
        raise DeltaConfigError(
            f"the {delta.delta_type!r} delta trains copies of backbone parameters ({', '.join(copies[:3])}"
            f"{', ...' if len(copies) > 3 else ''}), but the backbone was built on the meta device and has no "
            "values to copy. Build the backbone with real weights (model.init_device=cpu), or choose a delta "
            "that adds new parameters (lora, adapter)."
        )
