"""Run launch/train.py as a user would: under torchrun (or plain python), in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.bmt.emulated_cuda import EMULATION_ENV
from tests.train.distributed import free_port

ROOT = Path(__file__).resolve().parents[2]


def python_path() -> str:
    """The repository first, then whatever ``PYTHONPATH`` already names (the GPU check's carried packages)."""
    return os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))


def launch(
    overrides: list[str], nproc: int = 2, env: dict[str, str] | None = None, max_restarts: int = 0, timeout: int = 600
) -> subprocess.CompletedProcess[str]:
    """``torchrun --nproc_per_node=nproc launch/train.py *overrides`` (plain python when nproc is 0); under the
    CUDA emulation of ``tests/bmt/emulated_cuda.py`` when this process is, or ``env`` sets its variable."""
    if nproc:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={nproc}",
            f"--max-restarts={max_restarts}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{free_port()}",
        ]
    else:
        cmd = [sys.executable]
    full_env = {**os.environ, "PYTHONPATH": python_path(), "DS_ACCELERATOR": "cpu", **(env or {})}
    if full_env.get(EMULATION_ENV) == "1":  # under the CUDA emulation (or asked for it): the run is too
        cmd += ["-m", "tests.bmt.emulated_cuda"]
    cmd += [str(ROOT / "launch" / "train.py"), *overrides]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=full_env)


def metrics(run_dir: Path, split: str = "train") -> list[dict[str, Any]]:
    """The records a run logged to metrics.jsonl."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


def check(result: subprocess.CompletedProcess[str]) -> None:
    """Fail with the run's output when it did not succeed."""
    assert result.returncode == 0, result.stdout[-4000:] + "\n---\n" + result.stderr[-6000:]
