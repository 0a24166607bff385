"""LoRA: a trainable low-rank update ``B A x * alpha / r`` beside frozen linear layers (Hu et al., 2021)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from opendelta_dist.auto_delta import register_delta_method
from opendelta_dist.backends import Backend
from opendelta_dist.basemodel import DeltaBase
from opendelta_dist.config import BaseDeltaConfig
from opendelta_dist.errors import DeltaConfigError, UnsupportedModuleError
from opendelta_dist.operations import InsertParallel, Operation


@dataclass
class LoraConfig(BaseDeltaConfig):
    """Options of :class:`LoraModel`."""

    delta_type: ClassVar[str] = "lora"

    lora_r: int = 8
    lora_alpha: int | float = 16
    lora_dropout: float = 0.0


class LowRankLinear(nn.Module):
    """The LoRA update of one linear layer: ``dropout(x) A^T B^T * (alpha / r)``.

    ``lora_A`` (r, in) starts Kaiming-uniform and ``lora_B`` (out, r) at zero, so a new delta leaves
    the layer's output unchanged.

    Args:
        in_features: the linear layer's input size.
        out_features: its output size.
        r: the rank.
        lora_alpha: the scale numerator.
        lora_dropout: dropout on the input of the update.
        backend: makes the parameters.
        device: where to put them.
        dtype: their dtype (the linear layer's).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int,
        lora_alpha: float,
        lora_dropout: float,
        backend: Backend,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.r = r
        self.lora_alpha = lora_alpha
        self.scaling = lora_alpha / r
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.lora_A = backend.parameter(torch.empty(r, in_features, device=device, dtype=dtype))
        self.lora_B = backend.parameter(torch.zeros(out_features, r, device=device, dtype=dtype))
        if self.lora_A.device.type != "meta":
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """``lora_A`` Kaiming-uniform, ``lora_B`` zero (also after materialising from the meta device)."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The update for input ``x``; the caller adds it to the linear layer's output."""
        # scaling the (tokens, r) intermediate is cheaper than scaling the (tokens, out) result
        hidden = F.linear(self.lora_dropout(x).to(self.lora_A.dtype), self.lora_A) * self.scaling
        return F.linear(hidden, self.lora_B)


@register_delta_method
class LoraModel(DeltaBase):
    """LoRA on the linear layers of a backbone (``nn.Linear`` and transformers' ``Conv1D``).

    Args:
        backbone_model: the model to modify.
        lora_r: rank of the update.
        lora_alpha: the update is scaled by ``lora_alpha / lora_r``.
        lora_dropout: dropout on the update's input.
        modified_modules: keys of the linear layers to modify; default the self-attention query and
            value projections of a known model family.
        unfrozen_modules, exclude_modules, common_structure, interactive_modify, backend: as
            :class:`~opendelta_dist.basemodel.DeltaBase`.
    """

    delta_type: ClassVar[str] = "lora"
    config_class = LoraConfig
    default_modified_modules: ClassVar[list[Any]] = ["attn@.q@", "attn@.v@"]

    def __init__(
        self,
        backbone_model: nn.Module,
        lora_r: int = 8,
        lora_alpha: int | float = 16,
        lora_dropout: float = 0.0,
        modified_modules: list[str] | None = None,
        unfrozen_modules: list[str] | None = None,
        exclude_modules: list[str] | None = None,
        common_structure: bool | None = None,
        interactive_modify: bool | int = False,
        backend: str = "hf",
    ) -> None:
        if not isinstance(lora_r, int) or isinstance(lora_r, bool) or lora_r < 1:
            raise DeltaConfigError(f"lora_r must be a positive integer, not {lora_r!r}")
        if not 0.0 <= lora_dropout < 1.0:
            raise DeltaConfigError(f"lora_dropout must be in [0, 1), not {lora_dropout!r}")
        self.lora_r = lora_r
        self.lora_alpha = lora_alpha
        self.lora_dropout = lora_dropout
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
        """A :class:`LowRankLinear` in parallel to the linear layer ``name``."""
        dims = self.backend_mapping.linear_dims(module)
        if dims is None:
            linears = [n for n, m in module.named_modules() if n and self.backend_mapping.linear_dims(m)]
            inside = f"; its linear layers are: {', '.join(f'{name}.{n}' for n in linears[:6])}" if linears else ""
            raise UnsupportedModuleError(
                f"LoRA modifies linear layers, but {name!r} is a {type(module).__name__}{inside}. "
                "Aim modified_modules at linear layers."
            )
        weight = module.weight
        layer = LowRankLinear(
            dims[0],
            dims[1],
            self.lora_r,
            self.lora_alpha,
            self.lora_dropout,
            self.backend_mapping,
            device=weight.device,
            dtype=weight.dtype,
        )
        return [InsertParallel(name, layer, "lora")]
