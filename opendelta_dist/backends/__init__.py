"""Backends: where a delta's parameters and modules come from, and how to read them back whole.

A delta method asks a backend every question that depends on how the backbone stores its weights:

- **Making:** :meth:`Backend.parameter` creates a trainable parameter of a shape with an init function
  (a sharded backend creates only this rank's partition, then initialises it from a full tensor;
  init functions are picklable callables such as ``functools.partial(nn.init.normal_, std=0.02)``);
  :meth:`Backend.parameter_from` makes one from existing values; :meth:`Backend.linear` a linear
  layer of such parameters; :meth:`Backend.prepare_module` is called once on every delta module
  before it is used (a sharded backend turns it into its module class there), and
  :meth:`Backend.prepare_target` on a backbone module into whose parameter slot a delta puts a parameter.
- **Reading back:** :meth:`Backend.full_tensor`, :meth:`Backend.full_shape` and
  :meth:`Backend.load_full` see a parameter as the whole tensor, so saving, hashing and statistics never
  read a partition as if it were the whole. ``full_tensor`` is a collective where the backend shards.
- **Recognising:** :meth:`Backend.linear_dims`, :meth:`Backend.weight_layout` and :meth:`Backend.bias_kind`
  say which backbone layers the backend knows and how they store their weights; :attr:`Backend.families`
  is the table of module roles per model family (:mod:`~opendelta_dist.structure`) its backbones use.
- **Capabilities:** what else of the backbone a method may rely on (``"transformers"``: transformers'
  attention modules, input embeddings and ``dummy_inputs``). A method declares what it needs
  (``DeltaBase.required_capabilities``), and the backends it supports follow from that.

``hf`` (plain PyTorch and transformers) is always available. Other backends are registered by name
with :func:`register_backend` and imported only when asked for, so their optional dependencies
(bmtrain, model_center) stay out of ``import opendelta_dist``.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from opendelta_dist.errors import BackendUnavailableError, DeltaConfigError

#: fills a tensor of the parameter's full shape in place (called under ``torch.no_grad()``)
InitFn = Callable[[torch.Tensor], object]


class BiasKind(Enum):
    """How BitFit gives a module a trainable bias."""

    EXISTING = "existing"  # the module has a bias parameter: it is unfrozen (as a delta-owned copy)
    EMPTY_SLOT = "empty_slot"  # the module's forward reads ``self.bias`` but it is None: fill it
    ADDITIVE = "additive"  # the module has no bias at all (RMS norms): add one after its forward


class WeightLayout(Enum):
    """How a linear layer stores its weight matrix."""

    OUT_IN = "out_in"  # (out_features, in_features): torch's nn.Linear, ModelCenter's Linear
    IN_OUT = "in_out"  # (in_features, out_features): transformers' Conv1D (GPT-2)


@runtime_checkable
class Backend(Protocol):
    """What a delta method may ask of a backend (see the module docstring)."""

    name: str
    capabilities: frozenset[str]

    @property
    def families(self) -> Mapping[str, Mapping[str, str]]:
        """Model family -> role -> module-name pattern, for the backbones this backend recognises."""
        ...

    def parameter(
        self,
        shape: tuple[int, ...],
        init: InitFn,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> nn.Parameter:
        """A new trainable parameter of ``shape``, filled by ``init`` (left empty on the meta device)."""
        ...

    def parameter_from(self, data: torch.Tensor) -> nn.Parameter:
        """A new trainable parameter holding a copy of the full tensor ``data``."""
        ...

    def reset_module(self, module: nn.Module) -> None:
        """Initialise a prepared delta module's parameters again (after materialising it from the meta device)."""
        ...

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
        """A new linear layer ``y = x W^T + b`` of this backend's parameters (torch's init by default)."""
        ...

    def prepare_module(self, module: nn.Module) -> None:
        """Make ``module`` (a delta module, with its parameters) ready to run on this backend, in place."""
        ...

    def prepare_target(self, module: nn.Module) -> Callable[[], None]:
        """Make the backbone module ``module``, into one of whose parameter slots a delta puts a parameter of
        this backend, read that parameter as the backend needs (a sharded backend: whole), in place.

        Returns:
            What undoes it, called when the delta takes its parameter out of the slot again.
        """
        ...

    def owns(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` is a parameter of this backend's own kind (e.g. a partition)."""
        ...

    def full_tensor(self, param: torch.Tensor) -> torch.Tensor:
        """``param``'s whole value, detached. A collective where the backend shards: every rank calls it."""
        ...

    def full_shape(self, param: torch.Tensor) -> torch.Size:
        """``param``'s whole shape (not its partition's)."""
        ...

    def load_full(self, param: torch.Tensor, value: torch.Tensor) -> None:
        """Copy the whole tensor ``value`` into ``param`` (cast to its dtype and device)."""
        ...

    def linear_dims(self, module: nn.Module) -> tuple[int, int] | None:
        """``(in_features, out_features)`` when ``module`` is a linear layer, else None."""
        ...

    def weight_layout(self, module: nn.Module) -> WeightLayout | None:
        """How the linear layer ``module`` stores its weight; None when it is not a linear layer."""
        ...

    def bias_kind(self, module: nn.Module) -> tuple[BiasKind, int] | None:
        """How ``module`` takes a trainable bias and its size, or None if it takes none."""
        ...


@dataclass
class _Entry:
    target: str | Backend  # the backend, or "package.module:ATTRIBUTE" imported on first use
    capabilities: frozenset[str]
    install_hint: str


_REGISTRY: dict[str, _Entry] = {}


def register_backend(
    name: str,
    backend: str | Backend,
    capabilities: Iterable[str] = (),
    install_hint: str = "pip install opendelta-dist",
) -> None:
    """Make a backend available under ``name``.

    Args:
        name: what users pass as ``backend=...``.
        backend: the backend, or ``"package.module:ATTRIBUTE"`` naming it, imported on first use (so
            that its optional dependencies are imported only when asked for).
        capabilities: what it provides besides the protocol (declared here so that a method can be
            refused without importing the backend); a backend object's own ``capabilities`` are used.
        install_hint: the command that installs its optional dependencies, shown when they are missing.

    Raises:
        DeltaConfigError: another backend has that name.
    """
    known = _REGISTRY.get(name)
    if known is not None and known.target is not backend:
        raise DeltaConfigError(f"a backend called {name!r} is registered already")
    if not isinstance(backend, str):
        capabilities = backend.capabilities
    _REGISTRY[name] = _Entry(backend, frozenset(capabilities), install_hint)


def backend_names() -> list[str]:
    """The registered backends' names (whether or not their dependencies are installed)."""
    return sorted(_REGISTRY)


def backend_capabilities(name: str) -> frozenset[str]:
    """What the backend called ``name`` provides besides the protocol, without importing it.

    Raises:
        DeltaConfigError: the name is unknown.
    """
    return _entry(name).capabilities


def available_backends() -> list[str]:
    """The registered backends that can be used here (their dependencies import)."""
    names = []
    for name in backend_names():
        try:
            get_backend(name)
        except BackendUnavailableError:
            continue
        names.append(name)
    return names


def _entry(name: str) -> _Entry:
    if name not in _REGISTRY:
        raise DeltaConfigError(f"unknown backend {name!r}; choose one of {backend_names()}")
    return _REGISTRY[name]


def get_backend(name: str) -> Backend:
    """Return the backend called ``name``.

    Raises:
        DeltaConfigError: the name is unknown.
        BackendUnavailableError: the backend's optional dependencies are not installed.
    """
    entry = _entry(name)
    if not isinstance(entry.target, str):
        return entry.target
    module_name, attribute = entry.target.split(":")
    if importlib.util.find_spec(module_name) is None:
        raise BackendUnavailableError(f"the {name!r} backend is not part of this version of opendelta_dist")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise BackendUnavailableError(
            f"backend {name!r} needs packages that are not installed ({exc}); install them with: {entry.install_hint}"
        ) from exc
    entry.target = getattr(module, attribute)
    return entry.target


def backend_of(tensor: torch.Tensor) -> Backend:
    """The backend whose kind of parameter ``tensor`` is; ``hf`` for plain tensors.

    Only backends imported already are asked: a tensor of a backend never imported cannot exist.
    """
    for entry in _REGISTRY.values():
        backend = entry.target
        if not isinstance(backend, str) and backend.name != "hf" and backend.owns(tensor):
            return backend
    return get_backend("hf")


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``'s whole value, whatever backend made it (a collective for sharded backends)."""
    return backend_of(tensor).full_tensor(tensor)


def full_numel(tensor: torch.Tensor) -> int:
    """The number of scalars in ``tensor``'s whole value (not in its partition)."""
    return backend_of(tensor).full_shape(tensor).numel()


register_backend("hf", "opendelta_dist.backends.hf:BACKEND", capabilities={"transformers"})
# BMTrain + ModelCenter (the bmt extra); ModelCenter models have none of transformers' own modules
register_backend("bmt", "opendelta_dist.backends.bmt:BACKEND", install_hint="bash scripts/install-bmt.sh")

__all__ = [
    "Backend",
    "BiasKind",
    "InitFn",
    "WeightLayout",
    "available_backends",
    "backend_capabilities",
    "backend_names",
    "backend_of",
    "full_numel",
    "full_tensor",
    "get_backend",
    "register_backend",
]
