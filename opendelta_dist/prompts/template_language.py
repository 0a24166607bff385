"""The template language of OpenPrompt 1.0.1, parsed as data (never executed).

A template is a string of plain text runs and ``{...}`` blocks, for example::

    '{"placeholder": "text_a"} It was {"mask"}.'
    '{"soft": "it is", "soft_id": 2} {"mask"} {"meta": "entity", "shortenable": False}'

or, equivalently, a list of piece dicts given in Python (the only form that can carry a callable
``post_processing``)::

    [{"placeholder": "text_a", "post_processing": str.lower}, {"text": "It was"}, {"mask": None}]

Parsing follows OpenPrompt's spacing rules: runs of spaces are dropped and the next piece remembers
``add_prefix_space=" "``; a text run ends at the next ``{`` and is ``rstrip(" ")``-ed. A block holds a
Python-literal dict (``{"soft": "it is", "soft_id": 2}``) or set (``{"mask"}`` = ``{"mask": None}``), read
with :func:`ast.literal_eval`: strings in either quote (braces inside strings are fine), ints, ``True``,
``False`` and ``None``. OpenPrompt ran ``eval`` on the block; code such as a ``lambda`` is refused here
with a :class:`~opendelta_dist.prompts.errors.TemplateError` that says to use the list form instead.

In the list form a piece without ``add_prefix_space`` gets ``" "`` unless it is the first piece, as
the same template written as a string with single spaces between its pieces would.
"""

from __future__ import annotations

import ast
import difflib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from opendelta_dist.prompts.errors import TemplateError

#: Keys a piece may hold.
KNOWN_KEYS = frozenset(
    {
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
    }
)

#: Keys that say what a piece is; every piece holds at least one (the first in this order wins).
CONTENT_KEYS = ("placeholder", "meta", "soft", "soft_id", "mask", "special", "text")

_LIST_FORM_HINT = (
    'give the template as a list of piece dicts in Python instead, e.g. text=[{"placeholder": "text_a", '
    '"post_processing": fn}, {"text": "It was"}, {"mask": None}]'
)


def parse_template(text: str) -> list[dict[str, Any]]:
    """Parse a template string into piece dicts.

    Args:
        text: The template, e.g. ``'{"placeholder":"text_a"} It was {"mask"}.'``.

    Returns:
        One dict per piece, each with ``add_prefix_space`` (``" "`` or ``""``) and the block's keys
        (a text run becomes ``{"text": ...}``; a set block ``{"mask"}`` becomes ``{"mask": None}``).

    Raises:
        TemplateError: on unbalanced braces, a block that is not a literal dict or set, Python code in a
            block, an unknown key or an ill-typed value; the message names the position and the fix.
    """
    if not isinstance(text, str):
        raise TemplateError(
            f"a template string was expected, got {type(text).__name__}; pass a str such as "
            '\'{"placeholder":"text_a"} It was {"mask"}.\' or a list of piece dicts'
        )
    pieces: list[dict[str, Any]] = []
    i, n = 0, len(text)
    while i < n:
        prefix = " " if i > 0 and text[i - 1] == " " else ""
        while i < n and text[i] == " ":
            prefix = " "
            i += 1
        if i == n:
            break
        start = i
        if text[i] == "{":
            end = _block_end(text, i)
            piece = _read_block(text, i, end)
            piece.setdefault("add_prefix_space", prefix)
            i = end + 1
        else:
            end = text.find("{", i)
            end = n if end < 0 else end
            run = text[i:end]
            stray = run.find("}")
            if stray >= 0:
                raise TemplateError(
                    f"unbalanced braces in template {text!r}: '}}' at position {i + stray} closes no '{{'; "
                    'remove it, or write a literal brace as a text block such as {"text": "}"}'
                )
            piece = {"add_prefix_space": prefix, "text": run.rstrip(" ")}
            i = end
        pieces.append(_checked_piece(piece, where=f"at position {start} of template {text!r}"))
    return pieces


