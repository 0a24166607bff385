"""Prompt models: what reaches the language model, what comes back at the mask, the generation loss and
generate(), freezing with deltas, calibration."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from opendelta_dist import LoraModel, SoftPromptModel
from opendelta_dist.operations import delta_parameter_ids
from opendelta_dist.prompts import (
    InputExample,
    ManualTemplate,
    ManualVerbalizer,
    MixedTemplate,
    PromptForClassification,
    PromptForGeneration,
    SoftTemplate,
    SoftVerbalizer,
    VerbalizerError,
    WrappingError,
    calibrate,
)
from tests.prompts import prompt_models as pm

TEXT = '{"placeholder":"text_a"} It was {"mask"}.'
LM_TEXT = '{"placeholder":"text_a"} It was {"mask"}'
LABEL_WORDS = [["bad", "terrible"], ["good", "great"]]


def at_loss_positions(logits, b):
    rows, cols = (b["loss_ids"] > 0).nonzero(as_tuple=True)
    return logits[rows, cols]


def capture_kwargs(model):
    seen = []
    model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(dict(kwargs)), with_kwargs=True)
    return seen


def test_class_scores_are_the_verbalizer_on_the_mask_logits():
    plm, tok = pm.plm("bert").eval(), pm.tokenizer("bert")
    template = ManualTemplate(tok, text=TEXT)
    verbalizer = ManualVerbalizer(tok, classes=["neg", "pos"], label_words=LABEL_WORDS)
    model = PromptForClassification(plm, template, verbalizer).eval()
    b = pm.batch("bert", template, pm.examples(3))
    with torch.no_grad():
        mask_logits = at_loss_positions(plm(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b)
        assert torch.equal(model.forward_without_verbalize(b), mask_logits)
        assert torch.equal(model(b), verbalizer.process_logits(mask_logits))
    assert model.plm is plm and model.template is template and model.tokenizer is tok
    assert model.device == torch.device("cpu")


def test_the_batch_is_not_changed_and_soft_tokens_get_gradients():
    plm, tok = pm.plm("bert").eval(), pm.tokenizer("bert")
    template = MixedTemplate(plm, tok, text='{"placeholder":"text_a"} {"soft": "it was"} {"mask"} {"soft"}.')
    model = PromptForClassification(plm, template, ManualVerbalizer(tok, label_words=LABEL_WORDS)).eval()
    b = pm.batch("bert", template, pm.examples(2))
    before = {k: v.clone() for k, v in b.items() if isinstance(v, torch.Tensor)}
    first = model(b)
    assert set(before) <= set(b.keys()) and all(torch.equal(before[k], b[k]) for k in before)
    F.cross_entropy(model(b), b["label"]).backward()
    assert torch.equal(first, model(b).detach())
    assert template.soft_embedding.weight.grad is not None
    assert template.soft_embedding.weight.grad[1:].abs().sum() > 0


def test_only_named_arguments_reach_the_model_and_hidden_states_only_when_read():
    plm, tok = pm.plm("bert").eval(), pm.tokenizer("bert")
    template = ManualTemplate(tok, text=TEXT)
    b = pm.batch("bert", template, pm.examples(2))
    seen = capture_kwargs(plm)
    PromptForClassification(plm, template, ManualVerbalizer(tok, label_words=LABEL_WORDS))(b)
    assert set(seen[-1]) == {"input_ids", "attention_mask"}  # no loss_ids, label, guid; no hidden states
    soft = SoftVerbalizer(tok, plm, label_words=LABEL_WORDS)
    PromptForClassification(plm, template, soft)(b)
    assert seen[-1]["output_hidden_states"] is True


class NoKwargsLM(nn.Module):
    """A language model whose forward takes two named arguments and nothing else."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask=None):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask)


def test_a_model_that_takes_no_output_hidden_states_still_classifies():
    inner, tok = pm.plm("bert").eval(), pm.tokenizer("bert")
    template = ManualTemplate(tok, text=TEXT)
    b = pm.batch("bert", template, pm.examples(2))
    scores = PromptForClassification(NoKwargsLM(inner), template, ManualVerbalizer(tok, label_words=LABEL_WORDS))(b)
    assert scores.shape == (2, 2)


def test_mask_positions_must_agree_across_rows():
    plm, tok = pm.plm("bert").eval(), pm.tokenizer("bert")
    template = ManualTemplate(tok, text='{"placeholder":"text_a"} {"mask"} and {"mask"}.')
    verbalizer = ManualVerbalizer(tok, label_words=LABEL_WORDS)
    model = PromptForClassification(plm, template, verbalizer)
    b = pm.batch("bert", template, pm.examples(3))
    assert model.forward_without_verbalize(b).shape == (3, 2, len(tok))
    with pytest.raises(VerbalizerError, match="one mask per example"):
        model(b)
    b["loss_ids"][1] = torch.where(b["loss_ids"][1] == 1, 0, b["loss_ids"][1])
    with pytest.raises(WrappingError, match=r"rows \[1\] have \[0\], others 2"):
        model(b)


