"""Every delta method on every model family, through the whole life cycle.

defaults -> freeze -> 3 training steps (loss changes; only delta tensors change; backbone tensors
bit-identical) -> save -> reload on a fresh backbone (identical logits) -> detach (pristine logits)
-> attach (tuned logits again).
"""

from __future__ import annotations

import pytest
import torch

from opendelta_dist import (
    AdapterModel,
    AutoDeltaModel,
    BitFitModel,
    CompacterModel,
    LoraModel,
    LowRankAdapterModel,
    ParallelAdapterModel,
    PrefixModel,
    SoftPromptModel,
)
from opendelta_dist.errors import UnsupportedModuleError
from opendelta_dist.operations import pristine_named_parameters
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
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("method", sorted(METHODS))
def test_life_cycle(method, family, tmp_path):
    model = build(family)
    if (method, family) in UNSUPPORTED:
        pristine = logits(model, batch(family))
        with pytest.raises(UnsupportedModuleError, match=UNSUPPORTED[method, family]):
            METHODS[method](backbone_model=model, **OPTIONS.get(method, {}))
        assert torch.equal(logits(model, batch(family)), pristine)
        return
    inputs = batch(family)
    pristine_logits = logits(model, inputs)
    pristine_state = {k: v.clone() for k, v in model.state_dict().items()}

    delta = METHODS[method](backbone_model=model, **OPTIONS.get(method, {}))
    delta.freeze_module(exclude=["deltas"], set_state_dict=True)
    backbone_before = {n: p.detach().clone() for n, p in pristine_named_parameters(model)}
    delta_before = {k: p.detach().clone() for k, p in delta.named_delta_tensors()}
    assert delta_before, "the delta has no tensors"

    trainable = delta.trainable_parameters()
    assert {id(p) for p in trainable} == {id(p) for _, p in delta.named_delta_tensors()}
    # with set_state_dict the backbone's state dict holds exactly the trainable tensors
    assert set(model.state_dict()) == set(delta.trainable_parameters_names())

    optimizer = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(3):
        loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] != losses[0]

    for name, p in pristine_named_parameters(model):
        assert torch.equal(p, backbone_before[name]), f"backbone tensor {name} changed"
        assert p.grad is None, f"frozen backbone tensor {name} got a gradient"
    changed = [k for k, p in delta.named_delta_tensors() if not torch.equal(p, delta_before[k])]
    assert changed == list(delta_before), "every delta tensor is trained"

    tuned = logits(model, inputs)
    assert not torch.allclose(tuned, pristine_logits)
    delta.save_finetuned(tmp_path / "delta")

    fresh = build(family)
    loaded = AutoDeltaModel.from_finetuned(tmp_path / "delta", backbone_model=fresh)
    assert type(loaded) is type(delta)
    assert torch.equal(logits(fresh, inputs), tuned)

    delta.detach()
    assert torch.equal(logits(model, inputs), pristine_logits)
    restored = model.state_dict()
    assert list(restored) == list(pristine_state)
    assert all(torch.equal(restored[k], v) for k, v in pristine_state.items())

    delta.attach()
    assert torch.equal(logits(model, inputs), tuned)
