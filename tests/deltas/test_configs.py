"""Each delta method's options live in one place, its config class: the method's signature, its
docstring, its attributes and its Hydra file (``configs/delta/<method file>.yaml``) agree with it."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import opendelta_dist.deltas  # noqa: F401  (registers the methods)
from opendelta_dist import LoraModel
from opendelta_dist.auto_delta import DELTA_METHODS
from opendelta_dist.train.tuning import RECIPE_OPTIONS, delta_config
from tests.models import build

ROOT = Path(__file__).resolve().parents[2]
METHODS = sorted(DELTA_METHODS)

COMMON = ["modified_modules", "exclude_modules", "unfrozen_modules", "common_structure", "interactive_modify"]
#: this library's options after OpenDelta's parameters (emulating OpenDelta for its checkpoints)
COMPAT = ["opendelta_compat"]
#: OpenDelta 0.3.2's positional order of each method's parameters after backbone_model
POSITIONAL = {
    "lora": [
        "lora_r",
        "lora_alpha",
        "lora_dropout",
        "modified_modules",
        "unfrozen_modules",
        "exclude_modules",
        "common_structure",
        "interactive_modify",
        "backend",
        "leave_out",
    ],
    "adapter": ["bottleneck_dim", "non_linearity", *COMMON, "backend", "leave_out"],
    "parallel_adapter": ["bottleneck_dim", "non_linearity", "scaled", *COMMON, "backend", "leave_out"],
    "bitfit": [*COMMON, "backend", "leave_out"],
    "lowrankadapter": [
        "reduction_factor",
        "non_linearity",
        "low_rank_w_init",
        "low_rank_rank",
        *COMMON,
        "backend",
        "leave_out",
    ],
    "compacter": [
        *COMMON,
        "reduction_factor",
        "non_linearity",
        "phm_c_init",
        "hypercomplex_division",
        "learn_phm",
        "hypercomplex_nonlinearity",
        "shared_phm_rule",
        "factorized_phm",
        "shared_W_phm",
        "factorized_phm_rule",
        "phm_rank",
        "phm_init_range",
        "kronecker_prod",
        "use_bias_up_sampler",
        "use_bias_down_sampler",
        "backend",
        "leave_out",
    ],
    "prefix": ["prefix_token_num", "reparameterize", "embed_dim", "mid_dim", *COMMON, "backend", "leave_out", *COMPAT],
    "soft_prompt": [
        "soft_token_num",
        "init_range",
        "token_init",
        "other_expand_ids",
        *COMMON,
        "backend",
        "leave_out",
        *COMPAT,
    ],
}


def _group_name(delta_type: str) -> str:
    """The method's option in the Hydra group ``delta``: the name of the file that defines the method."""
    return DELTA_METHODS[delta_type].__module__.rpartition(".")[2]


def test_every_method_is_in_the_table():
    assert sorted(POSITIONAL) == METHODS


@pytest.mark.parametrize("delta_type", METHODS)
def test_the_config_file_lists_every_option_with_its_default(delta_type):
    config_class = DELTA_METHODS[delta_type].config_class
    path = ROOT / "configs" / "delta" / f"{_group_name(delta_type)}.yaml"
    assert path.is_file(), f"{delta_type} has no Hydra config file {path.relative_to(ROOT)}"
    options = OmegaConf.to_container(OmegaConf.load(path))
    assert options.pop("delta_type") == delta_type
    for key in RECIPE_OPTIONS:  # training set-up in the delta group, not saved with the delta
        assert options.pop(key, None) is None
    names = {f.name for f in dataclasses.fields(config_class)}
    assert set(options) <= names, f"{path.name} sets what is no option: {sorted(set(options) - names)}"
    missing = {f.name for f in config_class.method_options()} - set(options)
    assert not missing, f"{path.name} does not list the options {sorted(missing)}"
    defaults = config_class()
    for name, value in options.items():
        default = getattr(defaults, name)
        assert value == default, f"{path.name}: {name}={value!r}, but its default is {default!r}"


@pytest.mark.parametrize("delta_type", METHODS)
def test_the_config_group_composes_into_the_default_config(delta_type):
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "configs")):
        cfg = compose("config", overrides=[f"delta={_group_name(delta_type)}"])
    options = OmegaConf.to_container(cfg.delta, resolve=True)
    assert delta_config(options) == DELTA_METHODS[delta_type].config_class()


@pytest.mark.parametrize("delta_type", METHODS)
def test_the_signature_is_the_config_in_opendelta_order(delta_type):
    cls = DELTA_METHODS[delta_type]
    signature = inspect.signature(cls)
    assert list(signature.parameters) == ["backbone_model", *POSITIONAL[delta_type]]
    assert {p.kind for p in signature.parameters.values()} == {inspect.Parameter.POSITIONAL_OR_KEYWORD}
    defaults = cls.config_class()
    for f in dataclasses.fields(cls.config_class):
        assert signature.parameters[f.name].default == getattr(defaults, f.name), f.name


@pytest.mark.parametrize("delta_type", METHODS)
def test_the_docstring_documents_every_option(delta_type):
    cls = DELTA_METHODS[delta_type]
    doc = " ".join(inspect.getdoc(cls).split())
    for f in cls.config_class.method_options():
        assert f"{f.name}: {f.metadata['doc']}" in doc


def test_options_bind_in_opendelta_order_and_read_the_config():
    delta = LoraModel(build("bert"), 4, 2.0)
    assert (delta.config.lora_r, delta.config.lora_alpha) == (4, 2.0)
    assert (delta.lora_r, delta.lora_alpha, delta.lora_dropout) == (4, 2.0, 0.0)
    with pytest.raises(AttributeError):
        delta.lora_r = 2
    with pytest.raises(TypeError, match=r"LoraModel\(\): got an unexpected keyword argument 'lora_rank'"):
        LoraModel(build("bert"), lora_rank=4)
