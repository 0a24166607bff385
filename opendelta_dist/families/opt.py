"""OPT (decoder-only, pre-norm blocks under ``decoder.layers.N``)."""

from __future__ import annotations

from opendelta_dist.families.family import AttentionSpec, Family, num_heads_and_head_dim, self_attention_roles

OPT = Family(
    name="opt",
    model_types=("opt",),
    roles=self_attention_roles(
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
    attention=(AttentionSpec("transformers.models.opt.modeling_opt", "OPTAttention", num_heads_and_head_dim),),
)
