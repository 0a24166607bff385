"""Using what a run trained (opendelta_dist.train.predict, launch/predict.py): the final delta on the rebuilt
backbone gives the run's own evaluation, from the library and from the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from opendelta_dist.errors import DeltaConfigError
from opendelta_dist.train.predict import evaluate, load_run, predict
from tests.train.launch import ROOT, check, launch, metrics, python_path

RUN = ["+recipe=lora_t5_tiny", "engine=single", "train.max_steps=24", "train.eval_every=24", "checkpoint.every=0"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A finished delta run and a finished full fine-tuning run, one process each."""
    out = {}
    for name, extra in (("delta", []), ("full", ["delta=none", "optim.lr=1e-3"])):
        run_dir = tmp_path_factory.mktemp(name) / "run"
        result = launch([*RUN, *extra, f"run_dir={run_dir}"], nproc=0)
        check(result)
        assert result.stdout.splitlines()[-1] == f"use it: python launch/predict.py run_dir={run_dir}"
        out[name] = run_dir
    return out


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["delta", "full"])
def test_the_rebuilt_run_gives_its_own_evaluation(runs, kind):
    run = load_run(runs[kind])
    assert (run.delta is None) == (kind == "full")
    measured, rows = evaluate(run)
    logged = metrics(runs[kind], "eval")[-1]
    assert measured["loss"] == pytest.approx(logged["loss"], rel=1e-5)
    assert measured["exact_match"] == pytest.approx(logged["exact_match"])
    assert len(rows) == 32 and {"input", "target", "prediction"} <= set(rows[0])
    # generated text, not only teacher forcing; and predict() on raw texts agrees with the rows' predictions
    assert 0 <= measured["generated_exact_match"] <= 1
    assert predict(run, [r["input"] for r in rows[:4]]) == [r["prediction"] for r in rows[:4]]


@pytest.mark.slow
def test_the_command_evaluates_a_file_and_writes_predictions(runs, tmp_path):
    rows = tmp_path / "dev.jsonl"
    rows.write_text("".join(json.dumps({"input": t, "target": "good"}) + "\n" for t in ("a fine film", "dull")))
    out = tmp_path / "predictions.jsonl"
    command = [sys.executable, str(ROOT / "launch" / "predict.py"), f"run_dir={runs['delta']}", f"file={rows}"]
    result = subprocess.run(
        [*command, f"out={out}"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": python_path()},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("2 rows: loss ")
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [w["input"] for w in written] == ["a fine film", "dull"] and all("prediction" in w for w in written)


def test_a_directory_without_a_finished_run_is_refused_with_what_to_do(tmp_path):
    with pytest.raises(DeltaConfigError, match="not a run's directory"):
        load_run(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(DeltaConfigError, match=r"has not finished; .*resume=auto"):
        load_run(tmp_path)
    help_text = subprocess.run(
        [sys.executable, str(ROOT / "launch" / "predict.py"), "--help"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": python_path()},
    )
    assert help_text.returncode == 0 and "run_dir=outputs/lora_t5_tiny" in help_text.stdout
    result = subprocess.run(
        [sys.executable, str(ROOT / "launch" / "predict.py"), f"run_dir={tmp_path}"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": python_path()},
    )
    assert result.returncode == 1 and result.stderr.startswith("error: DeltaConfigError:")
