"""Exception types raised by opendelta_dist, and :func:`warn_user` for its warnings.

Every error names what was wrong and what to do about it. All of them derive from
:class:`OpenDeltaError`, so a caller can catch the whole family at once.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path


class OpenDeltaError(Exception):
    """Base class of every error raised by opendelta_dist."""


class ModuleNotFoundInBackboneError(OpenDeltaError, KeyError):
    """A module key matched no module of the backbone."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class UnsupportedModuleError(OpenDeltaError, TypeError):
    """A delta method was aimed at a module it cannot modify (e.g. LoRA on an attention block)."""


class UnknownModelFamilyError(OpenDeltaError, ValueError):
    """Default positions were requested for a model whose structure is not known."""


class DeltaConfigError(OpenDeltaError, ValueError):
    """A delta configuration is invalid: unknown delta_type, unknown or ill-typed option."""


class WholeValueUnavailableError(DeltaConfigError):
    """A backend cannot read this parameter whole here (e.g. a weight inside a BMTrain block, whole only
    inside the block's forward)."""


class DeltaStateError(OpenDeltaError, RuntimeError):
    """An operation does not fit the delta's state (attaching twice, detaching a detached delta)."""


class DeltaCheckpointError(OpenDeltaError, ValueError):
    """A delta checkpoint is missing, truncated, corrupted or does not fit the backbone."""


class BackboneMismatchError(DeltaCheckpointError):
    """A delta checkpoint was trained on a different backbone than the one it is loaded onto."""


class HiddenSizeInferenceError(OpenDeltaError, RuntimeError):
    """The hidden size a delta layer needs could not be inferred by a dummy forward."""


class OptimizerMismatchError(OpenDeltaError, RuntimeError):
    """An optimizer holds a frozen parameter or misses a trainable one."""


class BackendUnavailableError(OpenDeltaError, ImportError):
    """A backend was requested whose optional dependencies are not installed."""


class InteractiveTimeoutError(OpenDeltaError, TimeoutError):
    """No selection was submitted on the ``interactive_modify`` page within the time limit."""


class DeltaHubError(DeltaCheckpointError):
    """A delta could not be pulled from or pushed to the Hugging Face Hub (no such repository or revision,
    no access, offline without a cached copy, the Hub unreachable)."""


def warn_user(message: str) -> None:
    """Warn (a UserWarning) at the caller's line outside this package (e.g. its ``from_finetuned`` call)."""
    package = str(Path(__file__).resolve().parent)
    frame, level = sys._getframe(1), 2
    while frame.f_back is not None and str(Path(frame.f_code.co_filename).resolve()).startswith(package):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, UserWarning, stacklevel=level)
