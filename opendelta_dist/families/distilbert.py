"""DistilBERT (post-norm blocks under ``transformer.layer.N``)."""

from __future__ import annotations

from opendelta_dist.families.family import Family, self_attention_roles

DISTILBERT = Family(
    name="distilbert",
    model_types=("distilbert",),
    roles=self_attention_roles(
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
)
