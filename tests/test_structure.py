import re

import pytest
import torch
from torch import nn

from opendelta_dist import AdapterModel, BitFitModel, LoraModel, ParallelAdapterModel
from opendelta_dist.errors import DeltaConfigError, UnknownModelFamilyError
from opendelta_dist.structure import find_models, role_keys
from tests.models import batch, build, logits

# the modules each family's default LoRA positions must select (layer 0 of the first stack)
EXPECTED_LORA = {
    "bert": ["bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.0.attention.self.value"],
    "roberta": ["roberta.encoder.layer.0.attention.self.query", "roberta.encoder.layer.0.attention.self.value"],
    "deberta-v2": [
        "deberta.encoder.layer.0.attention.self.query_proj",
        "deberta.encoder.layer.0.attention.self.value_proj",
    ],
    "distilbert": ["distilbert.transformer.layer.0.attention.q_lin", "distilbert.transformer.layer.0.attention.v_lin"],
    "gpt2": ["transformer.h.0.attn.c_attn"],
    "opt": ["model.decoder.layers.0.self_attn.q_proj", "model.decoder.layers.0.self_attn.v_proj"],
    "llama": ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"],
    "bart": ["model.encoder.layers.0.self_attn.q_proj", "model.encoder.layers.0.self_attn.v_proj"],
    "t5": ["encoder.block.0.layer.0.SelfAttention.q", "encoder.block.0.layer.0.SelfAttention.v"],
}


@pytest.mark.parametrize("family", sorted(EXPECTED_LORA))
def test_default_lora_positions(family):
    model = build(family)
    delta = LoraModel(model)
    modules = sorted({op.module_name for op in delta._operations})
    # block 0 of the first stack (OPT has only a decoder)
    first = [m for m in modules if re.search(r"\.(\d+)\.", m).group(1) == "0"]
    if family != "opt":
        first = [m for m in first if "decoder." not in m]
    assert sorted(first) == sorted(EXPECTED_LORA[family])
    assert len(modules) == 2 * len(EXPECTED_LORA[family]) * (2 if family in ("bart", "t5") else 1)


def test_t5_default_positions_of_each_method():
    model = build("t5")
    adapter = {op.module_name for op in AdapterModel(model)._operations}
    assert "encoder.block.0.layer.0.SelfAttention.o" in adapter
    assert "decoder.block.1.layer.2.DenseReluDense.wo" in adapter
    assert not any("EncDecAttention" in n for n in adapter)

    model = build("t5")
    spans = {
        (op.module_name, getattr(op, "end_module_name", op.module_name))
        for op in ParallelAdapterModel(model)._operations
    }
    assert ("encoder.block.0.layer.0.SelfAttention", "encoder.block.0.layer.0.SelfAttention") in spans
    assert ("decoder.block.0.layer.2.DenseReluDense.wi", "decoder.block.0.layer.2.DenseReluDense.wo") in spans

    model = build("t5")
    bitfit = {k for k, _ in BitFitModel(model).named_delta_tensors()}
    assert "encoder.block.0.layer.0.SelfAttention.q.bias" in bitfit  # a bias slot filled
    assert "encoder.block.0.layer.0.layer_norm.bitfit.bias" in bitfit  # an RMS norm gets an added bias
    assert "encoder.final_layer_norm.bitfit.bias" in bitfit


class Wrapper(nn.Module):
    """A user's module holding a transformers model among other things."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = build("bert")
        self.head = nn.Linear(2, 2)

    def forward(self, **kw):
        return self.backbone(**kw)


def test_default_positions_inside_a_users_wrapper():
    wrapper = Wrapper()
    assert find_models(wrapper) == [("backbone", "bert")]
    delta = LoraModel(wrapper)
    assert {op.module_name for op in delta._operations} == {
        f"backbone.bert.encoder.layer.{i}.attention.self.{m}" for i in (0, 1) for m in ("query", "value")
    }
    inputs = batch("bert")
    before = logits(wrapper.backbone, inputs)
    with torch.no_grad():
        for _, p in delta.named_delta_tensors():
            p.normal_()
    assert not torch.allclose(logits(wrapper.backbone, inputs), before)


def test_unknown_model_without_modified_modules_points_at_visualization():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(UnknownModelFamilyError, match="Visualization"):
        LoraModel(model)
    delta = LoraModel(model, modified_modules=["0", "2"])
    assert [op.module_name for op in delta._operations] == ["0", "2"]


def test_common_structure_keys_from_the_user():
    model = build("llama")
    delta = LoraModel(model, modified_modules=["attn.k", "ff@.w2@"], common_structure=True)
    assert {op.module_name.split(".", 3)[-1] for op in delta._operations} == {"self_attn.k_proj", "mlp.down_proj"}


def test_unknown_role_is_an_error():
    with pytest.raises(DeltaConfigError, match="unknown common-structure role"):
        role_keys(build("t5"), ["attn.query"])
