"""CONTRIBUTING.md stays true: the files it names exist, and every registered method, engine and model
family has the configuration and the test row it says an addition needs."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from opendelta_dist.registry import DELTA_METHODS
from opendelta_dist.train.engines import engine_names
from tests.deltas.test_methods import METHODS
from tests.models import FAMILIES as TEST_FAMILIES

ROOT = Path(__file__).resolve().parents[1]
GUIDE = (ROOT / "CONTRIBUTING.md").read_text()


def _named_paths() -> list[str]:
    paths = re.findall(r"`((?:opendelta_dist|configs|tests|benchmarks|scripts)/[^`<>\s]*)`", GUIDE)
    return sorted(set(paths))


@pytest.mark.parametrize("path", _named_paths())
def test_every_file_the_guide_names_exists(path):
    assert (ROOT / path).exists(), f"CONTRIBUTING.md names {path}, which does not exist"


@pytest.mark.parametrize("delta_type", sorted(DELTA_METHODS))
def test_every_method_has_its_file_yaml_and_test_row(delta_type):
    module = sys.modules[DELTA_METHODS[delta_type].__module__]
    file = Path(module.__file__)
    assert file.parent == ROOT / "opendelta_dist" / "deltas", f"{delta_type} is not in opendelta_dist/deltas/"
    assert (ROOT / "configs" / "delta" / f"{file.stem}.yaml").is_file(), f"no configs/delta/{file.stem}.yaml"
    assert METHODS.get(delta_type) is DELTA_METHODS[delta_type], f"no row for {delta_type} in test_methods.py"


@pytest.mark.parametrize("engine", engine_names())
def test_every_engine_has_its_yaml_and_test_row(engine):
    from tests.train.test_training import ENGINES

    assert (ROOT / "configs" / "engine" / f"{engine}.yaml").is_file(), f"no configs/engine/{engine}.yaml"
    rows = [row for row in ENGINES if row == engine or row.startswith(f"{engine}_")]
    assert rows, f"no row for engine {engine} in tests/train/test_training.py ENGINES"


def test_every_model_family_has_its_test_row():
    from opendelta_dist.families import KNOWN_FAMILIES

    missing = sorted({t for family in KNOWN_FAMILIES for t in family.model_types} - set(TEST_FAMILIES))
    assert not missing, f"model types without a tiny model in tests/models.py FAMILIES: {missing}"
