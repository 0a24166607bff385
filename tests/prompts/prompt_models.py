"""Tiny language models on the test tokenizers (tests/assets/tokenizers), and batches from a PromptDataLoader."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers as T
from transformers import AutoTokenizer

from opendelta_dist.prompts import (
    InputExample,
    LMTokenizerWrapper,
    MLMTokenizerWrapper,
    PromptDataLoader,
    T5TokenizerWrapper,
)

TOKENIZERS = Path(__file__).resolve().parents[1] / "assets" / "tokenizers"
_TOKENIZER_CACHE: dict[str, object] = {}


def tokenizer(kind: str):
    """The test tokenizer of ``kind`` (bert, gpt2, t5, roberta); loaded once."""
    if kind not in _TOKENIZER_CACHE:
        _TOKENIZER_CACHE[kind] = AutoTokenizer.from_pretrained(TOKENIZERS / kind)
    return _TOKENIZER_CACHE[kind]


def plm(kind: str, seed: int = 0):
    """A tiny language model of ``kind`` with the test tokenizer's vocabulary; the same weights for one seed."""
    tok = tokenizer(kind)
    torch.manual_seed(seed)
    if kind in ("bert", "roberta"):
        config_class, model_class = {
            "bert": (T.BertConfig, T.BertForMaskedLM),
            "roberta": (T.RobertaConfig, T.RobertaForMaskedLM),
        }[kind]
        config = config_class(
            vocab_size=len(tok),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=37,
            hidden_dropout_prob=0.1,
            attention_probs_dropout_prob=0.0,
            pad_token_id=tok.pad_token_id,
        )
        return model_class(config)
    if kind == "gpt2":
        config = T.GPT2Config(
            vocab_size=len(tok),
            n_embd=32,
            n_layer=2,
            n_head=4,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        return T.GPT2LMHeadModel(config)
    if kind == "t5":
        config = T.T5Config(
            vocab_size=len(tok),
            d_model=32,
            d_kv=8,
            d_ff=37,
            num_layers=2,
            num_heads=4,
            dropout_rate=0.0,
            decoder_start_token_id=tok.pad_token_id,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
        return T.T5ForConditionalGeneration(config)
    raise ValueError(kind)


WRAPPERS = {
    "bert": MLMTokenizerWrapper,
    "roberta": MLMTokenizerWrapper,
    "gpt2": LMTokenizerWrapper,
    "t5": T5TokenizerWrapper,
}

SENTENCES = [
    ("the movie was great", 1),
    ("this is not good", 0),
    ("a terrible movie", 0),
    ("I think it was wonderful", 1),
]


def examples(n: int = 4) -> list[InputExample]:
    """``n`` labelled sentiment examples of different lengths."""
    return [
        InputExample(guid=i, text_a=SENTENCES[i % len(SENTENCES)][0], label=SENTENCES[i % len(SENTENCES)][1])
        for i in range(n)
    ]


def batch(kind: str, template, rows: list[InputExample], verbalizer=None, teacher_forcing: bool = False, **kwargs):
    """All ``rows`` in one batch of a PromptDataLoader (max_seq_length 64, T5 decoders sized to each row)."""
    loader = PromptDataLoader(
        rows,
        template,
        tokenizer=tokenizer(kind),
        tokenizer_wrapper_class=WRAPPERS[kind],
        verbalizer=verbalizer,
        max_seq_length=64,
        batch_size=len(rows),
        teacher_forcing=teacher_forcing,
        **kwargs,
    )
    return next(iter(loader))
