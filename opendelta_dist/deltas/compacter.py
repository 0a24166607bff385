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
from opendelta_dist.config import BaseDeltaConfig, check_positive_int
from opendelta_dist.deltas.adapter import activation, placement
from opendelta_dist.deltas.low_rank_adapter import ProjectionAdapter, bottleneck_size, glorot_
from opendelta_dist.errors import DeltaConfigError, UnsupportedModuleError
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
        self.init = init
        shapes = phm_shapes(n, p, q, factorized_phm_rule, factorized_phm, phm_rank)
        for name, shape in shapes.items():
            param = shared.get(name)
            if param is None:
                param = backend.parameter(torch.empty(shape, device=device, dtype=dtype))
                if name.startswith("phm_rule") and not learn_phm:
                    mark_fixed(param)
            self.register_parameter(name, param)
        self.b = backend.parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None
        if not any(param.is_meta for param in self.parameters()):
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """Rules normal(0, 0.01) or uniform(±0.01); every ``W_i`` Glorot or normal(0, init_range); ``b`` zero."""
        with torch.no_grad():
            for name, param in self.named_parameters(recurse=False):
                if name.startswith("phm_rule"):
                    param.normal_(std=0.01) if self.init.c_init == "normal" else param.uniform_(-0.01, 0.01)
                elif name == "b":
                    param.zero_()
                else:
                    for block in param:  # every W_i is a matrix of its own
                        if self.init.w_init == "normal":
                            block.normal_(std=self.init.init_range)
                        else:
                            glorot_(block, self.init.w_init)

    def weight(self) -> torch.Tensor:
        """The dense (in, out) matrix ``H`` this layer multiplies by."""
        rules = self.phm_rule_left @ self.phm_rule_right if hasattr(self, "phm_rule_left") else self.phm_rule
        blocks = torch.bmm(self.W_left, self.W_right) if hasattr(self, "W_left") else self.W
        return kronecker_sum(rules, blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x H + b``."""
        out = x @ self.weight()
        return out if self.b is None else out + self.b


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

    reduction_factor: int = 16
    non_linearity: str = "gelu_new"
    phm_c_init: str = "normal"
    hypercomplex_division: int = 4
    learn_phm: bool = True
    hypercomplex_nonlinearity: str = "glorot-uniform"
    shared_phm_rule: bool = False
    factorized_phm: bool = True
    shared_W_phm: bool = False
    factorized_phm_rule: bool = False
    phm_rank: int = 1
    phm_init_range: float = 0.0001
    kronecker_prod: bool | None = None
    use_bias_up_sampler: bool = True
    use_bias_down_sampler: bool = True


@register_delta_method
class CompacterModel(DeltaBase):
    """Compacter adapters (PHM projections) after the modified modules' outputs.

    Args:
        backbone_model: the model to modify.
        reduction_factor: the bottleneck size is the module's output size divided by this.
        non_linearity: the activation between the projections.
        phm_c_init: initialisation of the rules, ``"normal"`` (std 0.01) or ``"uniform"`` (±0.01).
        hypercomplex_division: ``n``; the hidden size and the bottleneck size must be multiples of it.
        learn_phm: train the rules (else they stay at their initial values, saved with the delta).
        hypercomplex_nonlinearity: initialisation of ``W``: ``"glorot-uniform"``, ``"glorot-normal"``
            or ``"normal"`` (std ``phm_init_range``).
        shared_phm_rule: one set of rules for every PHM layer of the delta.
        factorized_phm: ``W_i = W_left_i W_right_i`` of rank ``phm_rank``.
        shared_W_phm: PHM layers of the same shape share their ``W``.
        factorized_phm_rule: each rule is a rank-1 product ``phm_rule_left_i phm_rule_right_i``.
        phm_rank: the rank of the factorised ``W``.
        phm_init_range: standard deviation of the ``"normal"`` initialisation of ``W``.
        kronecker_prod: accepted for OpenDelta compatibility; both of its ways compute the same product.
        use_bias_up_sampler: the up projection has a bias.
        use_bias_down_sampler: the down projection has a bias.
        modified_modules: keys of the modules whose outputs the adapters transform; default the
            attention output projection and the feed-forward output projection of each block.
        exclude_modules, unfrozen_modules, common_structure, interactive_modify, backend: as
            :class:`~opendelta_dist.basemodel.DeltaBase`.
    """

    delta_type: ClassVar[str] = "compacter"
    config_class = CompacterConfig
    default_modified_modules: ClassVar[list[Any]] = ["attn@.proj@", "ff@.w2@"]
    _need_pseudo_data = True

    def __init__(
        self,
        backbone_model: nn.Module,
        modified_modules: list[str] | None = None,
        exclude_modules: list[str] | None = None,
        unfrozen_modules: list[str] | None = None,
        common_structure: bool | None = None,
        interactive_modify: bool | int = False,
        reduction_factor: int = 16,
        non_linearity: str = "gelu_new",
        phm_c_init: str = "normal",
        hypercomplex_division: int = 4,
        learn_phm: bool = True,
        hypercomplex_nonlinearity: str = "glorot-uniform",
        shared_phm_rule: bool = False,
        factorized_phm: bool = True,
        shared_W_phm: bool = False,
        factorized_phm_rule: bool = False,
        phm_rank: int = 1,
        phm_init_range: float = 0.0001,
        kronecker_prod: bool | None = None,
        use_bias_up_sampler: bool = True,
        use_bias_down_sampler: bool = True,
        backend: str = "hf",
    ) -> None:
        check_positive_int("reduction_factor", reduction_factor)
        check_positive_int("hypercomplex_division", hypercomplex_division)
        check_positive_int("phm_rank", phm_rank)
        if phm_c_init not in PHM_C_INITS:
            raise DeltaConfigError(f"phm_c_init must be one of {', '.join(PHM_C_INITS)}, not {phm_c_init!r}")
        if hypercomplex_nonlinearity not in PHM_W_INITS:
            raise DeltaConfigError(
                f"hypercomplex_nonlinearity must be one of {', '.join(PHM_W_INITS)}, not {hypercomplex_nonlinearity!r}"
            )
        if not phm_init_range > 0:
            raise DeltaConfigError(f"phm_init_range must be positive, not {phm_init_range!r}")
        activation(non_linearity)
        self.reduction_factor = reduction_factor
        self.non_linearity = non_linearity
        self.phm_c_init = phm_c_init
        self.hypercomplex_division = hypercomplex_division
        self.learn_phm = learn_phm
        self.hypercomplex_nonlinearity = hypercomplex_nonlinearity
        self.shared_phm_rule = shared_phm_rule
        self.factorized_phm = factorized_phm
        self.shared_W_phm = shared_W_phm
        self.factorized_phm_rule = factorized_phm_rule
        self.phm_rank = phm_rank
        self.phm_init_range = phm_init_range
        self.kronecker_prod = kronecker_prod
        self.use_bias_up_sampler = use_bias_up_sampler
        self.use_bias_down_sampler = use_bias_down_sampler
        self._shared: dict[Any, dict[str, nn.Parameter]] = {}
        super().__init__(
            backbone_model,
            modified_modules=modified_modules,
            exclude_modules=exclude_modules,
            unfrozen_modules=unfrozen_modules,
            common_structure=common_structure,
            interactive_modify=interactive_modify,
            backend=backend,
        )

    def _phm(self, name: str, role: str, n_in: int, n_out: int, bias: bool, device: Any, dtype: Any) -> PHMLinear:
        n = self.hypercomplex_division
        if n_in % n or n_out % n:
            raise UnsupportedModuleError(
                f"a Compacter {role} projection of {name!r} maps {n_in} -> {n_out} features, which are not both "
                f"multiples of hypercomplex_division={n}. Choose hypercomplex_division and reduction_factor so that "
                "the hidden size and hidden size // reduction_factor are multiples of it."
            )
        # the first layer of a kind creates the tensors to share; later ones take them from it
        shared: dict[str, nn.Parameter] = {}
        if self.shared_phm_rule:
            shared.update(self._shared.get("rules", {}))
        if self.shared_W_phm:
            shared.update(self._shared.get((role, n_in, n_out), {}))
        layer = PHMLinear(
            n_in,
            n_out,
            n,
            shared,
            self.factorized_phm_rule,
            self.factorized_phm,
            self.phm_rank,
            self.learn_phm,
            bias,
            PHMInit(self.phm_c_init, self.hypercomplex_nonlinearity, self.phm_init_range),
            self.backend_mapping,
            device,
            dtype,
        )
        own = dict(layer.named_parameters(recurse=False))
        if self.shared_phm_rule:
            self._shared.setdefault("rules", {k: v for k, v in own.items() if k.startswith("phm_rule")})
        if self.shared_W_phm:
            self._shared.setdefault((role, n_in, n_out), {k: v for k, v in own.items() if k.startswith("W")})
        return layer

    def update_module(self, name: str, module: nn.Module, io_dims: tuple[int, int] | None) -> list[Operation]:
        """A Compacter :class:`~opendelta_dist.deltas.low_rank_adapter.ProjectionAdapter` after ``name``'s output."""
        assert io_dims is not None
        hidden = io_dims[1]
        down = bottleneck_size(name, hidden, self.reduction_factor)
        device, dtype = placement(module)
        layer = ProjectionAdapter(
            self._phm(name, "down", hidden, down, self.use_bias_down_sampler, device, dtype),
            self.non_linearity,
            self._phm(name, "up", down, hidden, self.use_bias_up_sampler, device, dtype),
        )
        return [InsertSequential(name, layer, "compactor", position="after")]
