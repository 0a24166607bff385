"""Backends: where a delta's parameters and layers come from.

A backend answers the few questions a delta method asks about a backbone module (is it a linear
layer and of what size, can it take a bias) and makes the delta's parameters and linear layers.
Delta methods call only this seam, so a new backend is one module here and no change to any method.

``hf`` (plain PyTorch / transformers) is always available; ``bmt`` (BMTrain + ModelCenter) is
imported only when asked for.
"""

from __future__ import annotations

import importlib
import importlib.util
from enum import Enum
from typing import Protocol

import torch
from torch import nn

from opendelta_dist.errors import BackendUnavailableError, DeltaConfigError


class BiasKind(Enum):
    """How BitFit gives a module a trainable bias."""

    EXISTING = "existing"  # the module has a bias parameter: it is unfrozen (as a delta-owned copy)
    EMPTY_SLOT = "empty_slot"  # the module's forward reads ``self.bias`` but it is None: fill it
    ADDITIVE = "additive"  # the module has no bias at all (RMS norms): add one after its forward


class Backend(Protocol):
    """What a delta method may ask of a backend."""

    name: str

    def parameter(self, data: torch.Tensor) -> nn.Parameter:
        """Wrap ``data`` as a trainable parameter of this backend."""
        ...

    def linear(
        self, in_features: int, out_features: int, bias: bool, device: torch.device | None, dtype: torch.dtype | None
    ) -> nn.Module:
        """A new linear layer ``y = x W^T + b`` made of this backend's parameters."""
        ...

    def linear_dims(self, module: nn.Module) -> tuple[int, int] | None:
        """``(in_features, out_features)`` when ``module`` is a linear layer, else None."""
        ...

    def bias_kind(self, module: nn.Module) -> tuple[BiasKind, int] | None:
        """How ``module`` takes a trainable bias and its size, or None if it takes none."""
        ...


_BACKENDS = {"hf": "opendelta_dist.backends.hf", "bmt": "opendelta_dist.backends.bmt"}
_EXTRAS = {"bmt": "pip install 'opendelta-dist[bmt]' (BMTrain and ModelCenter; needs CUDA)"}


def get_backend(name: str) -> Backend:
    """Return the backend called ``name``.

    Args:
        name: ``"hf"`` or ``"bmt"``.

    Raises:
        DeltaConfigError: the name is unknown.
        BackendUnavailableError: the backend's optional dependencies are not installed.
    """
    if name not in _BACKENDS:
        raise DeltaConfigError(f"unknown backend {name!r}; choose one of {sorted(_BACKENDS)}")
    if importlib.util.find_spec(_BACKENDS[name]) is None:
        raise BackendUnavailableError(f"the {name!r} backend is not part of this version of opendelta_dist")
    try:
        module = importlib.import_module(_BACKENDS[name])
    except ImportError as exc:
        raise BackendUnavailableError(
            f"backend {name!r} needs packages that are not installed ({exc}); install them with: "
            f"{_EXTRAS.get(name, 'pip install opendelta-dist')}"
        ) from exc
    return module.BACKEND
