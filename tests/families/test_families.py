"""The family descriptions: each family file is complete and registered, and the tables the rest of the
package reads (structure roles, prefix attention classes, estimator readers) are derived from them."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
import transformers as T

from opendelta_dist import families, structure
from opendelta_dist.deltas import prefix
from opendelta_dist.estimate import Architecture, BlockInfo, Shapes, architecture_of, block_saves, outside_block_saves
from opendelta_dist.families import KNOWN_FAMILIES, Family
from tests.models import FAMILIES as TEST_MODELS
from tests.models import build

FAMILIES_DIR = Path(families.__file__).parent
CORE_ROLES = {"attn", "attn.q", "attn.k", "attn.v", "attn.proj", "ff", "ff.w1", "ff.w2", "layer_norm"}
SITES = {"attn_in", "attn_out", "cross_in", "encoder_out", "cross_out", "ff_in", "ff_mid"}
ESTIMATED = [(family.name, family) for family in KNOWN_FAMILIES if family.estimator is not None]


def _family_files() -> list[str]:
    return sorted(p.stem for p in FAMILIES_DIR.glob("*.py") if p.stem not in ("__init__", "family"))


@pytest.mark.parametrize("module", _family_files())
def test_every_family_file_is_registered(module):
    namespace = vars(importlib.import_module(f"opendelta_dist.families.{module}"))
    defined = [value for value in namespace.values() if isinstance(value, Family)]
    assert defined, f"opendelta_dist/families/{module}.py defines no Family"
    for family in defined:
        assert family in KNOWN_FAMILIES, f"{family.name} is not in families.KNOWN_FAMILIES"


@pytest.mark.parametrize("family", KNOWN_FAMILIES, ids=lambda f: f.name)
def test_every_family_names_the_core_roles_with_valid_patterns(family):
    assert family.model_types
    assert set(family.roles) >= CORE_ROLES
    assert set(family.roles) <= set(structure.ROLES)
    assert set(family.opendelta_roles) <= set(family.roles)
    for pattern in (*family.roles.values(), *family.opendelta_roles.values()):
        re.compile(pattern)


@pytest.mark.parametrize("family", KNOWN_FAMILIES, ids=lambda f: f.name)
def test_every_model_type_has_a_test_model_whose_modules_the_roles_name(family):
    for model_type in family.model_types:
        assert model_type in TEST_MODELS, f"add a tiny {model_type} model to tests/models.py"
        model = build(model_type)
        assert model.config.model_type == model_type
        assert structure.find_models(model)
        names = [name for name, _ in model.named_modules()]
        for role in CORE_ROLES:
            pattern = re.compile(rf"(?:.*\.)?(?:{family.roles[role]})")
            assert any(pattern.fullmatch(name) for name in names), (model_type, role)


def test_model_types_and_estimator_names_are_unique():
    model_types = [t for family in KNOWN_FAMILIES for t in family.model_types]
    assert len(model_types) == len(set(model_types))
    specs = [family.estimator for _, family in ESTIMATED]
    estimated = [t for spec in specs for t in spec.model_types]
    assert len(estimated) == len(set(estimated))
    assert len({spec.name for spec in specs}) == len(specs)
    assert len({f.name for f in KNOWN_FAMILIES}) == len(KNOWN_FAMILIES)


@pytest.mark.parametrize(("name", "family"), ESTIMATED, ids=[n for n, _ in ESTIMATED])
def test_every_estimator_description_reads_its_configs_and_has_formulas(name, family):
    spec = family.estimator
    assert families.estimator_named(spec.name) is spec
    for pattern, site in spec.sites:
        re.compile(pattern)
        assert site in SITES
    for model_type in spec.model_types:
        config = T.AutoConfig.for_model(model_type)
        arch = architecture_of(config)
        assert isinstance(arch, Architecture) and arch.family == spec.name
        assert families.estimator_of(model_type) is spec
    # activations.py has block formulas of that name
    block = BlockInfo("layers.0", "encoder", frozenset(SITES), {}, 0, False, 0, 0)
    shapes = Shapes(batch=1, input_tokens=8, target_tokens=0, bytes=4)
    assert sum(block_saves(arch, block, shapes, checkpointing=False).values()) > 0
    assert sum(outside_block_saves(arch, [block], shapes, checkpointing=True).values()) > 0


def test_the_structure_tables_are_derived_from_the_families():
    assert {t: dict(f.roles) for f in KNOWN_FAMILIES for t in f.model_types} == structure.FAMILIES
    assert {
        t: dict(f.opendelta_roles) for f in KNOWN_FAMILIES if f.opendelta_roles for t in f.model_types
    } == structure.OPENDELTA_ROLES
    for model_type in structure.FAMILIES:
        assert families.family_of(model_type).roles == structure.FAMILIES[model_type]
    assert families.family_of("no-such-model") is None and families.family_of(None) is None


def test_the_prefix_attention_table_is_the_families():
    assert prefix.ATTENTION_SPECS is families.ATTENTION_SPECS
    assert [spec for family in KNOWN_FAMILIES for spec in family.attention] == prefix.ATTENTION_SPECS
    for spec in prefix.ATTENTION_SPECS:
        assert spec.attention_class() is not None, f"transformers has no {spec.class_name}"


@pytest.mark.parametrize("family", [f for f in KNOWN_FAMILIES if f.attention], ids=lambda f: f.name)
def test_attention_classes_are_found_by_instance(family):
    for model_type in family.model_types:
        model = build(model_type)
        found = {families.attention_spec(m) for m in model.modules()} - {None}
        assert found and found <= set(family.attention), model_type
