"""Tiny models of every supported family, built from transformers configs with random weights.

``build(family)`` gives the same weights on every call (fixed seed), so a "fresh backbone" in a test
is the backbone the delta was trained on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import transformers as T
from torch import nn

VOCAB = 99
#: the tiny ViT's images are IMAGE_SIZE x IMAGE_SIZE pixels, 3 channels
IMAGE_SIZE = 8
_COMMON = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2)


#: the tiny T5 the tests share (also the engine tests' model)
T5_CONFIG = T.T5Config(
    d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4, dropout_rate=0.0, decoder_start_token_id=0, **_COMMON
)


@dataclass(frozen=True)
class Family:
    """How to build and feed one model family."""

    make: Callable[[], nn.Module]
    seq2seq: bool = False
    classification: bool = False
    #: it reads images (``pixel_values``), not tokens
    image: bool = False


def _bert_like(config_cls: type, **kw: object) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        cfg = config_cls(num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **_COMMON, **kw)
        return T.AutoModelForSequenceClassification.from_config(cfg)

    return make


FAMILIES: dict[str, Family] = {
    "bert": Family(
        _bert_like(T.BertConfig, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37),
        classification=True,
    ),
    "roberta": Family(
        _bert_like(T.RobertaConfig, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37),
        classification=True,
    ),
    "deberta-v2": Family(
        _bert_like(T.DebertaV2Config, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37),
        classification=True,
    ),
    "distilbert": Family(
        lambda: T.AutoModelForSequenceClassification.from_config(
            T.DistilBertConfig(
                dim=32,
                n_layers=2,
                n_heads=4,
                hidden_dim=37,
                dropout=0.0,
                attention_dropout=0.0,
                num_labels=2,
                **_COMMON,
            )
        ),
        classification=True,
    ),
    "gpt2": Family(
        lambda: T.GPT2LMHeadModel(
            T.GPT2Config(n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **_COMMON)
        )
    ),
    "opt": Family(
        lambda: T.OPTForCausalLM(
            T.OPTConfig(
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                ffn_dim=37,
                word_embed_proj_dim=32,
                dropout=0.0,
                **_COMMON,
            )
        )
    ),
    "llama": Family(
        lambda: T.LlamaForCausalLM(
            T.LlamaConfig(
                hidden_size=32,
                intermediate_size=37,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                **_COMMON,
            )
        )
    ),
    "bart": Family(
        lambda: T.BartForConditionalGeneration(
            T.BartConfig(
                d_model=32,
                encoder_layers=2,
                decoder_layers=2,
                encoder_attention_heads=4,
                decoder_attention_heads=4,
                encoder_ffn_dim=37,
                decoder_ffn_dim=37,
                dropout=0.0,
                decoder_start_token_id=2,
                **_COMMON,
            )
        ),
        seq2seq=True,
    ),
    "t5": Family(
        lambda: T.T5ForConditionalGeneration(T5_CONFIG),
        seq2seq=True,
    ),
    "ctrl": Family(
        lambda: T.CTRLLMHeadModel(
            T.CTRLConfig(n_embd=32, dff=37, n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, **_COMMON)
        )
    ),
    "vit": Family(
        lambda: T.ViTForImageClassification(
            T.ViTConfig(
                image_size=IMAGE_SIZE,
                patch_size=4,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=37,
                hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0,
                num_labels=2,
            )
        ),
        classification=True,
        image=True,
    ),
}


def build(family: str, seed: int = 0) -> nn.Module:
    """The tiny model of ``family``; the same weights for the same seed."""
    torch.manual_seed(seed)
    return FAMILIES[family].make()


def batch(family: str, seed: int = 1, size: int = 2, length: int = 7) -> dict[str, torch.Tensor]:
    """A batch with labels, so that ``model(**batch).loss`` is a training loss."""
    g = torch.Generator().manual_seed(seed)
    spec = FAMILIES[family]
    if spec.image:
        pixels = torch.randn(size, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
        return {"pixel_values": pixels, "labels": torch.randint(0, 2, (size,), generator=g)}
    ids = torch.randint(3, VOCAB, (size, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0  # one padded row: deltas must work with padding masks
    if spec.classification:
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 2, (size,), generator=g)}
    if spec.seq2seq:
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(3, VOCAB, (size, 5), generator=g)}
    return {"input_ids": ids, "attention_mask": mask, "labels": ids}


@torch.no_grad()
def logits(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's logits in eval mode, without gradients (a fixed numerical path)."""
    was_training = model.training
    model.eval()
    out = model(**inputs).logits
    model.train(was_training)
    return out
