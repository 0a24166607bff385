"""T5 (encoder-decoder, pre-RMS-norm blocks under ``encoder.block.N`` / ``decoder.block.N``, each a list of
sub-layers: self-attention, the decoder's cross-attention, feed-forward). The estimator also reads mT5."""

from __future__ import annotations

from typing import Any

from torch import nn

from opendelta_dist.families.family import (
    Architecture,
    AttentionSpec,
    EstimatorSpec,
    Family,
    cross_attention_roles,
    self_attention_roles,
)

_BLOCK = r"(?:encoder|decoder)\.block\.\d+"
# only the feed-forward sub-layer (layer.1 of the encoder, layer.2 of the decoder) is "ff"
_FF = r"(?:encoder\.block\.\d+\.layer\.1|decoder\.block\.\d+\.layer\.2)"


def _heads(m: nn.Module) -> tuple[int, int]:
    return m.n_heads, m.key_value_proj_dim


def _architecture(config: Any) -> Architecture:
    return Architecture(
        family="t5",
        d_model=config.d_model,
        n_heads=config.num_heads,
        head_dim=config.d_kv,
        d_ff=config.d_ff,
        vocab_size=config.vocab_size,
        activation=config.dense_act_fn,
        gated=config.is_gated_act,
        dropout=config.dropout_rate,
    )


T5 = Family(
    name="t5",
    model_types=("t5",),
    roles={
        **self_attention_roles(
            block=_BLOCK,
            attn=r"layer\.0\.SelfAttention",
            q="q",
            k="k",
            v="v",
            proj="o",
            ff=r"layer\.[12]",
            w1=r"layer\.[12]\.DenseReluDense\.(?:wi|wi_0)",
            w2=r"layer\.[12]\.DenseReluDense\.wo",
            norm=rf"(?:{_BLOCK}\.layer\.\d\.layer_norm|(?:encoder|decoder)\.final_layer_norm)",
        ),
        "ff": _FF,
        "ff.w1": rf"{_FF}\.DenseReluDense\.(?:wi|wi_0)",
        "ff.w2": rf"{_FF}\.DenseReluDense\.wo",
        **cross_attention_roles(r"decoder\.block\.\d+", r"layer\.1\.EncDecAttention", "q", "k", "v", "o"),
    },
    # OpenDelta 0.3.2's "attn" is the whole self-attention sub-layer
    opendelta_roles={"attn": r"(?:encoder|decoder)\.block\.\d+\.layer\.0"},
    attention=(
        AttentionSpec(
            "transformers.models.t5.modeling_t5",
            "T5Attention",
            _heads,
            mask_arg="mask",
            cross_args=("key_value_states",),
            relative_position_bias=True,
        ),
    ),
    estimator=EstimatorSpec(
        name="t5",
        model_types=("t5", "mt5"),
        architecture=_architecture,
        sites=(
            (r"layer\.0\.SelfAttention\.[qkv]", "attn_in"),
            (r"layer\.0\.SelfAttention\.o", "attn_out"),
            (r"layer\.1\.EncDecAttention\.q", "cross_in"),
            (r"layer\.1\.EncDecAttention\.[kv]", "encoder_out"),
            (r"layer\.1\.EncDecAttention\.o", "cross_out"),
            (r"layer\.\d\.DenseReluDense\.wi(_0|_1)?", "ff_in"),
            (r"layer\.\d\.DenseReluDense\.wo", "ff_mid"),
        ),
    ),
)
