"""transformers' T5 <-> ModelCenter's T5: names and weights on the CPU; equal logits on a GPU."""

from __future__ import annotations

import pytest
import torch
import transformers as T

from opendelta_dist import LoraModel
from opendelta_dist.errors import DeltaConfigError
from opendelta_dist.train.modelcenter_t5 import (
    activation,
    hf_to_modelcenter,
    hf_to_modelcenter_name,
    modelcenter_config,
    modelcenter_state_groups,
    modelcenter_to_hf,
    modelcenter_to_hf_name,
)
from tests.bmt.common import init_bmtrain, needs_bmt

FEED_FORWARDS = ["relu", "gated-gelu"]


def t5(feed_forward: str, **kw) -> T.T5ForConditionalGeneration:
    torch.manual_seed(0)
    config = T.T5Config(
        vocab_size=96, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=3, num_heads=4,
        dropout_rate=0.0, feed_forward_proj=feed_forward, decoder_start_token_id=0, **kw,
    )  # fmt: skip
    return T.T5ForConditionalGeneration(config)


@pytest.mark.parametrize("feed_forward", FEED_FORWARDS)
def test_every_weight_converts_once_and_back_exactly(feed_forward):
    model = t5(feed_forward)
    state = model.state_dict()
    converted = hf_to_modelcenter(state, model.config)
    shared = [k for k in state if k.endswith("embed_tokens.weight")]
    assert len(converted) == len(state) - len(shared)  # transformers' embed_tokens are views of shared
    assert converted["input_embedding.weight"] is state["shared.weight"]
    scale = model.config.d_model**-0.5  # transformers scales the decoder output before its tied head
    torch.testing.assert_close(converted["output_projection.weight"], state["lm_head.weight"] * scale)
    back = modelcenter_to_hf(converted, model.config)
    assert back.keys() == state.keys() - set(shared)
    for key, value in back.items():
        torch.testing.assert_close(value, state[key], rtol=1e-6, atol=0, msg=key)


def test_an_untied_head_is_not_scaled():
    model = t5("gated-gelu", tie_word_embeddings=False)
    assert not getattr(model.config, "scale_decoder_outputs", model.config.tie_word_embeddings)
    converted = hf_to_modelcenter(model.state_dict(), model.config)
    assert torch.equal(converted["output_projection.weight"], model.state_dict()["lm_head.weight"])


def _save(model: T.T5ForConditionalGeneration, directory, form: str) -> None:
    if form == "pytorch bin":
        directory.mkdir()
        model.config.save_pretrained(directory)
        torch.save(model.state_dict(), directory / "pytorch_model.bin")
    else:
        model.save_pretrained(directory, max_shard_size="20KB" if form == "sharded safetensors" else "5GB")


@pytest.mark.parametrize("form", ["safetensors", "sharded safetensors", "pytorch bin"])
@pytest.mark.parametrize(("feed_forward", "tied"), [("relu", True), ("gated-gelu", True), ("gated-gelu", False)])
def test_a_checkpoint_directory_is_read_one_layer_at_a_time(tmp_path, form, feed_forward, tied):
    """What the bmt engine loads: the whole conversion of the model (in bf16, as the engine's transformers T5 in
    bf16 converted would be), bit for bit, in parts of one layer each plus one of the rest."""
    model = t5(feed_forward, tie_word_embeddings=tied)
    _save(model, tmp_path / "ckpt", form)
    if form == "sharded safetensors":
        assert len(list((tmp_path / "ckpt").glob("*.safetensors"))) > 2
    expected = hf_to_modelcenter({k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}, model.config)
    parts = list(modelcenter_state_groups(tmp_path / "ckpt", model.config, torch.bfloat16))
    assert len(parts) == 2 + 3 + 1  # encoder layers, decoder layers, the rest
    for part in parts[:-1]:
        assert len({".".join(k.split(".")[:3]) for k in part}) == 1, sorted(part)
    assert not any(".layers." in k for k in parts[-1])
    got = {k: v for part in parts for k, v in part.items()}
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key].dtype == torch.bfloat16 and torch.equal(got[key], value), key


def test_a_directory_without_weights_is_refused_naming_what_was_looked_for(tmp_path):
    model = t5("relu")
    model.config.save_pretrained(tmp_path)
    with pytest.raises(DeltaConfigError, match=r"no transformers weights .*model\.safetensors"):
        next(modelcenter_state_groups(tmp_path, model.config, torch.bfloat16))


