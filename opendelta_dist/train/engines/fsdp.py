"""The ``fsdp`` engine: PyTorch FSDP2 (``fully_shard``), for backbones too big for one device.

How the model is cut into FSDP units, bottom-up (a unit's parameters are all-gathered together
before its forward and its gradients reduce-scattered together after its backward):

1. every delta module in the backbone (a LoRA ``lora``, an adapter, a BitFit ``BiasLayer``);
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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from opendelta_dist.addressing import is_delta_module
from opendelta_dist.basemodel import DeltaBase
from opendelta_dist.errors import DeltaCheckpointError, DeltaConfigError
from opendelta_dist.operations import UnfreezeParameter, original_parameter
from opendelta_dist.saving import load_delta_tensors
from opendelta_dist.train.engines.base import Engine, OptimizerSpec
from opendelta_dist.train.topology import Topology

TRAINING_STATE = "training_state.pt"
MIXED_PRECISION = {"bf16": torch.bfloat16}


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


def delta_submodules(module: nn.Module) -> Iterator[nn.Module]:
    """The delta modules attached inside ``module`` (the top of each delta's subtree)."""
    for child in module.children():
        if is_delta_module(child):
            yield child
        else:
            yield from delta_submodules(child)


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


def _unfrozen_in_place(delta: DeltaBase) -> list[UnfreezeParameter]:
    """The delta's installed operations whose parameter is the one in the backbone's slot now."""
    return [
        op
        for op in delta._operations
        if isinstance(op, UnfreezeParameter)
        and op.target is not None
        and op.target._parameters.get(op.param_name) is op.parameter
    ]


def reset_delta_module(module: nn.Module) -> None:
    """Initialise a delta module's parameters as the delta method does when it creates them.

    Raises:
        DeltaConfigError: the module has no ``reset_parameters()`` and is of no known delta class.
    """
    reset = getattr(module, "reset_parameters", None)
    if callable(reset):
        reset()
        return
    raise DeltaConfigError(
        f"cannot initialise a {type(module).__name__} delta module after building it on the meta device: it "
        "has no reset_parameters() method. Build the backbone on cpu, or give the module reset_parameters()."
    )


class FSDPEngine(Engine):
    """FSDP2 over the process group the topology joins: parameters, gradients and optimizer state sharded.

    Args:
        topology: this process's rank, world size and device.
        reshard_after_forward: free the gathered parameters of the delta and block units after their
            forward and gather them again for backward (less memory, more communication). The root
            unit keeps them, as its backward comes first.
        mixed_precision: ``"bf16"`` to gather parameters and compute in bf16 while the sharded
            parameters, gradients and optimizer state stay in their own dtype (fp32) and gradients
            are reduced in fp32; None to compute in the parameters' dtype.
        cpu_offload: keep the sharded parameters, gradients and optimizer state in CPU memory and
            step the optimizer there.

    Raises:
        DeltaConfigError: an unknown ``mixed_precision``.
    """

    name = "fsdp"

    def __init__(
        self,
        topology: Topology,
        reshard_after_forward: bool = True,
        mixed_precision: str | None = None,
        cpu_offload: bool = False,
    ) -> None:
        super().__init__(topology)
        if mixed_precision is not None and mixed_precision not in MIXED_PRECISION:
            raise DeltaConfigError(
                f"the fsdp engine's mixed_precision is one of {list(MIXED_PRECISION)} or null, not {mixed_precision!r}"
            )
        self.reshard_after_forward = reshard_after_forward
        self.mixed_precision = mixed_precision
        self.cpu_offload = cpu_offload
        self._own_process_group = False

    # ----------------------------------------------------------------- set-up

    def _shard_options(self) -> dict[str, Any]:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy

        mesh = init_device_mesh(self.topology.device.type, (dist.get_world_size(),))
        dtype = MIXED_PRECISION.get(self.mixed_precision or "")
        offload = CPUOffloadPolicy(pin_memory=self.topology.device.type == "cuda") if self.cpu_offload else None
        return {
            "mesh": mesh,
            "mp_policy": MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32 if dtype else None),
            "offload_policy": offload or OffloadPolicy(),
        }

    def prepare(self, module: nn.Module, delta: DeltaBase, spec: OptimizerSpec) -> None:
        """Shard ``module`` (delta modules, then blocks, then the root; see the module docstring),
        materialise it if it was built on the meta device, and build the optimizer over its trainable
        (sharded) parameters.

        Raises:
            DeltaConfigError: the backbone is on the meta device and the delta trains copies of
                backbone parameters (which do not exist yet), or a delta module cannot be initialised.
        """
        from torch.distributed.fsdp import fully_shard

        on_meta = any(p.is_meta for p in module.parameters())
        if on_meta:
            _refuse_copies_on_meta(delta)
        self._own_process_group = self.topology.ensure_process_group()
        self.spec = spec
        in_place = _unfrozen_in_place(delta)
        options = self._shard_options()
        for sub in delta_submodules(module):
            fully_shard(sub, reshard_after_forward=self.reshard_after_forward, **options)
        for block in transformer_blocks(module):
            fully_shard(block, reshard_after_forward=self.reshard_after_forward, **options)
        fully_shard(module, **options)
        for op in in_place:  # the holder outside the backbone takes the sharded parameter now in the slot
            op.delta_module._parameters[op.param_name] = op.target._parameters[op.param_name]
        if on_meta:
            self._materialise(module, delta)
        self.module = self.model = module
        self.optimizer = spec.build_optimizer([p for p in module.parameters() if p.requires_grad])
        self.scheduler = spec.build_scheduler(self.optimizer)

    def _materialise(self, module: nn.Module, delta: DeltaBase) -> None:
        """Allocate this rank's shards of a meta-device module and initialise them."""
        module.to_empty(device=torch.device("cpu") if self.cpu_offload else self.topology.device)
        with torch.no_grad():
            initialise_backbone(module)
            for op in delta._operations:
                if isinstance(op, UnfreezeParameter):
                    nn.init.zeros_(op.parameter)  # an empty slot filled (copies were refused before sharding)
                else:
                    reset_delta_module(op.delta_module)

    def load_pretrained(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Fill a meta-built, sharded backbone with pretrained weights read by rank 0 only.

        Rank 0 passes the checkpoint's full state dict (other ranks an empty dict); each tensor is
        broadcast and every rank keeps its shard, so only one process ever holds the whole model.
        The delta's own parameters are not in a backbone checkpoint and keep their initialisation.
        Collective.
        """
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        assert self.module is not None
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
        set_model_state_dict(self.module, state_dict, options=options)

    def optimized_parameters(self) -> list[nn.Parameter]:
        """The sharded (DTensor) parameters of every optimizer group."""
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    # ----------------------------------------------------------------- training

    def micro_step(self, batch: dict[str, torch.Tensor], last: bool) -> torch.Tensor:
        """Forward + backward with the loss divided by the accumulation count.

        Before the last micro-batch of an optimizer step, gradients accumulate unsharded on each rank
        (only the delta's: frozen parameters have none) and are reduce-scattered on the last one.
        """
        assert self.model is not None
        self.model.set_requires_gradient_sync(last)
        loss = self.model(**batch).loss
        (loss / self.spec.grad_accum).backward()
        return loss.detach()

    def optimizer_step(self) -> float | None:
        """Clip the global gradient norm, step, schedule, zero; returns the norm before clipping.

        ``clip_grad_norm_`` computes the norm of the sharded gradients as a DTensor over all ranks;
        its full value is the global norm.
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
        optimizer = get_optimizer_state_dict(self.module, self.optimizer, options=options)
        if self.topology.is_main:
            torch.save({"optimizer": optimizer, "scheduler": self.scheduler.state_dict()}, directory / TRAINING_STATE)

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
        state = torch.load(file, map_location="cpu", weights_only=True)
        optimizer = state["optimizer"] if self.topology.is_main else {}
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_optimizer_state_dict(self.module, self.optimizer, optimizer, options=options)
        self.scheduler.load_state_dict(state["scheduler"])

    def close(self) -> None:
        """Leave a process group this engine opened itself (a single process)."""
        if self._own_process_group and dist.is_initialized():
            dist.destroy_process_group()
            self._own_process_group = False


def _refuse_copies_on_meta(delta: DeltaBase) -> None:
    """Raise if the delta trains copies of backbone parameters, which a meta-device backbone has no values for."""
    copies = [
        f"{op.module_name}.{op.param_name}"
        for op in delta._operations
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
