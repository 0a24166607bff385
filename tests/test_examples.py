"""The README's main job: the example runs end to end with 2 gloo processes."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

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
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    losses = [float(line.split()[-1]) for line in result.stdout.splitlines() if line.startswith("step")]
    assert losses[-1] < losses[0] / 2, losses
    assert "reloaded on a fresh backbone" in result.stdout
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "delta_model.safetensors"]
