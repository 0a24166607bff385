"""Mistaken values on the training command line: one clear line that names the key and the fix, exit status
1, no traceback, and nothing written (launch/train.py run as a user runs it)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.train.launch import launch

TINY = ["+recipe=lora_t5_tiny", "engine=single"]

CASES = {
    # CUDA_VISIBLE_DEVICES="" hides any GPU, so that this holds on GPU machines too
    "device": (["device=cuda"], {"CUDA_VISIBLE_DEVICES": ""}, ["device=cuda", "CUDA is not available", "device=cpu"]),
    "model": (
        ["model.name_or_path=/nonexistent/model"],
        {"HF_HUB_OFFLINE": "1"},
        ["model.name_or_path=/nonexistent/model", "does not exist", "config.json", "hub id"],
    ),
    "hub_model": (
        ["model.name_or_path=nosuch-org/nosuch-model"],
        {"HF_HUB_OFFLINE": "1"},
        ["model.name_or_path=nosuch-org/nosuch-model", "could not be loaded", "HF_HUB_OFFLINE=1"],
    ),
    "unreachable_hub": (
        ["model.name_or_path=nosuch-org/nosuch-model"],
        {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"},  # nothing listens there: fails at once
        ["model.name_or_path=nosuch-org/nosuch-model", "cannot be reached", "not in the local cache"],
    ),
    "lr": (["optim.lr=-1"], {}, ["optim.lr=-1", "above 0"]),
    "max_steps": (["train.max_steps=-5"], {}, ["train.max_steps=-5", "positive integer"]),
    "grad_accum": (["train.grad_accum=0"], {}, ["train.grad_accum=0", "positive integer"]),
    # AdapterDrop (its other refusals: tests/deltas/test_adapterdrop.py): with layer 1 of the 2 left out, a step
    # drops every delta or none
    "leave_out_and_robust_drop": (
        ["delta.leave_out=[1]", "delta.robust_drop=[0,1]"],
        {},
        ["needs deltas in two layers or more", "only in layer 0 (leave_out=[1])"],
    ),
    "robust_soft_prompt": (
        ["delta=soft_prompt", "delta.soft_token_num=2", "delta.robust_drop=[0,1]"],
        {},
        ["SoftPromptModel modifies no module inside a layer"],
    ),
}


def _refused(result, expected: list[str]) -> None:
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-4000:]
    assert "Traceback" not in output, output[-4000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: DeltaConfigError: "), result.stderr[-4000:]
    for part in expected:
        assert part in line, line


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_mistaken_value_is_refused_before_anything_is_written(case, tmp_path):
    overrides, env, expected = CASES[case]
    result = launch([*TINY, *overrides, f"run_dir={tmp_path / 'run'}"], nproc=0, env=env)
    _refused(result, expected)
    assert list(tmp_path.iterdir()) == []


def test_a_run_dir_that_cannot_be_created_is_refused(tmp_path):
    (tmp_path / "a_file").write_text("")
    result = launch([*TINY, f"run_dir={tmp_path / 'a_file' / 'run'}"], nproc=0)
    _refused(result, [f"run_dir={tmp_path / 'a_file' / 'run'}", "is a file, not a directory", "run_dir=outputs/"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc, where nothing can be created")
def test_a_run_dir_under_proc_is_refused_even_for_root():
    result = launch([*TINY, "run_dir=/proc/nope/run"], nproc=0)
    _refused(result, ["run_dir=/proc/nope/run", "no directory can be created in /proc"])
    assert not Path("/proc/nope").exists()


def test_under_torchrun_the_error_is_one_line_and_the_launchers_summary_names_it(tmp_path):
    """Every rank meets a configuration error alike: rank 0 prints it once, and torchrun's failure summary at the
    bottom of the output ends with the cause, not with "To enable traceback see ..."."""
    result = launch(["+recipe=lora_t5_tiny", "train.global_batch_size=15", f"run_dir={tmp_path / 'run'}"], nproc=2)
    assert result.returncode != 0
    lines = result.stderr.splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and "global batch 15 is not divisible by world size 2" in errors[0], result.stderr[-3000:]
    summary = result.stderr[result.stderr.index("Root Cause") :]
    assert "global batch 15 is not divisible" in summary
    assert not (tmp_path / "run").exists()


def test_help_says_how_to_choose_a_recipe_and_lists_them():
    result = launch(["--help"], nproc=0)
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert "+recipe=NAME" in text and "torchrun" in text
    recipes = sorted(p.stem for p in (Path(__file__).resolve().parents[2] / "recipes").glob("*.yaml"))
    listed = [line.split()[0] for line in text.split("Recipes:")[1].split("\n\n")[0].splitlines() if line.strip()]
    assert sorted(listed) == recipes


def test_the_one_process_engine_on_several_processes_is_refused(tmp_path):
    """engine=single under torchrun with 2 processes would train two unsynchronised copies: refused, naming ddp."""
    result = launch(["+recipe=lora_t5_tiny", "engine=single", f"run_dir={tmp_path / 'run'}"], nproc=2)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode != 0 and len(errors) == 1, result.stderr[-3000:]
    assert "engine=single trains in one process, and this run has 2" in errors[0] and "engine=ddp" in errors[0]
    assert not (tmp_path / "run").exists()
