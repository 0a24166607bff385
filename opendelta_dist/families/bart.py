"""BART (encoder-decoder, post-norm blocks under ``encoder.layers.N`` / ``decoder.layers.N``)."""

from __future__ import annotations

from opendelta_dist.families.family import (
    AttentionSpec,
    Family,
    cross_attention_roles,
    num_heads_and_head_dim,
    self_attention_roles,
)

_BLOCK = r"(?:encoder|decoder)\.layers\.\d+"

BART = Family(
    name="bart",
    model_types=("bart",),
    roles={
        **self_attention_roles(
            block=_BLOCK,
            attn="self_attn",
            q="q_proj",
            k="k_proj",
            v="v_proj",
            proj="out_proj",
            ff="fc[12]",
            w1="fc1",
            w2="fc2",
            norm=rf"{_BLOCK}\.(?:self_attn_layer_norm|encoder_attn_layer_norm|final_layer_norm)",
        ),
        **cross_attention_roles(r"decoder\.layers\.\d+", "encoder_attn", "q_proj", "k_proj", "v_proj", "out_proj"),
    },
    attention=(
        AttentionSpec(
            "transformers.models.bart.modeling_bart",
            "BartAttention",
            num_heads_and_head_dim,
            cross_args=("key_value_states",),
        ),
    ),
)
