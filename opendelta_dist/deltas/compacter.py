"""Compacter: adapters whose projections are parameterised hypercomplex multiplications (Mahabadi et al., 2021).

A PHM layer's weight is a sum of Kronecker products, ``H = sum_i A_i (x) W_i``, with ``n`` small
"rule" matrices ``A_i`` (n, n) and ``n`` blocks ``W_i`` (in/n, out/n), so it holds about ``1/n`` of a
dense layer's parameters. ``W_i`` can itself be a rank-r product (``factorized_phm``), the rules a
rank-1 product (``factorized_phm_rule``). With ``shared_phm_rule`` one set of rules serves every PHM
layer of the delta, and with ``shared_W_phm`` every layer of the same shape shares its ``W`` (the
Compacter paper's sharing, which OpenDelta refused). Shared tensors are saved under every layer's
keys, so a checkpoint reads like an unshared one and loads either way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from opendelta_dist.auto_delta import register_delta_method
from opendelta_dist.backends import Backend
from opendelta_dist.basemodel import DeltaBase
from opendelta_dist.config import OPTIONS, BaseDeltaConfig, check_positive, check_positive_int, one_of, option
from opendelta_dist.deltas.adapter import check_activation, placement
from opendelta_dist.deltas.low_rank_adapter import ProjectionAdapter, bottleneck_size, glorot_
from opendelta_dist.errors import UnsupportedModuleError
from opendelta_dist.operations import InsertSequential, Operation, mark_fixed

PHM_W_INITS = ("glorot-uniform", "glorot-normal", "normal")
PHM_C_INITS = ("normal", "uniform")


def kronecker_sum(rules: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``sum_i kron(rules[i], blocks[i])``: rules (n, n, n) and blocks (n, p, q) -> a (n p, n q) matrix."""
    n, p, q = blocks.shape
    return torch.einsum("iab,ist->asbt", rules, blocks).reshape(n * p, n * q)


@dataclass(frozen=True)
class PHMInit:
    """How a PHM layer's tensors start: see :class:`CompacterModel` for the options."""

    c_init: str = "normal"
    w_init: str = "glorot-uniform"
    init_range: float = 0.0001

    def rules(self, tensor: torch.Tensor) -> None:
        """Rules normal(0, 0.01) or uniform(±0.01)."""
        tensor.normal_(std=0.01) if self.c_init == "normal" else tensor.uniform_(-0.01, 0.01)

    def blocks(self, tensor: torch.Tensor) -> None:
        """Every ``W_i`` (a matrix of its own) Glorot or normal(0, init_range)."""
        for block in tensor:
            if self.w_init == "normal":
                block.normal_(std=self.init_range)
            else:
                glorot_(block, self.w_init)


