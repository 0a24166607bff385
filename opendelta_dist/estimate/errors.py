"""The estimator's error type."""

from __future__ import annotations

from opendelta_dist.errors import DeltaConfigError


class EstimateError(DeltaConfigError):
    """The estimator cannot model what was asked (missing world size, unknown architecture, ...)."""
