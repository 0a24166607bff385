"""Statistics of a model with deltas (parameter counts, memory) and of its optimizer, and a check
that the optimizer holds exactly the model's trainable parameters.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from opendelta_dist.backends import full_numel
from opendelta_dist.errors import OptimizerMismatchError
from opendelta_dist.operations import delta_parameter_ids

logger = logging.getLogger("opendelta_dist")

_GB = 1024**3
# how many names check_optimizer lists per problem before "and N more"
_LISTED = 5
# hyperparameters the optimizer table always shows when a group has them
_MAIN_HYPERPARAMETERS = ("lr", "weight_decay")


def _ratio(part: float, total: float) -> float:
    return part / total if total else 0.0


def _ratio_line(label: str, part: float, total: float) -> str:
    """``"{label}: 1,024/110,000=0.93%"``."""
    return f"{label}: {int(part):,}/{int(total):,}={_ratio(part, total):.2%}"


def _memory_line(stats: dict[str, float]) -> str:
    return f"Static Memory {stats['cudamem']:.2f} GB, Max Memory {stats['maxcudamem']:.2f} GB"


def _unique(tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """``tensors`` without repeats (by identity), in order."""
    return list({id(t): t for t in tensors}.values())


def _cuda_memory_gb() -> tuple[float, float]:
    """(allocated, peak allocated) memory in GB, summed over the visible CUDA devices."""
    if not torch.cuda.is_available():
        return 0.0, 0.0
    devices = range(torch.cuda.device_count())
    allocated = sum(torch.cuda.memory_allocated(d) for d in devices)
    peak = sum(torch.cuda.max_memory_allocated(d) for d in devices)
    return allocated / _GB, peak / _GB


def inspect_module_statistics(module: nn.Module, verbose: bool = True) -> dict[str, float]:
    """Count the parameters of ``module`` (deltas included) and read the CUDA memory in use.

    A parameter shared by several modules is counted once; a sharded parameter counts with its whole size.

    Args:
        module: the model, usually a backbone with deltas attached.
        verbose: log the ratios and memory on the ``opendelta_dist`` logger at INFO level.

    Returns:
        ``total_parameters``, ``trainable_parameters``, ``delta_parameters`` (scalar counts),
        ``trainable_ratio``, ``delta_ratio`` (fractions of the total), ``cudamem`` and ``maxcudamem``
        (allocated and peak allocated CUDA memory in GB, 0.0 without CUDA).
    """
    params = list(module.parameters())  # parameters() yields a shared parameter once
    delta_ids = delta_parameter_ids(module)
    total = sum(full_numel(p) for p in params)  # whole tensors, not the partitions of a sharded backend
    trainable = sum(full_numel(p) for p in params if p.requires_grad)
    delta = sum(full_numel(p) for p in params if id(p) in delta_ids)
    cudamem, maxcudamem = _cuda_memory_gb()
    stats: dict[str, float] = {
        "total_parameters": total,
        "trainable_parameters": trainable,
        "trainable_ratio": _ratio(trainable, total),
        "delta_parameters": delta,
        "delta_ratio": _ratio(delta, total),
        "cudamem": cudamem,
        "maxcudamem": maxcudamem,
    }
    if verbose:
        logger.info(
            "%s; %s; %s",
            _ratio_line("Trainable Ratio", trainable, total),
            _ratio_line("Delta Parameter Ratio", delta, total),
            _memory_line(stats),
        )
    return stats


def print_module_statistics(
    stats: dict[str, float],
    delta_ratio: bool = True,
    trainable_ratio: bool = True,
    memory: bool = True,
    console: Console | None = None,
) -> None:
    """Print statistics from :func:`inspect_module_statistics`, one line each.

    Args:
        stats: the statistics.
        delta_ratio: print the delta parameters over all parameters.
        trainable_ratio: print the trainable parameters over all parameters.
        memory: print the CUDA memory (only printed when CUDA is available).
        console: where to print; default a new ``Console()`` on stdout.
    """
    console = console or Console()
    total = stats["total_parameters"]
    if trainable_ratio:
        console.print(_ratio_line("Trainable Ratio", stats["trainable_parameters"], total), highlight=False)
    if delta_ratio:
        console.print(_ratio_line("Delta Parameter Ratio", stats["delta_parameters"], total), highlight=False)
    if memory and torch.cuda.is_available():
        console.print(_memory_line(stats), highlight=False)


def _format(value: Any) -> str:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    return f"{value:g}" if isinstance(value, float) else str(value)


def _optimizer_table(stats: dict[str, dict[str, Any]]) -> Table:
    """One row per group: counts, ``lr`` and ``weight_decay``, and every hyperparameter that differs between groups."""
    groups = list(stats.values())
    counted = ("num_tensors", "total_parameters", "trainable_parameters", "trainable_ratio")
    hyper = [k for k in dict.fromkeys(k for g in groups for k in g) if k not in counted]
    shown = [k for k in hyper if k in _MAIN_HYPERPARAMETERS or len({_format(g.get(k)) for g in groups}) > 1]
    table = Table("group", "tensors", "parameters", "trainable", *shown, title="Optimizer parameter groups")
    for name, group in stats.items():
        trainable = f"{group['trainable_parameters']:,} ({group['trainable_ratio']:.2%})"
        table.add_row(
            name,
            str(group["num_tensors"]),
            f"{group['total_parameters']:,}",
            trainable,
            *(_format(group.get(k, "")) for k in shown),
        )
    return table


def inspect_optimizer_statistics(
    optimizer: torch.optim.Optimizer, verbose: bool = True, console: Console | None = None
) -> dict[str, dict[str, Any]]:
    """Count the tensors and parameters of every parameter group of ``optimizer``.

    Args:
        optimizer: the optimizer.
        verbose: print a table of the groups.
        console: where to print; default a new ``Console()`` on stdout.

    Returns:
        ``{"param_group_0": {...}, "param_group_1": {...}, ...}``: for each group ``num_tensors``,
        ``total_parameters`` and ``trainable_parameters`` (scalars; a tensor listed twice counts once),
        ``trainable_ratio``, and the group's hyperparameters (``lr``, ``weight_decay``, ...).
    """
    stats: dict[str, dict[str, Any]] = {}
    for i, group in enumerate(optimizer.param_groups):
        tensors = _unique(group["params"])
        total = sum(full_numel(t) for t in tensors)
        trainable = sum(full_numel(t) for t in tensors if t.requires_grad)
        entry: dict[str, Any] = {
            "num_tensors": len(tensors),
            "total_parameters": total,
            "trainable_parameters": trainable,
            "trainable_ratio": _ratio(trainable, total),
        }
        entry.update((k, v) for k, v in group.items() if k != "params")
        stats[f"param_group_{i}"] = entry
    if verbose:
        (console or Console()).print(_optimizer_table(stats))
    return stats


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:_LISTED])
    return shown if len(items) <= _LISTED else f"{shown} and {len(items) - _LISTED} more"


def check_optimizer(optimizer: torch.optim.Optimizer | Sequence[torch.Tensor], model: nn.Module) -> None:
    """Check that ``optimizer`` holds exactly the trainable parameters of ``model``, each once.

    Args:
        optimizer: the optimizer, or the list of parameters an engine's optimizer updates (DeepSpeed's
            ZeRO optimizers hold flat copies; their engines report the module parameters behind them).
        model: the model it trains (the backbone with its deltas attached).

    Raises:
        OptimizerMismatchError: the optimizer holds a frozen parameter of ``model``, a tensor that is
            not a parameter of ``model``, or one tensor twice, or misses a trainable parameter of
            ``model``. The message names them.
    """
    names: dict[int, str] = {}
    for name, p in model.named_parameters():
        names[id(p)] = name
    first_group: dict[int, int] = {}
    frozen: list[str] = []
    foreign: list[str] = []
    duplicated: list[str] = []
    groups = optimizer.param_groups if hasattr(optimizer, "param_groups") else [{"params": list(optimizer)}]
    for g, group in enumerate(groups):
        for t, tensor in enumerate(group["params"]):
            key = id(tensor)
            where = names.get(key, f"param_groups[{g}]['params'][{t}] of shape {tuple(tensor.shape)}")
            if key in first_group:
                duplicated.append(f"{where} (groups {first_group[key]} and {g})")
                continue
            first_group[key] = g
            if key not in names:
                foreign.append(where)
            elif not tensor.requires_grad:
                frozen.append(where)
    missing = [name for name, p in model.named_parameters() if p.requires_grad and id(p) not in first_group]
    problems = [
        f"it holds {len(items)} {what}: {_listing(items)}"
        for what, items in (
            ("frozen parameter(s) of the model", frozen),
            ("tensor(s) that are not parameters of the model", foreign),
            ("tensor(s) more than once", duplicated),
        )
        if items
    ]
    if missing:
        problems.append(f"it misses {len(missing)} trainable parameter(s) of the model: {_listing(missing)}")
    if problems:
        raise OptimizerMismatchError(
            "the optimizer does not fit the model: "
            + "; ".join(problems)
            + ". Build it after attaching the deltas and calling freeze_module(), from "
            "[p for p in model.parameters() if p.requires_grad], with each parameter in one group only."
        )


def check_gradients(model: nn.Module) -> None:
    """Check, after a backward pass, that no frozen parameter of ``model`` holds a gradient.

    Raises:
        OptimizerMismatchError: a frozen parameter has a gradient (something unfroze it behind the
            optimizer's back, or gradients were not cleared); the message names them.
    """
    leaked = [name for name, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
    if leaked:
        raise OptimizerMismatchError(
            f"{len(leaked)} frozen parameter(s) received gradients: {_listing(leaked)}. Only the delta (and "
            "explicitly unfrozen modules) may train: freeze before wrapping the model, and do not set "
            "requires_grad on backbone parameters afterwards."
        )