class PHMLinear(nn.Module):
    """``x H + b`` with ``H = sum_i phm_rule[i] (x) W[i]`` (parameterised hypercomplex multiplication).

    Parameter names follow OpenDelta's checkpoints: ``phm_rule`` or ``phm_rule_left`` /
    ``phm_rule_right``; ``W`` or ``W_left`` / ``W_right``; ``b``. Rules and weights passed in are
    shared with other layers; the others are created here.

    Args:
        in_features: input size (a multiple of ``phm_dim``).
        out_features: output size (a multiple of ``phm_dim``).
        phm_dim: ``n``, the number of Kronecker products.
        shared: tensors of other layers this layer uses as its own (by parameter name).
        factorized_phm_rule: the rules are rank-1 products.
        factorized_phm: ``W`` is a product of rank ``phm_rank``.
        phm_rank: that rank.
        learn_phm: whether the rules are trained.
        bias: whether the layer has a bias ``b`` (starts at zero).
        init: the initialisation of the rules and of ``W``.
        backend: makes the parameters.
        device: where they live.
        dtype: their dtype.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        phm_dim: int,
        shared: dict[str, nn.Parameter],
        factorized_phm_rule: bool,
        factorized_phm: bool,
        phm_rank: int,
        learn_phm: bool,
        bias: bool,
        init: PHMInit,
        backend: Backend,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        n, p, q = phm_dim, in_features // phm_dim, out_features // phm_dim
        shapes = phm_shapes(n, p, q, factorized_phm_rule, factorized_phm, phm_rank)
        for name, shape in shapes.items():
            param = shared.get(name)
            if param is None:
                fill = init.rules if name.startswith("phm_rule") else init.blocks
                param = backend.parameter(shape, fill, device, dtype)
                if name.startswith("phm_rule") and not learn_phm:
                    mark_fixed(param)
            self.register_parameter(name, param)
        self.b = backend.parameter((out_features,), nn.init.zeros_, device, dtype) if bias else None

    def weight(self) -> torch.Tensor:
        """The dense (in, out) matrix ``H`` this layer multiplies by."""
        # which factors exist is asked of ``_parameters``: on a sharded backend each attribute read is a gather
        factored = self._parameters
        rules = self.phm_rule_left @ self.phm_rule_right if "phm_rule_left" in factored else self.phm_rule
        blocks = torch.bmm(self.W_left, self.W_right) if "W_left" in factored else self.W
        return kronecker_sum(rules, blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x H + b``."""
        out = x @ self.weight()
        b = self.b
        return out if b is None else out + b


def phm_shapes(
    n: int, p: int, q: int, factorized_phm_rule: bool, factorized_phm: bool, rank: int
) -> dict[str, tuple[int, ...]]:
    """Names and shapes of a PHM layer's rule and weight tensors (``n`` blocks of ``p x q``)."""
    rules: dict[str, tuple[int, ...]] = {"phm_rule": (n, n, n)}
    if factorized_phm_rule:
        rules = {"phm_rule_left": (n, n, 1), "phm_rule_right": (n, 1, n)}
    weights = {"W_left": (n, p, rank), "W_right": (n, rank, q)} if factorized_phm else {"W": (n, p, q)}
    return {**rules, **weights}


@dataclass
class CompacterConfig(BaseDeltaConfig):
    """Options of :class:`CompacterModel`."""

    delta_type: ClassVar[str] = "compacter"
    parameter_order: ClassVar[tuple[str, ...]] = (
        "modified_modules",
        "exclude_modules",
        "unfrozen_modules",
        "common_structure",
        "interactive_modify",
        OPTIONS,
        "backend",
        "leave_out",
    )

    reduction_factor: int = option(
        16, "the bottleneck size is the module's output size divided by this.", check_positive_int
    )
    non_linearity: str = option("gelu_new", "the activation between the projections.", check_activation)
    phm_c_init: str = option(
        "normal",
        'initialisation of the rules, ``"normal"`` (std 0.01) or ``"uniform"`` (±0.01).',
        one_of(*PHM_C_INITS),
    )
    hypercomplex_division: int = option(
        4, "``n``; the hidden size and the bottleneck size must be multiples of it.", check_positive_int
    )
    learn_phm: bool = option(True, "train the rules (else they stay at their initial values, saved with the delta).")
    hypercomplex_nonlinearity: str = option(
        "glorot-uniform",
        'initialisation of ``W``: ``"glorot-uniform"``, ``"glorot-normal"`` or ``"normal"`` (std ``phm_init_range``).',
        one_of(*PHM_W_INITS),
    )
    shared_phm_rule: bool = option(False, "one set of rules for every PHM layer of the delta.")
    factorized_phm: bool = option(True, "``W_i = W_left_i W_right_i`` of rank ``phm_rank``.")
    shared_W_phm: bool = option(False, "PHM layers of the same shape share their ``W``.")
    factorized_phm_rule: bool = option(False, "each rule is a rank-1 product ``phm_rule_left_i phm_rule_right_i``.")
    phm_rank: int = option(1, "the rank of the factorised ``W``.", check_positive_int)
    phm_init_range: float = option(
        0.0001, 'standard deviation of the ``"normal"`` initialisation of ``W``.', check_positive
    )
    kronecker_prod: bool | None = option(
        None, "accepted for OpenDelta compatibility; both of its ways compute the same product."
    )
    use_bias_up_sampler: bool = option(True, "the up projection has a bias.")
    use_bias_down_sampler: bool = option(True, "the down projection has a bias.")


