"""A sharded reference backend, to prove that delta methods use nothing but the backend protocol.

Every parameter it makes holds only this rank's partition, as a flat 1-d tensor with padding, the way a
ZeRO-3 style backend stores it; the full tensor exists only while a module reads the attribute (an
all-gather with autograd across the default process group, or a reshape on one process).
:func:`shard_model` stores a whole backbone this way too, so a delta method that reads a partition as
if it were the whole tensor (for its shape, its values, a checksum or a statistic) gets wrong shapes or
values, and the contract tests in ``test_contract.py`` fail.

It recognises the same layers as ``hf`` (it shards plain PyTorch and transformers models) and is
registered only by the tests, under the name ``sharded-reference``. It is not any real engine's backend.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import nn

from opendelta_dist.backends import BiasKind, InitFn, WeightLayout, get_backend, register_backend

NAME = "sharded-reference"
_FULL_SHAPE = "_reference_full_shape"
_INITS = "_reference_inits"


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _partition_size(numel: int) -> int:
    # one element of padding more than needed (BMTrain pads its storages too): a partition never has the
    # whole tensor's size, even on one process
    return math.ceil(numel / _world()[1]) + 1


def _gather(param: torch.Tensor, differentiable: bool) -> torch.Tensor:
    shape: torch.Size = getattr(param, _FULL_SHAPE)
    _, world = _world()
    if world == 1:
        flat = param
    elif differentiable:
        flat = torch.cat(dist_fn.all_gather(param))
    else:
        parts = [torch.empty_like(param) for _ in range(world)]
        dist.all_gather(parts, param.detach().contiguous())
        flat = torch.cat(parts)
    return flat[: shape.numel()].view(shape)


#: how often each sharded parameter attribute was read, by (module id, attribute name): every read is an
#: all-gather, as on BMTrain (tests clear it and count)
READS: Counter[tuple[int, str]] = Counter()


class _ShardedModule:
    """Mixed into a module's class: reading a sharded parameter attribute gathers the full tensor."""

    def __getattr__(self, name: str) -> object:
        value = super().__getattr__(name)  # type: ignore[misc]
        if isinstance(value, torch.Tensor) and hasattr(value, _FULL_SHAPE):
            READS[(id(self), name)] += 1
            return _gather(value, differentiable=True)
        return value


def _make_sharded(module: nn.Module) -> None:
    for sub in module.modules():
        cls = type(sub)
        if not issubclass(cls, _ShardedModule):
            sub.__class__ = type(f"Sharded{cls.__name__}", (_ShardedModule, cls), {})


