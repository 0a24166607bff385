"""Templates: OpenPrompt 1.0.1's wrapping and soft tokens, checked at construction, with 1.0.1's bugs fixed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertForMaskedLM, T5Config, T5ForConditionalGeneration

from opendelta_dist.prompts.data import InputExample, InputFeatures
from opendelta_dist.prompts.errors import TemplateError
from opendelta_dist.prompts.soft_templates import MixedTemplate, SoftTemplate
from opendelta_dist.prompts.templates import ManualTemplate, Template

TOKENIZERS = Path(__file__).resolve().parents[1] / "assets" / "tokenizers"


@pytest.fixture(scope="module")
def bert():
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZERS / "bert")
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id,
    )
    return BertForMaskedLM(config).eval(), tokenizer


@pytest.fixture(scope="module")
def t5():
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZERS / "t5")
    torch.manual_seed(0)
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=32,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return T5ForConditionalGeneration(config).eval(), tokenizer


EXAMPLE = InputExample(guid="e1", text_a="the movie is good.", text_b="fun", label=1, meta={"topic": "sports"})


def test_manual_template_wraps_like_openprompt(bert):
    _, tokenizer = bert
    template = ManualTemplate(tokenizer, '{"placeholder":"text_a"} {"meta":"topic"} It was {"mask"}.')
    pieces, others = template.wrap_one_example(EXAMPLE)
    assert pieces == [
        {"text": "the movie is good.", "loss_ids": 0, "shortenable_ids": 1},
        {"text": " sports", "loss_ids": 0, "shortenable_ids": 0},  # meta is not shortenable by default
        {"text": " It was", "loss_ids": 0, "shortenable_ids": 0},
        {"text": "<mask>", "loss_ids": 1, "shortenable_ids": 0},  # the mask drops its prefix space
        {"text": ".", "loss_ids": 0, "shortenable_ids": 0},
    ]
    assert others == {"guid": "e1", "label": 1}
    assert template.registered_inputflag_names == ["loss_ids", "shortenable_ids"]
    assert isinstance(template, Template) and isinstance(template, torch.nn.Module)


def test_text_b_none_is_empty_and_placeholder_mapping_keys_work(bert):
    _, tokenizer = bert
    template = ManualTemplate(tokenizer, '{"placeholder":"<text_a>"} {"placeholder":"<text_b>"} {"mask"}')
    pieces, others = template.wrap_one_example(InputExample(guid=3, text_a="a", text_b=None, tgt_text="good"))
    assert [piece["text"] for piece in pieces] == ["a", " ", "<mask>"]
    assert others == {"guid": 3, "tgt_text": "good"}


def test_setting_text_recomputes_the_flags(bert):
    _, tokenizer = bert
    template = ManualTemplate(tokenizer, '{"placeholder":"text_a"} It was {"mask"}.')
    template.wrap_one_example(EXAMPLE)
    assert template.loss_ids == [0, 0, 1, 0]
    template.text = '{"mask"} : {"placeholder":"text_a", "shortenable": False} {"placeholder":"text_b"}'
    pieces, _ = template.wrap_one_example(EXAMPLE)
    assert [piece["loss_ids"] for piece in pieces] == [1, 0, 0, 0]
    assert [piece["shortenable_ids"] for piece in pieces] == [0, 0, 0, 1]


def test_explicit_flags_are_used_and_checked(bert):
    _, tokenizer = bert
    template = ManualTemplate(tokenizer, '{"placeholder":"text_a"} It was {"mask"}.')
    template.shortenable_ids = [0, 1, 0, 0]
    assert [piece["shortenable_ids"] for piece in template.wrap_one_example(EXAMPLE)[0]] == [0, 1, 0, 0]
    template.shortenable_ids = [0, 1]
    with pytest.raises(TemplateError, match="2 values for 4 pieces"):
        template.wrap_one_example(EXAMPLE)


def test_list_form_with_a_callable(bert):
    _, tokenizer = bert
    template = ManualTemplate(
        tokenizer, text=[{"placeholder": "text_a", "post_processing": lambda s: s.rstrip(".").upper()}, {"mask": None}]
    )
    assert [piece["text"] for piece in template.wrap_one_example(EXAMPLE)[0]] == ["THE MOVIE IS GOOD", "<mask>"]


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"text": '{"placeholder":"text_a"} It was good.'}, ["no mask", '{"mask"}']),
        ({"text": '{"placeholder":"text_c"} {"mask"}'}, ["unknown placeholder", "'text_c'", "meta"]),
        (
            {"text": '{"mask"}', "placeholder_mapping": {"<text_c>": "text_c"}},
            ["'text_c'", "not an InputExample field"],
        ),
        ({"text": '{"soft"} {"mask"}'}, ["MixedTemplate"]),
        ({"text": '{"mask"} {"placeholder": "text_a", "post_processing": lambda x: x}'}, ["Python code"]),
    ],
)
def test_construction_errors(bert, kwargs, words):
    _, tokenizer = bert
    with pytest.raises(TemplateError) as error:
        ManualTemplate(tokenizer, **kwargs)
    for word in words:
        assert word in str(error.value)


def test_wrap_time_errors(bert):
    _, tokenizer = bert
    template = ManualTemplate(tokenizer, '{"placeholder":"text_a"} {"meta":"entity"} {"mask"}')
    with pytest.raises(TemplateError) as error:
        template.wrap_one_example(EXAMPLE)
    assert "'entity'" in str(error.value) and "'e1'" in str(error.value) and "['topic']" in str(error.value)
    with pytest.raises(TemplateError, match="takes an InputExample"):
        template.wrap_one_example({"text_a": "x"})
    with pytest.raises(TemplateError, match="has no text"):
        ManualTemplate(tokenizer).wrap_one_example(EXAMPLE)


def test_from_file(bert, tmp_path):
    _, tokenizer = bert
    path = tmp_path / "templates.txt"
    path.write_text('{"placeholder":"text_a"} It was {"mask"}.\n{"mask"} : {"placeholder":"text_a"}\n')
    template = ManualTemplate(tokenizer).from_file(str(path), choice=1)
    assert [piece["text"] for piece in template.wrap_one_example(EXAMPLE)[0]] == ["<mask>", " :", " the movie is good."]
    with pytest.raises(TemplateError, match="no line 2"):
        template.from_file(str(path), choice=2)


def test_mixed_template_numbers_soft_tokens_as_documented(bert):
    model, tokenizer = bert
    text = (
        '{"soft"} {"soft": "the", "soft_id": 1} {"soft"} {"soft": "it", "soft_id": 3} {"soft_id": 1} {"soft": "was"} '
        '{"mask"}'
    )
    template = MixedTemplate(model, tokenizer, text)
    assert template.soft_token_ids == [1, 2, 3, 4, 2, 5, 0]
    assert template.num_soft_token == 5
    assert template.registered_inputflag_names == ["soft_token_ids", "loss_ids", "shortenable_ids"]
    weight = template.soft_embedding.weight
    assert weight.shape == (6, 32)
    raw = model.get_input_embeddings().weight
    for soft_id, word in ((2, "the"), (4, "it"), (5, "was")):
        assert torch.equal(weight[soft_id], raw[tokenizer.convert_tokens_to_ids(word)])
    pieces, _ = template.wrap_one_example(EXAMPLE)
    assert [piece["text"] for piece in pieces] == ["", "the", "", "it", "the", "was", "<mask>"]
    assert [piece["soft_token_ids"] for piece in pieces] == [1, 2, 3, 4, 2, 5, 0]


def test_mixed_template_duplicate_same_and_multi_token_soft_text(bert):
    model, tokenizer = bert
    template = MixedTemplate(
        model,
        tokenizer,
        '{"soft": None, "duplicate": 3} {"soft": None, "duplicate": 2, "same": True} {"soft": "terrible"} {"mask"}',
    )
    assert template.soft_token_ids == [1, 2, 3, 4, 4, 5, 6, 0]  # terrible = terr ##ible: two soft tokens
    assert template.soft_embedding.num_embeddings == 7


def test_soft_id_before_definition_is_an_error(bert):
    model, tokenizer = bert
    with pytest.raises(TemplateError) as error:
        MixedTemplate(model, tokenizer, '{"soft_id": 2} {"placeholder":"text_a"} {"mask"}')
    assert "soft_id 2 is used before it is defined" in str(error.value)
    assert '{"soft": None, "soft_id": 2}' in str(error.value)
    # a first use that says "soft" defines the group, as in OpenPrompt
    template = MixedTemplate(model, tokenizer, '{"soft": None, "soft_id": 2} {"soft_id": 2} {"mask"}')
    assert template.soft_token_ids == [1, 1, 0]


def test_mixed_template_process_batch(bert):
    model, tokenizer = bert
    template = MixedTemplate(model, tokenizer, '{"placeholder":"text_a"} {"soft": "it was"} {"mask"}')
    with torch.no_grad():
        template.soft_embedding.weight[1] += 1.0  # make the soft row differ from the word's embedding
    batch = InputFeatures(
        input_ids=torch.tensor([[2, 110, 0, 0, 4, 3]]),
        soft_token_ids=torch.tensor([[0, 0, 1, 2, 0, 0]]),
        attention_mask=torch.ones(1, 6, dtype=torch.long),
    )
    out = template.process_batch(batch)
    assert "input_ids" not in out and out["input_ids"] is None
    raw = model.get_input_embeddings()
    expected = raw(torch.tensor([[2, 110, 0, 0, 4, 3]]))
    expected[0, 2] = template.soft_embedding.weight[1]
    expected[0, 3] = template.soft_embedding.weight[2]
    assert torch.allclose(out["inputs_embeds"], expected)
    out["inputs_embeds"].sum().backward()
    assert template.soft_embedding.weight.grad[1].abs().sum() > 0


def test_soft_template_keeps_the_plm_embeddings_trainable_and_prepends(bert):
    model, tokenizer = bert
    template = SoftTemplate(model, tokenizer, num_tokens=3)
    assert model.get_input_embeddings().weight.requires_grad
    assert torch.equal(template.soft_embeds, model.get_input_embeddings().weight[:3])
    # text=None: a default template chosen by whether text_b is empty
    one = template.wrap_one_example(InputExample(guid=0, text_a="good", text_b=None))[0]
    two = template.wrap_one_example(InputExample(guid=1, text_a="good", text_b="fun"))[0]
    assert [p["text"] for p in one] == ["good", "<mask>"]
    assert [p["text"] for p in two] == ["good", " fun", "<mask>"]
    assert [p["shortenable_ids"] for p in two] == [1, 1, 0]
    batch = InputFeatures(
        input_ids=torch.tensor([[2, 149, 4, 3]]),
        attention_mask=torch.ones(1, 4, dtype=torch.long),
        token_type_ids=torch.zeros(1, 4, dtype=torch.long),
    )
    out = template.process_batch(batch)
    assert out["inputs_embeds"].shape == (1, 7, 32)
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 1, 1]]
    assert out["token_type_ids"].shape == (1, 7)
    logits = model(inputs_embeds=out["inputs_embeds"], attention_mask=out["attention_mask"])
    assert template.post_processing_outputs(logits).logits.shape == (1, 4, len(tokenizer))


def test_soft_template_options(bert, t5):
    model, tokenizer = bert
    random = SoftTemplate(model, tokenizer, num_tokens=2, initialize_from_vocab=False, random_range=0.01)
    assert random.soft_embeds.abs().max() <= 0.01
    given = SoftTemplate(model, tokenizer, soft_embeds=torch.ones(4, 32))
    assert given.num_tokens == 4 and isinstance(given.soft_embeds, torch.nn.Parameter)
    with pytest.raises(TemplateError, match=r"\[num_tokens, 32\]"):
        SoftTemplate(model, tokenizer, soft_embeds=torch.ones(4, 5))
    with pytest.raises(TemplateError, match="MixedTemplate"):
        SoftTemplate(model, tokenizer, text='{"soft"} {"mask"}')
    t5_model, t5_tokenizer = t5
    encoder_decoder = SoftTemplate(t5_model, t5_tokenizer, num_tokens=2)
    outputs = t5_model(
        inputs_embeds=torch.zeros(1, 3, 32), decoder_input_ids=torch.tensor([[0, 229]]), return_dict=True
    )
    assert encoder_decoder.post_processing_outputs(outputs).logits.shape[1] == 2  # decoder logits are untouched
