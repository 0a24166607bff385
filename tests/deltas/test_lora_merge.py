"""LoRA merge/unmerge: folded into the weights with equal logits, saved as a plain model, taken out again."""

from __future__ import annotations

import pytest
import torch

from opendelta_dist import LoraModel
from opendelta_dist.errors import DeltaStateError
from opendelta_dist.operations import pristine_named_parameters
from tests.models import batch, build, logits

ATOL = 1e-5


def _tuned(family, **options):
    model = build(family)
    delta = LoraModel(model, **options)
    with torch.no_grad():
        for _, p in delta.named_delta_tensors():
            p.normal_(std=0.3)
    return model, delta


@pytest.mark.parametrize("family", ["t5", "gpt2"])  # nn.Linear and transformers' Conv1D
def test_merge_keeps_logits_and_unmerge_restores_the_weights_exactly(family):
    model, delta = _tuned(family)
    inputs = batch(family)
    original = {n: p.detach().clone() for n, p in pristine_named_parameters(model)}
    tuned = logits(model, inputs)

    delta.merge()
    assert delta.merged
    assert not any(".lora" in name for name, _ in model.named_modules())  # no LoRA branch runs
    torch.testing.assert_close(logits(model, inputs), tuned, atol=ATOL, rtol=0)
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, original[n])]
    assert changed and all(n.endswith(".weight") for n in changed)

    delta.unmerge()
    assert not delta.merged
    assert all(torch.equal(p, original[n]) for n, p in pristine_named_parameters(model))
    assert torch.equal(logits(model, inputs), tuned)


def test_unmerge_without_the_kept_copy_subtracts_within_rounding():
    model, delta = _tuned("t5")
    inputs = batch("t5")
    original = {n: p.detach().clone() for n, p in pristine_named_parameters(model)}
    delta.merge(exact_unmerge=False)
    delta.unmerge()
    for n, p in pristine_named_parameters(model):
        torch.testing.assert_close(p, original[n], atol=1e-6, rtol=0)
    delta.detach()
    torch.testing.assert_close(logits(model, inputs), logits(build("t5"), inputs), atol=1e-5, rtol=0)


def test_merged_model_saves_and_loads_as_a_plain_transformers_model(tmp_path):
    model, delta = _tuned("bert", unfrozen_modules=["deltas", "classifier"])
    with torch.no_grad():
        model.classifier.weight.normal_()  # the delta's trained copy of the classifier
    delta.freeze_module(set_state_dict=True)  # the state dict holds only the delta ...
    inputs = batch("bert")
    tuned = logits(model, inputs)
    delta.merge()  # ... until it is merged: then the whole model saves
    model.save_pretrained(tmp_path / "merged")
    plain = type(model).from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(logits(plain, inputs), tuned, atol=ATOL, rtol=0)
    delta.unmerge()
    assert set(model.state_dict()) == set(delta.trainable_parameters_names())


def test_detach_while_merged_gives_the_pristine_backbone():
    model, delta = _tuned("t5")
    inputs = batch("t5")
    delta.merge()
    delta.detach()
    assert torch.equal(logits(model, inputs), logits(build("t5"), inputs))
    delta.attach()
    delta.merge()
    delta.unmerge()


def test_merge_misuse_gives_clear_errors(tmp_path):
    _, delta = _tuned("t5")
    delta.merge()
    with pytest.raises(DeltaStateError, match="merged already; call unmerge"):
        delta.merge()
    with pytest.raises(DeltaStateError, match="call unmerge\\(\\) before save_finetuned"):
        delta.save_finetuned(tmp_path / "d")
    delta.unmerge()
    with pytest.raises(DeltaStateError, match="not merged; nothing to unmerge"):
        delta.unmerge()
    delta.detach()
    with pytest.raises(DeltaStateError, match="not attached; attach\\(\\) it before merging"):
        delta.merge()


def test_a_training_step_on_a_merged_lora_is_refused_with_the_fix():
    """Merged, the LoRA branches are out of the model: a training forward would train nothing of the delta (and
    its backward fail on frozen weights). It is refused; inference (eval or no_grad) runs, and unmerge() trains."""
    model, delta = _tuned("t5")
    delta.freeze_module(exclude=["deltas"])
    inputs = batch("t5")
    delta.merge()
    model.train()
    with pytest.raises(DeltaStateError, match=r"merged into the backbone's weights .*call delta.unmerge\(\) before"):
        model(**inputs)
    with torch.no_grad():
        model(**inputs)
    model.eval()
    model(**inputs)
    delta.unmerge()
    model.train()
    model(**inputs).loss.backward()
    assert all(p.grad is not None for p in delta.trainable_parameters())


@pytest.mark.parametrize("method", ["AdapterModel", "BitFitModel", "PrefixModel"])
def test_merge_and_peft_export_of_other_methods_say_why_not(method, tmp_path):
    import opendelta_dist
    from opendelta_dist.errors import DeltaConfigError

    delta = getattr(opendelta_dist, method)(build("t5"))
    with pytest.raises(DeltaStateError, match=f"{method} adds computation that no weight can absorb"):
        delta.merge()
    with pytest.raises(DeltaStateError, match="never merged"):
        delta.unmerge()
    with pytest.raises(DeltaConfigError, match=f"LoRA deltas only, not for {method}: save it with save_finetuned"):
        delta.save_peft(tmp_path / "peft")
    assert not (tmp_path / "peft").exists()
