"""Every recipe composes, and every config group binds to what consumes it (nothing is built)."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from opendelta_dist.train.data import DataConfig
from opendelta_dist.train.engines import OptimizerSpec, engine_names
from opendelta_dist.train.models import ModelConfig
from opendelta_dist.train.tuning import delta_config

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted(p.stem for p in (ROOT / "recipes").glob("*.yaml"))


def _compose(overrides):
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "configs")):
        return compose("config", overrides=overrides)


def test_the_issue_recipes_exist():
    assert {"lora_t5_tiny", "lora_t5_base", "adapter_t5_3b", "bitfit_roberta_large", "lora_t5_11b"} <= set(RECIPES)


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_composes_and_binds(recipe):
    text = (ROOT / "recipes" / f"{recipe}.yaml").read_text().splitlines()
    assert text[0] == "# @package _global_"
    assert text[1].startswith("# ") and f"+recipe={recipe}" in text[1], "line 2 is the command that runs it"
    cfg = OmegaConf.to_container(_compose([f"+recipe={recipe}"]), resolve=True)
    assert cfg["run_dir"] == f"outputs/{recipe}"
    ModelConfig(**cfg["model"])
    DataConfig(**cfg["data"])
    delta_config(cfg["delta"])
    optim = {k: v for k, v in cfg["optim"].items() if k != "betas"}
    OptimizerSpec(**optim, betas=tuple(cfg["optim"]["betas"]))
    assert cfg["engine"]["name"] in {"single", "ddp", "fsdp", "deepspeed", "bmt"}


@pytest.mark.parametrize("engine", engine_names())
def test_engine_is_one_key(engine):
    cfg = _compose(["+recipe=lora_t5_tiny", f"engine={engine}"])
    assert cfg.engine.name == engine


def test_unknown_recipe_and_key_are_hydra_errors():
    from hydra.errors import ConfigCompositionException, MissingConfigException

    with pytest.raises(MissingConfigException, match="lora_t5_tinyy"):
        _compose(["+recipe=lora_t5_tinyy"])
    with pytest.raises(ConfigCompositionException, match="max_stepz"):
        _compose(["+recipe=lora_t5_tiny", "train.max_stepz=3"])


def test_an_option_of_another_engine_is_refused_with_the_fix():
    from opendelta_dist.errors import DeltaConfigError
    from opendelta_dist.train.engines import build_engine
    from opendelta_dist.train.topology import Topology

    fix = r"engine ddp has no option reshard_after_forward .*~engine.options.reshard_after_forward"
    with pytest.raises(DeltaConfigError, match=fix):
        build_engine("ddp", Topology(0, 1, 0, torch.device("cpu")), {"reshard_after_forward": True})


DELTA_GROUPS = sorted(p.stem for p in (ROOT / "configs" / "delta").glob("*.yaml") if p.stem != "none")


@pytest.mark.parametrize("group", DELTA_GROUPS)
def test_common_structure_is_an_override_of_every_delta_group(group):
    """``delta.common_structure=true`` (what the bmt engine's refusal tells users to pass) composes."""
    cfg = OmegaConf.to_container(_compose([f"delta={group}", "delta.common_structure=true"]), resolve=True)
    assert delta_config(cfg["delta"]).common_structure is True


def test_the_launcher_keeps_the_callers_python_path(monkeypatch):
    """torchrun's children find what the caller's ``PYTHONPATH`` names (the GPU check's carried packages)."""
    from tests.train.launch import python_path

    monkeypatch.setenv("PYTHONPATH", "/carried/site")
    assert python_path().split(":") == [str(ROOT), "/carried/site"]
    monkeypatch.delenv("PYTHONPATH")
    assert python_path() == str(ROOT)


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("group", DELTA_GROUPS)
def test_another_delta_on_a_recipe_starts_from_its_own_defaults(recipe, group):
    """``delta=X`` on any recipe gives method X as its config file says: a recipe's module choices for its own
    method (LoRA on every T5 linear layer) live in that method's file, not in the shared ``delta`` key."""
    cfg = OmegaConf.to_container(_compose([f"+recipe={recipe}", f"delta={group}"]), resolve=True)
    alone = OmegaConf.to_container(_compose([f"delta={group}"]), resolve=True)
    recipe_keys = {"unfrozen_modules"}  # method-neutral: a task head that trains with any delta
    assert {k: v for k, v in cfg["delta"].items() if k not in recipe_keys} == {
        k: v for k, v in alone["delta"].items() if k not in recipe_keys
    }


@pytest.mark.parametrize("recipe", ["lora_t5_base", "adapter_t5_3b", "lora_t5_11b"])
def test_big_model_recipes_train_on_the_users_files_with_real_lengths(recipe):
    from opendelta_dist.train.data import DataError, load_rows

    data = OmegaConf.to_container(_compose([f"+recipe={recipe}"]), resolve=True)["data"]
    assert (data["max_length"], data["max_target_length"]) == (512, 128)
    with pytest.raises(DataError, match=r"trains on your data: pass data.train_file=<path> data.eval_file=<path>"):
        load_rows(DataConfig(**data), "train")


def test_the_data_task_follows_the_model_task():
    cfg = OmegaConf.to_container(_compose(["+recipe=lora_t5_tiny", "model.task=classification"]), resolve=True)
    assert cfg["data"]["task"] == "classification"