class ShardedReferenceBackend:
    """Parameters as flat partitions across the default process group (see the module docstring)."""

    name = NAME
    capabilities = frozenset({"transformers"})

    def __init__(self) -> None:
        self._hf = get_backend("hf")

    @property
    def families(self) -> Mapping[str, Mapping[str, str]]:
        """The transformers families, as ``hf``."""
        return self._hf.families

    def _shard(self, full: torch.Tensor) -> nn.Parameter:
        rank, _ = _world()
        size = _partition_size(full.numel())
        flat = full.detach().reshape(-1)
        part = torch.zeros(size, dtype=full.dtype, device=full.device)
        piece = flat[rank * size : (rank + 1) * size]
        part[: piece.numel()] = piece
        param = nn.Parameter(part, requires_grad=True)
        setattr(param, _FULL_SHAPE, full.shape)
        return param

    def parameter(
        self,
        shape: tuple[int, ...],
        init: InitFn,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> nn.Parameter:
        """A partition of a full tensor initialised by ``init`` (the same on every rank: it is broadcast)."""
        full = torch.empty(shape, device=device, dtype=dtype)
        with torch.no_grad():
            init(full)
        if _world()[1] > 1:
            dist.broadcast(full, src=0)
        param = self._shard(full)
        param._delta_init = init  # type: ignore[attr-defined]
        return param

    def parameter_from(self, data: torch.Tensor) -> nn.Parameter:
        """A partition of ``data``."""
        return self._shard(data)

    def reset_module(self, module: nn.Module) -> None:
        """Initialise the module's parameters again from their recorded init functions."""
        inits = module.__dict__.get(_INITS, {})
        for sub_name, sub in module.named_modules():
            for name, param in sub._parameters.items():
                if param is not None:
                    full = torch.zeros(self.full_shape(param), dtype=param.dtype, device=param.device)
                    init = inits.get((sub_name, name))
                    if init is not None:
                        with torch.no_grad():
                            init(full)
                    self.load_full(param, full)

    def linear(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        device: torch.device | str | None,
        dtype: torch.dtype | None,
        init_weight: InitFn | None = None,
        init_bias: InitFn | None = None,
    ) -> nn.Module:
        """An ``nn.Linear`` of sharded parameters (made by ``hf``'s recipe, with this backend's parameters)."""
        return type(self._hf).linear(self, in_features, out_features, bias, device, dtype, init_weight, init_bias)  # type: ignore[arg-type]

    def prepare_module(self, module: nn.Module) -> None:
        """Make every submodule gather its sharded parameters on attribute access; record init functions."""
        module.__dict__[_INITS] = {
            (sub_name, name): param._delta_init
            for sub_name, sub in module.named_modules()
            for name, param in sub._parameters.items()
            if param is not None and hasattr(param, "_delta_init")
        }
        _make_sharded(module)

    def prepare_target(self, module: nn.Module) -> Callable[[], None]:
        """Make a backbone module that does not gather yet (an unsharded model) gather, until undone."""
        cls = type(module)
        if issubclass(cls, _ShardedModule):
            return lambda: None
        module.__class__ = type(f"Sharded{cls.__name__}", (_ShardedModule, cls), {})

        def undo() -> None:
            module.__class__ = cls

        return undo

    def owns(self, tensor: torch.Tensor) -> bool:
        """Parameters made by this backend (they carry their full shape)."""
        return hasattr(tensor, _FULL_SHAPE)

    def full_tensor(self, param: torch.Tensor) -> torch.Tensor:
        """The gathered full tensor (a collective), detached."""
        return _gather(param, differentiable=False).detach()

    def full_shape(self, param: torch.Tensor) -> torch.Size:
        """The full shape recorded at creation."""
        return getattr(param, _FULL_SHAPE)

    def load_full(self, param: torch.Tensor, value: torch.Tensor) -> None:
        """Copy this rank's partition of ``value`` into ``param``."""
        if tuple(value.shape) != tuple(self.full_shape(param)):
            raise ValueError(f"a tensor of shape {tuple(value.shape)} does not fit {tuple(self.full_shape(param))}")
        rank, _ = _world()
        size = param.numel()
        piece = value.detach().reshape(-1)[rank * size : (rank + 1) * size]
        with torch.no_grad():
            param.zero_()
            param[: piece.numel()].copy_(piece.to(device=param.device, dtype=param.dtype))

    def weight_layout(self, module: nn.Module) -> WeightLayout | None:
        """As ``hf``."""
        return self._hf.weight_layout(module)

    def linear_dims(self, module: nn.Module) -> tuple[int, int] | None:
        """As ``hf`` (the weight's shape is read through the gathering attribute)."""
        return self._hf.linear_dims(module)

    def bias_kind(self, module: nn.Module) -> tuple[BiasKind, int] | None:
        """As ``hf``."""
        return self._hf.bias_kind(module)


BACKEND = ShardedReferenceBackend()


def register() -> ShardedReferenceBackend:
    """Register the reference backend (idempotent) and return it."""
    register_backend(NAME, BACKEND)
    return BACKEND


def shard_model(model: nn.Module) -> nn.Module:
    """Store every parameter of ``model`` as a partition, in place (buffers stay whole); returns ``model``."""
    backend = register()
    sharded: dict[int, nn.Parameter] = {}  # tied parameters stay tied
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and not backend.owns(param):
                if id(param) not in sharded:
                    sharded[id(param)] = backend.parameter_from(param.detach())
                    sharded[id(param)].requires_grad_(param.requires_grad)
                module._parameters[name] = sharded[id(param)]
    _make_sharded(model)
    return model
