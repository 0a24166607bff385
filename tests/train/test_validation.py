"""The run configuration's checks (opendelta_dist.train.validation): every bad value is named with its fix,
and nothing is created while checking."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from opendelta_dist.errors import DeltaConfigError
from opendelta_dist.train import validation
from opendelta_dist.train.models import ModelConfig, check_model_source, is_local_path
from opendelta_dist.train.validation import check_run_dir, validate_run_config

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted(p.stem for p in (ROOT / "recipes").glob("*.yaml"))


def _config(recipe: str, tmp_path: Path) -> dict:
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "configs")):
        cfg = OmegaConf.to_container(compose("config", overrides=[f"+recipe={recipe}"]), resolve=True)
    cfg["run_dir"] = str(tmp_path / "run")
    return cfg


def _set(cfg: dict, key: str, value: object) -> dict:
    cfg = copy.deepcopy(cfg)
    *parents, last = key.split(".")
    node = cfg
    for part in parents:
        node = node[part]
    node[last] = value
    return cfg


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_passes(recipe, tmp_path, monkeypatch):
    monkeypatch.setattr(validation, "check_model_source", lambda cfg: None)  # hub models: no download here
    validate_run_config(_config(recipe, tmp_path))
    assert list(tmp_path.iterdir()) == []


BAD = [
    ("train.max_steps", -5, "must be a positive integer; set e.g. train.max_steps=100"),
    ("train.max_steps", 0, "must be a positive integer"),
    ("train.max_steps", 2.5, "must be a positive integer"),
    ("train.max_steps", "abc", "must be a positive integer"),
    ("train.global_batch_size", 0, "must be a positive integer"),
    ("train.grad_accum", -1, "must be a positive integer"),
    ("train.eval_batch_size", 0, "must be a positive integer"),
    ("train.eval_every", -1, "must be 0 or a positive integer"),
    ("train.log_every", 0, "must be a positive integer"),
    ("checkpoint.every", -2, "must be 0 or a positive integer"),
    ("checkpoint.keep_last", -1, "must be 0 or a positive integer"),
    ("seed", -1, "must be 0 or a positive integer"),
    ("optim.warmup_steps", -10, "must be 0 or a positive integer"),
    ("optim.lr", -1, "must be a number above 0; set e.g. optim.lr=1e-3"),
    ("optim.lr", 0, "must be a number above 0"),
    ("optim.lr", float("nan"), "must be a number above 0"),
    ("optim.lr", True, "must be a number above 0"),
    ("optim.weight_decay", -0.1, "must be a number at least 0"),
    ("optim.eps", 0, "must be a number above 0"),
    ("optim.momentum", -0.5, "must be a number at least 0"),
    ("optim.max_grad_norm", 0, "must be a number above 0"),
    ("optim.betas", [0.9, 1.0], "two numbers in [0, 1)"),
    ("optim.betas", [0.9], "two numbers in [0, 1)"),
    ("optim.name", "adam", "choose one of adamw, sgd"),
    ("optim.momentum", 0.9, "is SGD's (optim.name=sgd), which adamw would ignore"),
    ("optim.total_steps", 5, "optim has no key total_steps"),
    ("train.max_stepz", 5, "train has no key 'max_stepz' (its keys: max_steps, "),
    ("train.max_stepz", 5, "did you mean train.max_steps? drop it with ~train.max_stepz"),
    ("checkpoint.evry", 10, "did you mean checkpoint.every?"),
    ("model.foo", 1, "model has no key 'foo'"),
    ("data.train_fiel", "x.jsonl", "did you mean data.train_file?"),
    ("logger.projct", "p", "did you mean logger.project?"),
    ("checkpoint.signal", "KILL", "cannot be the checkpoint signal; choose USR1, USR2 or HUP"),
    ("checkpoint.signal", "USR9", "is not a signal; set e.g. checkpoint.signal=USR1"),
    ("checkpoint.time_limit_margin", -3, "must be auto, a number >= 0, or null"),
    ("checkpoint.max_requeues", -1, "must be 0 or a positive integer"),
    ("overwrite_run_dir", "yes", "must be true or false"),
]


@pytest.mark.parametrize(("key", "value", "message"), BAD, ids=[f"{k}={v!r}" for k, v, _ in BAD])
def test_a_bad_value_is_refused_with_its_key_and_fix(key, value, message, tmp_path):
    cfg = _set(_config("lora_t5_tiny", tmp_path), key, value)
    with pytest.raises(DeltaConfigError) as info:
        validate_run_config(cfg)
    assert str(info.value).startswith(key.split(".")[0]) and message in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_null_clipping_and_zero_intervals_are_valid(tmp_path):
    cfg = _config("lora_t5_tiny", tmp_path)
    for key, value in [("optim.max_grad_norm", None), ("train.eval_every", 0), ("checkpoint.every", 0)]:
        cfg = _set(cfg, key, value)
    validate_run_config(cfg)


def test_run_dir_checks_create_nothing(tmp_path):
    check_run_dir(tmp_path / "new" / "run")  # missing parents are fine: the recipe creates them
    check_run_dir(tmp_path)  # an existing, writable directory
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "file").write_text("")
    for bad in (tmp_path / "file", tmp_path / "file" / "run"):
        with pytest.raises(DeltaConfigError, match=f"run_dir={re.escape(str(bad))}: .*file, not a directory"):
            check_run_dir(bad)
    assert [p.name for p in tmp_path.iterdir()] == ["file"]


@pytest.mark.parametrize(
    ("name", "local"),
    [
        ("/abs/model", True),
        ("./model", True),
        ("../model", True),
        ("~/model", True),
        ("a/b/c", True),
        ("tests/no_such_model", True),  # its parent exists
        ("google-t5/t5-small", False),
        ("t5-small", False),
    ],
)
def test_is_local_path(name, local):
    assert is_local_path(name) is local


def test_model_source(tmp_path):
    with pytest.raises(DeltaConfigError, match=r"model.name_or_path=/nonexistent/model: .* does not exist"):
        check_model_source(ModelConfig(name_or_path="/nonexistent/model"))
    with pytest.raises(DeltaConfigError, match=r"holds no config\.json"):
        check_model_source(ModelConfig(name_or_path=str(tmp_path)))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5"}))
    check_model_source(ModelConfig(name_or_path=str(tmp_path)))
    check_model_source(ModelConfig(config={"model_type": "t5", "d_model": 8}))
    with pytest.raises(DeltaConfigError, match=r"model\.config does not describe a transformers model"):
        check_model_source(ModelConfig(config={"model_type": "no_such_model_type"}))


def test_module_names_on_the_bmt_engine_are_refused_before_anything_is_built(tmp_path):
    """ModelCenter's T5 has other module names than the recipe's (q, k, v, ...): the bmt engine asks for roles,
    naming the overrides, before a backbone or a run directory exists (not a "matches no module" error)."""
    cfg = _set(_config("lora_t5_tiny", tmp_path), "engine", {"name": "bmt", "options": {}})
    with pytest.raises(DeltaConfigError, match=r"delta.common_structure=true .*delta.modified_modules=null"):
        validate_run_config(cfg)
    assert list(tmp_path.iterdir()) == []
    validate_run_config(_set(cfg, "delta.common_structure", True))  # read as roles (checked when attached)
    validate_run_config(_set(cfg, "delta.modified_modules", None))  # the method's default roles


def test_an_unknown_top_level_key_is_refused(tmp_path):
    cfg = _set(_config("lora_t5_tiny", tmp_path), "sede", 1)
    with pytest.raises(DeltaConfigError, match=r"the configuration has no key 'sede' .*did you mean seed\?"):
        validate_run_config(cfg)
