"""``PromptForClassification(..., logits_at_mask_only=True)``: the output layer projects only the mask positions'
hidden states to the vocabulary, with the scores and gradients of the full projection; where it cannot (soft
templates that shift the positions, encoder-decoders, verbalizers that read more than the logits, rows with
different numbers of masks) the layer runs in full. Off by default."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F

from opendelta_dist import LoraModel, SoftPromptModel
from opendelta_dist.prompts import (
    ManualTemplate,
    ManualVerbalizer,
    MixedTemplate,
    PromptForClassification,
    SoftTemplate,
    SoftVerbalizer,
    VerbalizerError,
    WrappingError,
)
from tests.prompts import prompt_models as pm

TEXT = '{"placeholder":"text_a"} It was {"mask"}.'
LM_TEXT = '{"placeholder":"text_a"} It was {"mask"}'
TWO_MASKS = '{"placeholder":"text_a"} {"mask"} and {"mask"}.'
LABEL_WORDS = [["bad", "terrible"], ["good", "great"]]
ATOL = 1e-5


def plm(kind: str):
    """A tiny language model of the prompt tests (BERT, RoBERTa, GPT-2, T5) in eval mode."""
    return pm.plm(kind).eval()


@contextmanager
def output_layer_inputs(model):
    """The shapes of the inputs that the language model's output layer receives while the block runs."""
    shapes: list[tuple[int, ...]] = []
    handle = model.get_output_embeddings().register_forward_hook(lambda m, args, out: shapes.append(args[0].shape))
    try:
        yield shapes
    finally:
        handle.remove()


def run_both(model, batch, method="forward"):
    """``method``'s result with the option off and on, and the output layer's input shapes in each mode."""
    results, shapes = [], []
    for on in (False, True):
        model.logits_at_mask_only = on
        with output_layer_inputs(model.plm) as seen, torch.no_grad():
            results.append(getattr(model, method)(batch))
        shapes.append(seen)
    return results, shapes


class TwoMaskVerbalizer(ManualVerbalizer):
    """Class scores from several masks per row (summed); it reads the logits as the base class does."""

    def process_outputs(self, outputs, batch=None, **kwargs):
        return sum(self.process_logits(outputs[:, i]) for i in range(outputs.shape[1]))


class LogitsReadingVerbalizer(ManualVerbalizer):
    """A verbalizer with its own ``gather_outputs`` (here the same logits): never narrowed."""

    def gather_outputs(self, outputs):
        return outputs.logits


@pytest.mark.parametrize(("kind", "text"), [("bert", TEXT), ("roberta", TEXT), ("gpt2", LM_TEXT)])
def test_one_mask_per_row_projects_only_the_masks_with_the_same_scores(kind, text):
    lm, tok = plm(kind), pm.tokenizer(kind)
    template = ManualTemplate(tok, text=text)
    model = PromptForClassification(lm, template, ManualVerbalizer(tok, label_words=LABEL_WORDS))
    b = pm.batch(kind, template, pm.examples(3))
    (off, on), (full, narrow) = run_both(model, b)
    assert off.shape == on.shape == (3, 2)
    torch.testing.assert_close(on, off, atol=ATOL, rtol=0)
    (off, on), _ = run_both(model, b, "forward_without_verbalize")
    assert off.shape == on.shape == (3, len(tok))
    torch.testing.assert_close(on, off, atol=ATOL, rtol=0)
    hidden = lm.config.hidden_size if kind != "gpt2" else lm.config.n_embd
    assert full == [(3, b["input_ids"].shape[1], hidden)] and narrow == [(3, 1, hidden)]


def test_several_masks_per_row_are_projected_together():
    lm, tok = plm("bert"), pm.tokenizer("bert")
    template = ManualTemplate(tok, text=TWO_MASKS)
    model = PromptForClassification(lm, template, TwoMaskVerbalizer(tok, label_words=LABEL_WORDS))
    b = pm.batch("bert", template, pm.examples(3))
    (off, on), (full, narrow) = run_both(model, b, "forward_without_verbalize")
    assert off.shape == on.shape == (3, 2, len(tok))
    torch.testing.assert_close(on, off, atol=ATOL, rtol=0)
    assert full == [(3, b["input_ids"].shape[1], 32)] and narrow == [(3, 2, 32)]
    (off, on), _ = run_both(model, b)
    assert off.shape == (3, 2)
    torch.testing.assert_close(on, off, atol=ATOL, rtol=0)
    # a verbalizer that takes one mask per row refuses two in both modes
    model.verbalizer = ManualVerbalizer(tok, label_words=LABEL_WORDS)
    for on in (False, True):
        model.logits_at_mask_only = on
        with pytest.raises(VerbalizerError, match="one mask per example"):
            model(b)


def test_gradients_of_the_delta_and_the_soft_tokens_agree():
    # a mixed template keeps Template's post_processing_outputs (its soft tokens replace embeddings in place), so
    # it is narrowed too
    lm, tok = plm("bert"), pm.tokenizer("bert")
    template = MixedTemplate(lm, tok, text='{"placeholder":"text_a"} {"soft": "it was"} {"mask"} {"soft"}.')
    LoraModel(backbone_model=lm)
    model = PromptForClassification(lm, template, ManualVerbalizer(tok, label_words=LABEL_WORDS), freeze_plm=True)
    model.eval()
    b = pm.batch("bert", template, pm.examples(3))
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert "prompt_model.template.soft_embedding.weight" in trained and len(trained) > 1
    with torch.no_grad():  # LoRA's B starts at zero, which leaves A without a gradient
        for name, p in trained.items():
            if "lora_B" in name:
                p.normal_(std=0.1)
    grads, losses, shapes = [], [], []
    for on in (False, True):
        model.logits_at_mask_only = on
        model.zero_grad(set_to_none=True)
        with output_layer_inputs(lm) as seen:
            loss = F.cross_entropy(model(b), b["label"])
            loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in trained.items()})
        shapes.append(seen)
    torch.testing.assert_close(losses[1], losses[0], atol=ATOL, rtol=0)
    assert shapes == [[(3, b["input_ids"].shape[1], 32)], [(3, 1, 32)]]
    for name in trained:
        assert grads[0][name].abs().sum() > 0, name
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=ATOL, rtol=1e-4, msg=name)