@register_delta_method
class CompacterModel(DeltaBase):
    """Compacter adapters (PHM projections) after the modified modules' outputs.

    ``modified_modules`` are keys of the modules whose outputs the adapters transform; by default the
    attention output projection and the feed-forward output projection of each block.
    """

    delta_type: ClassVar[str] = "compacter"
    config_class = CompacterConfig
    config: CompacterConfig
    default_modified_modules: ClassVar[list[Any]] = ["attn@.proj@", "ff@.w2@"]
    _need_pseudo_data = True

    @classmethod
    def opendelta_options(cls, options: dict[str, Any], backbone: nn.Module) -> dict[str, Any]:
        """OpenDelta's config declares ``bottleneck_dim`` and ``sequential``, which its Compacter never takes."""
        unused = ("bottleneck_dim", "sequential")
        options = {k: v for k, v in options.items() if not (k in unused and v is None)}
        return super().opendelta_options(options, backbone)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # the tensors PHM layers share: the rules under "rules", each W under (role, in, out)
        self._shared: dict[Any, dict[str, nn.Parameter]] = {}
        super().__init__(*args, **kwargs)

    def _phm(self, name: str, role: str, n_in: int, n_out: int, bias: bool, device: Any, dtype: Any) -> PHMLinear:
        config = self.config
        n = config.hypercomplex_division
        if n_in % n or n_out % n:
            raise UnsupportedModuleError(
                f"a Compacter {role} projection of {name!r} maps {n_in} -> {n_out} features, which are not both "
                f"multiples of hypercomplex_division={n}. Choose hypercomplex_division and reduction_factor so that "
                "the hidden size and hidden size // reduction_factor are multiples of it."
            )
        # the first layer of a kind creates the tensors to share; later ones take them from it
        shared: dict[str, nn.Parameter] = {}
        if config.shared_phm_rule:
            shared.update(self._shared.get("rules", {}))
        if config.shared_W_phm:
            shared.update(self._shared.get((role, n_in, n_out), {}))
        layer = PHMLinear(
            n_in,
            n_out,
            n,
            shared,
            config.factorized_phm_rule,
            config.factorized_phm,
            config.phm_rank,
            config.learn_phm,
            bias,
            PHMInit(config.phm_c_init, config.hypercomplex_nonlinearity, config.phm_init_range),
            self.backend_mapping,
            device,
            dtype,
        )
        own = dict(layer.named_parameters(recurse=False))
        if config.shared_phm_rule:
            self._shared.setdefault("rules", {k: v for k, v in own.items() if k.startswith("phm_rule")})
        if config.shared_W_phm:
            self._shared.setdefault((role, n_in, n_out), {k: v for k, v in own.items() if k.startswith("W")})
        return layer

    def update_module(self, name: str, module: nn.Module, io_dims: tuple[int, int] | None) -> list[Operation]:
        """A Compacter :class:`~opendelta_dist.deltas.low_rank_adapter.ProjectionAdapter` after ``name``'s output."""
        assert io_dims is not None
        config = self.config
        hidden = io_dims[1]
        down = bottleneck_size(name, hidden, config.reduction_factor)
        device, dtype = placement(module)
        layer = ProjectionAdapter(
            self._phm(name, "down", hidden, down, config.use_bias_down_sampler, device, dtype),
            config.non_linearity,
            self._phm(name, "up", down, hidden, config.use_bias_up_sampler, device, dtype),
        )
        return [InsertSequential(name, layer, "compactor", position="after")]
