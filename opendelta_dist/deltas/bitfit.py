"""BitFit: tune only bias terms (Ben Zaken et al., 2022)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from opendelta_dist.addressing import named_backbone_modules
from opendelta_dist.auto_delta import register_delta_method
from opendelta_dist.backends import BiasKind
from opendelta_dist.basemodel import DeltaBase
from opendelta_dist.config import BaseDeltaConfig
from opendelta_dist.errors import UnsupportedModuleError
from opendelta_dist.operations import InsertSequential, Operation, original_parameter


class BiasLayer(nn.Module):
    """Adds a trainable bias (starting at zero) to a module's output."""

    def __init__(self, bias: nn.Parameter) -> None:
        super().__init__()
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x + bias``."""
        return x + self.bias.to(x.dtype)


@dataclass
class BitFitConfig(BaseDeltaConfig):
    """Options of :class:`BitFitModel` (BitFit has none of its own)."""

    delta_type: ClassVar[str] = "bitfit"


@register_delta_method
class BitFitModel(DeltaBase):
    """Trainable biases in every linear and normalisation layer inside the modified modules.

    Existing biases are unfrozen (the delta trains a copy; ``detach`` puts the original back);
    linear and LayerNorm layers without a bias get one; RMS norms (T5, Llama) get one added to
    their output. New biases start at zero.

    ``modified_modules`` are keys of the modules whose layers get trainable biases; by default the
    attention blocks, feed-forward blocks and normalisation layers.
    """

    delta_type: ClassVar[str] = "bitfit"
    config_class = BitFitConfig
    default_modified_modules: ClassVar[list[Any]] = ["attn@", "ff@", "layer_norm@"]

    @classmethod
    def opendelta_options(cls, options: dict[str, Any], backbone: nn.Module) -> dict[str, Any]:
        """OpenDelta's default role ``lm_head@.proj@`` never matched a module: it is dropped."""
        options = dict(options)
        if isinstance(options.get("modified_modules"), list):
            options["modified_modules"] = [m for m in options["modified_modules"] if m != "lm_head@.proj@"]
        return super().opendelta_options(options, backbone)

    def opendelta_tensors(self, tensors: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
        """OpenDelta adds the biases of layers without one lazily, at the first forward, after
        ``freeze_module(set_state_dict=True)`` fixed what its checkpoint holds: those biases (and those of
        layers it did not take for linear, like GPT-2's ``Conv1D``) are not in it and start as they start
        here (zero, or the layer's own bias)."""
        own = {key: self.backend_mapping.full_tensor(p) for key, p in self.named_delta_tensors()}
        return {**{key: value for key, value in own.items() if key not in tensors}, **tensors}

    def build_operations(self, backbone: nn.Module, modified_modules: list[Any]) -> list[Operation]:
        """A bias operation for every distinct bias-taking layer inside the selected modules."""
        ops: list[Operation] = []
        done: set[int] = set()
        for name in self.select(modified_modules):
            found = False
            for sub, module in named_backbone_modules(backbone.get_submodule(name), prefix=name):
                kind = self.backend_mapping.bias_kind(module)
                if kind is None:
                    continue
                found = True
                if id(module) not in done:
                    done.add(id(module))
                    ops.append(self._bias_operation(sub, module, *kind))
            if not found:
                raise UnsupportedModuleError(
                    f"BitFit found no linear or normalisation layer in {name!r} "
                    f"({type(backbone.get_submodule(name)).__name__}); aim it at modules that contain some"
                )
        return ops

    def _bias_operation(self, name: str, module: nn.Module, kind: BiasKind, size: int) -> Operation:
        weight = module.weight
        own = original_parameter(module, "bias")  # the backbone's, not another attached delta's
        if kind is BiasKind.EXISTING and own is not None:
            # whole, through the backend: a sharded bias is read as the tensor, not as this rank's partition
            return self.unfreeze_parameter(name, "bias", self.backend_mapping.full_tensor(own).clone())
        if kind in (BiasKind.EXISTING, BiasKind.EMPTY_SLOT):
            return self.unfreeze_parameter(name, "bias", torch.zeros(size, device=weight.device, dtype=weight.dtype))
        bias = self.backend_mapping.parameter((size,), nn.init.zeros_, weight.device, weight.dtype)
        return InsertSequential(name, BiasLayer(bias), "bitfit", position="after")