def test_a_soft_prompt_delta_is_narrowed_after_it_drops_its_positions():
    # the delta puts 4 embeddings before each row and takes them out of the sequence output before the heads (the
    # returned hidden_states keep them), so the output layer sees one row per batch position and is narrowed
    lm, tok = plm("bert"), pm.tokenizer("bert")
    template = ManualTemplate(tok, text=TEXT)
    SoftPromptModel(backbone_model=lm, soft_token_num=4)
    model = PromptForClassification(lm, template, ManualVerbalizer(tok, label_words=LABEL_WORDS))
    b = pm.batch("bert", template, pm.examples(3))
    (off, on), (full, narrow) = run_both(model, b)
    torch.testing.assert_close(on, off, atol=ATOL, rtol=0)
    assert full == [(3, b["input_ids"].shape[1], 32)] and narrow == [(3, 1, 32)]


def soft_template_case():
    lm, tok = plm("bert"), pm.tokenizer("bert")
    template = SoftTemplate(lm, tok, text=TEXT, num_tokens=3)
    return lm, template, ManualVerbalizer(tok, label_words=LABEL_WORDS), 3


def soft_verbalizer_case():
    lm, tok = plm("bert"), pm.tokenizer("bert")
    return lm, ManualTemplate(tok, text=TEXT), SoftVerbalizer(tok, lm, label_words=LABEL_WORDS), 0


def own_gather_outputs_case():
    lm, tok = plm("bert"), pm.tokenizer("bert")
    return lm, ManualTemplate(tok, text=TEXT), LogitsReadingVerbalizer(tok, label_words=LABEL_WORDS), 0


@pytest.mark.parametrize("case", [soft_template_case, soft_verbalizer_case, own_gather_outputs_case])
def test_the_fallbacks_project_every_position_with_the_same_scores(case):
    lm, template, verbalizer, prepended = case()
    model = PromptForClassification(lm, template, verbalizer)
    b = pm.batch("bert", template, pm.examples(3))
    (off, on), (full, narrow) = run_both(model, b)
    assert off.shape == (3, 2)
    torch.testing.assert_close(on, off, atol=0, rtol=0)
    assert full == narrow == [(3, b["input_ids"].shape[1] + prepended, 32)]


def test_an_encoder_decoder_is_never_narrowed():
    lm, tok = plm("t5"), pm.tokenizer("t5")
    template = ManualTemplate(tok, text=TEXT)
    model = PromptForClassification(lm, template, ManualVerbalizer(tok, label_words=LABEL_WORDS))
    b = pm.batch("t5", template, pm.examples(3))
    (off, on), (full, narrow) = run_both(model, b)
    assert off.shape == (3, 2)
    torch.testing.assert_close(on, off, atol=0, rtol=0)
    assert full == narrow == [(3, b["decoder_input_ids"].shape[1], 32)]  # the decoder's positions, all of them


@pytest.mark.parametrize("count", [0, 1])
def test_rows_with_different_numbers_of_masks_raise_the_same_error_in_both_modes(count):
    lm, tok = plm("bert"), pm.tokenizer("bert")
    template = ManualTemplate(tok, text=TWO_MASKS)
    model = PromptForClassification(lm, template, TwoMaskVerbalizer(tok, label_words=LABEL_WORDS))
    b = pm.batch("bert", template, pm.examples(3))
    masks = torch.nonzero(b["loss_ids"][1] > 0).flatten()
    b["loss_ids"][1, masks[count:]] = 0  # row 1 keeps `count` of its 2 masks
    messages, shapes = [], []
    for on in (False, True):
        model.logits_at_mask_only = on
        with output_layer_inputs(lm) as seen, pytest.raises(WrappingError) as error:
            model(b)
        messages.append(str(error.value))
        shapes.append(seen)
    assert messages[0] == messages[1] and f"rows [1] have [{count}], others 2" in messages[0]
    assert shapes[0] == shapes[1] == [(3, b["input_ids"].shape[1], 32)]


def test_off_by_default_and_bit_identical_to_the_full_projection():
    lm, tok = plm("bert"), pm.tokenizer("bert")
    template = ManualTemplate(tok, text=TEXT)
    verbalizer = ManualVerbalizer(tok, label_words=LABEL_WORDS)
    model = PromptForClassification(lm, template, verbalizer)
    assert model.logits_at_mask_only is False
    b = pm.batch("bert", template, pm.examples(3))
    with torch.no_grad():
        logits = lm(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        rows, cols = (b["loss_ids"] > 0).nonzero(as_tuple=True)
        want = logits[rows, cols]
        with output_layer_inputs(lm) as seen:
            assert torch.equal(model.forward_without_verbalize(b), want)
            assert torch.equal(model(b), verbalizer.process_logits(want))
    assert seen == [(3, b["input_ids"].shape[1], 32)] * 2
