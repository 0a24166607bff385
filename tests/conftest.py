"""Tests marked ``gpu`` need CUDA; elsewhere they are skipped with the reason.

Under the CUDA emulation of ``tests/bmt/emulated_cuda.py`` (BMTrain and ModelCenter on the CPU: the bmt tier CI
runs, ``tests/bmt/test_emulated.py``) ``torch.cuda.is_available()`` is true, so ``gpu`` tests run there; what
they would measure of the GPU itself (memory) they check only on a real one.
"""

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine); run on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def small_disk(tmp_path) -> Iterator[Path]:
    """A real 2 MiB filesystem (tmpfs) mounted under tmp_path; needs root."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a 2 MiB tmpfs needs root and the mount command")
    command = ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a 2 MiB tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)
