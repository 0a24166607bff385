"""PrefixModel: life cycle, padding, generate() with a cache, the reparameterisation network and what
is saved of it, and the errors for modules it cannot modify.

The padding, causality and generate checks are shared with test_soft_prompt.py; the life cycle of
the defaults on every family is in test_methods.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from opendelta_dist import AutoDeltaModel
from opendelta_dist.basemodel import DeltaBase
from opendelta_dist.deltas.prefix import PrefixModel, PrefixReparameterization
from opendelta_dist.errors import DeltaConfigError, UnsupportedModuleError
from tests.deltas.lifecycle import check_life_cycle
from tests.models import FAMILIES, VOCAB, batch, build, logits

SUPPORTED = ["bart", "bert", "gpt2", "llama", "opt", "roberta", "t5"]
CAUSAL_LM = ["gpt2", "llama", "opt"]
GENERATIVE = ["bart", "gpt2", "llama", "opt", "t5"]
#: families whose rows keep their positions when left-padded (given position_ids where needed)
LEFT_PADDING = ["gpt2", "llama", "opt", "t5"]

MakeDelta = Callable[[nn.Module], DeltaBase]


def check_padding(model: nn.Module, family: str, side: str) -> None:
    """Row 0 padded on ``side`` in a batch gives, at its real positions, the logits it gives alone."""
    g = torch.Generator().manual_seed(3)
    real = torch.randint(3, VOCAB, (5,), generator=g)
    other = torch.randint(3, VOCAB, (7,), generator=g)
    pad = torch.zeros(2, dtype=torch.long)
    ones, zeros = torch.ones(5, dtype=torch.long), torch.zeros(2, dtype=torch.long)
    row, row_mask = (
        (torch.cat([real, pad]), torch.cat([ones, zeros]))
        if side == "right"
        else (
            torch.cat([pad, real]),
            torch.cat([zeros, ones]),
        )
    )
    padded = {"input_ids": torch.stack([row, other]), "attention_mask": torch.stack([row_mask, torch.ones(7).long()])}
    alone = {"input_ids": real[None], "attention_mask": ones[None]}
    spec = FAMILIES[family]
    if spec.seq2seq:
        decoder = torch.randint(3, VOCAB, (2, 4), generator=g)
        padded["decoder_input_ids"], alone["decoder_input_ids"] = decoder, decoder[:1]
    elif not spec.classification and side == "left" and family != "opt":  # OPT derives positions from the mask
        padded["position_ids"] = (padded["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    got, want = logits(model, padded)[0], logits(model, alone)[0]
    if not spec.seq2seq and not spec.classification:
        got = got[:5] if side == "right" else got[2:]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def check_causal(model: nn.Module, family: str) -> None:
    """Logits at a position do not depend on later tokens (the explicit causal mask is right)."""
    ids = torch.randint(3, VOCAB, (2, 8), generator=torch.Generator().manual_seed(4))
    if FAMILIES[family].seq2seq:
        full = logits(model, {"input_ids": ids, "decoder_input_ids": ids[:, :6]})
        part = logits(model, {"input_ids": ids, "decoder_input_ids": ids[:, :3]})
        torch.testing.assert_close(full[:, :3], part, atol=1e-5, rtol=1e-4)
    else:
        torch.testing.assert_close(logits(model, {"input_ids": ids})[:, :4], logits(model, {"input_ids": ids[:, :4]}))


@torch.no_grad()
def check_generate(model: nn.Module, family: str, steps: int = 4) -> object:
    """Greedy ``generate()`` (with a cache) gives, step by step, the logits of a forward without cache on
    the same tokens; one encoder row is padded for encoder-decoder models. Returns generate's output."""
    model.eval()
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    seq2seq = FAMILIES[family].seq2seq
    if seq2seq:
        mask[0, -2:] = 0
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=steps,
        min_new_tokens=steps,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        forced_eos_token_id=None,  # BART's default would force EOS at the last step
    )
    assert len(out.logits) == steps
    for step, step_logits in enumerate(out.logits):
        if seq2seq:
            ref = model(
                input_ids=ids, attention_mask=mask, decoder_input_ids=out.sequences[:, : step + 1], use_cache=False
            )
        else:
            ref = model(input_ids=out.sequences[:, : ids.shape[1] + step], use_cache=False)
        torch.testing.assert_close(step_logits, ref.logits[:, -1], atol=1e-5, rtol=1e-4)
        # greedy: each generated token is the argmax, except that min_new_tokens keeps EOS out
        ref_logits = ref.logits[:, -1].clone()
        ref_logits[:, model.generation_config.eos_token_id] = float("-inf")
        assert torch.equal(ref_logits.argmax(-1), out.sequences[:, (1 if seq2seq else ids.shape[1]) + step])
    return out


