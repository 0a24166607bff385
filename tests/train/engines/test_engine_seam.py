"""The engine seam: what the code around the engines asks an engine class instead of branching on its name.

The first tests read the package's source: outside ``opendelta_dist/train/engines/`` no engine name is
compared, tested for membership, used as a dict key or matched, and no list of engine names is kept. The
others check the declarations that replace those branches.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from opendelta_dist.errors import DeltaConfigError
from opendelta_dist.train.engines import OptimizerSpec, build_engine, engine_class, engine_names
from opendelta_dist.train.engines.memory import Backbone, ParameterCounts
from opendelta_dist.train.topology import Topology

ROOT = Path(__file__).resolve().parents[3]
PACKAGE = ROOT / "opendelta_dist"
ENGINES_DIR = PACKAGE / "train" / "engines"
ENGINE_NAMES = frozenset(engine_names()) | {"bmt"}  # bmt: the BMTrain engine a later change adds
BACKEND_NAMES_DIR = PACKAGE / "backends"
"""Where ``bmt`` also names a backend (BMTrain parameters and modules), which is not an engine."""
CPU = Topology(0, 1, 0, torch.device("cpu"))


def engine_name_uses(source: str) -> list[tuple[int, str]]:
    """Line and name of every engine name in ``source`` that is compared, tested for membership, a dict key,
    a ``case`` pattern, or one of several engine names in a tuple, list or set literal."""
    found: list[tuple[int, str]] = []

    def names(nodes: list[ast.AST | None]) -> list[ast.Constant]:
        return [n for n in nodes if isinstance(n, ast.Constant) and n.value in ENGINE_NAMES]

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            hits = names([sub for operand in (node.left, *node.comparators) for sub in ast.walk(operand)])
        elif isinstance(node, ast.Dict):
            hits = names(list(node.keys))
        elif isinstance(node, ast.MatchValue):
            hits = names([node.value])
        elif isinstance(node, ast.Tuple | ast.List | ast.Set):
            hits = names(list(node.elts))
            hits = hits if len({h.value for h in hits}) > 1 else []
        else:
            continue
        found.extend((h.lineno, h.value) for h in hits)
    return sorted(set(found))


@pytest.mark.parametrize(
    "source",
    [
        'if engine == "fsdp":\n    pass',
        'ok = "deepspeed" != state.get("engine")',
        'ok = engine in ("single", "ddp")',
        'ok = engine not in {"bmt"}',
        'rows = {"ddp": 1}',
        'match engine:\n    case "fsdp":\n        pass',
        'SHARDED = ("fsdp", "deepspeed")',
    ],
)
def test_the_check_finds_a_branch_on_an_engine_name(source: str) -> None:
    assert engine_name_uses(source)


@pytest.mark.parametrize(
    "source",
    [
        'engine = build_engine("fsdp", topology)',
        'message = "use engine=ddp or fsdp"',
        'x = cfg.get("engine", "single")',
        'backends = ("hf", "bmt")',
        'if name == "lora":\n    pass',
    ],
)
def test_the_check_leaves_other_uses_alone(source: str) -> None:
    assert engine_name_uses(source) == []


def test_nothing_outside_the_engines_branches_on_an_engine_name() -> None:
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if ENGINES_DIR in path.parents:
            continue
        uses = engine_name_uses(path.read_text())
        if BACKEND_NAMES_DIR in path.parents:
            uses = [(line, name) for line, name in uses if name != "bmt"]
        problems.extend(f"{path.relative_to(ROOT)}:{line}: {name!r}" for line, name in uses)
    assert problems == [], "ask the engine class (train/engines/base.py) instead of branching on its name"


# ------------------------------------------------------------------------------------------ the registry


def test_every_engine_config_names_a_registered_engine_with_those_options() -> None:
    configs = {p.stem: yaml.safe_load(p.read_text()) for p in (ROOT / "configs" / "engine").glob("*.yaml")}
    assert set(configs) == set(engine_names())
    for name, cfg in configs.items():
        cls = engine_class(name)
        assert cls.name == cfg["name"] == name
        assert set(cfg["options"]) <= set(cls.option_defaults())


def test_an_unknown_engine_names_the_choices() -> None:
    choices = "bmt, ddp, deepspeed, fsdp, single"
    with pytest.raises(DeltaConfigError, match=f"unknown engine 'bmtt'; choose one of {choices}"):
        engine_class("bmtt")


# ------------------------------------------------------------------------------------------ declarations


def test_full_fine_tuning_runs_on_the_engines_that_keep_the_whole_model() -> None:
    able = {name for name in engine_names() if engine_class(name).supports_full_fine_tuning}
    assert able == {"single", "ddp"}
    assert not any(engine_class(name).splits_model for name in able)


def test_an_engine_prepares_without_a_delta_for_full_fine_tuning() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    engine = build_engine("single", CPU)
    engine.prepare(model, None, OptimizerSpec())
    assert [id(p) for p in engine.optimized_parameters()] == [id(p) for p in model.parameters()]
    assert engine.optimized_numel() == sum(p.numel() for p in model.parameters())


def test_an_engine_that_builds_the_weights_refuses_to_load_them_without_reading_them() -> None:
    engine = build_engine("ddp", CPU)
    with pytest.raises(DeltaConfigError, match=r"needs an engine that loads them into its shards.*the ddp engine"):
        engine.load_pretrained(lambda: pytest.fail("the checkpoint was read"))


def test_a_deepspeed_checkpoint_resumes_only_on_as_many_processes() -> None:
    deepspeed = engine_class("deepspeed")
    four = Topology(0, 4, 0, torch.device("cpu"))
    deepspeed.check_resume({"engine": "deepspeed", "world_size": 4}, four)
    deepspeed.check_resume({"engine": "fsdp", "world_size": 2}, four)  # not its own partitions
    with pytest.raises(DeltaConfigError, match=r"partitioned for 2 ranks and this run has 4\. Resume with the same"):
        deepspeed.check_resume({"engine": "deepspeed", "world_size": 2}, four)
    for name in ("single", "ddp", "fsdp"):  # their optimizer state is whole in the checkpoint
        engine_class(name).check_resume({"engine": name, "world_size": 2}, four)


def test_the_memory_model_needs_no_deepspeed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # makes `import deepspeed` fail
    monkeypatch.delitem(sys.modules, "opendelta_dist.train.engines.deepspeed", raising=False)
    engine = engine_class("deepspeed")
    counts = ParameterCounts(frozen={torch.float32: 1000}, trainable={torch.float32: 10})
    backbone = Backbone(counts, [], 100, [(1000, False), (10, True)], torch.float32)
    options = {**engine.option_defaults(), "stage": 3, "precision": "bf16"}
    memory = engine.memory_rows(backbone, 2, options)
    assert [r.name for r in memory.rows] == ["weights", "deltas", "optimizer"]
    assert engine.compute_dtype(options, torch.float32) == torch.bfloat16
