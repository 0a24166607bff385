"""The ``hf`` backend: plain ``torch.nn.Parameter``s on PyTorch and transformers models."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from functools import partial

import torch
from torch import nn

from opendelta_dist.backends import BiasKind, InitFn, WeightLayout, backend_of

try:  # GPT-2 style linear layer with a transposed (in, out) weight
    from transformers.pytorch_utils import Conv1D
except ImportError:  # transformers is a dependency, but the backend does not need it to work
    Conv1D = None

#: where a new parameter keeps its init function until :meth:`HFBackend.prepare_module` records it
INIT_ATTRIBUTE = "_delta_init"
#: where a prepared delta module keeps its parameters' init functions, by (submodule, parameter) name
INITS_ATTRIBUTE = "_delta_inits"


def _nothing() -> None:
    return None


def _is_rms_norm(module: nn.Module) -> bool:
    # T5LayerNorm, LlamaRMSNorm and their many copies in transformers: a 1-d scale and no bias
    name = type(module).__name__
    weight = module._parameters.get("weight")
    return (
        (name.endswith("RMSNorm") or name.endswith("LayerNorm"))
        and weight is not None
        and len(backend_of(weight).full_shape(weight)) == 1
        and "bias" not in module._parameters
    )


#: ``nn.Linear``'s own weight initialisation: Kaiming-uniform with ``a = sqrt(5)``
torch_linear_weight_init: InitFn = partial(nn.init.kaiming_uniform_, a=math.sqrt(5))


def torch_linear_bias_init(in_features: int) -> InitFn:
    """``nn.Linear``'s own bias initialisation: uniform in ``±1/sqrt(in_features)``."""
    bound = 1 / math.sqrt(in_features) if in_features > 0 else 0.0
    return partial(nn.init.uniform_, a=-bound, b=bound)


class HFBackend:
    """Backend of plain PyTorch modules (``nn.Linear``, transformers' ``Conv1D``, norms)."""

    name = "hf"
    capabilities = frozenset({"transformers"})

    @property
    def families(self) -> Mapping[str, Mapping[str, str]]:
        """The transformers model families (:data:`opendelta_dist.structure.FAMILIES`)."""
        from opendelta_dist.structure import FAMILIES

        return FAMILIES

    def parameter(
        self,
        shape: tuple[int, ...],
        init: InitFn,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> nn.Parameter:
        """A new ``nn.Parameter`` filled by ``init`` (on the meta device, left for :meth:`reset_module`)."""
        param = nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
        setattr(param, INIT_ATTRIBUTE, init)
        if not param.is_meta:
            with torch.no_grad():
                init(param)
        return param

    def parameter_from(self, data: torch.Tensor) -> nn.Parameter:
        """``data`` as a trainable ``nn.Parameter`` (no copy: pass a tensor nothing else holds)."""
        return nn.Parameter(data, requires_grad=True)

    def reset_module(self, module: nn.Module) -> None:
        """Initialise a prepared delta module's parameters again, as :meth:`parameter` did.

        For a module built on the meta device and materialised later (``to_empty``); the init functions
        were recorded by :meth:`prepare_module`, so parameters replaced since (e.g. by FSDP's sharding)
        are initialised too. A parameter made from values (:meth:`parameter_from`) has no init function
        and starts at zero.
        """
        inits: dict[tuple[str, str], InitFn] = module.__dict__.get(INITS_ATTRIBUTE, {})
        with torch.no_grad():
            for sub_name, sub in module.named_modules():
                for name, param in sub._parameters.items():
                    if param is not None:
                        init = inits.get((sub_name, name))
                        param.zero_() if init is None else init(param)

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
        """A new ``nn.Linear`` whose parameters come from :meth:`parameter` (torch's init by default)."""
        layer = nn.Linear(in_features, out_features, bias=False, device="meta")
        layer.weight = self.parameter(
            (out_features, in_features), init_weight or torch_linear_weight_init, device, dtype
        )
        if bias:
            init_bias = init_bias or torch_linear_bias_init(in_features)
            layer.bias = self.parameter((out_features,), init_bias, device, dtype)
        return layer

    def prepare_module(self, module: nn.Module) -> None:
        """Record the init functions of ``module``'s parameters (for :meth:`reset_module`); it runs as it is."""
        module.__dict__[INITS_ATTRIBUTE] = {
            (sub_name, name): getattr(param, INIT_ATTRIBUTE)
            for sub_name, sub in module.named_modules()
            for name, param in sub._parameters.items()
            if param is not None and hasattr(param, INIT_ATTRIBUTE)
        }

    def prepare_target(self, module: nn.Module) -> Callable[[], None]:
        """Nothing to do: a plain module reads a plain parameter as it is."""
        return _nothing

    def owns(self, tensor: torch.Tensor) -> bool:
        """Every plain tensor."""
        return True

    def full_tensor(self, param: torch.Tensor) -> torch.Tensor:
        """``param`` itself, detached: it is whole."""
        return param.detach()

    def full_shape(self, param: torch.Tensor) -> torch.Size:
        """``param.shape``."""
        return param.shape

    def load_full(self, param: torch.Tensor, value: torch.Tensor) -> None:
        """``param.copy_(value)``, cast to ``param``'s dtype and device."""
        with torch.no_grad():
            param.copy_(value.to(device=param.device, dtype=param.dtype))

    def weight_layout(self, module: nn.Module) -> WeightLayout | None:
        """``OUT_IN`` for ``nn.Linear``, ``IN_OUT`` for transformers' ``Conv1D``, else None."""
        if isinstance(module, nn.Linear):
            return WeightLayout.OUT_IN
        if Conv1D is not None and isinstance(module, Conv1D):
            return WeightLayout.IN_OUT
        return None

    def linear_dims(self, module: nn.Module) -> tuple[int, int] | None:
        """``(in_features, out_features)`` of an ``nn.Linear`` or ``Conv1D``, else None."""
        layout = self.weight_layout(module)
        if layout is None:
            return None
        rows, cols = module.weight.shape
        return (cols, rows) if layout is WeightLayout.OUT_IN else (rows, cols)

    def bias_kind(self, module: nn.Module) -> tuple[BiasKind, int] | None:
        """How BitFit gives ``module`` a bias: linear layers, LayerNorm and RMS norms take one."""
        dims = self.linear_dims(module)
        if dims is not None:
            size = dims[1]
        elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
            size = module.normalized_shape[-1]
        elif _is_rms_norm(module):
            return BiasKind.ADDITIVE, module.weight.shape[0]
        else:
            return None
        if isinstance(module._parameters.get("bias"), nn.Parameter):
            return BiasKind.EXISTING, size
        return BiasKind.EMPTY_SLOT, size


BACKEND = HFBackend()
