"""ViT (image encoder, pre-norm blocks under ``layers.N``; patches, not tokens, so no input embeddings).

No prefix: ``ViTAttention`` takes no cache argument, so a prefix has nothing to enter through
(:mod:`opendelta_dist.deltas.prefix`).
"""

from __future__ import annotations

from opendelta_dist.families.family import Family, self_attention_roles

VIT = Family(
    name="vit",
    model_types=("vit",),
    roles=self_attention_roles(
        block=r"layers\.\d+",
        attn="attention",
        q="q_proj",
        k="k_proj",
        v="v_proj",
        proj="o_proj",
        ff="mlp",
        w1=r"mlp\.fc1",
        w2=r"mlp\.fc2",
        norm=r"(?:layers\.\d+\.layernorm_(?:before|after)|layernorm)",
    ),
)
