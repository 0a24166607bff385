"""The model families the library knows: one file per family, one :class:`Family` each.

A family file holds everything the library knows about a family's modules: its common-structure roles
(:mod:`opendelta_dist.structure`), the attention classes a prefix can enter
(:mod:`opendelta_dist.deltas.prefix`) and how the memory estimator reads it (:mod:`opendelta_dist.estimate`).
Those modules read the families through the lookups here. Adding a family is one file and one entry in
:data:`KNOWN_FAMILIES`.

The package is a leaf: it imports nothing else of ``opendelta_dist`` (transformers' attention classes are
imported only when a prefix looks one up).
"""

from __future__ import annotations

from torch import nn

from opendelta_dist.families.bart import BART
from opendelta_dist.families.bert_like import BERT, DEBERTA_V2
from opendelta_dist.families.ctrl import CTRL
from opendelta_dist.families.distilbert import DISTILBERT
from opendelta_dist.families.family import Architecture, AttentionSpec, EstimatorSpec, Family
from opendelta_dist.families.gpt2 import GPT2
from opendelta_dist.families.llama import LLAMA
from opendelta_dist.families.opt import OPT
from opendelta_dist.families.t5 import T5
from opendelta_dist.families.vit import VIT

__all__ = [
    "ATTENTION_SPECS",
    "KNOWN_FAMILIES",
    "Architecture",
    "AttentionSpec",
    "EstimatorSpec",
    "Family",
    "attention_spec",
    "estimated_model_types",
    "estimator_named",
    "estimator_of",
    "family_of",
]

#: Every known family, in lookup order (their attention classes are tried in this order).
KNOWN_FAMILIES: tuple[Family, ...] = (BERT, DEBERTA_V2, DISTILBERT, GPT2, BART, OPT, T5, LLAMA, CTRL, VIT)

_BY_MODEL_TYPE = {model_type: family for family in KNOWN_FAMILIES for model_type in family.model_types}
_ESTIMATORS = [family.estimator for family in KNOWN_FAMILIES if family.estimator is not None]
_ESTIMATOR_BY_MODEL_TYPE = {model_type: spec for spec in _ESTIMATORS for model_type in spec.model_types}
_ESTIMATOR_BY_NAME = {spec.name: spec for spec in _ESTIMATORS}

#: The attention classes a prefix can enter, every family's in turn; the first entry the module is an
#: instance of applies.
ATTENTION_SPECS: list[AttentionSpec] = [spec for family in KNOWN_FAMILIES for spec in family.attention]


def family_of(model_type: str | None) -> Family | None:
    """The family whose roles name the modules of transformers models of ``model_type``, or None."""
    return _BY_MODEL_TYPE.get(model_type) if model_type is not None else None


def attention_spec(module: nn.Module) -> AttentionSpec | None:
    """The entry of :data:`ATTENTION_SPECS` for ``module`` (by its attention class), or None."""
    for spec in ATTENTION_SPECS:
        cls = spec.attention_class()
        if cls is not None and isinstance(module, cls):
            return spec
    return None


def estimator_of(model_type: str | None) -> EstimatorSpec | None:
    """How the memory estimator reads models of ``model_type``, or None where it has no formulas for them."""
    return _ESTIMATOR_BY_MODEL_TYPE.get(model_type) if model_type is not None else None


def estimator_named(name: str) -> EstimatorSpec:
    """The estimator description whose block formulas are called ``name`` (:attr:`Architecture.family`).

    Raises:
        KeyError: no family has formulas called ``name``.
    """
    return _ESTIMATOR_BY_NAME[name]


def estimated_model_types() -> list[str]:
    """The model types the memory estimator reads, sorted."""
    return sorted(_ESTIMATOR_BY_MODEL_TYPE)
