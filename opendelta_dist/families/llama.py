"""Llama (decoder-only, pre-RMS-norm blocks under ``layers.N``, rotary positions, SwiGLU, grouped-query
attention). The estimator also reads Mistral and Qwen2."""

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


def _heads(m: nn.Module) -> tuple[int, int]:
    return m.config.num_key_value_heads, m.head_dim  # grouped-query attention: the key/value heads


def _architecture(config: Any) -> Architecture:
    return hidden_size_architecture(config, "llama", gated=True, dropout=0.0)


LLAMA = Family(
    name="llama",
    model_types=("llama",),
    roles=self_attention_roles(
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
    attention=(AttentionSpec("transformers.models.llama.modeling_llama", "LlamaAttention", _heads),),
    estimator=EstimatorSpec(
        name="llama",
        model_types=("llama", "mistral", "qwen2"),
        architecture=_architecture,
        sites=(
            (r"self_attn\.[qkv]_proj", "attn_in"),
            (r"self_attn\.o_proj", "attn_out"),
            (r"mlp\.(gate|up)_proj", "ff_in"),
            (r"mlp\.down_proj", "ff_mid"),
        ),
    ),
)
