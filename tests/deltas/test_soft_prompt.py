"""SoftPromptModel: life cycle on every family, padding, generate() with a cache, what the outputs and
the loss are, initialisation, and the errors for models it cannot prompt."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from opendelta_dist.deltas.prefix import PrefixModel
from opendelta_dist.deltas.soft_prompt import SoftPromptModel
from opendelta_dist.errors import DeltaConfigError, UnsupportedModuleError
from tests.deltas.test_prefix import (
    CAUSAL_LM,
    GENERATIVE,
    LEFT_PADDING,
    check_causal,
    check_generate,
    check_left_padded_generate,
    check_padding,
)
from tests.models import FAMILIES, VOCAB, batch, build, logits

TEXT = sorted(f for f in FAMILIES if not FAMILIES[f].image)  # a soft prompt is made of token embeddings


@pytest.mark.parametrize("family", TEXT)
def test_the_prompt_is_one_tensor_of_the_defaults_size(family):
    delta = SoftPromptModel(backbone_model=build(family))
    ((name, prompt),) = delta.named_delta_tensors()
    assert name.endswith("soft_prompt.soft_embeds") and prompt.shape == (100, 32)


@pytest.mark.parametrize(("family", "side"), [(f, "right") for f in TEXT] + [(f, "left") for f in LEFT_PADDING])
def test_padding(family, side):
    model = build(family)
    SoftPromptModel(backbone_model=model, soft_token_num=5)
    check_padding(model, family, side)


@pytest.mark.parametrize("family", GENERATIVE)
def test_causal(family):
    model = build(family)
    SoftPromptModel(backbone_model=model, soft_token_num=5)
    check_causal(model, family)


@pytest.mark.parametrize("family", GENERATIVE)
def test_generate_equals_forward_without_cache(family):
    model = build(family)
    SoftPromptModel(backbone_model=model, soft_token_num=5)
    out = check_generate(model, family)
    generated = out.sequences.shape[1] - 1
    # decoder-only: the cache holds the prompt once, ahead of the tokens; encoder-decoder: the decoder's does not
    prompt = 0 if FAMILIES[family].seq2seq else 5
    assert out.past_key_values.get_seq_length() == prompt + generated


@pytest.mark.parametrize("family", ["gpt2", "t5"])
def test_with_a_prefix_too(family):
    """A soft prompt and a prefix on one model: generate() still equals the forward without cache."""
    model = build(family)
    SoftPromptModel(backbone_model=model, soft_token_num=3)
    PrefixModel(backbone_model=model, prefix_token_num=2)
    check_generate(model, family)


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_left_padded_generate_matches_the_row_alone(family):
    """The prompt sits after a row's left padding, right before its text."""
    model = build(family)
    SoftPromptModel(backbone_model=model, soft_token_num=5)
    check_left_padded_generate(model, family)


def test_prompt_is_placed_after_left_padding():
    model = build("gpt2")
    delta = SoftPromptModel(backbone_model=model, soft_token_num=3)
    seen = {}
    handle = model.transformer.h[0].register_forward_pre_hook(lambda m, a, k: seen.update(x=a[0]), with_kwargs=True)
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 0]])
    logits(model, {"input_ids": torch.tensor([[0, 0, 5, 6], [7, 8, 9, 0]]), "attention_mask": mask})
    handle.remove()
    prompt = dict(delta.named_delta_tensors())["transformer.soft_prompt.soft_embeds"].detach()
    wpe = model.transformer.wpe.weight
    # block 0 sees token + position embeddings: the prompt at 2..4 in row 0 (after the padding), at 0..2 in row 1
    torch.testing.assert_close(seen["x"][0, 2:5], prompt + wpe[2:5])
    torch.testing.assert_close(seen["x"][1, 0:3], prompt + wpe[0:3])


@pytest.mark.parametrize("family", CAUSAL_LM)
def test_causal_lm_logits_cover_the_input_and_the_loss_is_the_usual_one(family):
    model = build(family)
    SoftPromptModel(backbone_model=model, soft_token_num=4)
    inputs = batch(family)
    labels = inputs["labels"].clone()
    labels[0, -2:] = -100
    out = model(**{**inputs, "labels": labels})
    assert out.logits.shape == (*inputs["input_ids"].shape, VOCAB)
    manual = F.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, manual)


@pytest.mark.parametrize("family", ["bart", "t5"])
def test_encoder_decoder_extends_the_encoder_input_only(family):
    model = build(family)
    SoftPromptModel(backbone_model=model, soft_token_num=4)
    inputs = batch(family)
    out = model(**inputs)
    assert out.encoder_last_hidden_state.shape[1] == inputs["input_ids"].shape[1] + 4
    assert out.logits.shape == (*inputs["labels"].shape, VOCAB)


