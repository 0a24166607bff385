"""Low-rank adapter: a residual bottleneck whose projections are rank-r products (Mahabadi et al., 2021).

The adapter after a module's output computes ``h + up(act(down(h)))`` where ``down`` and ``up``
are :class:`LowRankLinear` layers, ``x (W_left W_right) + b``. OpenDelta multiplied ``W_left`` and
``W_right`` elementwise, which is a rank-1 outer product for ``low_rank_rank=1`` and fails for any
other rank; here the product is a true matrix product, so every rank works.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar

import torch
from torch import nn

from opendelta_dist.auto_delta import register_delta_method
from opendelta_dist.backends import Backend
from opendelta_dist.basemodel import DeltaBase
from opendelta_dist.config import BaseDeltaConfig, check_positive_int, one_of, option
from opendelta_dist.deltas.adapter import activation, check_activation, placement
from opendelta_dist.errors import DeltaConfigError, UnsupportedModuleError
from opendelta_dist.operations import InsertSequential, Operation

W_INITS = ("glorot-uniform", "glorot-normal")


def glorot_(tensor: torch.Tensor, init: str) -> torch.Tensor:
    """Glorot (Xavier) initialisation of a 2-d weight in place: ``"glorot-uniform"`` or ``"glorot-normal"``."""
    if init == "glorot-uniform":
        return nn.init.xavier_uniform_(tensor)
    if init == "glorot-normal":
        return nn.init.xavier_normal_(tensor)
    raise DeltaConfigError(f"unknown weight initialisation {init!r}; choose one of {', '.join(W_INITS)}")


class LowRankLinear(nn.Module):
    """``x W_left W_right + b`` with ``W_left`` (in, rank) and ``W_right`` (rank, out).

    The rank-r intermediate is computed first, so the layer costs ``rank * (in + out)`` per token
    and never builds the full (in, out) matrix.

    Args:
        in_features: input size.
        out_features: output size.
        rank: the rank of the weight.
        w_init: ``"glorot-uniform"`` or ``"glorot-normal"`` for both factors; the bias starts at zero.
        backend: makes the parameters.
        device: where to put them.
        dtype: their dtype.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        w_init: str,
        backend: Backend,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        init = partial(glorot_, init=w_init)
        self.W_left = backend.parameter((in_features, rank), init, device, dtype)
        self.W_right = backend.parameter((rank, out_features), init, device, dtype)
        self.b = backend.parameter((out_features,), nn.init.zeros_, device, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x W_left W_right + b``."""
        return (x @ self.W_left) @ self.W_right + self.b


class ProjectionAdapter(nn.Module):
    """A residual adapter ``h + up_sampler(activation(down_sampler(h)))`` over any two projections.

    The low-rank adapter and Compacter share this layer and differ in their projections. The
    projections run in their own dtype; the result is returned in ``h``'s.
    """

    def __init__(self, down_sampler: nn.Module, non_linearity: str, up_sampler: nn.Module) -> None:
        super().__init__()
        self.down_sampler = down_sampler
        self.activation = activation(non_linearity)
        self.up_sampler = up_sampler

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden`` plus the adapter's output."""
        dtype = next(self.down_sampler.parameters()).dtype
        out = self.up_sampler(self.activation(self.down_sampler(hidden.to(dtype))))
        return hidden + out.to(hidden.dtype)


def bottleneck_size(name: str, hidden: int, reduction_factor: int) -> int:
    """``hidden // reduction_factor``, or a clear error when that is zero."""
    size = hidden // reduction_factor
    if size < 1:
        raise UnsupportedModuleError(
            f"the output of {name!r} has {hidden} features, fewer than reduction_factor={reduction_factor}: "
            "the adapter's bottleneck would be empty. Lower reduction_factor."
        )
    return size


@dataclass
class LowRankAdapterConfig(BaseDeltaConfig):
    """Options of :class:`LowRankAdapterModel`."""

    delta_type: ClassVar[str] = "lowrankadapter"

    reduction_factor: int = option(
        32, "the bottleneck size is the module's output size divided by this.", check_positive_int
    )
    non_linearity: str = option(
        "gelu_new", "the activation between the projections (a name of transformers' ``ACT2FN``).", check_activation
    )
    low_rank_w_init: str = option("glorot-uniform", '``"glorot-uniform"`` or ``"glorot-normal"``.', one_of(*W_INITS))
    low_rank_rank: int = option(1, "the rank of each projection's weight.", check_positive_int)


@register_delta_method
class LowRankAdapterModel(DeltaBase):
    """Low-rank adapters after the modified modules' outputs.

    ``modified_modules`` are keys of the modules whose outputs the adapters transform; by default the
    attention output projection and the feed-forward output projection of each block.
    """

    delta_type: ClassVar[str] = "lowrankadapter"
    delta_type_aliases: ClassVar[tuple[str, ...]] = ("low_rank_adapter",)  # OpenDelta 0.3.2's config.json
    config_class = LowRankAdapterConfig
    config: LowRankAdapterConfig
    default_modified_modules: ClassVar[list[Any]] = ["attn@.proj@", "ff@.w2@"]
    _need_pseudo_data = True

    def update_module(self, name: str, module: nn.Module, io_dims: tuple[int, int] | None) -> list[Operation]:
        """A low-rank :class:`ProjectionAdapter` after the output of ``name``."""
        assert io_dims is not None
        config = self.config
        hidden = io_dims[1]
        down = bottleneck_size(name, hidden, config.reduction_factor)
        device, dtype = placement(module)

        def projection(n_in: int, n_out: int) -> LowRankLinear:
            return LowRankLinear(
                n_in, n_out, config.low_rank_rank, config.low_rank_w_init, self.backend_mapping, device, dtype
            )

        layer = ProjectionAdapter(projection(hidden, down), config.non_linearity, projection(down, hidden))
        return [InsertSequential(name, layer, "low_rank_adapter", position="after")]
