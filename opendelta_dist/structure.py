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
==============  =====================================================================

The accepted spellings ``attn@.q@`` (OpenDelta's) and ``attn.q`` are the same role.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

from opendelta_dist.addressing import REGEX_PREFIX, named_backbone_modules
from opendelta_dist.errors import DeltaConfigError, UnknownModelFamilyError


def _roles(block: str, attn: str, q: str, k: str, v: str, proj: str, ff: str, w1: str, w2: str, norm: str) -> dict:
    return {
        "attn": rf"{block}\.{attn}",
        "attn.q": rf"{block}\.{attn}\.{q}",
        "attn.k": rf"{block}\.{attn}\.{k}",
        "attn.v": rf"{block}\.{attn}\.{v}",
        "attn.proj": rf"{block}\.{attn}\.{proj}",
        "ff": rf"{block}\.{ff}",
        "ff.w1": rf"{block}\.{w1}",
        "ff.w2": rf"{block}\.{w2}",
        "layer_norm": norm,
    }


def _cross(block: str, attn: str, q: str, k: str, v: str, proj: str) -> dict:
    return {
        "crossattn": rf"{block}\.{attn}",
        "crossattn.q": rf"{block}\.{attn}\.{q}",
        "crossattn.k": rf"{block}\.{attn}\.{k}",
        "crossattn.v": rf"{block}\.{attn}\.{v}",
        "crossattn.proj": rf"{block}\.{attn}\.{proj}",
    }


_BERT_BLOCK = r"encoder\.layer\.\d+"
_BERT_LIKE = dict(
    block=_BERT_BLOCK,
    attn="attention",
    proj=r"output\.dense",
    ff=r"(?:intermediate|output)",
    w1=r"intermediate\.dense",
    w2=r"output\.dense",
    norm=rf"{_BERT_BLOCK}\.(?:attention\.output|output)\.LayerNorm",
)
_T5_BLOCK = r"(?:encoder|decoder)\.block\.\d+"
_T5_FF = r"(?:encoder\.block\.\d+\.layer\.1|decoder\.block\.\d+\.layer\.2)"
_BART_BLOCK = r"(?:encoder|decoder)\.layers\.\d+"

#: model_type -> role -> regular expression over module names (matched on a dotted suffix)
FAMILIES: dict[str, dict[str, str]] = {
    "bert": _roles(q=r"self\.query", k=r"self\.key", v=r"self\.value", **_BERT_LIKE),
    "roberta": _roles(q=r"self\.query", k=r"self\.key", v=r"self\.value", **_BERT_LIKE),
    "deberta-v2": _roles(q=r"self\.query_proj", k=r"self\.key_proj", v=r"self\.value_proj", **_BERT_LIKE),
    "distilbert": _roles(
        block=r"transformer\.layer\.\d+",
        attn="attention",
        q="q_lin",
        k="k_lin",
        v="v_lin",
        proj="out_lin",
        ff="ffn",
        w1=r"ffn\.lin1",
        w2=r"ffn\.lin2",
        norm=r"transformer\.layer\.\d+\.(?:sa_layer_norm|output_layer_norm)",
    ),
    # GPT-2 projects q, k and v with one fused layer: the three roles name it
    "gpt2": _roles(
        block=r"h\.\d+",
        attn="attn",
        q="c_attn",
        k="c_attn",
        v="c_attn",
        proj="c_proj",
        ff="mlp",
        w1=r"mlp\.c_fc",
        w2=r"mlp\.c_proj",
        norm=r"(?:h\.\d+\.ln_[12]|ln_f)",
    ),
    "opt": _roles(
        block=r"decoder\.layers\.\d+",
        attn="self_attn",
        q="q_proj",
        k="k_proj",
        v="v_proj",
        proj="out_proj",
        ff="fc[12]",
        w1="fc1",
        w2="fc2",
        norm=r"(?:decoder\.layers\.\d+\.(?:self_attn_layer_norm|final_layer_norm)|decoder\.final_layer_norm)",
    ),
    "bart": {
        **_roles(
            block=_BART_BLOCK,
            attn="self_attn",
            q="q_proj",
            k="k_proj",
            v="v_proj",
            proj="out_proj",
            ff="fc[12]",
            w1="fc1",
            w2="fc2",
            norm=rf"{_BART_BLOCK}\.(?:self_attn_layer_norm|encoder_attn_layer_norm|final_layer_norm)",
        ),
        **_cross(r"decoder\.layers\.\d+", "encoder_attn", "q_proj", "k_proj", "v_proj", "out_proj"),
    },
    "t5": {
        **_roles(
            block=_T5_BLOCK,
            attn=r"layer\.0\.SelfAttention",
            q="q",
            k="k",
            v="v",
            proj="o",
            ff=r"layer\.[12]",
            w1=r"layer\.[12]\.DenseReluDense\.(?:wi|wi_0)",
            w2=r"layer\.[12]\.DenseReluDense\.wo",
            norm=rf"(?:{_T5_BLOCK}\.layer\.\d\.layer_norm|(?:encoder|decoder)\.final_layer_norm)",
        ),
        # only the feed-forward sub-layer (layer.1 of the encoder, layer.2 of the decoder) is "ff"
        "ff": _T5_FF,
        "ff.w1": rf"{_T5_FF}\.DenseReluDense\.(?:wi|wi_0)",
        "ff.w2": rf"{_T5_FF}\.DenseReluDense\.wo",
        **_cross(r"decoder\.block\.\d+", r"layer\.1\.EncDecAttention", "q", "k", "v", "o"),
    },
    "llama": _roles(
        block=r"layers\.\d+",
        attn="self_attn",
        q="q_proj",
        k="k_proj",
        v="v_proj",
        proj="o_proj",
        ff="mlp",
        w1=r"mlp\.up_proj",
        w2=r"mlp\.down_proj",
        norm=r"(?:layers\.\d+\.(?:input_layernorm|post_attention_layernorm)|norm)",
    ),
}

ROLES = sorted({role for roles in FAMILIES.values() for role in roles})

#: where OpenDelta 0.3.2 placed a role differently (T5's "attn" is the whole self-attention sub-layer
#: there, BERT's "ff" only the output sub-layer): used to read OpenDelta checkpoints where they were
OPENDELTA_ROLES: dict[str, dict[str, str]] = {
    "t5": {"attn": r"(?:encoder|decoder)\.block\.\d+\.layer\.0"},
    **{family: {"ff": r"encoder\.layer\.\d+\.output"} for family in ("bert", "roberta", "deberta-v2")},
}


def normalize_role(key: str) -> str:
    """``"attn@.q@"`` (OpenDelta's spelling) -> ``"attn.q"``."""
    return key.replace("@", "")


def find_models(backbone: nn.Module) -> list[tuple[str, str]]:
    """The outermost transformers models of a known family inside ``backbone``.

    Returns:
        ``(module_name, model_type)`` pairs; ``module_name`` is ``""`` for the backbone itself.
    """
    found: list[tuple[str, str]] = []
    for name, module in named_backbone_modules(backbone):
        model_type = getattr(getattr(module, "config", None), "model_type", None)
        if model_type not in FAMILIES:
            continue
        if any(name == p or name.startswith(p + ".") for p, _ in found if p) or ("", model_type) in found:
            continue
        if found and found[0][0] == "":
            continue  # the backbone itself is a known model: everything below belongs to it
        found.append((name, model_type))
    return found


def role_keys(
    backbone: nn.Module, roles: Sequence[str], overrides: dict[str, dict[str, str]] | None = None
) -> list[str]:
    """Translate roles into ``[r]`` module keys for every known model inside ``backbone``.

    Args:
        backbone: the model to modify.
        roles: role names (``attn.q`` or ``attn@.q@``).
        overrides: per model type, roles placed elsewhere than :data:`FAMILIES` says
            (e.g. :data:`OPENDELTA_ROLES`).

    Returns:
        One key per (model, role) pair whose family defines the role.

    Raises:
        UnknownModelFamilyError: no model of a known family is inside ``backbone``.
        DeltaConfigError: a role is not in the common structure.
    """
    models = find_models(backbone)
    if not models:
        raise UnknownModelFamilyError(
            f"{type(backbone).__name__} is not a model whose structure opendelta_dist knows "
            f"(known transformers model types: {', '.join(sorted(FAMILIES))}), so it has no default positions. "
            "Pass modified_modules=[...] with the names of the modules to modify; "
            "print Visualization(model).structure_graph() to see them."
        )
    keys: list[str] = []
    for role in map(normalize_role, roles):
        if role not in ROLES:
            raise DeltaConfigError(f"unknown common-structure role {role!r}; roles are: {', '.join(ROLES)}")
        for prefix, model_type in models:
            pattern = (overrides or {}).get(model_type, {}).get(role) or FAMILIES[model_type].get(role)
            if pattern is None:
                continue
            scope = re.escape(prefix) + r"\.(?:.*\.)?" if prefix else ""
            keys.append(f"{REGEX_PREFIX}{scope}(?:{pattern})")
    return keys
