"""What the bmt tests share: whether the bmt extra is here, and BMTrain's one-process initialisation on a GPU."""

from __future__ import annotations

import importlib.util
import os
import shutil

import pytest
import torch

BMT_INSTALLED = importlib.util.find_spec("bmtrain") is not None and importlib.util.find_spec("model_center") is not None
NO_BMT = "the bmt extra is not installed (bash scripts/install-bmt.sh; it needs nvcc)"
needs_bmt = pytest.mark.skipif(not BMT_INSTALLED, reason=NO_BMT)


def nvcc_present() -> bool:
    """Whether this machine can build the bmt extra (and so the set-up installs it)."""
    return shutil.which("nvcc") is not None or bool(os.environ.get("CUDACXX"))


def init_bmtrain() -> None:
    """``bmtrain.init_distributed`` once in this process (one rank, this GPU): what the bmt engine does."""
    import bmtrain as bmt

    if not bmt.config.get("initialized", False):
        os.environ.setdefault("MASTER_PORT", "29771")
        bmt.init_distributed(seed=0)
    torch.backends.cudnn.enabled = True  # BMTrain turns it off; the other GPU tests of the session use it