def normalize_pieces(pieces: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Check a template given as a list of piece dicts and fill in ``add_prefix_space``.

    Args:
        pieces: Piece dicts such as ``{"placeholder": "text_a", "post_processing": str.lower}``.

    Returns:
        New dicts (the caller's are not changed); a missing ``add_prefix_space`` is ``""`` for the first
        piece and ``" "`` for the others.

    Raises:
        TemplateError: on a piece that is not a dict, an unknown key or an ill-typed value.
    """
    checked = []
    for index, piece in enumerate(pieces):
        if not isinstance(piece, Mapping):
            raise TemplateError(
                f"piece {index} of the template is a {type(piece).__name__}, not a dict; write each piece as a "
                'dict such as {"text": "It was"} or {"mask": None}'
            )
        new = dict(piece)
        new.setdefault("add_prefix_space", "" if index == 0 else " ")
        checked.append(_checked_piece(new, where=f"in piece {index} ({dict(piece)!r})"))
    return checked


def parse_any(text: str | Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Parse a template given either as a string or as a list of piece dicts.

    Args:
        text: The template string or the list of piece dicts.

    Returns:
        The piece dicts (see :func:`parse_template` and :func:`normalize_pieces`).

    Raises:
        TemplateError: as :func:`parse_template` / :func:`normalize_pieces`.
    """
    if isinstance(text, str):
        return parse_template(text)
    if isinstance(text, Sequence):
        return normalize_pieces(text)
    raise TemplateError(
        f"a template is a string or a list of piece dicts, got {type(text).__name__}; "
        'pass e.g. \'{"placeholder":"text_a"} It was {"mask"}.\''
    )


def piece_kind(piece: Mapping[str, Any]) -> str:
    """The content key that decides what a piece produces (``placeholder``, ``meta``, ``soft``, ...).

    Args:
        piece: A checked piece dict.

    Returns:
        The first of :data:`CONTENT_KEYS` the piece holds.

    Raises:
        TemplateError: if it holds none.
    """
    for key in CONTENT_KEYS:
        if key in piece:
            return key
    raise TemplateError(
        f"the template piece {dict(piece)!r} says nothing to insert; give it one of {', '.join(CONTENT_KEYS)}"
    )


def _block_end(text: str, start: int) -> int:
    """Index of the ``}`` that closes the block opened at ``start`` (quotes and nesting respected)."""
    depth, quote, i = 0, "", start
    while i < len(text):
        char = text[i]
        if quote:
            if char == "\\":
                i += 1
            elif char == quote:
                quote = ""
        elif char in "'\"":
            quote = char
        elif char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    what = f"the string opened by {quote} is not closed" if quote else "it has no matching '}'"
    raise TemplateError(
        f"unbalanced braces in template {text!r}: the block opened by '{{' at position {start} never closes "
        f'({what}); close it, e.g. {{"mask"}}'
    )


def _read_block(text: str, start: int, end: int) -> dict[str, Any]:
    block = text[start : end + 1]
    where = f"the block {block!r} at position {start} of template {text!r}"
    try:
        value = ast.literal_eval(block)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        value = _refuse_block(block, where)
    if isinstance(value, (set, frozenset)):
        if not all(isinstance(key, str) for key in value):
            raise TemplateError(f'{where} is a set of non-strings; a set block lists keys, e.g. {{"mask"}}')
        # a set has no order; sort so the piece is the same on every run
        return {key: None for key in sorted(value)}
    if isinstance(value, dict):
        if not value:
            raise TemplateError(f'{where} is empty; remove it or give a key such as {{"mask"}}')
        if not all(isinstance(key, str) for key in value):
            raise TemplateError(f'{where} has non-string keys; write keys as strings, e.g. {{"soft_id": 1}}')
        return dict(value)
    raise TemplateError(
        f'{where} is a {type(value).__name__}, not a dict or a set; write {{"key": value}} or {{"key"}}'
    )


def _refuse_block(block: str, where: str) -> Any:
    try:
        tree = ast.parse(block, mode="eval")
    except SyntaxError as error:
        raise TemplateError(
            f'{where} is not a literal dict or set ({error.msg}); write it like {{"soft": "it is", '
            '"soft_id": 2}, with quoted keys and string, int, True/False/None values'
        ) from None
    code = next(
        (
            node
            for node in ast.walk(tree)
            if isinstance(node, (ast.Lambda, ast.Call, ast.Name, ast.Attribute, ast.BinOp, ast.Subscript))
        ),
        None,
    )
    snippet = ast.get_source_segment(block, code) if code is not None else block
    raise TemplateError(
        f"{where} holds Python code ({snippet!r}); template strings are read as data and never run. "
        f"To pass a function such as post_processing, {_LIST_FORM_HINT}"
    )


def _checked_piece(piece: dict[str, Any], where: str) -> dict[str, Any]:
    unknown = [key for key in piece if key not in KNOWN_KEYS]
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, KNOWN_KEYS, n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise TemplateError(
            f"unknown key {', '.join(hints)} {where}; the known keys are {', '.join(sorted(KNOWN_KEYS))}"
        )
    kind = piece_kind(piece)
    _check_values(piece, kind, where)
    if "shortenable" in piece and isinstance(piece["shortenable"], str):
        piece["shortenable"] = piece["shortenable"].strip().lower() == "true"
    return piece


def _check_values(piece: dict[str, Any], kind: str, where: str) -> None:
    def fail(key: str, expected: str, example: str) -> None:
        raise TemplateError(f"{key!r} must be {expected} {where}, got {piece[key]!r}; write e.g. {example}")

    for key in ("placeholder", "meta", "special", "text"):
        if key in piece and not isinstance(piece[key], str):
            fail(key, "a string", f'{{"{key}": "text_a"}}' if key == "placeholder" else f'{{"{key}": "..."}}')
    if "soft" in piece and piece["soft"] is not None and not isinstance(piece["soft"], str):
        fail("soft", "None or a string", '{"soft": "it is"} or {"soft"}')
    if "soft_id" in piece and (isinstance(piece["soft_id"], bool) or not isinstance(piece["soft_id"], int)):
        fail("soft_id", "an int >= 1", '{"soft": None, "soft_id": 1}')
    if "soft_id" in piece and piece["soft_id"] < 1:
        fail("soft_id", "an int >= 1 (0 means 'not a soft token')", '{"soft": None, "soft_id": 1}')
    if "duplicate" in piece:
        if isinstance(piece["duplicate"], bool) or not isinstance(piece["duplicate"], int) or piece["duplicate"] < 1:
            fail("duplicate", "an int >= 1", '{"soft": None, "duplicate": 5}')
        if kind not in ("soft", "soft_id") or piece.get("soft") is not None:
            fail("duplicate", "on a soft token without text", '{"soft": None, "duplicate": 5}')
    if "same" in piece and not isinstance(piece["same"], bool):
        fail("same", "True or False", '{"soft": None, "duplicate": 5, "same": True}')
    shortenable = piece.get("shortenable")
    if "shortenable" in piece and not (
        isinstance(shortenable, bool)
        or (isinstance(shortenable, str) and shortenable.strip().lower() in ("true", "false"))
    ):
        fail("shortenable", "True or False", '{"placeholder": "text_b", "shortenable": False}')
    if "add_prefix_space" in piece and not isinstance(piece["add_prefix_space"], str):
        fail("add_prefix_space", 'a string (" " or "")', '{"text": ".", "add_prefix_space": ""}')
    if "post_processing" in piece:
        processing = piece["post_processing"]
        if not callable(processing):
            raise TemplateError(
                f"'post_processing' must be a callable {where}, got {processing!r}; a template string cannot "
                f"carry one: {_LIST_FORM_HINT}"
            )
        if kind not in ("placeholder", "meta"):
            raise TemplateError(
                f"'post_processing' applies to placeholder and meta pieces only {where}; move it to the "
                '{"placeholder": ...} or {"meta": ...} piece whose value it transforms'
            )


def fill_piece(piece: Mapping[str, Any], example: Any) -> str | None:
    """The text a ``placeholder``, ``meta`` or ``text`` piece produces for one example.

    ``add_prefix_space`` comes first, then the value (after ``post_processing`` for placeholder and meta
    pieces). A placeholder whose value is ``None`` (e.g. ``text_b=None``) counts as the empty string.

    Args:
        piece: A checked piece dict.
        example: An ``InputExample`` (anything with the named attributes and a ``meta`` dict).

    Returns:
        The piece's text, or ``None`` for the other kinds (``mask``, ``soft``, ``special``), which the
        template renders itself.

    Raises:
        TemplateError: for a ``meta`` key the example lacks, or a value that is not a string; the message
            names the example's ``guid``.
    """
    kind = piece_kind(piece)
    guid = getattr(example, "guid", None)
    if kind == "text":
        return piece.get("add_prefix_space", "") + piece["text"]
    if kind == "placeholder":
        value = getattr(example, piece["placeholder"])
        where = f"placeholder {piece['placeholder']!r}"
    elif kind == "meta":
        meta = getattr(example, "meta", None) or {}
        if piece["meta"] not in meta:
            raise TemplateError(
                f"the template reads meta key {piece['meta']!r} but example guid={guid!r} has meta keys "
                f"{sorted(meta)}; add it to the example's meta dict or fix the key in the template"
            )
        value = meta[piece["meta"]]
        where = f"meta {piece['meta']!r}"
    else:
        return None
    if value is None:
        value = ""
    processing: Callable[[Any], Any] | None = piece.get("post_processing")
    if processing is not None:
        value = processing(value)
    if not isinstance(value, str):
        raise TemplateError(
            f"{where} of example guid={guid!r} is {value!r} of type {type(value).__name__}, but a template inserts "
            "text; store a string there, or convert it with a post_processing callable (e.g. str) in a list-form "
            "template"
        )
    return piece.get("add_prefix_space", "") + value
