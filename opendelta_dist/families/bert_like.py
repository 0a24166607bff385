"""BERT-like encoders (post-norm blocks under ``encoder.layer.N``): BERT, RoBERTa (and XLM-R for the
estimator), DeBERTa-v2."""

from __future__ import annotations

from typing import Any

from torch import nn

from opendelta_dist.families.family import (
    Architecture,
    AttentionSpec,
    EstimatorSpec,
    Family,
    hidden_size_architecture,
    self_attention_roles,
)

_BLOCK = r"encoder\.layer\.\d+"
_LAYOUT = dict(
    block=_BLOCK,
    attn="attention",
    proj=r"output\.dense",
    ff=r"(?:intermediate|output)",
    w1=r"intermediate\.dense",
    w2=r"output\.dense",
    norm=rf"{_BLOCK}\.(?:attention\.output|output)\.LayerNorm",
)


def _heads(m: nn.Module) -> tuple[int, int]:
    return m.num_attention_heads, m.attention_head_size


def _architecture(config: Any) -> Architecture:
    return hidden_size_architecture(config, "bert", gated=False, dropout=config.hidden_dropout_prob)


BERT = Family(
    name="bert",
    model_types=("bert", "roberta"),
    roles=self_attention_roles(q=r"self\.query", k=r"self\.key", v=r"self\.value", **_LAYOUT),
    attention=(
        AttentionSpec("transformers.models.bert.modeling_bert", "BertSelfAttention", _heads),
        AttentionSpec("transformers.models.roberta.modeling_roberta", "RobertaSelfAttention", _heads),
    ),
    estimator=EstimatorSpec(
        name="bert",
        model_types=("bert", "roberta", "xlm-roberta"),
        architecture=_architecture,
        sites=(
            (r"attention\.self\.(query|key|value)", "attn_in"),
            (r"attention\.output\.dense", "attn_out"),
            (r"intermediate\.dense", "ff_in"),
            (r"output\.dense", "ff_mid"),
        ),
    ),
)

DEBERTA_V2 = Family(
    name="deberta-v2",
    model_types=("deberta-v2",),
    roles=self_attention_roles(q=r"self\.query_proj", k=r"self\.key_proj", v=r"self\.value_proj", **_LAYOUT),
)