@pytest.mark.parametrize("feed_forward", FEED_FORWARDS)
def test_delta_keys_map_to_modelcenter_and_back(feed_forward):
    model = t5(feed_forward)
    modules = ["attn.q", "attn.v", "crossattn.proj", "ff.w1", "ff.w2"]
    delta = LoraModel(model, modified_modules=modules, common_structure=True)
    keys = [k for k, _ in delta.named_delta_tensors()]
    assert len(keys) == 2 * (2 * 4 + 3 * 5)  # A and B: q, v, w1, w2 per layer, proj in decoder layers
    mapped = [hf_to_modelcenter_name(k) for k in keys]
    assert len(set(mapped)) == len(keys)
    assert all(".layers." in k and ".block." not in k for k in mapped)
    assert [modelcenter_to_hf_name(k) for k in mapped] == keys
    assert hf_to_modelcenter_name("decoder.block.1.layer.1.EncDecAttention.o.lora.lora_B") == (
        "decoder.layers.1.cross_att.self_attention.attention_out.lora.lora_B"
    )
    assert hf_to_modelcenter_name("encoder.block.0.layer.1") == "encoder.layers.0.ffn"


@pytest.mark.parametrize(
    ("hf", "mc"),
    [
        ("encoder.block.0.layer.1.adapter.up_proj.weight", "encoder.layers.0.ffn.adapter.up_proj.weight"),
        ("decoder.block.1.layer.1.parallel_adapter.b", "decoder.layers.1.cross_att.parallel_adapter.b"),
        ("encoder.block.1.layer.0.SelfAttention.adapter.w", "encoder.layers.1.self_att.self_attention.adapter.w"),
        ("decoder.block.0.layer.1.EncDecAttention.adapter.w", "decoder.layers.0.cross_att.self_attention.adapter.w"),
        ("decoder.block.2.layer.2.DenseReluDense.adapter.w", "decoder.layers.2.ffn.ffn.adapter.w"),
    ],
)  # fmt: skip
def test_a_deltas_child_of_a_sub_layer_attention_or_feed_forward_keeps_its_tail(hf, mc):
    assert hf_to_modelcenter_name(hf) == mc
    assert modelcenter_to_hf_name(mc) == hf


def test_names_without_a_counterpart_are_refused():
    names = (
        "encoder.block.0",
        "encoder.block.0.layer.1.dropout",
        "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight",
        "encoder.block.0.layer.1.DenseReluDense.act",
        "encoder.layers.0.cross_att.x",
        "encoder.layers.0.ffn.ffn.w_in",
        "encoder.layers.0.self_att.self_attention.softmax",
        "encoder.layers.0.self_att.layernorm_before_ffn",
    )
    for name in names:
        with pytest.raises(DeltaConfigError, match="no counterpart"):
            (modelcenter_to_hf_name if ".layers." in name else hf_to_modelcenter_name)(name)


def test_an_activation_modelcenter_lacks_is_refused_naming_another_engine():
    config = T.T5Config(feed_forward_proj="gated-silu")
    with pytest.raises(DeltaConfigError, match="engine=fsdp"):
        activation(config)


@needs_bmt
def test_the_modelcenter_config_is_the_transformers_one():
    model = t5("gated-gelu")
    mc = modelcenter_config(model.config, torch.bfloat16)
    assert (mc.dim_model, mc.dim_head, mc.num_heads, mc.dim_ff) == (32, 8, 4, 48)
    assert (mc.num_encoder_layers, mc.num_decoder_layers, mc.vocab_size) == (2, 3, 96)
    assert (mc.ffn_activate_fn, mc.tied, mc.scale, mc.dtype) == ("gated_gelu_new", False, None, torch.bfloat16)


def _assert_same_logits(model: T.T5ForConditionalGeneration, mc: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(2, 96, (2, 9), generator=g).cuda()
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    decoder_ids = torch.randint(2, 96, (2, 5), generator=g).cuda()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
        got = mc(
            input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids,
            decoder_attention_mask=torch.ones_like(decoder_ids), output_logits=True, return_dict=True,
        ).logits  # fmt: skip
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.emulated
@needs_bmt
@pytest.mark.parametrize("feed_forward", FEED_FORWARDS)
def test_modelcenter_t5_converted_gives_transformers_logits(feed_forward):
    from model_center.model import T5

    init_bmtrain()
    model = t5(feed_forward).cuda().eval()
    mc = T5(modelcenter_config(model.config, torch.float32))
    mc.load_state_dict(hf_to_modelcenter(model.state_dict(), model.config), strict=True)
    _assert_same_logits(model, mc.eval())


@pytest.mark.gpu
@pytest.mark.emulated
@needs_bmt
def test_the_bmt_engine_loads_a_sharded_checkpoint_layer_by_layer(tmp_path):
    from opendelta_dist.train.engines import build_engine
    from opendelta_dist.train.models import ModelConfig
    from opendelta_dist.train.topology import Topology

    model = t5("gated-gelu")
    _save(model, tmp_path / "ckpt", "sharded safetensors")
    engine = build_engine("bmt", Topology.from_environment("cuda"))
    mc = engine.build_backbone(ModelConfig(name_or_path=str(tmp_path / "ckpt")))
    _assert_same_logits(model.cuda().eval(), mc.eval())
