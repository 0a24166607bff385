"""Adapter: a residual bottleneck MLP after a module's output (Houlsby et al., 2019)."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from opendelta_dist.auto_delta import register_delta_method
from opendelta_dist.backends import Backend
from opendelta_dist.basemodel import DeltaBase
from opendelta_dist.config import BaseDeltaConfig, check_positive_int
from opendelta_dist.errors import DeltaConfigError
from opendelta_dist.operations import InsertSequential, Operation


def activation(name: str) -> nn.Module:
    """The activation module called ``name`` in transformers' ``ACT2FN`` (``gelu_new``, ``relu``, ...).

    Raises:
        DeltaConfigError: no activation has that name.
    """
    from transformers.activations import ACT2FN

    if name not in ACT2FN:
        raise DeltaConfigError(f"unknown non_linearity {name!r}; choose one of {', '.join(sorted(ACT2FN))}")
    return ACT2FN[name]


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
        down = backend.linear(in_dim, bottleneck_dim, True, device, dtype)
        up = backend.linear(bottleneck_dim, out_dim, True, device, dtype)
        self.modulelist = nn.Sequential(
            OrderedDict([("down_proj", down), ("non_linear", activation(non_linearity)), ("up_proj", up)])
        )
        if down.weight.device.type != "meta":
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """Weights normal(0, 0.01), biases zero (also after materialising from the meta device)."""
        for layer in (self.modulelist.down_proj, self.modulelist.up_proj):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The bottleneck MLP of ``x``, in ``x``'s dtype."""
        dtype = self.modulelist.down_proj.weight.dtype
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

    bottleneck_dim: int = 24
    non_linearity: str = "gelu_new"


@register_delta_method
class AdapterModel(DeltaBase):
    """Sequential adapters after the modified modules' outputs.

    Args:
        backbone_model: the model to modify.
        bottleneck_dim: the adapter's hidden size.
        non_linearity: its activation (a name of transformers' ``ACT2FN``).
        modified_modules: keys of the modules whose outputs the adapters transform; default the
            attention output projection and the feed-forward output projection of each block.
        exclude_modules, unfrozen_modules, common_structure, interactive_modify, backend: as
            :class:`~opendelta_dist.basemodel.DeltaBase`.
    """

    delta_type: ClassVar[str] = "adapter"
    config_class = AdapterConfig
    default_modified_modules: ClassVar[list[Any]] = ["attn@.proj@", "ff@.w2@"]
    _need_pseudo_data = True

    def __init__(
        self,
        backbone_model: nn.Module,
        bottleneck_dim: int = 24,
        non_linearity: str = "gelu_new",
        modified_modules: list[str] | None = None,
        exclude_modules: list[str] | None = None,
        unfrozen_modules: list[str] | None = None,
        common_structure: bool | None = None,
        interactive_modify: bool | int = False,
        backend: str = "hf",
    ) -> None:
        check_positive_int("bottleneck_dim", bottleneck_dim)
        activation(non_linearity)
        self.bottleneck_dim = bottleneck_dim
        self.non_linearity = non_linearity
        super().__init__(
            backbone_model,
            modified_modules=modified_modules,
            exclude_modules=exclude_modules,
            unfrozen_modules=unfrozen_modules,
            common_structure=common_structure,
            interactive_modify=interactive_modify,
            backend=backend,
        )

    def update_module(self, name: str, module: nn.Module, io_dims: tuple[int, int] | None) -> list[Operation]:
        """An :class:`AdapterLayer` after the output of ``name``."""
        assert io_dims is not None
        device, dtype = placement(module)
        layer = AdapterLayer(
            io_dims[1], self.bottleneck_dim, self.non_linearity, self.backend_mapping, device=device, dtype=dtype
        )
        return [InsertSequential(name, layer, "adapter", position="after")]


def placement(module: nn.Module) -> tuple[torch.device | None, torch.dtype | None]:
    """Device and floating dtype of a module's first parameter (for new delta layers beside it)."""
    for p in module.parameters():
        if p.is_floating_point():
            return p.device, p.dtype
    return None, None
