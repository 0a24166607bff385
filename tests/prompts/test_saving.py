"""save_prompt / load_prompt: one directory with the delta and the prompt, rebuilt exactly on a fresh backbone."""

from __future__ import annotations

import json

import pytest
import torch

from opendelta_dist import AdapterModel, LoraModel
from opendelta_dist.prompts import (
    GenerationVerbalizer,
    InputExample,
    ManualTemplate,
    ManualVerbalizer,
    MixedTemplate,
    PromptError,
    PromptForClassification,
    PromptForGeneration,
    SoftTemplate,
    SoftVerbalizer,
    load_prompt,
    save_prompt,
)
from opendelta_dist.prompts.saving import PROMPT_CONFIG_NAME, PROMPT_TENSORS_NAME
from tests.prompts import prompt_models as pm

TEXT = '{"placeholder":"text_a"} It was {"mask"}.'
MIXED = (
    '{"soft": "it was", "soft_id": 1} {"placeholder":"text_a"} {"soft"} {"mask"} {"soft_id": 1} '
    '{"soft": None, "duplicate": 2, "same": True}.'
)


def perturb(*modules):
    """Move every trainable tensor away from its initial value, as training would."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for module in modules:
            for p in module.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)


def scores(model, b):
    model.eval()
    with torch.no_grad():
        return model(b)


def test_a_calibrated_manual_prompt_round_trips(tmp_path):
    plm, tok = pm.plm("bert"), pm.tokenizer("bert")
    template = ManualTemplate(tok, text=TEXT)
    verbalizer = ManualVerbalizer(
        tok, classes=["neg", "pos"], label_words={"pos": ["good", "great"], "neg": "bad"}, post_log_softmax=True
    )
    model = PromptForClassification(plm, template, verbalizer, freeze_plm=True)
    verbalizer.register_calibrate_logits(torch.randn(len(tok)))
    b = pm.batch("bert", template, pm.examples(3))
    save_prompt(tmp_path, model)
    assert {p.name for p in tmp_path.iterdir()} == {PROMPT_CONFIG_NAME, PROMPT_TENSORS_NAME}
    config = json.loads((tmp_path / PROMPT_CONFIG_NAME).read_text())
    assert config["model"] == {"class": "PromptForClassification", "freeze_plm": True, "plm_eval_mode": False}
    assert config["template"]["class"] == "ManualTemplate" and config["delta"] is False
    assert config["verbalizer"]["label_words"] == ["bad", ["good", "great"]]  # as given, in class order
    assert config["verbalizer"]["options"] == {"prefix": " ", "multi_token_handler": "first", "post_log_softmax": True}
    assert config["verbalizer"]["calibrated"] is True
    loaded = load_prompt(tmp_path, pm.plm("bert"), tok)
    assert isinstance(loaded, PromptForClassification) and loaded.delta_model is None
    assert loaded.verbalizer.label_words == verbalizer.label_words and loaded.prompt_model.freeze_plm
    assert torch.equal(loaded.verbalizer._calibrate_logits, verbalizer._calibrate_logits)
    assert torch.equal(scores(loaded, b), scores(model, b))


def test_soft_tokens_soft_verbalizer_and_delta_round_trip(tmp_path):
    plm, tok = pm.plm("bert"), pm.tokenizer("bert")
    template = MixedTemplate(plm, tok, text=MIXED)
    verbalizer = SoftVerbalizer(tok, plm, classes=["neg", "pos"], label_words=[["bad"], ["good", "great"]])
    delta = LoraModel(backbone_model=plm)
    delta.freeze_module()
    model = PromptForClassification(plm, template, verbalizer)
    perturb(model)
    b = pm.batch("bert", template, pm.examples(4))
    save_prompt(tmp_path, model, delta_model=delta)
    assert {"config.json", "delta_model.safetensors", PROMPT_CONFIG_NAME} <= {p.name for p in tmp_path.iterdir()}
    fresh = pm.plm("bert")
    loaded = load_prompt(tmp_path, fresh, tok)
    assert loaded.delta_model is not None and loaded.delta_model.backbone_model is fresh
    assert loaded.template.soft_token_ids == template.soft_token_ids
    assert torch.equal(scores(loaded, b), scores(model, b))
    # the batch the loaded template makes is the same too
    again = pm.batch("bert", loaded.template, pm.examples(4))
    assert all(torch.equal(again[k], b[k]) for k in b if isinstance(b[k], torch.Tensor))


def test_a_generation_prompt_round_trips(tmp_path):
    plm, tok = pm.plm("t5"), pm.tokenizer("t5")
    template = SoftTemplate(plm, tok, text=TEXT, num_tokens=3, initialize_from_vocab=False)
    verbalizer = GenerationVerbalizer(tok, label_words={0: ["bad"], 1: ["good"]})
    delta = AdapterModel(backbone_model=plm)
    delta.freeze_module()
    model = PromptForGeneration(plm, template, tokenizer=tok, gen_config={"max_new_tokens": 3})
    perturb(model)
    rows = [verbalizer.wrap_one_example(e) for e in pm.examples(3)]
    b = pm.batch("t5", template, rows, teacher_forcing=True)
    save_prompt(tmp_path, model, delta_model=delta)
    config = json.loads((tmp_path / PROMPT_CONFIG_NAME).read_text())
    assert config["model"]["gen_config"] == {"max_new_tokens": 3} and config["verbalizer"] is None
    assert config["template"]["options"] == {"initialize_from_vocab": False, "num_tokens": 3, "random_range": 0.5}
    loaded = load_prompt(tmp_path, pm.plm("t5"), tok)
    assert isinstance(loaded, PromptForGeneration) and loaded.plm.generation_config.max_new_tokens == 3
    with torch.no_grad():
        assert torch.equal(loaded.eval()(b), model.eval()(b))
    assert loaded.generate(b, do_sample=False) == model.generate(b, do_sample=False)


class MyVerbalizer(ManualVerbalizer):
    """A verbalizer class of the user's own."""


