"""CTRL (decoder-only, pre-norm blocks under ``h.N``, feed-forward an ``nn.Sequential``).

No prefix: CTRL's ``MultiHeadAttention`` takes its input as ``(v, k, q)`` and its cache as ``layer_past``,
neither of which the prefix's call rewriting (:mod:`opendelta_dist.deltas.prefix`) reads.
"""

from __future__ import annotations

from opendelta_dist.families.family import Family, self_attention_roles

CTRL = Family(
    name="ctrl",
    model_types=("ctrl",),
    roles=self_attention_roles(
        block=r"h\.\d+",
        attn="multi_head_attention",
        q="Wq",
        k="Wk",
        v="Wv",
        proj="dense",
        ff="ffn",
        # the feed-forward is Sequential(Linear, ReLU, Linear)
        w1=r"ffn\.0",
        w2=r"ffn\.2",
        norm=r"(?:h\.\d+\.layernorm[12]|layernorm)",
    ),
)
