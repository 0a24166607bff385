"""Verbalizers against hand computations (plain Python floats over small tensors), and their errors."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch
import transformers as T
from transformers import AutoTokenizer

from opendelta_dist.prompts import GenerationVerbalizer, InputExample
from opendelta_dist.prompts.errors import VerbalizerError
from opendelta_dist.prompts.soft_verbalizer import SoftVerbalizer
from opendelta_dist.prompts.verbalizers import ManualVerbalizer, One2oneVerbalizer, Verbalizer

TOKENIZERS = Path(__file__).resolve().parents[1] / "assets" / "tokenizers"


@pytest.fixture(scope="module")
def bert_tok():
    return AutoTokenizer.from_pretrained(TOKENIZERS / "bert")


@pytest.fixture(scope="module")
def gpt2_tok():
    return AutoTokenizer.from_pretrained(TOKENIZERS / "gpt2")


def ids(tok, word):
    return tok.encode(word, add_special_tokens=False)


def logits_for(tok, batch=2, seed=0):
    return torch.randn(batch, len(tok), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def by_hand(z, words_ids, handler="first", log_softmax=True, cal=None):
    """Class scores of one row ``z`` (a list of floats) for ``words_ids`` = per class, per word, the token ids."""

    def word_score(row, tokens):
        values = [row[t] for t in tokens]
        if handler == "first":
            return values[0]
        if handler == "max":
            return max(values)
        return sum(values) / (len(values) + 1e-15)

    def probs(row):
        scores = [[word_score(row, w) for w in group] for group in words_ids]
        total = sum(math.exp(s) for group in scores for s in group)
        return [[math.exp(s) / total for s in group] for group in scores]

    if not log_softmax:
        return [sum(word_score(z, w) for w in g) / len(g) for g in words_ids]
    p = probs(z)
    if cal is not None:
        pc = probs(cal)
        p = [[a / (b + 1e-15) for a, b in zip(ga, gb)] for ga, gb in zip(p, pc)]
        total = sum(a for g in p for a in g)
        p = [[a / total for a in g] for g in p]
    return [sum(math.log(a + 1e-15) for a in g) / len(g) for g in p]


def test_label_words_get_the_prefix_and_are_tokenised(bert_tok, gpt2_tok):
    v = ManualVerbalizer(bert_tok, classes=["pos", "neg"], label_words=[["good", "great"], "bad"])
    assert v.label_words == [[" good", " great"], [" bad"]]
    assert v.num_classes == 2
    assert v.label_words_ids.tolist() == [
        [ids(bert_tok, " good"), ids(bert_tok, " great")],
        [ids(bert_tok, " bad"), [0]],
    ]
    assert v.label_words_mask.tolist() == [[1, 1], [1, 0]]
    # "<!>" keeps the word as it is: without the leading space, BPE gives other tokens
    g = ManualVerbalizer(gpt2_tok, label_words=[["<!>good"], ["good"]])
    assert g.label_words == [["good"], [" good"]]
    assert g.label_words_ids[0, 0].tolist()[: len(ids(gpt2_tok, "good"))] == ids(gpt2_tok, "good")
    assert ids(gpt2_tok, "good") != ids(gpt2_tok, " good")
    assert g.label_words_ids[1, 0, 0].item() == ids(gpt2_tok, " good")[0]


def test_a_dict_of_label_words_is_ordered_by_the_classes(bert_tok):
    v = ManualVerbalizer(bert_tok, classes=["neg", "pos"], label_words={"pos": ["good"], "neg": ["bad"]})
    assert v.label_words == [[" bad"], [" good"]]
    assert v.raw_label_words == [["bad"], ["good"]]


@pytest.mark.parametrize("handler", ["first", "max", "mean"])
@pytest.mark.parametrize("log_softmax", [True, False])
def test_manual_verbalizer_matches_the_hand_computation(bert_tok, handler, log_softmax):
    words = [["good", "terrible"], ["bad"], ["wonderful", "great", "horrible"]]
    v = ManualVerbalizer(bert_tok, label_words=words, multi_token_handler=handler, post_log_softmax=log_softmax)
    words_ids = [[ids(bert_tok, " " + w) for w in g] for g in words]
    assert [len(i) for i in words_ids[0]] == [1, 2]  # the multi-token word is really split
    z = logits_for(bert_tok)
    got = v.process_logits(z)
    want = [by_hand(row.tolist(), words_ids, handler, log_softmax) for row in z]
    assert got.shape == (2, 3)
    assert torch.allclose(got, torch.tensor(want, dtype=got.dtype), atol=1e-9, rtol=0)


def test_calibration_divides_and_renormalises(bert_tok):
    words = [["good", "great"], ["bad"]]
    v = ManualVerbalizer(bert_tok, label_words=words)
    z, cal = logits_for(bert_tok), logits_for(bert_tok, batch=1, seed=5)[0]
    uncalibrated = v.process_logits(z)
    v.register_calibrate_logits(cal.requires_grad_())
    assert not v._calibrate_logits.requires_grad
    words_ids = [[ids(bert_tok, " " + w) for w in g] for g in words]
    want = [by_hand(row.tolist(), words_ids, cal=cal.tolist()) for row in z]
    got = v.process_logits(z)
    assert torch.allclose(got, torch.tensor(want, dtype=got.dtype), atol=1e-9, rtol=0)
    assert not torch.allclose(got, uncalibrated)
    assert "_calibrate_logits" not in v.state_dict()


def test_one2one_verbalizer(bert_tok):
    v = One2oneVerbalizer(bert_tok, classes=["a", "b", "c"], label_words=["good", ["terrible"], "bad"])
    assert v.label_words == [" good", " terrible", " bad"]
    z = logits_for(bert_tok)
    words_ids = [[ids(bert_tok, " " + w)] for w in ("good", "terrible", "bad")]
    want = [by_hand(row.tolist(), words_ids) for row in z]
    assert torch.allclose(v.process_logits(z), torch.tensor(want, dtype=z.dtype), atol=1e-9, rtol=0)
    raw = One2oneVerbalizer(bert_tok, label_words=["good", "bad"], post_log_softmax=False).process_logits(z)
    assert torch.equal(raw, z[:, [ids(bert_tok, " good")[0], ids(bert_tok, " bad")[0]]])
    with pytest.raises(VerbalizerError, match="One2oneVerbalizer takes one per class: use ManualVerbalizer"):
        One2oneVerbalizer(bert_tok, label_words=[["good", "great"], ["bad"]])


def test_base_helpers(bert_tok):
    x = torch.tensor([[[1.0, 3.0], [2.0, 4.0]]])
    assert torch.equal(Verbalizer.aggregate(x), torch.tensor([[2.0, 3.0]]))
    p = Verbalizer().normalize(x)
    assert torch.allclose(p.sum(), torch.tensor(1.0)) and p.shape == x.shape
    v = ManualVerbalizer(bert_tok, label_words=["good", "bad"])
    assert not v.needs_hidden_states
    with pytest.raises(VerbalizerError, match="single"):
        v.process_logits(torch.zeros(2, 3, len(bert_tok)))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"label_words": [["good"], ["中中"]]}, "' 中中' of class #1.*only to the unknown token"),
        ({"label_words": [["good"], [""]], "prefix": ""}, "'' of class #1 tokenises to no token"),
        ({"classes": ["a", "b", "c"], "label_words": [["good"], ["bad"]]}, "2 groups of label words for 3 classes"),
        ({"num_classes": 3, "label_words": ["good", "bad"]}, "2 groups of label words for 3 classes"),
        ({"classes": ["pos", "neg"], "label_words": {"pos": "good", "bad": "bad"}}, r"missing \['neg'\].*\['bad'\]"),
        ({"label_words": {"pos": "good", "neg": "bad"}}, "need classes"),
        ({"classes": ["a", "b"], "num_classes": 3}, "classes has 2 entries but num_classes=3"),
        ({"label_words": [["good"], []]}, "class #1 are \\[\\]"),
        ({"label_words": "good"}, "not str"),
        ({"label_words": ["good"], "multi_token_handler": "last"}, "multi_token_handler='last' is unknown"),
    ],
)
def test_bad_label_words_are_one_clear_error(bert_tok, kwargs, message):
    with pytest.raises(VerbalizerError, match=message):
        ManualVerbalizer(bert_tok, **kwargs)


def test_an_unknown_word_names_the_class(bert_tok):
    with pytest.raises(VerbalizerError, match=r"' €' of class 'neg'"):
        ManualVerbalizer(bert_tok, classes=["pos", "neg"], label_words={"pos": ["good"], "neg": ["€"]})


def test_label_words_read_before_being_set(bert_tok):
    with pytest.raises(VerbalizerError, match="no label words yet"):
        _ = ManualVerbalizer(bert_tok).label_words


def test_from_file(bert_tok, tmp_path):
    (tmp_path / "v.txt").write_text("good, great\nbad\n\n\nyes\nno\n")
    v = ManualVerbalizer(bert_tok).from_file(tmp_path / "v.txt")
    assert v.label_words == [[" good", " great"], [" bad"]]
    assert ManualVerbalizer(bert_tok).from_file(str(tmp_path / "v.txt"), choice=1).label_words == [[" yes"], [" no"]]
    with pytest.raises(VerbalizerError, match=r"choice=2, but .* holds 2 verbalizer"):
        ManualVerbalizer(bert_tok).from_file(tmp_path / "v.txt", choice=2)
    (tmp_path / "v.csv").write_text("good\nbad,terrible\n")
    assert ManualVerbalizer(bert_tok).from_file(tmp_path / "v.csv").raw_label_words == [["good"], ["bad", "terrible"]]
    (tmp_path / "v.json").write_text(json.dumps({"neg": "bad", "pos": ["good"]}))
    v = ManualVerbalizer(bert_tok, classes=["pos", "neg"]).from_file(tmp_path / "v.json")
    assert v.label_words == [[" good"], [" bad"]]
    (tmp_path / "v.jsonl").write_text(json.dumps([{"pos": "good", "neg": "bad"}, {"pos": "yes", "neg": "no"}]))
    v = ManualVerbalizer(bert_tok, classes=["pos", "neg"]).from_file(tmp_path / "v.jsonl", choice=1)
    assert v.label_words == [[" yes"], [" no"]]
    with pytest.raises(VerbalizerError, match="2 groups of label words for 3 classes"):
        ManualVerbalizer(bert_tok, num_classes=3).from_file(tmp_path / "v.csv")
    with pytest.raises(VerbalizerError, match=r"use a \.txt, \.csv, \.json or \.jsonl file"):
        ManualVerbalizer(bert_tok).from_file(tmp_path / "v.yaml")
    built = ManualVerbalizer.from_config({"file_path": str(tmp_path / "v.txt"), "prefix": " "}, tokenizer=bert_tok)
    assert built.label_words == [[" good", " great"], [" bad"]]


def _tiny_bert(vocab):
    torch.manual_seed(0)
    cfg = T.BertConfig(
        vocab_size=vocab, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=20
    )
    return T.BertForMaskedLM(cfg).eval()


def _tiny_gpt2(vocab):
    torch.manual_seed(0)
    return T.GPT2LMHeadModel(T.GPT2Config(vocab_size=vocab, n_embd=16, n_layer=1, n_head=2)).eval()


def test_soft_verbalizer_head_starts_as_the_lm_head_on_the_first_words(bert_tok, gpt2_tok):
    # GPT-2: the head is a bare Linear; its rows are the first words' output embeddings (sub-tokens averaged)
    gpt2 = _tiny_gpt2(len(gpt2_tok))
    v = SoftVerbalizer(gpt2_tok, gpt2, label_words=[["terrible", "bad"], ["good"]])
    assert v.num_classes == 2 and isinstance(v.head, torch.nn.Linear)
    w = gpt2.lm_head.weight
    terr = ids(gpt2_tok, " terrible")
    assert len(terr) == 2
    want = torch.stack([w[terr].mean(0), w[ids(gpt2_tok, " good")[0]]])
    assert torch.allclose(v.head.weight, want)
    assert v.head.weight.data_ptr() != w.data_ptr() and v.needs_hidden_states
    # BERT: a copy of `cls` (transform + a new class layer); with one-token words its scores are the MLM
    # logits of those words less the decoder's bias
    bert = _tiny_bert(len(bert_tok))
    v = SoftVerbalizer(bert_tok, bert, classes=["pos", "neg"], label_words={"pos": "good", "neg": "bad"})
    assert v.head_last_layer_full_name == "predictions.decoder"
    assert v.head_last_layer.out_features == 2 and v.group_parameters_2 == [v.head_last_layer.weight]
    # every tensor of the head trains but the vocabulary bias, which nothing reads once the projection is replaced
    assert [n for n, p in v.named_parameters() if not p.requires_grad] == ["head.predictions.bias"]
    h = torch.randn(3, 16)
    word_ids = [ids(bert_tok, " good")[0], ids(bert_tok, " bad")[0]]
    with torch.no_grad():
        want = bert.cls(h)[:, word_ids] - bert.cls.predictions.decoder.bias[word_ids]
        assert torch.allclose(v.process_outputs(h, batch=None), want, atol=1e-6)
    assert len(v.group_parameters_1) > 0
    assert {id(p) for p in v.parameters()}.isdisjoint({id(p) for p in bert.parameters()})


def test_soft_verbalizer_errors(gpt2_tok):
    gpt2 = _tiny_gpt2(len(gpt2_tok))
    with pytest.raises(VerbalizerError, match="needs the number of classes"):
        SoftVerbalizer(gpt2_tok, gpt2)
    v = SoftVerbalizer(gpt2_tok, gpt2, num_classes=2)
    with pytest.raises(VerbalizerError, match="holds no hidden states"):
        v.gather_outputs(gpt2(input_ids=torch.tensor([[5, 6]])))


def test_generation_verbalizer_keeps_every_label_word_and_fills_rules():
    tok = AutoTokenizer.from_pretrained(TOKENIZERS / "t5")
    example = InputExample(guid="e", text_a="fish run", label=0, meta={"why": "no legs", "review": "great fun"})
    plain = GenerationVerbalizer(tok, label_words={0: "no", 1: ["yes"]})
    assert plain.classes == [0, 1] and plain.wrap_one_example(example).tgt_text == "no"
    # several words: one per mask, every one kept (1.0.1 kept the first only)
    both = GenerationVerbalizer(tok, is_rule=True, label_words={0: ["no", '{"meta": "why"}'], 1: ["yes", "maybe"]})
    assert both.wrap_one_example(example).tgt_text == ["no", "no legs"]
    # pieces are joined with a space; a block right after text ending in a space keeps that space (as 1.0.1)
    rule = GenerationVerbalizer(
        tok, is_rule=True, label_words=['bad {"meta":"review"}', '{"meta":"why"} {"placeholder":"text_a"}.']
    )
    assert rule.wrap_one_example(example).tgt_text == "bad  great fun"
    example.label = 1
    assert rule.wrap_one_example(example).tgt_text == "no legs fish run ."
    assert example.tgt_text is None  # the caller's example is not changed


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"is_rule": True, "label_words": ['{"mask"}', "x"]}, "holds a 'mask' piece"),
        ({"is_rule": True, "label_words": ['{"meta": ', "x"]}, "is not a valid rule"),
        ({"classes": ["a"], "label_words": {"b": "x"}}, "not the classes"),
    ],
)
def test_generation_verbalizer_errors(kwargs, message):
    with pytest.raises(VerbalizerError, match=message):
        GenerationVerbalizer(AutoTokenizer.from_pretrained(TOKENIZERS / "t5"), **kwargs)


def test_generation_verbalizer_refuses_an_unknown_label():
    verbalizer = GenerationVerbalizer(AutoTokenizer.from_pretrained(TOKENIZERS / "t5"), label_words=["no", "yes"])
    with pytest.raises(VerbalizerError, match="label 'maybe' is neither a class index below 2"):
        verbalizer.wrap_one_example(InputExample(text_a="x", label="maybe"))


def test_first_token_scoring_is_said_and_indistinguishable_classes_are_warned():
    bert_tok = AutoTokenizer.from_pretrained(Path(__file__).resolve().parents[1] / "assets" / "tokenizers" / "bert")
    with pytest.warns(UserWarning, match=r"' terrible'.*2 tokens.*only 'terr' is scored"):
        ManualVerbalizer(bert_tok, classes=["bad", "good"], label_words=[["bad", "terrible"], ["good"]])
    # a byte-level tokenizer makes the prefix space a token of its own: both classes would be scored by " "
    with pytest.warns(UserWarning, match="cannot tell them apart"):
        ManualVerbalizer(T.ByT5Tokenizer(), classes=["bad", "good"], label_words=[["bad"], ["good"]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ManualVerbalizer(bert_tok, classes=["bad", "good"], label_words=[["bad"], ["good"]])
        words = [["terrible"], ["good"]]
        ManualVerbalizer(bert_tok, classes=["bad", "good"], label_words=words, multi_token_handler="mean")
