"""The ``hf`` backend: plain ``torch.nn.Parameter``s on PyTorch and transformers models."""

from __future__ import annotations

import torch
from torch import nn

from opendelta_dist.backends import BiasKind

try:  # GPT-2 style linear layer with a transposed (in, out) weight
    from transformers.pytorch_utils import Conv1D
except ImportError:  # transformers is a dependency, but the backend does not need it to work
    Conv1D = None


def _is_rms_norm(module: nn.Module) -> bool:
    # T5LayerNorm, LlamaRMSNorm and their many copies in transformers: a 1-d scale and no bias
    name = type(module).__name__
    weight = getattr(module, "weight", None)
    return (
        (name.endswith("RMSNorm") or name.endswith("LayerNorm"))
        and isinstance(weight, nn.Parameter)
        and weight.dim() == 1
        and "bias" not in module._parameters
    )


class HFBackend:
    """Backend of plain PyTorch modules (``nn.Linear``, transformers' ``Conv1D``, norms)."""

    name = "hf"

    def parameter(self, data: torch.Tensor) -> nn.Parameter:
        """Wrap ``data`` as a trainable ``nn.Parameter``."""
        return nn.Parameter(data, requires_grad=True)

    def linear(
        self, in_features: int, out_features: int, bias: bool, device: torch.device | None, dtype: torch.dtype | None
    ) -> nn.Module:
        """A new ``nn.Linear``."""
        return nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)

    def linear_dims(self, module: nn.Module) -> tuple[int, int] | None:
        """``(in_features, out_features)`` of an ``nn.Linear`` or ``Conv1D``, else None."""
        if isinstance(module, nn.Linear):
            return module.in_features, module.out_features
        if Conv1D is not None and isinstance(module, Conv1D):
            return module.weight.shape[0], module.nf
        return None

    def bias_kind(self, module: nn.Module) -> tuple[BiasKind, int] | None:
        """How BitFit gives ``module`` a bias: linear layers, LayerNorm and RMS norms take one."""
        if isinstance(module, nn.Linear) or (Conv1D is not None and isinstance(module, Conv1D)):
            size = self.linear_dims(module)[1]  # type: ignore[index]
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