def test_soft_template_positions_are_dropped_from_hidden_states_too():
    # GPT-2 with 3 prepended soft embeddings: the template drops them from the logits; the hidden states a
    # SoftVerbalizer reads keep them, and the prompt model aligns them with loss_ids
    plm, tok = pm.plm("gpt2").eval(), pm.tokenizer("gpt2")
    template = SoftTemplate(plm, tok, text=LM_TEXT, num_tokens=3)
    b = pm.batch("gpt2", template, pm.examples(3))
    embeds = torch.cat([template.soft_embeds.expand(3, -1, -1), plm.get_input_embeddings()(b["input_ids"])], 1)
    mask = torch.cat([torch.ones(3, 3, dtype=torch.long), b["attention_mask"]], 1)
    with torch.no_grad():
        out = plm(inputs_embeds=embeds, attention_mask=mask, output_hidden_states=True)
        soft = SoftVerbalizer(tok, plm, label_words=LABEL_WORDS)
        scores = PromptForClassification(plm, template, soft)(b)
        assert torch.allclose(scores, soft.head(at_loss_positions(out.hidden_states[-1][:, 3:], b)), atol=1e-6)
        manual = ManualVerbalizer(tok, label_words=LABEL_WORDS)
        scores = PromptForClassification(plm, template, manual)(b)
        assert torch.allclose(scores, manual.process_logits(at_loss_positions(out.logits[:, 3:], b)), atol=1e-6)


def test_a_soft_prompt_delta_s_positions_are_dropped_from_hidden_states():
    # the delta puts 4 embeddings before each row: the logits lose them, the hidden states keep them
    plm, tok = pm.plm("bert").eval(), pm.tokenizer("bert")
    template = ManualTemplate(tok, text=TEXT)
    soft = SoftVerbalizer(tok, plm, label_words=LABEL_WORDS)
    SoftPromptModel(backbone_model=plm, soft_token_num=4)
    b = pm.batch("bert", template, pm.examples(3))
    with torch.no_grad():
        hidden = plm(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True)
        assert hidden.hidden_states[-1].shape[1] == b["input_ids"].shape[1] + 4
        want = soft.head(at_loss_positions(hidden.hidden_states[-1][:, 4:], b))
        assert torch.allclose(PromptForClassification(plm, template, soft)(b), want, atol=1e-6)


def test_t5_scores_come_from_the_decoder_position_of_the_sentinel():
    plm, tok = pm.plm("t5").eval(), pm.tokenizer("t5")
    template = ManualTemplate(tok, text=TEXT)
    verbalizer = ManualVerbalizer(tok, label_words=LABEL_WORDS)
    b = pm.batch("t5", template, pm.examples(2))
    with torch.no_grad():
        out = plm(
            input_ids=b["input_ids"], attention_mask=b["attention_mask"], decoder_input_ids=b["decoder_input_ids"]
        )
        want = verbalizer.process_logits(at_loss_positions(out.logits, b))
        assert torch.equal(PromptForClassification(plm, template, verbalizer)(b), want)


def test_freeze_plm_keeps_deltas_trainable_and_plm_eval_mode_keeps_dropout_off():
    plm, tok = pm.plm("bert"), pm.tokenizer("bert")
    template = MixedTemplate(plm, tok, text='{"placeholder":"text_a"} {"soft"} {"mask"}.')
    LoraModel(backbone_model=plm)
    model = PromptForClassification(plm, template, ManualVerbalizer(tok, label_words=LABEL_WORDS), freeze_plm=True)
    deltas = delta_parameter_ids(plm)
    assert deltas and all(p.requires_grad for p in plm.parameters() if id(p) in deltas)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    delta_names = {n for n, p in model.named_parameters() if id(p) in deltas}
    assert trainable == delta_names | {"prompt_model.template.soft_embedding.weight"}
    evaluated = PromptForClassification(
        plm, template, ManualVerbalizer(tok, label_words=LABEL_WORDS), plm_eval_mode=True
    ).train()
    assert not any(m.training for m in plm.modules()) and template.training and evaluated.training
    b = pm.batch("bert", template, pm.examples(2))
    assert torch.equal(evaluated(b), evaluated(b))  # dropout 0.1 is off


def lm_loss_by_hand(logits, reference, loss_ids):
    total = []
    for row in range(logits.shape[0]):
        terms = [
            -F.log_softmax(logits[row, t], -1)[reference[row, t + 1]]
            for t in range(logits.shape[1] - 1)
            if loss_ids[row, t + 1] > 0
        ]
        total.append(torch.stack(terms).sum())
    return torch.stack(total).mean()


def with_targets(targets):
    return [InputExample(guid=i, text_a=e.text_a, tgt_text=t) for i, (e, t) in enumerate(zip(pm.examples(), targets))]


