"""The README's main job: the example runs end to end with 2 gloo processes."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.train.launch import python_path

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_tune_tiny_with_two_processes(tmp_path):
    out = tmp_path / "delta"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(ROOT / "examples" / "tune_tiny.py"),
            "--steps",
            "20",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": python_path()},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    losses = [float(line.split()[-1]) for line in result.stdout.splitlines() if line.startswith("step")]
    assert losses[-1] < losses[0] / 2, losses
    assert "reloaded on a fresh backbone" in result.stdout
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "delta_model.safetensors"]


def _load_example(name: str, monkeypatch):
    import importlib.util

    monkeypatch.syspath_prepend(str(ROOT / "examples"))  # as when the example runs as a script
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_multitask_server_answers_each_request_with_exactly_its_delta(tmp_path, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from opendelta_dist import AutoDeltaModel

    serve = _load_example("serve_multitask", monkeypatch)
    tokenizer = serve.ByT5Tokenizer()
    for task in serve.TASKS:
        serve.tune(task, tmp_path / task, steps=15, tokenizer=tokenizer)
    texts = [r["sentence"] for r in serve.read_rows()[:4]]

    def reference(task):
        model = serve.build_backbone().eval()
        AutoDeltaModel.from_finetuned(tmp_path / task, model)
        enc = tokenizer(texts, padding=True, return_tensors="pt")
        with torch.no_grad():
            return tokenizer.batch_decode(model.generate(**enc, max_new_tokens=12), skip_special_tokens=True)

    expected = {task: reference(task) for task in serve.TASKS}
    assert len({tuple(v) for v in expected.values()}) == len(expected), "the tasks' deltas answer differently"

    server = serve.DeltaServer(serve.build_backbone(), tokenizer)
    for task in serve.TASKS:
        server.add(task, tmp_path / task)
    order = ["sentiment", "length", "length", "first_word", "sentiment", "first_word", "length"]
    for task in order:
        assert server.generate(task, texts) == expected[task], task
    assert server.switches == 6  # consecutive requests of a task keep its delta attached
    with ThreadPoolExecutor(max_workers=3) as pool:  # requests from several threads at once
        answers = list(pool.map(lambda t: (t, server.generate(t, texts)), order * 2))
    assert all(answer == expected[task] for task, answer in answers)
    with pytest.raises(KeyError, match="no delta for task 'translate'"):
        server.generate("translate", texts)

    # AdapterDrop per request: a request bypassing layer 0's deltas is answered by a delta without them, and
    # the next request has them again
    model = serve.build_backbone().eval()
    AutoDeltaModel.from_finetuned(tmp_path / "sentiment", model, leave_out=[0], check_hash=False)
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        without_layer0 = tokenizer.batch_decode(model.generate(**enc, max_new_tokens=12), skip_special_tokens=True)
    assert server.generate("sentiment", texts, skip_layers=[0]) == without_layer0
    assert server.generate("sentiment", texts) == expected["sentiment"]


def test_the_readmes_python_runs_as_written(tmp_path):
    """The README's Python blocks, in order, as one script (a user copies them): nothing undefined, nothing
    that needs the network (the blocks that reach the Hub are fenced ``py``, not ``python``, and not run)."""
    text = (ROOT / "README.md").read_text()
    blocks = [block.split("```", 1)[0] for block in text.split("```python\n")[1:]]
    assert len(blocks) >= 3
    script = tmp_path / "readme.py"
    script.write_text("\n".join(blocks))
    result = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": python_path(), "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
