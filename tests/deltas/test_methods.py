"""Every delta method on every model family, through the whole life cycle (tests/deltas/lifecycle.py):

defaults -> freeze -> 3 training steps (loss changes; only delta tensors change; backbone tensors
bit-identical) -> save -> reload on a fresh backbone (identical logits) -> detach (pristine logits)
-> attach (tuned logits again). Where a method cannot apply to a family, the library says why.
"""

from __future__ import annotations

import pytest
import torch

from opendelta_dist import (
    AdapterModel,
    BitFitModel,
    CompacterModel,
    LoraModel,
    LowRankAdapterModel,
    ParallelAdapterModel,
    PrefixModel,
    SoftPromptModel,
)
from opendelta_dist.errors import UnsupportedModuleError
from tests.deltas.lifecycle import check_life_cycle
from tests.models import FAMILIES, batch, build, logits

METHODS = {
    "lora": LoraModel,
    "adapter": AdapterModel,
    "parallel_adapter": ParallelAdapterModel,
    "bitfit": BitFitModel,
    "lowrankadapter": LowRankAdapterModel,
    "compacter": CompacterModel,
    "prefix": PrefixModel,
    "soft_prompt": SoftPromptModel,
}
OPTIONS = {
    # the tiny models have 32 features: Compacter's bottleneck (32 // 16 = 2) must be a multiple of n = 4
    "compacter": {"reduction_factor": 4},
    # sized to the tiny models (their position tables are short)
    "prefix": {"prefix_token_num": 3, "embed_dim": 16, "mid_dim": 16},
    "soft_prompt": {"soft_token_num": 4},
}
# where a method cannot apply, and why: the library says so with a clear error
UNSUPPORTED = {
    # DistilBERT's and DeBERTa-v2's attention classes compute their scores in ways no prefix entry covers yet
    ("prefix", "distilbert"): "cannot add a prefix to .* DistilBertSelfAttention",
    ("prefix", "deberta-v2"): "cannot add a prefix to .* DebertaV2",
    # CTRL's attention takes (v, k, q) and its cache as `layer_past`; ViT's attention takes no cache at all
    ("prefix", "ctrl"): "cannot add a prefix to .* MultiHeadAttention",
    ("prefix", "vit"): "cannot add a prefix to .* ViTAttention",
    # ViT reads pixels: it has no input embeddings to put a prompt before
    ("soft_prompt", "vit"): "no module of ViTForImageClassification that holds its input embeddings",
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("method", sorted(METHODS))
def test_life_cycle(method, family, tmp_path):
    if (method, family) in UNSUPPORTED:
        model = build(family)
        pristine = logits(model, batch(family))
        with pytest.raises(UnsupportedModuleError, match=UNSUPPORTED[method, family]):
            METHODS[method](backbone_model=model, **OPTIONS.get(method, {}))
        assert torch.equal(logits(model, batch(family)), pristine)
        return
    check_life_cycle(lambda m: METHODS[method](backbone_model=m, **OPTIONS.get(method, {})), family, tmp_path)
