"""Run a test function in N processes joined by a gloo process group (as torchrun would)."""

from __future__ import annotations

import os
import socket
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port nobody listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    try:
        result: Any = ("ok", fn(*args))
    except BaseException:
        result = ("error", traceback.format_exc())
    torch.save(result, Path(out) / f"rank{rank}.pt")
    if result[0] == "error":
        raise SystemExit(1)


def run_distributed(fn: Callable[..., Any], *args: Any, world_size: int = 2) -> list[Any]:
    """Run ``fn(*args)`` on ``world_size`` gloo ranks; return each rank's result (re-raise any rank's error).

    ``fn`` must be importable (a module-level function) and reads its rank from the environment
    (``RANK``, ``WORLD_SIZE``, ...), like a script under torchrun.
    """
    with tempfile.TemporaryDirectory() as out:
        port = free_port()
        try:
            mp.start_processes(_worker, args=(world_size, port, out, fn, args), nprocs=world_size, start_method="spawn")
        except mp.ProcessRaisedException:
            pass
        except mp.ProcessExitedException:
            pass
        results = []
        for rank in range(world_size):
            file = Path(out) / f"rank{rank}.pt"
            if not file.exists():
                raise RuntimeError(f"rank {rank} died without a result")
            status, value = torch.load(file, weights_only=False)
            if status == "error":
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            results.append(value)
        return results