def test_classes_of_ones_own_are_named_on_load(tmp_path):
    plm, tok = pm.plm("bert"), pm.tokenizer("bert")
    template = ManualTemplate(tok, text=TEXT)
    model = PromptForClassification(plm, template, MyVerbalizer(tok, label_words=[["bad"], ["good"]]))
    save_prompt(tmp_path, model)
    with pytest.raises(PromptError, match=r"classes=\{'MyVerbalizer': MyVerbalizer\}"):
        load_prompt(tmp_path, pm.plm("bert"), tok)
    loaded = load_prompt(tmp_path, pm.plm("bert"), tok, classes={"MyVerbalizer": MyVerbalizer})
    assert type(loaded.verbalizer) is MyVerbalizer
    b = pm.batch("bert", template, pm.examples(2))
    assert torch.equal(scores(loaded, b), scores(model, b))


def test_what_cannot_be_saved_or_loaded_is_one_clear_error(tmp_path):
    plm, tok = pm.plm("bert"), pm.tokenizer("bert")
    verbalizer = ManualVerbalizer(tok, label_words=[["bad"], ["good"]])
    LoraModel(backbone_model=plm)
    model = PromptForClassification(plm, ManualTemplate(tok, text=TEXT), verbalizer)
    with pytest.raises(PromptError, match="carries a delta, which would be lost: pass it"):
        save_prompt(tmp_path / "a", model)
    other = LoraModel(backbone_model=pm.plm("bert"))
    with pytest.raises(PromptError, match="not attached to this prompt model's language model"):
        save_prompt(tmp_path / "a", model, delta_model=other)
    processing = [{"placeholder": "text_a", "post_processing": str.lower}, {"text": "It was"}, {"mask": None}]
    model = PromptForClassification(pm.plm("bert"), ManualTemplate(tok, text=processing), verbalizer)
    with pytest.raises(PromptError, match="a callable such as a template's post_processing cannot be saved"):
        save_prompt(tmp_path / "b", model)
    model = PromptForClassification(pm.plm("bert"), ManualTemplate(tok, text=TEXT), verbalizer)
    save_prompt(tmp_path / "c", model)
    # another tokenizer gives the label words other ids
    with pytest.raises(PromptError, match="other ids than the one the prompt was trained with"):
        load_prompt(tmp_path / "c", pm.plm("bert"), pm.tokenizer("roberta"))
    tensors = tmp_path / "c" / PROMPT_TENSORS_NAME
    tensors.write_bytes(tensors.read_bytes()[:-3])
    with pytest.raises(PromptError, match="does not match the sha256"):
        load_prompt(tmp_path / "c", pm.plm("bert"), tok)
    with pytest.raises(PromptError, match=r"no prompt_config\.json"):
        load_prompt(tmp_path / "nothing", pm.plm("bert"), tok)


def test_the_example_is_not_changed_by_the_generation_verbalizer():
    verbalizer = GenerationVerbalizer(pm.tokenizer("t5"), label_words={0: "bad", 1: "good"})
    example = InputExample(guid=0, text_a="x", label=1)
    assert verbalizer.wrap_one_example(example).tgt_text == "good" and example.tgt_text is None
