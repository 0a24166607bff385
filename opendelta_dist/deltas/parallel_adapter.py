"""Parallel adapter: a bottleneck MLP beside a module or a span of modules (He et al., 2022)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from opendelta_dist.auto_delta import register_delta_method
from opendelta_dist.basemodel import DeltaBase
from opendelta_dist.config import BaseDeltaConfig, check_positive_int, option
from opendelta_dist.deltas.adapter import BottleneckMLP, check_activation, placement
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

    bottleneck_dim: int = option(24, "the adapter's hidden size.", check_positive_int)
    non_linearity: str = option("gelu_new", "its activation (a name of transformers' ``ACT2FN``).", check_activation)
    scaled: float = option(1.0, "factor on the adapter's output.")


@register_delta_method
class ParallelAdapterModel(DeltaBase):
    """Adapters that run beside modules and add to their outputs.

    Each entry of ``modified_modules`` is a key (the adapter runs beside that module: it reads the
    module's input and adds to its output) or a pair ``[first, last]`` of keys (the adapter reads
    the input of ``first`` and adds to the output of ``last``; the i-th match of ``first`` pairs with
    the i-th match of ``last``). Default: beside each self-attention block, and beside each
    feed-forward MLP from its input projection to its output projection.
    """

    delta_type: ClassVar[str] = "parallel_adapter"
    config_class = ParallelAdapterConfig
    config: ParallelAdapterConfig
    default_modified_modules: ClassVar[list[Any]] = ["attn@", ["ff@.w1@", "ff@.w2@"]]
    _need_pseudo_data = True

    @classmethod
    def opendelta_options(cls, options: dict[str, Any], backbone: nn.Module) -> dict[str, Any]:
        """OpenDelta lists parallel adapters as consecutive (first, last) module pairs and saves ``scaled`` null."""
        options = dict(options)
        modules = options.get("modified_modules")
        if isinstance(modules, list) and len(modules) % 2 == 0:
            pairs = zip(modules[::2], modules[1::2], strict=True)
            options["modified_modules"] = [a if a == b else [a, b] for a, b in pairs]
        if "scaled" in options and options["scaled"] is None:
            del options["scaled"]
        return super().opendelta_options(options, backbone)

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
                self.config.bottleneck_dim,
                dims[last][1],
                self.config.non_linearity,
                self.config.scaled,
                self.backend_mapping,
                device=device,
                dtype=dtype,
            )
            if first == last:
                ops.append(InsertParallel(first, layer, "parallel_adapter"))
            else:
                ops.append(InsertParallelSpan(first, layer, "parallel_adapter", last))
        return ops
