import pytest
from torch import nn

from opendelta_dist.addressing import closest_names, match_key, select_modules
from opendelta_dist.errors import DeltaConfigError, ModuleNotFoundInBackboneError
from tests.models import build


@pytest.mark.parametrize(
    ("key", "name", "expected"),
    [
        ("query", "encoder.layer.0.attention.self.query", True),
        ("self.query", "encoder.layer.0.attention.self.query", True),
        ("query", "encoder.layer.0.attention.self.xquery", False),  # suffix only at a '.' boundary
        ("layer.0.attention", "encoder.layer.0.attention", True),
        ("attention", "encoder.layer.0.attention.self", False),
        ("q", "encoder.block.0.layer.0.SelfAttention.q", True),
        ("", "", True),
        (r"[r]layer\.[01]\.attention\.self\.(query|value)", "bert.encoder.layer.1.attention.self.value", True),
        (r"[r]layer\.[01]\.attention\.self\.(query|value)", "bert.encoder.layer.2.attention.self.value", False),
        (r"[r]uery", "encoder.layer.0.attention.self.query", False),  # regexes match whole dotted suffixes too
        (r"[r]\d+", "h.11", True),
    ],
)
def test_match_key(key, name, expected):
    assert match_key(key, name) is expected


def test_select_modules_keeps_backbone_order_and_dedupes():
    model = build("bert")
    names = select_modules(model, ["value", "query", r"[r]layer\.0\.attention\.self\.query"])
    assert names == [
        "bert.encoder.layer.0.attention.self.query",
        "bert.encoder.layer.0.attention.self.value",
        "bert.encoder.layer.1.attention.self.query",
        "bert.encoder.layer.1.attention.self.value",
    ]


def test_exclude_removes_matches():
    model = build("bert")
    names = select_modules(model, ["query"], exclude=[r"[r]layer\.1\..*"])
    assert names == ["bert.encoder.layer.0.attention.self.query"]


def test_key_matching_nothing_lists_closest_names():
    model = build("t5")
    with pytest.raises(ModuleNotFoundInBackboneError) as info:
        select_modules(model, ["SelfAttention.qq"])
    message = str(info.value)
    assert "'SelfAttention.qq' matches no module" in message
    assert "encoder.block.0.layer.0.SelfAttention.q" in message
    assert "Visualization" in message


def test_closest_names_prefers_similar_suffixes():
    names = ["a.query", "a.key", "b.dense"]
    assert closest_names("querry", names)[0] == "a.query"


def test_invalid_regex_is_a_config_error():
    with pytest.raises(DeltaConfigError, match="not a valid regular expression"):
        select_modules(nn.Linear(2, 2), ["[r](unclosed"])
