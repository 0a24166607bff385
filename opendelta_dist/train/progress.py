"""What a training run reports as it goes: its header line, the window of steps since the last log line, memory,
and the small all-reduces behind them."""

from __future__ import annotations

import resource
import time
from typing import Any

import torch
import torch.distributed as dist

from opendelta_dist.train.topology import Topology
from opendelta_dist.train.tuning import delta_summary


def memory_mb(device: torch.device) -> float:
    """Peak memory of this process in MiB: CUDA allocated on a GPU, else the resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def all_reduce_floats(values: list[float], device: torch.device, op: Any = None) -> list[float]:
    """``values`` reduced over the ranks (a sum unless ``op`` says otherwise); as given without a process group."""
    if not dist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t.tolist()


class LogWindow:
    """Loss and tokens accumulated since the last log line."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Start a new window now."""
        self.loss, self.tokens, self.steps, self.start = 0.0, 0, 0, time.perf_counter()

    def add(self, loss: float, tokens: int) -> None:
        """Count one optimizer step's mean loss and its tokens."""
        self.loss += loss
        self.tokens += tokens
        self.steps += 1


def run_header(cfg: dict[str, Any], topology: Topology) -> str:
    """One line that says what this run is: model, delta, engine, processes, steps, where it writes."""
    model = cfg["model"].get("name_or_path") or f"a random {cfg['model'].get('config', {}).get('model_type', '')} model"
    train = cfg["train"]
    processes = f"{topology.world_size} process{'es' if topology.world_size > 1 else ''} on {topology.device.type}"
    return (
        f"training {delta_summary(cfg['delta'])} on {model} with engine {cfg['engine']['name']}, {processes}: "
        f"{train['max_steps']} steps of global batch {train['global_batch_size']}; run_dir {cfg['run_dir']}"
    )
