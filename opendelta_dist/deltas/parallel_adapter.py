"""Parallel adapter: a bottleneck MLP beside a module or a span of modules (He et al., 2022)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from opendelta_dist.auto_delta import register_delta_method
from opendelta_dist.basemodel import DeltaBase
from opendelta_dist.config import BaseDeltaConfig, check_positive_int
from opendelta_dist.deltas.adapter import BottleneckMLP, activation, placement
from opendelta_dist.errors import DeltaConfigError
from opendelta_dist.operations import InsertParallel, InsertParallelSpan, Operation


class ParallelAdapterLayer(BottleneckMLP):
    """``scaled * up(act(down(x)))``, added to the output of the module (span) it runs beside."""

    def __init__(
        self, in_dim: int, bottleneck_dim: int, out_dim: int, non_linearity: str, scaled: float, backend: Any, **kw: Any
    ) -> None:
        super().__init__(in_dim, bottleneck_dim, out_dim, non_linearity, backend, **kw)
        self.scaled = scaled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The scaled bottleneck MLP of ``x``."""
        return super().forward(x) * self.scaled


@dataclass
class ParallelAdapterConfig(BaseDeltaConfig):
    """Options of :class:`ParallelAdapterModel`."""

    delta_type: ClassVar[str] = "parallel_adapter"

    bottleneck_dim: int = 24
    non_linearity: str = "gelu_new"
    scaled: float = 1.0


@register_delta_method
class ParallelAdapterModel(DeltaBase):
    """Adapters that run beside modules and add to their outputs.

    Each entry of ``modified_modules`` is a key (the adapter runs beside that module: it reads the
    module's input and adds to its output) or a pair ``[first, last]`` of keys (the adapter reads
    the input of ``first`` and adds to the output of ``last``; the i-th match of ``first`` pairs with
    the i-th match of ``last``). Default: beside each self-attention block, and beside each
    feed-forward MLP from its input projection to its output projection.

    Args:
        backbone_model: the model to modify.
        bottleneck_dim: the adapter's hidden size.
        non_linearity: its activation (a name of transformers' ``ACT2FN``).
        scaled: factor on the adapter's output.
        modified_modules, exclude_modules, unfrozen_modules, common_structure, interactive_modify,
            backend: as :class:`~opendelta_dist.basemodel.DeltaBase`.
    """

    delta_type: ClassVar[str] = "parallel_adapter"
    config_class = ParallelAdapterConfig
    default_modified_modules: ClassVar[list[Any]] = ["attn@", ["ff@.w1@", "ff@.w2@"]]
    _need_pseudo_data = True

    def __init__(
        self,
        backbone_model: nn.Module,
        bottleneck_dim: int = 24,
        non_linearity: str = "gelu_new",
        scaled: float = 1.0,
        modified_modules: list[str | list[str]] | None = None,
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
        self.scaled = scaled
        super().__init__(
            backbone_model,
            modified_modules=modified_modules,
            exclude_modules=exclude_modules,
            unfrozen_modules=unfrozen_modules,
            common_structure=common_structure,
            interactive_modify=interactive_modify,
            backend=backend,
        )

    def build_operations(self, backbone: nn.Module, modified_modules: list[Any]) -> list[Operation]:
        """One adapter per selected module, or per (first, last) pair of a span entry."""
        spans: list[tuple[str, str]] = []
        for entry in modified_modules:
            if isinstance(entry, str):
                spans.extend((n, n) for n in self.select([entry]))
                continue
            if len(entry) != 2:
                raise DeltaConfigError(f"a span in modified_modules is a pair [first, last], not {entry!r}")
            firsts, lasts = self.select([entry[0]]), self.select([entry[1]])
            if len(firsts) != len(lasts):
                raise DeltaConfigError(
                    f"span {entry!r}: {entry[0]!r} matches {len(firsts)} modules but {entry[1]!r} matches "
                    f"{len(lasts)}; each first module needs one last module"
                )
            spans.extend(zip(firsts, lasts, strict=True))
        dims = self.probe_io_dims(sorted({n for span in spans for n in span}))
        ops: list[Operation] = []
        for first, last in spans:
            device, dtype = placement(backbone.get_submodule(first))
            layer = ParallelAdapterLayer(
                dims[first][0],
                self.bottleneck_dim,
                dims[last][1],
                self.non_linearity,
                self.scaled,
                self.backend_mapping,
                device=device,
                dtype=dtype,
            )
            if first == last:
                ops.append(InsertParallel(first, layer, "parallel_adapter"))
            else:
                ops.append(InsertParallelSpan(first, layer, "parallel_adapter", last))
        return ops
