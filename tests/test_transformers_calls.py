"""The calling conventions that prefix tuning and soft prompts depend on, read off each module's signature."""

import pytest
import torch
from torch import nn
from transformers.cache_utils import DynamicCache, EncoderDecoderCache

from opendelta_dist.transformers_calls import (
    CACHE_ARGUMENTS,
    cache_argument,
    cached_length,
    enable_activation_checkpointing,
    relative_position_bias,
    self_attention_cache,
)
from tests.models import build


class Newest(nn.Module):
    def forward(self, hidden_states, cache=None, attention_mask=None):
        return hidden_states


class Middle(nn.Module):
    def forward(self, hidden_states, past_key_values=None, attention_mask=None):
        return hidden_states


class Oldest(nn.Module):
    def forward(self, hidden_states, past_key_value=None, **kwargs):
        return hidden_states


class KeywordsOnly(nn.Module):
    def forward(self, hidden_states, **kwargs):
        return hidden_states


@pytest.mark.parametrize(
    ("module", "name"),
    [
        (Newest(), "cache"),
        (Middle(), "past_key_values"),
        (Oldest(), "past_key_value"),
        (KeywordsOnly(), "past_key_values"),
    ],
)
def test_the_declared_name_is_used(module, name):
    arg = cache_argument(module)
    assert arg.name == name
    kwargs = {"attention_mask": None}
    arg.set(kwargs, "stand-in")
    assert kwargs == {"attention_mask": None, name: "stand-in"}


@pytest.mark.parametrize("alias", CACHE_ARGUMENTS)
def test_a_cache_passed_under_any_generation_s_name_is_found_and_replaced_once(alias):
    arg = cache_argument(Newest())
    kwargs = {alias: "real", "attention_mask": None}
    assert arg.get(kwargs) == "real"
    arg.set(kwargs, "stand-in")
    # the module sees one cache: a deprecated alias left beside the new name would win or warn
    assert kwargs == {"attention_mask": None, "cache": "stand-in"}


def test_no_cache_is_none():
    assert cache_argument(Middle()).get({"past_key_values": None}) is None
    assert cached_length(None) == 0


def test_the_installed_transformers_attention_modules_declare_a_known_name():
    for family in ("gpt2", "t5", "llama", "bart", "bert"):
        model = build(family)
        attention = next(
            m
            for n, m in model.named_modules()
            if type(m).__name__.endswith(("Attention", "SelfAttention")) and "forward" in type(m).__dict__
        )
        assert cache_argument(attention).name in CACHE_ARGUMENTS


def test_encoder_decoder_caches_give_their_self_attention_part():
    self_cache = DynamicCache()
    self_cache.update(torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4), 0)
    cache = EncoderDecoderCache(self_cache, DynamicCache())
    assert self_attention_cache(cache) is self_cache
    assert self_attention_cache(self_cache) is self_cache
    assert cached_length(self_attention_cache(cache)) == 3


def test_t5_relative_bias_covers_the_real_keys_after_the_cached_ones():
    model = build("t5")
    attention = model.encoder.block[0].layer[0].SelfAttention
    full = relative_position_bias(attention, 5, 0, torch.device("cpu"))
    tail = relative_position_bias(attention, 2, 3, torch.device("cpu"))
    assert full.shape[-2:] == (5, 5) and tail.shape[-2:] == (2, 5)
    # the last two queries after three cached tokens see what they see in the whole sequence
    torch.testing.assert_close(tail, full[..., 3:, :])


def test_activation_checkpointing_is_on_through_the_model_s_own_entry_point():
    model = build("t5")
    enable_activation_checkpointing(model, {"use_reentrant": False})
    assert model.is_gradient_checkpointing
