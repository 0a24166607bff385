"""The life cycle every delta method goes through, as one check (used by the method x family table)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from opendelta_dist import AutoDeltaModel
from opendelta_dist.basemodel import DeltaBase
from opendelta_dist.operations import pristine_named_parameters
from tests.models import batch, build, logits

MakeDelta = Callable[[nn.Module], DeltaBase]


def check_life_cycle(make_delta: MakeDelta, family: str, tmp_path) -> DeltaBase:
    """defaults -> freeze -> 3 training steps (loss changes; only delta tensors change; backbone tensors
    bit-identical) -> save -> reload on a fresh backbone (identical logits) -> detach (pristine logits,
    bit-exact) -> attach (tuned logits again). Returns the delta."""
    model = build(family)
    inputs = batch(family)
    pristine_logits = logits(model, inputs)
    pristine_state = {k: v.clone() for k, v in model.state_dict().items()}

    delta = make_delta(model)
    delta.freeze_module(exclude=["deltas"], set_state_dict=True)
    backbone_before = {n: p.detach().clone() for n, p in pristine_named_parameters(model)}
    delta_before = {k: p.detach().clone() for k, p in delta.named_delta_tensors()}
    assert delta_before, "the delta has no tensors"
    trainable = delta.trainable_parameters()
    assert {id(p) for p in trainable} == {id(p) for _, p in delta.named_delta_tensors()}
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
    return delta