@torch.no_grad()
def check_left_padded_generate(model: nn.Module, family: str, steps: int = 4) -> None:
    """A left-padded row generates, in a batch, what it generates alone (models whose attention sees
    relative positions only: rotary or T5's relative bias)."""
    model.eval()
    g = torch.Generator().manual_seed(8)
    real, other = torch.randint(3, VOCAB, (5,), generator=g), torch.randint(3, VOCAB, (7,), generator=g)
    ids = torch.stack([torch.cat([torch.zeros(2, dtype=torch.long), real]), other])
    mask = torch.stack([torch.tensor([0, 0, 1, 1, 1, 1, 1]), torch.ones(7, dtype=torch.long)])
    options = dict(max_new_tokens=steps, min_new_tokens=steps, do_sample=False, output_logits=True)
    both = model.generate(input_ids=ids, attention_mask=mask, return_dict_in_generate=True, **options)
    alone = model.generate(
        input_ids=real[None], attention_mask=torch.ones(1, 5).long(), return_dict_in_generate=True, **options
    )
    assert torch.equal(both.sequences[0, -steps:], alone.sequences[0, -steps:])
    for mixed, single in zip(both.logits, alone.logits, strict=True):
        torch.testing.assert_close(mixed[0], single[0], atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------ life cycle


@pytest.mark.parametrize("family", ["gpt2", "t5"])
def test_life_cycle_without_reparameterization(family, tmp_path):
    delta = check_life_cycle(lambda m: PrefixModel(backbone_model=m, reparameterize=False), family, tmp_path)
    assert all(k.endswith((".prefix.key", ".prefix.value")) for k, _ in delta.named_delta_tensors())


def test_default_positions_are_every_self_attention():
    t5 = PrefixModel(build("t5"), reparameterize=False)
    names = sorted({k.rsplit(".prefix.", 1)[0] for k, _ in t5.named_delta_tensors()})
    assert names == [f"{s}.block.{i}.layer.0.SelfAttention" for s in ("decoder", "encoder") for i in (0, 1)]
    bert = PrefixModel(build("bert"), reparameterize=False, prefix_token_num=3)
    # BertAttention (the `attn` role) is modified through the BertSelfAttention it wraps
    shapes = dict(bert.named_delta_tensors())
    assert shapes["bert.encoder.layer.0.attention.self.prefix.key"].shape == (4, 3, 8)  # (heads, tokens, head dim)
    llama = PrefixModel(build("llama"), reparameterize=False)
    assert dict(llama.named_delta_tensors())["model.layers.1.self_attn.prefix.value"].shape == (2, 6, 8)  # kv heads


# ------------------------------------------------------------------------------------------ reparameterisation


def test_reparameterization_network_trains_and_the_checkpoint_holds_plain_prefixes(tmp_path):
    model = build("t5")
    inputs = batch("t5")
    delta = PrefixModel(backbone_model=model, prefix_token_num=3, embed_dim=16, mid_dim=24)
    delta.freeze_module(exclude=["deltas"])
    network = delta._network
    assert isinstance(network, PrefixReparameterization)
    assert {k for k, _ in delta.named_delta_tensors()} == {f"prefix_network.{n}" for n, _ in network.named_parameters()}

    model(**inputs).loss.backward()
    for name, p in network.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"the network's {name} got no gradient"
    torch.optim.SGD(delta.trainable_parameters(), lr=0.1).step()
    tuned = logits(model, inputs)

    path = delta.save_finetuned(tmp_path / "delta")
    saved = load_file(path / "delta_model.safetensors")
    attentions = [f"{s}.block.{i}.layer.0.SelfAttention" for s in ("encoder", "decoder") for i in (0, 1)]
    assert set(saved) == {f"{a}.prefix.{kv}" for a in attentions for kv in ("key", "value")}
    assert all(t.shape == (4, 3, 8) for t in saved.values())
    with torch.no_grad():
        key, value = network.key_value(2)  # decoder.block.0
    assert torch.equal(saved["decoder.block.0.layer.0.SelfAttention.prefix.key"], key)
    assert torch.equal(saved["decoder.block.0.layer.0.SelfAttention.prefix.value"], value)
    config = json.loads((path / "config.json").read_text())
    assert config["delta_type"] == "prefix" and config["reparameterize"] is False and config["prefix_token_num"] == 3
    assert delta.config.reparameterize is True, "saving leaves the live delta's config alone"

    loaded = AutoDeltaModel.from_finetuned(path, backbone_model=build("t5"))
    assert isinstance(loaded, PrefixModel) and not loaded.reparameterize
    assert torch.equal(logits(loaded.backbone_model, inputs), tuned)


def test_engine_state_dict_of_the_network_saves_as_given(tmp_path):
    """An engine's gathered tensors (the network's) are saved as they are, with the reparameterised config."""
    model = build("gpt2")
    delta = PrefixModel(backbone_model=model, embed_dim=8, mid_dim=8)
    tensors = {k: p.detach().clone() for k, p in delta.named_delta_tensors()}
    path = delta.save_finetuned(tmp_path / "delta", state_dict=tensors)
    assert set(load_file(path / "delta_model.safetensors")) == set(tensors)
    loaded = AutoDeltaModel.from_finetuned(path, backbone_model=build("gpt2"))
    assert loaded.reparameterize
    inputs = batch("gpt2")
    assert torch.equal(logits(loaded.backbone_model, inputs), logits(model, inputs))


# ------------------------------------------------------------------------------------------ attention behaviour


def test_prefix_enters_attention_as_always_attended_keys_and_values():
    """BertSelfAttention with a prefix equals a hand-written attention over [prefix; keys] with the
    padding mask extended by attended prefix columns."""
    model = build("bert")
    delta = PrefixModel(backbone_model=model, prefix_token_num=3, reparameterize=False)
    attn = model.bert.encoder.layer[0].attention.self
    pkey, pvalue = (p.detach() for p in attn.prefix.key_value())
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(0))
    keep = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    mask = torch.zeros(2, 1, 1, 5).masked_fill(~keep[:, None, None, :], torch.finfo(torch.float32).min)
    attn.eval()
    with torch.no_grad():
        got, _ = attn(x, attention_mask=mask)

        def heads(t):
            return t.view(2, 5, 4, 8).transpose(1, 2)

        q, k, v = heads(attn.query(x)), heads(attn.key(x)), heads(attn.value(x))
        k = torch.cat([pkey.expand(2, -1, -1, -1), k], dim=2)
        v = torch.cat([pvalue.expand(2, -1, -1, -1), v], dim=2)
        scores = q @ k.transpose(-1, -2) / 8**0.5 + torch.cat([torch.zeros(2, 1, 1, 3), mask], dim=-1)
        want = (scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 5, 32)
    torch.testing.assert_close(got, want)
    delta.detach()
    with torch.no_grad():
        assert attn(x, attention_mask=mask)[0].shape == (2, 5, 32)


