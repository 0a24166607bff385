"""The bmt extra and backend where there is no GPU: installed where nvcc is, importable, refusing clearly."""

from __future__ import annotations

import os
import re

import pytest
import transformers as T

from opendelta_dist import LoraModel, PrefixModel, SoftPromptModel
from opendelta_dist.errors import DeltaConfigError
from opendelta_dist.structure import FAMILIES, ROLES, role_keys
from opendelta_dist.train.modelcenter_t5 import hf_to_modelcenter_name
from tests.bmt.common import BMT_INSTALLED, NO_BMT, needs_bmt, nvcc_present
from tests.models import build


def test_the_set_up_installs_the_bmt_extra_where_nvcc_is():
    if not nvcc_present():
        pytest.skip("no nvcc here: the set-up does not build BMTrain (scripts/install-bmt.sh needs the CUDA toolkit)")
    if os.environ.get("OPENDELTA_BMT") == "0":
        pytest.skip("OPENDELTA_BMT=0: the set-up was asked not to install the bmt extra")
    assert BMT_INSTALLED, "nvcc is here but bmtrain/model_center are not installed: run bash scripts/install-bmt.sh"
    import bmtrain
    import model_center.model

    assert bmtrain.C.is_bf16_supported()  # the compiled extension loads, with its CUDA kernels
    assert hasattr(model_center.model, "T5")


@needs_bmt
def test_a_bmt_delta_without_initialised_bmtrain_is_refused_with_the_fix():
    with pytest.raises(DeltaConfigError, match=r"bmtrain\.init_distributed\(\).*backend='hf'"):
        LoraModel(build("t5"), backend="bmt")


@needs_bmt
@pytest.mark.parametrize("method", [PrefixModel, SoftPromptModel])
def test_methods_needing_transformers_modules_refuse_bmt_by_name(method):
    assert "bmt" not in method.supported_backends()
    with pytest.raises(DeltaConfigError, match=rf"{method.__name__} .*'transformers'.* backend 'bmt'"):
        method(build("t5"), backend="bmt")


@needs_bmt
def test_the_bmt_backend_is_available_and_names_modelcenter_t5_roles():
    from opendelta_dist.backends import available_backends, get_backend
    from opendelta_dist.backends.bmt import MODELCENTER_T5

    assert "bmt" in available_backends()
    assert "bmt" in LoraModel.supported_backends()
    roles = get_backend("bmt").families[MODELCENTER_T5]
    assert set(roles) <= set(ROLES)


@pytest.mark.skipif(not BMT_INSTALLED, reason=NO_BMT)
@pytest.mark.parametrize("feed_forward", ["relu", "gated-gelu"])
def test_each_role_on_modelcenter_t5_is_where_the_conversion_puts_transformers_modules(feed_forward):
    """The bmt role table against the name conversion: a role's modules on transformers' T5, converted,
    are exactly those the role matches among ModelCenter's names (every converted module name)."""
    from opendelta_dist.backends.bmt import MODELCENTER_T5, T5_ROLES

    config = T.T5Config(d_model=16, d_kv=4, d_ff=24, num_layers=2, num_heads=2, feed_forward_proj=feed_forward)
    model = T.T5ForConditionalGeneration(config)
    converted = {}
    for name, _ in model.named_modules():
        try:
            converted[name] = hf_to_modelcenter_name(name)
        except DeltaConfigError:
            continue
    assert len(converted) > 20
    for role in T5_ROLES:
        if role not in FAMILIES["t5"]:
            continue
        on_hf = set()
        for key in role_keys(model, [role]):
            pattern = re.compile(key[len("[r]") :])
            on_hf |= {name for name in converted if pattern.fullmatch(name)}
        expected = {converted[name] for name in on_hf}
        mc_pattern = re.compile(rf"(?:.*\.)?(?:{T5_ROLES[role]})")
        found = {mc for mc in converted.values() if mc_pattern.fullmatch(mc)}
        assert found == expected, role
    assert MODELCENTER_T5 == "model_center.model.t5.T5"


@needs_bmt
def test_modules_inside_a_bmtrain_block_are_addressable():
    """A BMTrain ``Block`` keeps its layer outside ``_modules``; the layer's modules are found by name below it,
    as ModelCenter's T5 names them (``encoder.layers.0.self_att...``)."""
    import bmtrain as bmt
    from torch import nn

    from opendelta_dist.addressing import select_modules

    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.self_att = nn.Module()
            self.self_att.project_q = nn.Linear(4, 4)
            self.ffn = nn.Linear(4, 4)

    root = nn.Module()
    root.layers = nn.ModuleList([bmt.Block(Layer(), initialized=True) for _ in range(2)])
    assert select_modules(root, ["project_q"]) == ["layers.0.self_att.project_q", "layers.1.self_att.project_q"]


def test_the_decoder_start_token_is_t5s_padding_token_when_the_config_has_none():
    from opendelta_dist.train.engines.bmt import decoder_start_token_id

    config = T.T5Config(pad_token_id=7)
    config.__dict__.pop("decoder_start_token_id", None)  # transformers 5 sets it only when it is given
    assert decoder_start_token_id(config) == 7
    assert decoder_start_token_id(T.T5Config(pad_token_id=0, decoder_start_token_id=3)) == 3
