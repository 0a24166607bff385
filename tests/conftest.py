"""Tests marked ``gpu`` need CUDA; elsewhere they are skipped with the reason.

Under the CUDA emulation of ``tests/bmt/emulated_cuda.py`` (BMTrain and ModelCenter on the CPU: the bmt tier CI
runs, ``tests/bmt/test_emulated.py``) ``torch.cuda.is_available()`` is true, so ``gpu`` tests run there; what
they would measure of the GPU itself (memory) they check only on a real one.
"""

import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine); run on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
