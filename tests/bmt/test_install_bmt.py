"""scripts/install-bmt.sh refuses what it cannot build, before installing anything."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "install-bmt.sh"


def run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(SCRIPT), *args], env={**os.environ, **env}, capture_output=True, text=True)


def test_an_architecture_that_is_not_a_compute_capability_is_refused():
    result = run(sys.executable, BMT_CUDA_ARCHS="sm_90")
    assert result.returncode == 2
    assert "BMT_CUDA_ARCHS='sm_90': give compute capabilities like \"80;90\"" in result.stderr


def test_a_missing_python_is_named():
    result = run("/nonexistent/bin/python")
    assert result.returncode == 1 and "no Python at '/nonexistent/bin/python'" in result.stderr


def test_a_missing_nvcc_is_refused_with_exit_3_and_the_fix():
    result = run(sys.executable, CUDACXX="/nonexistent/nvcc")
    assert result.returncode == 3
    assert "nvcc not found" in result.stderr and "CUDACXX=" in result.stderr


def test_every_download_is_pinned_by_version_and_hash():
    lines = [line for line in (ROOT / "scripts" / "bmt.lock").read_text().splitlines() if not line.startswith("#")]
    names = {line.split("==")[0] for line in lines if line}
    assert names == {"bmtrain", "model-center", "nvidia-nccl-cu13", "pybind11"}
    assert all(" --hash=sha256:" in line and len(line.split("sha256:")[1]) == 64 for line in lines if line)