@pytest.mark.parametrize("kind", ["gpt2", "t5"])
def test_generation_loss_is_summed_per_example_then_averaged(kind):
    plm, tok = pm.plm(kind).eval(), pm.tokenizer(kind)
    template = ManualTemplate(tok, text=LM_TEXT)
    rows = with_targets(["great", "not good at all", "bad"])
    b = pm.batch(kind, template, rows, teacher_forcing=True, predict_eos_token=True)
    model = PromptForGeneration(plm, template, tokenizer=tok)
    reference = b["decoder_input_ids"] if kind == "t5" else b["input_ids"]
    with torch.no_grad():
        inputs = {k: b[k] for k in ("input_ids", "attention_mask", "decoder_input_ids") if k in b}
        want = lm_loss_by_hand(plm(**inputs).logits, reference, b["loss_ids"])
        assert torch.allclose(model(b), want, atol=1e-5)
    assert (b["loss_ids"] > 0).sum(-1).tolist()[0] < (b["loss_ids"] > 0).sum(-1).tolist()[1]


def test_t5_generates_the_batch_at_once_with_the_kwargs_given():
    plm, tok = pm.plm("t5").eval(), pm.tokenizer("t5")
    template = ManualTemplate(tok, text=TEXT)
    b = pm.batch("t5", template, pm.examples(3))
    decoder = b["decoder_input_ids"].clone()
    model = PromptForGeneration(plm, template, tokenizer=tok)
    sequences, sentences = model.generate(b, max_new_tokens=3, do_sample=False)
    assert torch.equal(b["decoder_input_ids"], decoder)  # the batch is not cut
    want = plm.generate(
        input_ids=b["input_ids"],
        attention_mask=b["attention_mask"],
        decoder_input_ids=decoder[:, :2],
        max_new_tokens=3,
        do_sample=False,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    ).tolist()
    assert sequences == want and all(len(s) == 5 for s in sequences)
    assert sentences == model.post_processing(want, 2)
    assert sentences[0] == tok.decode(want[0][2:]).split(tok.eos_token)[0].strip()
    with pytest.raises(ValueError, match="not_an_option"):
        model.generate(b, max_new_tokens=2, not_an_option=1)
    beams, texts = model.generate(b, max_new_tokens=2, num_beams=2, num_return_sequences=2)
    assert len(beams) == 6 and len(texts) == 6


def test_gpt2_generates_each_example_from_its_real_tokens():
    plm, tok = pm.plm("gpt2").eval(), pm.tokenizer("gpt2")
    template = ManualTemplate(tok, text=LM_TEXT)
    b = pm.batch("gpt2", template, pm.examples(3))
    model = PromptForGeneration(plm, template, gen_config={"max_new_tokens": 4})
    assert plm.generation_config.max_new_tokens == 4 and model.tokenizer is tok
    sequences, sentences = model.generate(b, do_sample=False)
    for row, n in enumerate(b["input_ids_len"].tolist()):
        ids = b["input_ids"][row : row + 1, :n]
        want = plm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=628)
        assert sequences[row] == want[0].tolist() and len(sequences[row]) == n + 4
    assert sentences == model.post_processing(sequences, b["input_ids_len"].tolist())


def test_gpt2_generates_after_a_soft_prompt():
    plm, tok = pm.plm("gpt2").eval(), pm.tokenizer("gpt2")
    template = SoftTemplate(plm, tok, text=LM_TEXT, num_tokens=2)
    b = pm.batch("gpt2", template, pm.examples(2))
    sequences, _ = PromptForGeneration(plm, template).generate(b, max_new_tokens=3, do_sample=False)
    for row, n in enumerate(b["input_ids_len"].tolist()):
        ids = b["input_ids"][row, :n]
        embeds = torch.cat([template.soft_embeds, plm.get_input_embeddings()(ids)])[None]
        new = plm.generate(inputs_embeds=embeds, max_new_tokens=3, do_sample=False, pad_token_id=628)[0].tolist()
        assert sequences[row] == ids.tolist() + new


def test_calibrate_is_the_mean_mask_logits_and_keeps_the_mode():
    plm, tok = pm.plm("bert"), pm.tokenizer("bert")
    template = ManualTemplate(tok, text=TEXT)
    model = PromptForClassification(plm, template, ManualVerbalizer(tok, label_words=LABEL_WORDS)).train()
    batches = [pm.batch("bert", template, pm.examples(3)), pm.batch("bert", template, [InputExample(text_a="")])]
    cal = calibrate(model, batches)
    assert model.training
    model.eval()
    with torch.no_grad():
        want = torch.cat([model.forward_without_verbalize(b) for b in batches]).mean(0)
        assert cal.shape == (len(tok),) and torch.allclose(cal, want, atol=1e-6)
        before = model(batches[0])
        model.verbalizer.register_calibrate_logits(cal)
        assert not torch.allclose(model(batches[0]), before)
