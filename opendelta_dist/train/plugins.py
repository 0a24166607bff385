"""The naming convention behind engines and tasks: the plugin called ``x`` is the one subclass of a base class, with
``name = "x"``, defined in the module ``<package>/x.py``."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterable
from typing import TypeVar

from opendelta_dist.errors import DeltaConfigError

T = TypeVar("T")


def module_names(path: Iterable[str], excluded: frozenset[str]) -> list[str]:
    """The modules of a package (its ``__path__``) that are plugins: every one but ``excluded``, sorted."""
    return sorted(m.name for m in pkgutil.iter_modules(path) if m.name not in excluded)


def named_subclass(module_name: str, base: type[T], name: str) -> type[T]:
    """The one subclass of ``base`` that the module ``module_name`` defines, which must be called ``name``.

    Raises:
        DeltaConfigError: the module defines none, several, or one with another ``name``.
    """
    module = importlib.import_module(module_name)
    found = [
        obj
        for obj in vars(module).values()
        if isinstance(obj, type) and issubclass(obj, base) and obj.__module__ == module.__name__
    ]
    if len(found) != 1 or getattr(found[0], "name", None) != name:
        raise DeltaConfigError(f"{module.__name__} must define one {base.__name__} subclass with name = {name!r}")
    return found[0]
