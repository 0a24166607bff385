"""Adapter: a residual bottleneck MLP after a module's output (Houlsby et al., 2019)."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar

import torch
from torch import nn

from opendelta_dist.auto_delta import register_delta_method
from opendelta_dist.backends import Backend
from opendelta_dist.basemodel import DeltaBase
from opendelta_dist.config import BaseDeltaConfig, check_positive_int, option
from opendelta_dist.errors import DeltaConfigError
from opendelta_dist.operations import InsertSequential, Operation


def check_activation(option_name: str, name: Any) -> None:
    """Raise :class:`~opendelta_dist.errors.DeltaConfigError` if the string ``name`` (the value of the
    option ``option_name``) is not an activation of transformers' ``ACT2FN`` (``gelu_new``, ``relu``, ...)."""
    from transformers.activations import ACT2FN

    if isinstance(name, str) and name not in ACT2FN:
        raise DeltaConfigError(f"unknown {option_name} {name!r}; choose one of {', '.join(sorted(ACT2FN))}")


def activation(name: str) -> nn.Module:
    """The activation module called ``name`` in transformers' ``ACT2FN`` (``gelu_new``, ``relu``, ...).

    Raises:
        DeltaConfigError: no activation has that name.
    """
    from transformers.activations import ACT2FN

    check_activation("non_linearity", name)
    return ACT2FN[name]


#: the bottleneck's weights start normal(0, 0.01)
WEIGHT_INIT = partial(nn.init.normal_, std=0.01)


class BottleneckMLP(nn.Module):
    """``up(act(down(x)))``: ``in_dim -> bottleneck_dim -> out_dim``.

    Weights start normal(0, 0.01) and biases at zero, so a new adapter is close to the identity.
    """

    def __init__(
        self,
        in_dim: int,
        bottleneck_dim: int,
        out_dim: int,
        non_linearity: str,
        backend: Backend,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        down = backend.linear(in_dim, bottleneck_dim, True, device, dtype, WEIGHT_INIT, nn.init.zeros_)
        up = backend.linear(bottleneck_dim, out_dim, True, device, dtype, WEIGHT_INIT, nn.init.zeros_)
        self.modulelist = nn.Sequential(
            OrderedDict([("down_proj", down), ("non_linear", activation(non_linearity)), ("up_proj", up)])
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The bottleneck MLP of ``x``, in ``x``'s dtype."""
        # the dtype is read without reading the weight: on a sharded backend every read is a gather
        dtype = next(self.modulelist.down_proj.parameters()).dtype
        return self.modulelist(x.to(dtype)).to(x.dtype)


class AdapterLayer(BottleneckMLP):
    """A residual adapter: ``x + up(act(down(x)))``."""

    def __init__(self, hidden_dim: int, bottleneck_dim: int, non_linearity: str, backend: Backend, **kw: Any) -> None:
        super().__init__(hidden_dim, bottleneck_dim, hidden_dim, non_linearity, backend, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` plus the bottleneck MLP of ``x``."""
        return x + super().forward(x)


@dataclass
class AdapterConfig(BaseDeltaConfig):
    """Options of :class:`AdapterModel`."""

    delta_type: ClassVar[str] = "adapter"

    bottleneck_dim: int = option(24, "the adapter's hidden size.", check_positive_int)
    non_linearity: str = option("gelu_new", "its activation (a name of transformers' ``ACT2FN``).", check_activation)


@register_delta_method
class AdapterModel(DeltaBase):
    """Sequential adapters after the modified modules' outputs.

    ``modified_modules`` are keys of the modules whose outputs the adapters transform; by default the
    attention output projection and the feed-forward output projection of each block.
    """

    delta_type: ClassVar[str] = "adapter"
    config_class = AdapterConfig
    config: AdapterConfig
    default_modified_modules: ClassVar[list[Any]] = ["attn@.proj@", "ff@.w2@"]
    _need_pseudo_data = True

    def update_module(self, name: str, module: nn.Module, io_dims: tuple[int, int] | None) -> list[Operation]:
        """An :class:`AdapterLayer` after the output of ``name``."""
        assert io_dims is not None
        device, dtype = placement(module)
        layer = AdapterLayer(
            io_dims[1],
            self.config.bottleneck_dim,
            self.config.non_linearity,
            self.backend_mapping,
            device=device,
            dtype=dtype,
        )
        return [InsertSequential(name, layer, "adapter", position="after")]


def placement(module: nn.Module) -> tuple[torch.device | None, torch.dtype | None]:
    """Device and floating dtype of a module's first parameter (for new delta layers beside it)."""
    for p in module.parameters():
        if p.is_floating_point():
            return p.device, p.dtype
    return None, None
