"""GPT-2 (pre-norm blocks under ``h.N``, ``Conv1D`` layers with (in, out) weights)."""

from __future__ import annotations

from typing import Any

from opendelta_dist.families.family import (
    Architecture,
    AttentionSpec,
    EstimatorSpec,
    Family,
    num_heads_and_head_dim,
    self_attention_roles,
)


def _architecture(config: Any) -> Architecture:
    return Architecture(
        family="gpt2",
        d_model=config.n_embd,
        n_heads=config.n_head,
        head_dim=config.n_embd // config.n_head,
        d_ff=config.n_inner or 4 * config.n_embd,
        vocab_size=config.vocab_size,
        activation=config.activation_function,
        gated=False,
        dropout=config.resid_pdrop,
        use_cache=bool(config.use_cache),
    )


GPT2 = Family(
    name="gpt2",
    model_types=("gpt2",),
    # GPT-2 projects q, k and v with one fused layer: the three roles name it
    roles=self_attention_roles(
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
    attention=(
        AttentionSpec(
            "transformers.models.gpt2.modeling_gpt2",
            "GPT2Attention",
            num_heads_and_head_dim,
            cross_args=("encoder_hidden_states",),
        ),
    ),
    estimator=EstimatorSpec(
        name="gpt2",
        model_types=("gpt2",),
        architecture=_architecture,
        sites=(
            (r"attn\.c_attn", "attn_in"),
            (r"attn\.c_proj", "attn_out"),
            (r"mlp\.c_fc", "ff_in"),
            (r"mlp\.c_proj", "ff_mid"),
        ),
    ),
)
