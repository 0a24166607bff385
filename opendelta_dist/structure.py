"""Common structure: one vocabulary of module roles across model families.

Delta methods name their default positions in roles (``attn.q``, ``ff.w2``, ...) rather than in
the module names of one family. This module finds the transformers models inside a backbone (the
backbone itself, a task-head model, or a model inside a user's wrapper module) and translates roles
into ``[r]`` module keys for each of them.

Roles:

==============  =====================================================================
``attn``        a self-attention block            (``attn.q/k/v``: its projections,
                                                   ``attn.proj``: its output projection)
``crossattn``   a cross-attention block           (``crossattn.q/k/v/proj`` likewise)
``ff``          a feed-forward block              (``ff.w1``: its input projection,
                                                   ``ff.w2``: its output projection)
``layer_norm``  the normalisation layers of the blocks (and the final one)
``layer``       a block (a transformer layer) itself, ``<stack>.<index>``: the unit AdapterDrop counts
==============  =====================================================================

The accepted spellings ``attn@.q@`` (OpenDelta's) and ``attn.q`` are the same role. Where each role is in
a family's modules is said in that family's file in :mod:`opendelta_dist.families`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from torch import nn

from opendelta_dist.addressing import REGEX_PREFIX, named_backbone_modules
from opendelta_dist.errors import DeltaConfigError, UnknownModelFamilyError
from opendelta_dist.families import KNOWN_FAMILIES

#: model_type -> role -> regular expression over module names (matched on a dotted suffix), from the families
FAMILIES: dict[str, dict[str, str]] = {
    model_type: dict(family.roles) for family in KNOWN_FAMILIES for model_type in family.model_types
}

ROLES = sorted({role for roles in FAMILIES.values() for role in roles})

#: where OpenDelta 0.3.2 placed a role differently (T5's "attn" is the whole self-attention sub-layer
#: there, BERT's "ff" only the output sub-layer): used to read OpenDelta checkpoints where they were
OPENDELTA_ROLES: dict[str, dict[str, str]] = {
    model_type: dict(family.opendelta_roles)
    for family in KNOWN_FAMILIES
    if family.opendelta_roles
    for model_type in family.model_types
}


def normalize_role(key: str) -> str:
    """``"attn@.q@"`` (OpenDelta's spelling) -> ``"attn.q"``."""
    return key.replace("@", "")


def model_type_of(module: nn.Module) -> str | None:
    """The key of ``module``'s family: its transformers ``config.model_type``, else (a model with a ``config`` of
    another library, e.g. ModelCenter's) its class path, ``package.module.Class``; None for other modules."""
    config = getattr(module, "config", None)
    if config is None:
        return None
    model_type = getattr(config, "model_type", None)
    return model_type if isinstance(model_type, str) else f"{type(module).__module__}.{type(module).__qualname__}"


def find_models(backbone: nn.Module, families: Mapping[str, Mapping[str, str]] = FAMILIES) -> list[tuple[str, str]]:
    """The outermost models of a known family inside ``backbone``.

    Args:
        backbone: the model.
        families: model type -> roles; a backend's own table (``Backend.families``), default transformers'.

    Returns:
        ``(module_name, model_type)`` pairs; ``module_name`` is ``""`` for the backbone itself.
    """
    found: list[tuple[str, str]] = []
    for name, module in named_backbone_modules(backbone):
        model_type = model_type_of(module)
        if model_type not in families:
            continue
        if any(name == p or name.startswith(p + ".") for p, _ in found if p) or ("", model_type) in found:
            continue
        if found and found[0][0] == "":
            continue  # the backbone itself is a known model: everything below belongs to it
        found.append((name, model_type))
    return found


def role_keys(
    backbone: nn.Module,
    roles: Sequence[str],
    overrides: dict[str, dict[str, str]] | None = None,
    families: Mapping[str, Mapping[str, str]] = FAMILIES,
) -> list[str]:
    """Translate roles into ``[r]`` module keys for every known model inside ``backbone``.

    Args:
        backbone: the model to modify.
        roles: role names (``attn.q`` or ``attn@.q@``).
        overrides: per model type, roles placed elsewhere than :data:`FAMILIES` says
            (e.g. :data:`OPENDELTA_ROLES`).
        families: model type -> roles; a backend's own table (``Backend.families``), default transformers'.

    Returns:
        One key per (model, role) pair whose family defines the role.

    Raises:
        UnknownModelFamilyError: no model of a known family is inside ``backbone``.
        DeltaConfigError: a role is not in the common structure.
    """
    models = find_models(backbone, families)
    if not models:
        raise UnknownModelFamilyError(
            f"{type(backbone).__name__} is not a model whose structure opendelta_dist knows "
            f"(known model types: {', '.join(sorted(families))}), so it has no default positions. "
            "Pass modified_modules=[...] with the names of the modules to modify; "
            "print Visualization(model).structure_graph() to see them."
        )
    keys: list[str] = []
    for role in map(normalize_role, roles):
        if role not in ROLES:
            raise DeltaConfigError(f"unknown common-structure role {role!r}; roles are: {', '.join(ROLES)}")
        for prefix, model_type in models:
            pattern = (overrides or {}).get(model_type, {}).get(role) or families[model_type].get(role)
            if pattern is None:
                continue
            scope = re.escape(prefix) + r"\.(?:.*\.)?" if prefix else ""
            keys.append(f"{REGEX_PREFIX}{scope}(?:{pattern})")
    return keys
