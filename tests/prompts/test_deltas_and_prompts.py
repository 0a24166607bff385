"""Every delta method inside a prompt model: the optimizer trains exactly the delta and the prompt's own
parameters (soft tokens, soft verbalizer head), the inspector proves it, the backbone does not move, and
save_prompt + load_prompt on a fresh backbone reproduce the class scores."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from opendelta_dist import check_optimizer
from opendelta_dist.inspect import check_gradients
from opendelta_dist.operations import delta_parameter_ids
from opendelta_dist.prompts import (
    MixedTemplate,
    PromptForClassification,
    SoftVerbalizer,
    load_prompt,
    save_prompt,
)
from tests.deltas.test_methods import METHODS, OPTIONS
from tests.prompts import prompt_models as pm

TEXT = '{"placeholder":"text_a"} {"soft": "it was"} {"mask"} {"soft"}.'
LABEL_WORDS = [["bad", "terrible"], ["good", "great"]]


def build(method):
    plm, tok = pm.plm("bert"), pm.tokenizer("bert")
    template = MixedTemplate(plm, tok, text=TEXT)
    # built before the delta, as a script does: the verbalizer copies the model's output head
    verbalizer = SoftVerbalizer(tok, plm, classes=["neg", "pos"], label_words=LABEL_WORDS)
    delta = METHODS[method](backbone_model=plm, **OPTIONS.get(method, {}))
    delta.freeze_module(set_state_dict=True)
    # freeze_plm freezes the backbone's own parameters only: the delta stays trainable
    return PromptForClassification(plm, template, verbalizer, freeze_plm=True), delta


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_prompt_model_trains_its_delta_and_prompt_only(method, tmp_path):
    model, delta = build(method)
    plm = model.plm
    deltas = delta_parameter_ids(plm)
    # the verbalizer's head, but the vocabulary bias nothing reads once the projection is replaced (frozen)
    prompt_own = [model.template.soft_embedding.weight, *(p for p in model.verbalizer.parameters() if p.requires_grad)]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == deltas | {id(p) for p in prompt_own}
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    check_optimizer(optimizer, model)
    backbone = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    tuned = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    b = pm.batch("bert", model.template, pm.examples(4))
    model.train()
    for _ in range(2):
        optimizer.zero_grad()
        F.cross_entropy(model(b), b["label"]).backward()
        check_gradients(model)
        optimizer.step()
    after = dict(model.named_parameters())
    assert all(torch.equal(after[n], v) for n, v in backbone.items())
    moved = {n for n, v in tuned.items() if not torch.equal(after[n], v)}
    assert "prompt_model.template.soft_embedding.weight" in moved
    assert any(id(after[n]) in deltas for n in moved), f"no {method} parameter moved"
    assert "verbalizer.head.predictions.decoder.weight" in moved
    save_prompt(tmp_path, model, delta_model=delta)
    loaded = load_prompt(tmp_path, pm.plm("bert"), pm.tokenizer("bert"))
    model.eval()
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(b), model(b))
