"""Compacter: the PHM product, sharing across layers, fixed rules, OpenDelta's tensor names."""

from __future__ import annotations

import pytest
import torch

from opendelta_dist import AutoDeltaModel, CompacterModel
from opendelta_dist.backends.hf import BACKEND
from opendelta_dist.deltas.compacter import PHMInit, PHMLinear
from opendelta_dist.errors import DeltaConfigError, UnsupportedModuleError
from tests.models import batch, build, logits


@pytest.mark.parametrize("factorized_phm", [False, True])
@pytest.mark.parametrize("factorized_phm_rule", [False, True])
def test_phm_weight_is_a_sum_of_kronecker_products(factorized_phm, factorized_phm_rule):
    torch.manual_seed(0)
    n = 4
    layer = PHMLinear(16, 8, n, {}, factorized_phm_rule, factorized_phm, 2, True, True, PHMInit(), BACKEND)
    with torch.no_grad():
        layer.b.normal_()
    p = dict(layer.named_parameters())
    rules = p["phm_rule_left"] @ p["phm_rule_right"] if factorized_phm_rule else p["phm_rule"]
    blocks = p["W_left"] @ p["W_right"] if factorized_phm else p["W"]
    expected = sum(torch.kron(rules[i], blocks[i]) for i in range(n))
    assert expected.shape == (16, 8)
    torch.testing.assert_close(layer.weight(), expected)
    x = torch.randn(3, 16)
    torch.testing.assert_close(layer(x), x @ expected + layer.b)


def _shared_ids(delta, suffix):
    return {id(p) for k, p in delta.named_delta_tensors() if k.endswith(suffix)}


def test_shared_rules_and_weights_train_once_and_round_trip(tmp_path):
    model = build("t5")
    inputs = batch("t5")
    delta = CompacterModel(model, reduction_factor=4, shared_phm_rule=True, shared_W_phm=True, factorized_phm=False)
    assert len(_shared_ids(delta, ".phm_rule")) == 1
    assert len(_shared_ids(delta, "down_sampler.W")) == 1
    assert len(_shared_ids(delta, "up_sampler.W")) == 1
    assert len(_shared_ids(delta, ".b")) > 1
    delta.freeze_module()
    rule = next(p for k, p in delta.named_delta_tensors() if k.endswith(".phm_rule"))
    before = rule.detach().clone()
    optimizer = torch.optim.SGD(delta.trainable_parameters(), lr=0.5)
    model(**inputs).loss.backward()
    optimizer.step()
    assert not torch.equal(rule, before)
    tuned = logits(model, inputs)
    delta.save_finetuned(tmp_path / "c")
    fresh = build("t5")
    loaded = AutoDeltaModel.from_finetuned(tmp_path / "c", fresh)
    assert len(_shared_ids(loaded, ".phm_rule")) == 1
    assert torch.equal(logits(fresh, inputs), tuned)


def test_rules_are_fixed_without_learn_phm_and_still_saved(tmp_path):
    model = build("bert")
    inputs = batch("bert")
    delta = CompacterModel(model, reduction_factor=4, learn_phm=False)
    delta.freeze_module()
    rules = {k: p for k, p in delta.named_delta_tensors() if ".phm_rule" in k}
    assert rules and not any(p.requires_grad for p in rules.values())
    trainable = {id(p) for p in delta.trainable_parameters()}
    assert not trainable & {id(p) for p in rules.values()}
    before = {k: p.detach().clone() for k, p in rules.items()}
    optimizer = torch.optim.AdamW(delta.trainable_parameters(), lr=1e-2)
    model(**inputs).loss.backward()
    optimizer.step()
    assert all(torch.equal(p, before[k]) for k, p in rules.items())
    delta.save_finetuned(tmp_path / "c")
    fresh = build("bert")
    AutoDeltaModel.from_finetuned(tmp_path / "c", fresh)
    assert torch.equal(logits(fresh, inputs), logits(model, inputs))


def test_tensor_names_and_sizes_follow_opendelta():
    delta = CompacterModel(build("t5"), reduction_factor=4, phm_rank=2, use_bias_up_sampler=False)
    shapes = {k: tuple(p.shape) for k, p in delta.named_delta_tensors()}
    prefix = "encoder.block.0.layer.1.DenseReluDense.wo.compactor"
    assert shapes[f"{prefix}.down_sampler.phm_rule"] == (4, 4, 4)
    assert shapes[f"{prefix}.down_sampler.W_left"] == (4, 8, 2)
    assert shapes[f"{prefix}.down_sampler.W_right"] == (4, 2, 2)
    assert shapes[f"{prefix}.down_sampler.b"] == (8,)
    assert f"{prefix}.up_sampler.b" not in shapes


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"reduction_factor": 16}, UnsupportedModuleError, "not both multiples of hypercomplex_division=4"),
        ({"hypercomplex_division": 0}, DeltaConfigError, "hypercomplex_division must be a positive integer"),
        ({"phm_c_init": "zeros"}, DeltaConfigError, "phm_c_init must be one of"),
        ({"hypercomplex_nonlinearity": "phm"}, DeltaConfigError, "hypercomplex_nonlinearity must be one of"),
        ({"phm_init_range": 0.0}, DeltaConfigError, "phm_init_range must be positive"),
    ],
)
def test_bad_options_give_clear_errors(options, error, match):
    model = build("t5")
    inputs = batch("t5")
    pristine = logits(model, inputs)
    with pytest.raises(error, match=match):
        CompacterModel(model, **{"reduction_factor": 4, **options})
    assert torch.equal(logits(model, inputs), pristine)
