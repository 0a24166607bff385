"""The template language: OpenPrompt 1.0.1's syntax and spacing, parsed as data, with errors that say the fix."""

from __future__ import annotations

import pytest

from opendelta_dist.prompts.data import InputExample
from opendelta_dist.prompts.errors import TemplateError
from opendelta_dist.prompts.template_language import (
    KNOWN_KEYS,
    fill_piece,
    normalize_pieces,
    parse_any,
    parse_template,
    piece_kind,
)


def test_spacing_rules_follow_openprompt():
    # the example of OpenPrompt's docs: text runs are rstrip-ed, a piece after spaces gets add_prefix_space=" "
    assert parse_template('? Is it correct? {"mask"}.') == [
        {"add_prefix_space": "", "text": "? Is it correct?"},
        {"add_prefix_space": " ", "mask": None},
        {"add_prefix_space": "", "text": "."},
    ]
    assert parse_template('  {"placeholder":"text_a"}   It  was {"mask"}') == [
        {"add_prefix_space": " ", "placeholder": "text_a"},
        {"add_prefix_space": " ", "text": "It  was"},
        {"add_prefix_space": " ", "mask": None},
    ]


def test_literals_both_quotes_sets_and_braces_inside_strings():
    pieces = parse_template(
        "{'placeholder':'text_a', 'shortenable': False} {\"soft\": \"it is\", \"soft_id\": 2} "
        '{"soft"} {"text": "a {curly} } brace"} {"meta": "k", "shortenable": True} {"special": "<eos>"}'
    )
    assert pieces == [
        {"add_prefix_space": "", "placeholder": "text_a", "shortenable": False},
        {"add_prefix_space": " ", "soft": "it is", "soft_id": 2},
        {"add_prefix_space": " ", "soft": None},
        {"add_prefix_space": " ", "text": "a {curly} } brace"},
        {"add_prefix_space": " ", "meta": "k", "shortenable": True},
        {"add_prefix_space": " ", "special": "<eos>"},
    ]
    # a block's own add_prefix_space wins over the computed one
    assert parse_template('{"placeholder":"text_a"} {"text": ".", "add_prefix_space": ""}')[1]["add_prefix_space"] == ""
    # the string "True" of OpenPrompt's own error message means True
    assert parse_template('{"meta": "k", "shortenable": "True"} {"mask"}')[0]["shortenable"] is True


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ('{"placeholder":"text_a"} {"mask"', ["unbalanced", "position 25", "never closes"]),
        ('{"text": "never closed} {"mask"}', ["unbalanced", "string opened by"]),
        ('It was {"mask"}}.', ["unbalanced", "'}'", "closes no"]),
        ('{"mask"} {"placehlder": "text_a"}', ["unknown key", "'placehlder'", "did you mean 'placeholder'"]),
        (
            '{"mask"} {"placeholder": "text_a", "post_processing": lambda s: s.upper()}',
            ["Python code", "lambda", "list"],
        ),
        ('{"mask"} {"meta": __import__("os").getcwd()}', ["Python code", "never run"]),
        ('{"mask"} {"soft": None, soft_id: 1}', ["Python code"]),
        ('{"mask", }} ', ["unbalanced"]),
        ('{"mask"} {"soft_id": 0}', ["soft_id", ">= 1"]),
        ('{"mask"} {"soft": "it is", "duplicate": 2}', ["duplicate", "without text"]),
        ('{"mask"} {"placeholder": "text_a", "post_processing": "lambda s: s"}', ["callable", "list of piece dicts"]),
        ('{"mask"} {}', ["empty"]),
        ('{"mask"} {1, 2}', ["non-strings"]),
        ('{"mask"} {"shortenable": True}', ["says nothing to insert"]),
        ('{"mask"} {"placeholder": 3}', ["'placeholder' must be a string"]),
        ('{"mask"} {"mask": None "x": 1}', ["not a literal dict or set"]),
    ],
)
def test_errors_name_the_problem_and_the_fix(text, words):
    with pytest.raises(TemplateError) as error:
        parse_template(text)
    for word in words:
        assert word in str(error.value)


def test_code_in_a_block_is_never_run(tmp_path):
    marker = tmp_path / "ran"
    with pytest.raises(TemplateError):
        parse_template('{"mask"} {"text": open(' + repr(str(marker)) + ', "w").write("x")}')
    assert not marker.exists()


def test_list_form_carries_callables_and_defaults_prefix_spaces():
    pieces = normalize_pieces(
        [
            {"placeholder": "text_a", "post_processing": str.upper},
            {"text": "It was"},
            {"mask": None},
            {"text": ".", "add_prefix_space": ""},
        ]
    )
    assert [piece["add_prefix_space"] for piece in pieces] == ["", " ", " ", ""]
    assert pieces[0]["post_processing"] is str.upper
    assert parse_any(pieces) == pieces  # already normalised pieces parse to themselves
    with pytest.raises(TemplateError, match="piece 1 of the template is a str"):
        normalize_pieces([{"mask": None}, "text"])
    with pytest.raises(TemplateError, match="applies to placeholder and meta pieces only"):
        normalize_pieces([{"mask": None, "post_processing": str.upper}])
    with pytest.raises(TemplateError, match="a string or a list of piece dicts"):
        parse_any(42)


def test_every_documented_key_is_known():
    assert {
        "placeholder",
        "meta",
        "soft",
        "soft_id",
        "mask",
        "special",
        "text",
        "shortenable",
        "post_processing",
        "duplicate",
        "same",
        "add_prefix_space",
    } == KNOWN_KEYS
    assert piece_kind({"soft": None, "soft_id": 2}) == "soft"
    assert piece_kind({"soft_id": 2}) == "soft_id"


def test_fill_piece_values_none_meta_and_post_processing():
    example = InputExample(guid="g7", text_a="Good.", text_b=None, meta={"topic": "sports"})
    assert fill_piece({"add_prefix_space": " ", "placeholder": "text_a", "post_processing": str.lower}, example) == (
        " good."
    )
    assert fill_piece({"add_prefix_space": " ", "placeholder": "text_b"}, example) == " "
    assert fill_piece({"add_prefix_space": "", "meta": "topic"}, example) == "sports"
    assert fill_piece({"add_prefix_space": "", "mask": None}, example) is None
    with pytest.raises(TemplateError) as error:
        fill_piece({"add_prefix_space": "", "meta": "entity"}, example)
    assert "'entity'" in str(error.value) and "'g7'" in str(error.value) and "['topic']" in str(error.value)
    with pytest.raises(TemplateError, match="of type int"):
        fill_piece({"add_prefix_space": "", "meta": "n"}, InputExample(guid=1, meta={"n": 3}))
