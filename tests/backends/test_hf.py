import pytest
import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.t5.modeling_t5 import T5LayerNorm
from transformers.pytorch_utils import Conv1D

from opendelta_dist.backends import BiasKind, get_backend
from opendelta_dist.errors import DeltaConfigError


@pytest.fixture
def hf():
    return get_backend("hf")


def test_linear_dims(hf):
    assert hf.linear_dims(nn.Linear(3, 5)) == (3, 5)
    assert hf.linear_dims(Conv1D(5, 3)) == (3, 5)  # Conv1D(nf=out, nx=in) keeps a (in, out) weight
    assert hf.linear_dims(nn.LayerNorm(3)) is None


def test_bias_kinds(hf):
    assert hf.bias_kind(nn.Linear(3, 5)) == (BiasKind.EXISTING, 5)
    assert hf.bias_kind(nn.Linear(3, 5, bias=False)) == (BiasKind.EMPTY_SLOT, 5)
    assert hf.bias_kind(Conv1D(5, 3)) == (BiasKind.EXISTING, 5)
    assert hf.bias_kind(nn.LayerNorm(4)) == (BiasKind.EXISTING, 4)
    assert hf.bias_kind(nn.LayerNorm(4, bias=False)) == (BiasKind.EMPTY_SLOT, 4)
    assert hf.bias_kind(T5LayerNorm(6)) == (BiasKind.ADDITIVE, 6)
    assert hf.bias_kind(LlamaRMSNorm(6)) == (BiasKind.ADDITIVE, 6)
    assert hf.bias_kind(nn.LayerNorm(4, elementwise_affine=False)) is None
    assert hf.bias_kind(nn.ReLU()) is None


def test_made_parameters_and_layers(hf):
    p = hf.parameter_from(torch.zeros(2))
    assert isinstance(p, nn.Parameter) and p.requires_grad
    q = hf.parameter((2, 3), nn.init.ones_, "cpu", torch.float64)
    assert isinstance(q, nn.Parameter) and q.requires_grad and torch.equal(q, torch.ones(2, 3, dtype=torch.float64))
    layer = hf.linear(3, 4, True, torch.device("cpu"), torch.bfloat16)
    assert isinstance(layer, nn.Linear) and layer.weight.dtype == torch.bfloat16


def test_unknown_backend():
    with pytest.raises(DeltaConfigError, match="unknown backend 'tpu'"):
        get_backend("tpu")