def test_explicit_positions_are_shifted_after_the_prompt():
    model = build("gpt2")
    SoftPromptModel(backbone_model=model, soft_token_num=3)
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(7))
    implicit = logits(model, {"input_ids": ids})
    explicit = logits(model, {"input_ids": ids, "position_ids": torch.arange(6).expand(2, 6)})
    torch.testing.assert_close(explicit, implicit)


def test_token_type_ids_are_extended():
    model = build("bert")
    SoftPromptModel(backbone_model=model, soft_token_num=3)
    inputs = batch("bert")
    without = logits(model, inputs)
    zeros = logits(model, {**inputs, "token_type_ids": torch.zeros_like(inputs["input_ids"])})
    torch.testing.assert_close(zeros, without)


def test_token_init_takes_the_first_non_special_tokens_cycling():
    model = build("gpt2")
    delta = SoftPromptModel(backbone_model=model)  # 100 tokens, 96 non-special ones (0, 1, 2 are special)
    prompt = dict(delta.named_delta_tensors())["transformer.soft_prompt.soft_embeds"]
    ids = [3 + i % 96 for i in range(100)]
    assert torch.equal(prompt.detach(), model.transformer.wte.weight[ids])

    bart = build("bart")  # scaled embeddings: the prompt starts at the scale the encoder uses
    prompt = dict(SoftPromptModel(backbone_model=bart, soft_token_num=2).named_delta_tensors())
    with torch.no_grad():
        want = bart.model.encoder.embed_tokens(torch.tensor([3, 4]))
    assert torch.equal(prompt["model.encoder.soft_prompt.soft_embeds"].detach(), want)


def test_uniform_init():
    torch.manual_seed(0)
    delta = SoftPromptModel(backbone_model=build("t5"), soft_token_num=50, token_init=False, init_range=0.1)
    (prompt,) = (p for _, p in delta.named_delta_tensors())
    assert prompt.abs().max() <= 0.1 and prompt.std() > 0.03


class Wrapper(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = build("gpt2")

    def forward(self, **kwargs):
        return self.inner(**kwargs)


def test_wrapped_model_is_prompted_by_name():
    wrapper = Wrapper()
    with pytest.raises(UnsupportedModuleError, match=r"Wrapper has no input embeddings.*modified_modules"):
        SoftPromptModel(backbone_model=wrapper)
    delta = SoftPromptModel(backbone_model=wrapper, soft_token_num=3, modified_modules=["inner"])
    assert [k for k, _ in delta.named_delta_tensors()] == ["inner.transformer.soft_prompt.soft_embeds"]
    direct = build("gpt2")
    SoftPromptModel(backbone_model=direct, soft_token_num=3)
    inputs = batch("gpt2")
    assert torch.equal(logits(wrapper, inputs), logits(direct, inputs))


class NoEmbeddings(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def get_input_embeddings(self) -> None:
        return None


@pytest.mark.parametrize("model", [nn.Sequential(nn.Linear(4, 4)), NoEmbeddings()], ids=["plain", "returns_none"])
def test_model_without_input_embeddings_is_refused(model):
    with pytest.raises(UnsupportedModuleError, match="no input embeddings"):
        SoftPromptModel(backbone_model=model)


def test_prompt_longer_than_the_positions_is_refused():
    with pytest.raises(DeltaConfigError, match=r"soft_token_num=1024.*1024 positions"):
        SoftPromptModel(backbone_model=build("gpt2"), soft_token_num=1024)


def test_mask_of_the_wrong_length_is_refused():
    model = build("gpt2")
    SoftPromptModel(backbone_model=model, soft_token_num=3)
    with pytest.raises(ValueError, match=r"attention_mask has length 5.*6 real positions"):
        model(input_ids=torch.ones(1, 6, dtype=torch.long), attention_mask=torch.ones(1, 5, dtype=torch.long))


@pytest.mark.parametrize(
    "options",
    [
        {"soft_token_num": 0},
        {"soft_token_num": 2.5},
        {"soft_token_num": True},
        {"init_range": 0},
        {"init_range": -1.0},
        {"token_init": "yes"},
        {"other_expand_ids": {"attention_mask": "1"}},
        {"other_expand_ids": ["attention_mask"]},
        {"backend": "bmt"},
    ],
)
def test_bad_options(options):
    name = next(iter(options))
    with pytest.raises(DeltaConfigError, match=name):
        SoftPromptModel(backbone_model=build("gpt2"), **options)
