"""Tokenizer wrappers: per-piece encoding, flags, special tokens and truncation as OpenPrompt 1.0.1, with its bugs
fixed, on the four tiny tokenizers (BERT WordPiece, RoBERTa and GPT-2 byte-level BPE, T5 Unigram)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoTokenizer,
    BartConfig,
    BartForConditionalGeneration,
    BertConfig,
    BertForMaskedLM,
    GPT2Config,
    GPT2LMHeadModel,
    OPTConfig,
    OPTForCausalLM,
)

from opendelta_dist.prompts.data import InputExample
from opendelta_dist.prompts.errors import WrappingError
from opendelta_dist.prompts.plms import get_model_class, load_plm
from opendelta_dist.prompts.seq2seq_wrappers import BartTokenizerWrapper, T5LMTokenizerWrapper, T5TokenizerWrapper
from opendelta_dist.prompts.soft_templates import MixedTemplate
from opendelta_dist.prompts.templates import ManualTemplate
from opendelta_dist.prompts.wrappers import (
    LMTokenizerWrapper,
    MLMTokenizerWrapper,
    TokenizerWrapper,
    special_token_frame,
)

TOKENIZERS = Path(__file__).resolve().parents[1] / "assets" / "tokenizers"
FAMILIES = ("bert", "roberta", "gpt2", "t5")
LONG_A = "This is not a good movie, it is terrible!"  # 12 tokens in every tokenizer


@pytest.fixture(scope="module")
def tok():
    return {family: AutoTokenizer.from_pretrained(TOKENIZERS / family) for family in FAMILIES}


def ids(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


def tokenize(wrapper, template, example, teacher_forcing=False):
    return wrapper.tokenize_one_example(template.wrap_one_example(example), teacher_forcing)


@pytest.mark.parametrize("family", FAMILIES)
def test_special_token_frame_matches_the_tokenizer(tok, family):
    samples = json.loads((TOKENIZERS / "sample_ids.json").read_text())["samples"][family]
    prefix, suffix = special_token_frame(tok[family])
    for sample in samples:
        assert [*prefix, *sample["ids"], *suffix] == sample["ids_with_special"]
    assert (len(prefix), len(suffix)) == {"bert": (1, 1), "roberta": (1, 1), "gpt2": (0, 0), "t5": (0, 1)}[family]


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_mlm_pieces_encoded_one_by_one_with_flags(tok, family):
    tokenizer = tok[family]
    template = ManualTemplate(tokenizer, '{"placeholder":"text_a"} It was {"mask"}.')
    out = tokenize(MLMTokenizerWrapper(32, tokenizer), template, InputExample(guid=0, text_a="the movie"))
    prefix, suffix = special_token_frame(tokenizer)
    body = ids(tokenizer, "the movie") + ids(tokenizer, " It was") + [tokenizer.mask_token_id] + ids(tokenizer, ".")
    assert out["input_ids"] == prefix + body + suffix
    n = len(body)
    assert out["loss_ids"] == [-100] + [0] * (n - 2) + [1, 0] + [-100]
    assert out["attention_mask"] == [1] * (n + 2)
    assert set(out) == {"input_ids", "loss_ids", "attention_mask"}


def test_mlm_token_types_soft_tokens_targets_and_errors(tok):
    tokenizer = tok["bert"]
    torch.manual_seed(0)
    model = BertForMaskedLM(
        BertConfig(
            vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37
        )
    )
    template = MixedTemplate(model, tokenizer, '{"placeholder":"text_a"} {"soft"} {"soft": "it was"} {"mask"}')
    wrapper = MLMTokenizerWrapper(32, tokenizer, create_token_type_ids=True)
    out = tokenize(wrapper, template, InputExample(guid=0, text_a="good", tgt_text=["good", "bad movie"]))
    assert out["input_ids"] == [2, tokenizer.convert_tokens_to_ids("good"), 0, 0, 0, 4, 3]
    assert out["soft_token_ids"] == [0, 0, 1, 2, 3, 0, 0]  # special positions are 0, not -100
    assert out["loss_ids"] == [-100, 0, 0, 0, 0, 1, -100]
    assert out["token_type_ids"] == [0] * 7
    assert out["encoded_tgt_text"] == [ids(tokenizer, "good"), ids(tokenizer, "bad movie")]
    with pytest.raises(WrappingError, match="cannot be teacher-forced"):
        tokenize(wrapper, template, InputExample(text_a="good"), teacher_forcing=True)
    eos_template = ManualTemplate(tokenizer, '{"placeholder":"text_a"} {"mask"} {"special": "<eos>"}')
    with pytest.raises(WrappingError, match="has no such token"):
        tokenize(wrapper, eos_template, InputExample(guid=5, text_a="good"))
    with pytest.raises(WrappingError, match="no mask token"):
        tokenize(MLMTokenizerWrapper(32, tok["gpt2"]), ManualTemplate(tok["gpt2"], '{"mask"}'), InputExample())
    with pytest.raises(WrappingError, match="truncate_method"):
        MLMTokenizerWrapper(32, tokenizer, truncate_method="middle")
    with pytest.raises(WrappingError, match="max_seq_length must be an int"):
        MLMTokenizerWrapper("long", tokenizer)
    assert MLMTokenizerWrapper("16", tokenizer).max_seq_length == 16  # 1.0.1 typed it str (#281)
    with pytest.warns(UserWarning, match="takes no argument decoder_max_lenght"):
        T5TokenizerWrapper(16, tok["t5"], decoder_max_lenght=3)


def parts(*lengths, shortenable, loss=None):
    """Synthetic parts: part i holds ids i*100, i*100+1, ..."""
    loss = loss or [0] * len(lengths)
    return {
        "input_ids": [[i * 100 + j for j in range(n)] for i, n in enumerate(lengths)],
        "shortenable_ids": [[s] * n for s, n in zip(shortenable, lengths)],
        "loss_ids": [[f] * n for f, n in zip(loss, lengths)],
    }


def kept(result):
    return [len(part) for part in result["input_ids"]]


def test_truncation_methods_as_openprompt():
    # text_a 9 tokens + template 2 + text_b 5 + mask 1; 11 to cut (PROMPT-FACTS §3)
    example = parts(9, 2, 5, 1, shortenable=[1, 0, 1, 0], loss=[0, 0, 0, 1])
    assert kept(TokenizerWrapper.truncate_from_tail(example, 11)) == [3, 2, 0, 1]
    assert kept(TokenizerWrapper.truncate_from_head(example, 11)) == [0, 2, 3, 1]
    assert kept(TokenizerWrapper.balanced_truncate(example, 11)) == [1, 2, 2, 1]
    # every part is cut from its end, and every key alike
    tail = TokenizerWrapper.truncate_from_tail(example, 11)
    assert tail["input_ids"][0] == [0, 1, 2] and tail["shortenable_ids"][0] == [1, 1, 1]


def test_truncation_with_empty_parts_does_not_crash():
    # 1.0.1: balanced raised IndexError on an empty part, head too when the empty part came first
    example = parts(0, 2, 9, 1, shortenable=[1, 0, 1, 0])
    assert kept(TokenizerWrapper.balanced_truncate(example, 4)) == [0, 2, 5, 1]
    assert kept(TokenizerWrapper.truncate_from_head(example, 4)) == [0, 2, 5, 1]
    assert kept(TokenizerWrapper.truncate_from_tail(example, 4)) == [0, 2, 5, 1]


def test_truncation_never_cuts_loss_tokens():
    example = parts(4, 1, shortenable=[1, 0], loss=[0, 0])
    example["loss_ids"][0][-1] = 1  # the causal LM's predicting token
    result = TokenizerWrapper.truncate_from_tail(example, 2)
    assert result["input_ids"][0] == [0, 3] and result["loss_ids"][0] == [0, 1]


@pytest.mark.parametrize(("method", "a_kept", "b_kept"), [("tail", 8, 0), ("head", 4, 4), ("balanced", 6, 2)])
def test_mlm_truncation_end_to_end(tok, method, a_kept, b_kept):
    tokenizer = tok["bert"]
    template = ManualTemplate(tokenizer, '{"placeholder":"text_a"} {"placeholder":"text_b"} It was {"mask"}.')
    wrapper = MLMTokenizerWrapper(14, tokenizer, truncate_method=method)
    example = InputExample(guid="l0", text_a=LONG_A, text_b="the story was boring")
    out = tokenize(wrapper, template, example)
    a, b = ids(tokenizer, LONG_A), ids(tokenizer, " the story was boring")
    assert out["input_ids"] == [2, *a[:a_kept], *b[:b_kept], *ids(tokenizer, " It was"), 4, *ids(tokenizer, "."), 3]
    assert len(out["input_ids"]) == 14
    assert wrapper.truncate_rate == 1.0


def test_still_too_long_is_an_error(tok):
    tokenizer = tok["bert"]
    template = ManualTemplate(tokenizer, '{"placeholder":"text_a", "shortenable": False} It was {"mask"}.')
    with pytest.raises(WrappingError) as error:
        tokenize(MLMTokenizerWrapper(8, tokenizer), template, InputExample(guid="g", text_a=LONG_A))
    assert "guid='g'" in str(error.value) and "max_seq_length=8" in str(error.value)


def test_lm_predicts_from_the_token_before_the_mask(tok):
    tokenizer = tok["gpt2"]
    template = ManualTemplate(tokenizer, '{"placeholder":"text_a"} It was {"mask"} . {"placeholder":"text_b"}')
    out = tokenize(LMTokenizerWrapper(32, tokenizer), template, InputExample(guid=0, text_a="good", text_b="fun"))
    expected = ids(tokenizer, "good") + ids(tokenizer, " It was")  # no special tokens; text after the mask dropped
    assert out["input_ids"] == expected
    assert out["loss_ids"] == [0] * (len(expected) - 1) + [1]
    assert out["input_ids_len"] == len(expected)
    with pytest.raises(WrappingError, match="nothing before the mask"):
        tokenize(
            LMTokenizerWrapper(32, tokenizer),
            ManualTemplate(tokenizer, '{"mask"} {"placeholder":"text_a"}'),
            InputExample(text_a="x"),
        )


def test_lm_tail_truncation_keeps_the_predicting_token(tok):
    tokenizer = tok["gpt2"]
    template = ManualTemplate(tokenizer, 'It was {"placeholder":"text_a"} {"mask"}')
    out = tokenize(LMTokenizerWrapper(6, tokenizer), template, InputExample(guid="l0", text_a=LONG_A))
    a = ids(tokenizer, " " + LONG_A)
    assert out["input_ids"] == ids(tokenizer, "It was") + a[:3] + a[-1:]  # cut before the predicting "!"
    assert out["loss_ids"] == [0, 0, 0, 0, 0, 1]
    fixed = ManualTemplate(tokenizer, '{"placeholder":"text_a", "shortenable": False} {"mask"}')
    with pytest.raises(WrappingError, match="max_seq_length=6"):
        tokenize(LMTokenizerWrapper(6, tokenizer), fixed, InputExample(guid="l0", text_a=LONG_A))


def test_lm_soft_tokens_without_text_and_reused_soft_ids_are_kept(tok):
    tokenizer = tok["gpt2"]
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0
        )
    )
    wrapper = LMTokenizerWrapper(32, tokenizer)
    template = MixedTemplate(model, tokenizer, '{"placeholder":"text_a"} {"soft"} {"soft"} It was {"mask"}.')
    out = tokenize(wrapper, template, InputExample(text_a="This"))
    assert out["soft_token_ids"] == [0, 1, 2, 0, 0]  # 1.0.1 dropped both soft tokens here
    assert out["input_ids"] == [*ids(tokenizer, "This"), 0, 0, *ids(tokenizer, " It was")]
    template = MixedTemplate(
        model, tokenizer, '{"soft": "It", "soft_id": 1} {"placeholder":"text_a"} {"soft_id": 1} was {"mask"}.'
    )
    out = tokenize(wrapper, template, InputExample(text_a="This"))  # 1.0.1: TypeError len(None)
    assert out["soft_token_ids"] == [1, 0, 1, 0]
    assert out["loss_ids"] == [0, 0, 0, 1]


def test_lm_with_a_bos_token_like_llama_and_opt(tok):
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZERS / "gpt2")
    tokenizer.add_bos_token = True
    tokenizer.update_post_processor()
    template = ManualTemplate(tokenizer, 'It was {"placeholder":"text_a"} {"mask"}')
    out = tokenize(LMTokenizerWrapper(6, tokenizer), template, InputExample(guid="l0", text_a=LONG_A))
    a = ids(tokenizer, " " + LONG_A)
    assert out["input_ids"] == [tokenizer.bos_token_id, *ids(tokenizer, "It was"), *a[:2], a[-1]]
    assert out["loss_ids"] == [-100, 0, 0, 0, 0, 1]


def test_lm_teacher_forcing_and_eos(tok):
    tokenizer = tok["gpt2"]
    template = ManualTemplate(tokenizer, '{"placeholder":"text_a"} It was {"mask"}')
    example = InputExample(guid=0, text_a="good", tgt_text="great")
    out = tokenize(LMTokenizerWrapper(32, tokenizer, predict_eos_token=True), template, example, teacher_forcing=True)
    context, target = ids(tokenizer, "good") + ids(tokenizer, " It was"), ids(tokenizer, " great ")
    assert out["input_ids"] == context + target + [tokenizer.eos_token_id]
    assert out["loss_ids"] == [0] * len(context) + [1] * (len(target) + 1)
    with pytest.raises(WrappingError, match="has none"):
        tokenize(LMTokenizerWrapper(32, tokenizer), template, InputExample(guid=0, text_a="x"), teacher_forcing=True)


def test_t5_sentinels_and_decoder(tok):
    tokenizer = tok["t5"]
    extra0, extra1 = tokenizer.convert_tokens_to_ids(["<extra_id_0>", "<extra_id_1>"])
    template = ManualTemplate(tokenizer, '{"placeholder":"text_a"} It was {"mask"} and {"mask"}')
    example = InputExample(guid=0, text_a="good", tgt_text=["great", "fun"])
    wrapper = T5TokenizerWrapper(32, tokenizer, decoder_max_length=-1)
    out = tokenize(wrapper, template, example)
    assert out["input_ids"] == ids(tokenizer, "good") + ids(tokenizer, " It was") + [extra0] + ids(
        tokenizer, " and"
    ) + [extra1, 1]
    assert out["decoder_input_ids"] == [0, extra0, extra1]
    assert out["loss_ids"] == [0, 1, 1]
    assert "loss_ids" in out and len(out["attention_mask"]) == len(out["input_ids"])
    forced = tokenize(
        T5TokenizerWrapper(32, tokenizer, decoder_max_length=-1, predict_eos_token=True),
        template,
        example,
        teacher_forcing=True,
    )
    great, fun = ids(tokenizer, " great"), ids(tokenizer, " fun")
    assert forced["decoder_input_ids"] == [0, extra0, *great, extra1, *fun, 1]
    assert forced["loss_ids"] == [0, 0, *[1] * len(great), 1, *[1] * len(fun), 1]
    assert wrapper.mask_token(1) == "<extra_id_1>" and wrapper.mask_token_ids(0) == extra0


def test_t5_decoder_max_length_is_a_limit_not_a_cut(tok):
    tokenizer = tok["t5"]
    template = ManualTemplate(tokenizer, '{"placeholder":"text_a"} It was {"mask"}')
    example = InputExample(guid="s0", text_a="good", tgt_text="great fun")
    assert len(tokenize(T5TokenizerWrapper(32, tokenizer, decoder_max_length=3), template, example)["loss_ids"]) == 2
    with pytest.raises(WrappingError) as error:  # 1.0.1 silently cut the target away
        tokenize(T5TokenizerWrapper(32, tokenizer, decoder_max_length=3), template, example, teacher_forcing=True)
    assert "needs 4 decoder tokens" in str(error.value) and "decoder_max_length=-1" in str(error.value)


def test_t5_lm_wrapper(tok):
    tokenizer = tok["t5"]
    extra0 = tokenizer.convert_tokens_to_ids("<extra_id_0>")
    template = ManualTemplate(tokenizer, '{"placeholder":"text_a"} It was {"mask"} . {"placeholder":"text_b"}')
    example = InputExample(guid=0, text_a="good", text_b="fun", tgt_text="great")
    out = tokenize(T5LMTokenizerWrapper(32, tokenizer, decoder_max_length=-1), template, example)
    assert out["input_ids"] == ids(tokenizer, "good") + ids(tokenizer, " It was") + [1]
    assert (out["decoder_input_ids"], out["loss_ids"]) == ([0, extra0, 1], [0, 1, 0])
    forced = tokenize(
        T5LMTokenizerWrapper(32, tokenizer, decoder_max_length=-1, predict_eos_token=True),
        template,
        example,
        teacher_forcing=True,
    )
    great = ids(tokenizer, " great")
    assert forced["decoder_input_ids"] == [0, extra0, *great, 1]
    assert forced["loss_ids"] == [0, 0, *[1] * len(great), 1]


def test_bart_wrapper_reads_the_mask_from_the_rebuilt_text(tok):
    tokenizer = tok["roberta"]  # BART's byte-level BPE with <s> <pad> </s> <unk> <mask>
    template = ManualTemplate(tokenizer, '{"placeholder":"text_a"} It was {"mask"}.')
    example = InputExample(guid=0, text_a="the movie", tgt_text="great fun")
    out = tokenize(BartTokenizerWrapper(32, tokenizer), template, example)
    encoder = out["input_ids"]
    mask_at = encoder.index(tokenizer.mask_token_id)
    assert encoder == [
        0,
        *ids(tokenizer, "the movie"),
        *ids(tokenizer, " It was"),
        tokenizer.mask_token_id,
        *ids(tokenizer, "."),
        2,
    ]
    assert out["decoder_input_ids"] == [tokenizer.eos_token_id, *encoder]
    assert [i for i, flag in enumerate(out["loss_ids"]) if flag] == [mask_at]
    assert "loss_ids" in out and set(out) == {"input_ids", "attention_mask", "decoder_input_ids", "loss_ids"}
    forced = tokenize(
        BartTokenizerWrapper(32, tokenizer, predict_eos_token=True), template, example, teacher_forcing=True
    )
    target = ids(tokenizer, " great fun")
    rebuilt = encoder[:mask_at] + target + encoder[mask_at + 1 :]
    assert forced["input_ids"] == encoder  # the encoder keeps the mask
    assert forced["decoder_input_ids"] == [tokenizer.eos_token_id, *rebuilt]
    flagged = [i for i, flag in enumerate(forced["loss_ids"]) if flag]
    assert flagged == [*range(mask_at + 1, mask_at + 1 + len(target)), len(rebuilt)]
    # a tiny BART runs on these rows; logits at the loss position have the vocabulary size
    torch.manual_seed(0)
    config = BartConfig(
        vocab_size=len(tokenizer),
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=37,
        decoder_ffn_dim=37,
        max_position_embeddings=64,
    )
    model = BartForConditionalGeneration(config).eval()
    logits = model(input_ids=torch.tensor([encoder]), decoder_input_ids=torch.tensor([out["decoder_input_ids"]])).logits
    assert logits[0, torch.tensor(out["loss_ids"]) > 0].shape == (1, len(tokenizer))


def test_model_classes_and_load_plm(tok, tmp_path):
    assert get_model_class("bert").wrapper is MLMTokenizerWrapper
    assert get_model_class("t5-lm").wrapper is T5LMTokenizerWrapper
    assert get_model_class("opt").model.__name__ == "OPTForCausalLM"
    with pytest.raises(WrappingError, match="unknown model type 'mystery'"):
        get_model_class("mystery")
    tokenizer = tok["gpt2"]
    # a GPT-2 checkpoint whose tokenizer has no pad token yet: load_plm adds "<pad>" and resizes the embeddings
    no_pad = AutoTokenizer.from_pretrained(TOKENIZERS / "gpt2")
    no_pad.pad_token = None
    model = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0
        )
    )
    model.save_pretrained(tmp_path / "gpt2")
    no_pad.save_pretrained(tmp_path / "gpt2")
    model, loaded, config, wrapper = load_plm("gpt2", str(tmp_path / "gpt2"))
    assert wrapper is LMTokenizerWrapper and config.n_embd == 32
    assert loaded.pad_token == "<pad>" and model.get_input_embeddings().weight.shape[0] == len(loaded)
    # OPT: OpenPrompt stops the tokenizer adding its bos token
    with_bos = AutoTokenizer.from_pretrained(TOKENIZERS / "gpt2")
    with_bos.add_bos_token = True
    with_bos.update_post_processor()
    assert special_token_frame(with_bos) == ([with_bos.bos_token_id], [])
    config = OPTConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        ffn_dim=37,
        num_attention_heads=4,
        word_embed_proj_dim=32,
        max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=0,
        eos_token_id=0,
    )
    OPTForCausalLM(config).save_pretrained(tmp_path / "opt")
    with_bos.save_pretrained(tmp_path / "opt")
    assert special_token_frame(AutoTokenizer.from_pretrained(tmp_path / "opt"))[0] == [with_bos.bos_token_id]
    _, opt_tokenizer, _, opt_wrapper = load_plm("opt", str(tmp_path / "opt"))
    assert opt_wrapper is LMTokenizerWrapper and special_token_frame(opt_tokenizer) == ([], [])
