"""Name-based addressing of a backbone's submodules.

A *key* selects modules by their dotted names:

- a plain key (``"attention.self.query"``) matches every module whose name ends with the key at a
  ``.`` boundary (``"encoder.layer.0.attention.self.query"`` matches, ``"xquery"`` does not);
- a key starting with ``[r]`` is a regular expression matched the same way: it must match a whole
  dotted suffix of the name (``"[r]layer\\.[0-5]\\.attention\\.self\\.(query|value)"``);
- the empty string matches the root module.

Delta modules that are attached to the backbone are invisible here: keys address the backbone only.
"""

from __future__ import annotations

import difflib
import re
import weakref
from collections.abc import Iterable, Iterator, Sequence
from functools import lru_cache

from torch import nn

from opendelta_dist.errors import DeltaConfigError, ModuleNotFoundInBackboneError

REGEX_PREFIX = "[r]"

_DELTA_MODULES: weakref.WeakSet[nn.Module] = weakref.WeakSet()
# a delta module that took a backbone module's place -> that backbone module
_REPLACED: weakref.WeakKeyDictionary[nn.Module, nn.Module] = weakref.WeakKeyDictionary()


def mark_delta_module(module: nn.Module, replaces: nn.Module | None = None) -> None:
    """Record ``module`` as the top of a delta's subtree, which addressing then skips.

    Args:
        module: the delta module.
        replaces: the backbone module ``module`` stands in for (see ``operations.Replace``);
            addressing sees that one at the delta module's place.
    """
    _DELTA_MODULES.add(module)
    if replaces is not None:
        _REPLACED[module] = replaces


def replaced_module(module: nn.Module) -> nn.Module | None:
    """The backbone module a replacing delta module stands in for, if any."""
    return _REPLACED.get(module)


def is_delta_module(module: nn.Module) -> bool:
    """Whether ``module`` was created by a delta (see :func:`mark_delta_module`)."""
    return module in _DELTA_MODULES


@lru_cache(maxsize=1024)
def _compile(key: str) -> re.Pattern[str]:
    if key.startswith(REGEX_PREFIX):
        body = key[len(REGEX_PREFIX) :]
        try:
            re.compile(body)
        except re.error as exc:
            raise DeltaConfigError(f"module key {key!r} is not a valid regular expression: {exc}") from exc
    else:
        body = re.escape(key)
    if not body:
        return re.compile("")
    return re.compile(rf"(?:.*\.)?(?:{body})")


def match_key(key: str, name: str) -> bool:
    """Whether the module key ``key`` selects the module named ``name``.

    Args:
        key: a plain key (dotted-suffix match) or an ``[r]``-prefixed regular expression.
        name: a module's dotted name relative to the backbone (``""`` for the root).

    Returns:
        True when ``key`` matches a whole dotted suffix of ``name``.
    """
    return _compile(key).fullmatch(name) is not None


def match_any(keys: Iterable[str], name: str) -> bool:
    """Whether any of ``keys`` selects ``name``."""
    return any(match_key(k, name) for k in keys)


def named_backbone_modules(root: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """Yield ``(name, module)`` for every module of ``root``, skipping attached delta modules.

    Shared modules are reported once, under their first name, as ``nn.Module.named_modules`` does.
    """
    seen: set[int] = set()
    stack: list[tuple[str, nn.Module]] = [(prefix, root)]
    while stack:
        name, module = stack.pop()
        if is_delta_module(module):
            original = _REPLACED.get(module)
            if original is None:
                continue
            module = original  # the backbone's view: the module that was replaced
        if id(module) in seen:
            continue
        seen.add(id(module))
        yield name, module
        # named_children, not _modules: a BMTrain Block keeps its layer outside _modules and shows the layer's
        # children as its own (the names ModelCenter's checkpoints use)
        children = [(f"{name}.{n}" if name else n, c) for n, c in module.named_children()]
        # the stack pops from the end: push in reverse to keep the definition order
        stack.extend(reversed(children))


def closest_names(key: str, names: Sequence[str], limit: int = 5) -> list[str]:
    """The module names that look most like ``key``, for "did you mean" messages."""
    plain = key[len(REGEX_PREFIX) :] if key.startswith(REGEX_PREFIX) else key
    tail = plain.split(".")[-1]
    by_suffix: dict[str, str] = {}
    for name in names:
        parts = name.split(".")
        for i in range(len(parts)):
            by_suffix.setdefault(".".join(parts[i:]), name)
    close = difflib.get_close_matches(plain, list(by_suffix), n=limit * 3, cutoff=0.5)
    close += difflib.get_close_matches(tail, list(by_suffix), n=limit * 3, cutoff=0.5)
    out: list[str] = []
    for suffix in close:
        full = by_suffix[suffix]
        if full not in out:
            out.append(full)
    return out[:limit]


def select_modules(
    root: nn.Module,
    keys: Sequence[str],
    exclude: Sequence[str] = (),
) -> list[str]:
    """Resolve module keys to the names of the backbone modules they select.

    Args:
        root: the backbone.
        keys: module keys (see the module docstring); each must match at least one module.
        exclude: keys whose matches are removed from the result.

    Returns:
        The selected module names, in the backbone's definition order, each once.

    Raises:
        ModuleNotFoundInBackboneError: a key matched no module; the message lists the closest names.
    """
    names = [n for n, _ in named_backbone_modules(root)]
    selected: list[str] = []
    for key in keys:
        hits = [n for n in names if match_key(key, n)]
        if not hits:
            hint = closest_names(key, [n for n in names if n])
            near = "; closest module names: " + ", ".join(hint) if hint else ""
            raise ModuleNotFoundInBackboneError(
                f"module key {key!r} matches no module of the backbone{near}. Keys match a dotted-name "
                "suffix at a '.' boundary ('[r]' prefix for a regular expression); "
                "print Visualization(model).structure_graph() to see every name."
            )
        selected.extend(hits)
    order = {n: i for i, n in enumerate(names)}
    unique = sorted(set(selected), key=order.__getitem__)
    return [n for n in unique if not match_any(exclude, n)]
