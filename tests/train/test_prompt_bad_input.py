"""Bad prompt input stops a run before anything is written, with one error that names the problem and the fix;
``launch/train.py`` exits 1 with that one line."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from opendelta_dist.errors import DeltaConfigError
from opendelta_dist.train.recipe import run
from opendelta_dist.train.validation import validate_run_config
from tests.train.launch import launch
from tests.train.test_tasks import SHORT, TASKS, compose_run

BASE = [*TASKS["prompt_classification"], "delta=lora", "engine=single", *SHORT]
TEXT = "prompt.template.text="

#: case -> (overrides, what the message must say)
CASES: dict[str, tuple[list[str], str]] = {
    "unbalanced braces": ([TEXT + '\'{"placeholder":"text_a" It was {"mask"}.\''], "unbalanced braces"),
    "a template that never reads the row": ([TEXT + '\'{"soft":"It was"} {"mask"}.\''], "text_a"),
    "soft tokens in a manual template": (
        ["prompt.template.class=manual", TEXT + '\'{"placeholder":"text_a"} {"soft":"It was"} {"mask"}.\''],
        "prompt.template.class=mixed",
    ),
    "a prompt task on an engine with models of its own": (["engine=bmt"], "builds models of its own"),
    "unknown placeholder": ([TEXT + '\'{"placeholder":"text_c"} It was {"mask"}.\''], "text_c"),
    "unknown meta key": ([TEXT + '\'{"placeholder":"text_a"} {"meta":"topic"} It was {"mask"}.\''], "topic"),
    "no mask": ([TEXT + '\'{"placeholder":"text_a"} It was good.\''], "mask"),
    "soft_id never defined": ([TEXT + '\'{"placeholder":"text_a"} {"soft_id": 3} {"mask"}.\''], "soft_id"),
    "label word of nothing": (["prompt.verbalizer.label_words=[[bad,' '],[good,great]]"], "no token"),
    # a word of a character the tiny tokenizer does not know
    "label word of the unknown token": (["prompt.verbalizer.label_words=[[bad,'€'],[good,great]]"], "unknown"),
    "classes unlike the data's": (["prompt.verbalizer.classes=[negative,positive]"], "label_names"),
    "python code": (
        [TEXT + '\'{"placeholder":"text_a", "post_processing": lambda s: s.upper()} {"mask"}\''],
        "never run",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_prompt_input_is_one_clear_error_and_nothing_is_written(case, tmp_path):
    overrides, says = CASES[case]
    run_dir = tmp_path / "run"
    cfg = compose_run([*BASE, *overrides, f"run_dir={run_dir}"])
    with pytest.raises(DeltaConfigError, match=says) as caught:
        validate_run_config(cfg)  # what launch/train.py checks first
        run(OmegaConf.create(cfg))
    message = str(caught.value)
    assert "\n" not in message and len(message) < 600, message
    assert not run_dir.exists(), sorted(p.name for p in run_dir.iterdir())


def test_the_launcher_exits_1_with_the_one_line(tmp_path):
    run_dir = tmp_path / "run"
    overrides, _ = CASES["no mask"]
    result = launch([*BASE, *overrides, f"run_dir={run_dir}"], nproc=0)
    assert result.returncode == 1, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "mask" in errors[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert not Path(run_dir).exists()