@pytest.mark.parametrize(("family", "side"), [(f, "right") for f in SUPPORTED] + [(f, "left") for f in LEFT_PADDING])
def test_padding(family, side):
    model = build(family)
    PrefixModel(backbone_model=model)
    check_padding(model, family, side)


@pytest.mark.parametrize("family", GENERATIVE)
def test_causal(family):
    model = build(family)
    PrefixModel(backbone_model=model)
    check_causal(model, family)


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama", "t5"])
def test_eager_and_sdpa_agree(family):
    model = build(family)
    PrefixModel(backbone_model=model)
    inputs = batch(family)
    sdpa = logits(model, inputs)
    model.set_attn_implementation("eager")
    torch.testing.assert_close(logits(model, inputs), sdpa, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", GENERATIVE)
def test_generate_equals_forward_without_cache(family):
    model = build(family)
    PrefixModel(backbone_model=model)
    out = check_generate(model, family)
    # the prefix is never stored in the cache: it holds the real tokens only (positions stay unshifted)
    generated = out.sequences.shape[1] - 1
    assert out.past_key_values.get_seq_length() == generated


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_left_padded_generate_matches_the_row_alone(family):
    model = build(family)
    PrefixModel(backbone_model=model)
    check_left_padded_generate(model, family)


def test_prefix_is_not_cached_and_positions_do_not_shift():
    model = build("gpt2").eval()
    PrefixModel(backbone_model=model)
    ids = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        first = model(input_ids=ids[:, :4], use_cache=True)
        assert first.past_key_values.get_seq_length() == 4
        step = model(input_ids=ids[:, 4:], past_key_values=first.past_key_values, use_cache=True)
        full = model(input_ids=ids, use_cache=False)
    torch.testing.assert_close(step.logits, full.logits[:, 4:], atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(("family", "cls"), [("distilbert", "DistilBertSelfAttention"), ("deberta-v2", "DebertaV2")])
def test_unsupported_family_is_refused_and_the_model_left_alone(family, cls):
    model = build(family)
    inputs = batch(family)
    before = logits(model, inputs)
    with pytest.raises(UnsupportedModuleError, match=cls) as err:
        PrefixModel(backbone_model=model)
    assert "BertSelfAttention" in str(err.value) and "LlamaAttention" in str(err.value)
    assert torch.equal(logits(model, inputs), before)
    assert not any("prefix" in n for n, _ in model.named_modules())


def test_custom_module_is_refused():
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(UnsupportedModuleError, match=r"'0'.*Linear.*supported attention classes"):
        PrefixModel(backbone_model=model, modified_modules=["0"])


@pytest.mark.parametrize(
    ("family", "key"),
    [("t5", r"[r]decoder\.block\.0\.layer\.1\.EncDecAttention"), ("bart", r"[r]decoder\.layers\.0\.encoder_attn")],
)
def test_cross_attention_is_refused(family, key):
    with pytest.raises(UnsupportedModuleError, match="cross-attention"):
        PrefixModel(backbone_model=build(family), modified_modules=[key])


def test_other_attention_implementation_is_refused():
    model = build("llama")
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(UnsupportedModuleError, match=r"flash_attention_2.*sdpa"):
        PrefixModel(backbone_model=model)


@pytest.mark.parametrize(
    "options",
    [
        {"prefix_token_num": 0},
        {"prefix_token_num": -2},
        {"prefix_token_num": 1.5},
        {"prefix_token_num": True},
        {"embed_dim": 0},
        {"mid_dim": -1},
        {"reparameterize": "yes"},
        {"backend": "bmt"},
    ],
)
def test_bad_options(options):
    name = next(iter(options))
    with pytest.raises(DeltaConfigError, match=name):
        PrefixModel(backbone_model=build("gpt2"), **options)
