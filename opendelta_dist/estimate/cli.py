"""Per-GPU memory of a training run, before running it: ``python -m opendelta_dist.estimate``.

    python -m opendelta_dist.estimate +recipe=lora_t5_11b world_size=8
    python -m opendelta_dist.estimate +recipe=lora_t5_11b engine=deepspeed engine.options.precision=bf16 world_size=8
    python -m opendelta_dist.estimate +recipe=lora_t5_11b world_size=1 micro_batch_size=8 input_tokens=512 \\
        target_tokens=128 model.dtype=bf16 format=json

The run configuration is composed exactly as ``launch/train.py`` composes it (Hydra, ``configs/`` and
``recipes/``), so ``+recipe=NAME``, ``engine=fsdp`` and any ``key=value`` override mean the same here.
The estimator's own keys, which are not part of a run's configuration, are:

======================  ======================================================================================
``world_size``          processes (GPUs) of the run; needed for every engine but ``single`` (it splits the
                        batch and, for fsdp and deepspeed, the model)
``micro_batch_size``    sequences per GPU per forward; default ``train.global_batch_size / (world_size x
                        train.grad_accum)``, as the launcher computes it
``input_tokens``        input (encoder) sequence length; default ``data.max_length`` (batches padded to it)
``target_tokens``       target (decoder) length of seq2seq models; default ``data.max_target_length``
``format``              ``table`` (default, a rich table) or ``json`` (machine-readable, for benchmarks)
``gpu_memory``          GiB of one GPU (e.g. ``40``): the answer to "does it fit?", with the headroom or what
                        to change
======================  ======================================================================================

The backbone is built on the meta device (no memory, no download): its architecture comes from
``model.config`` (transformers config fields, ``model_type`` first), or from a ``config.json`` already on
this machine (a local directory, a ``pkg://`` package or the transformers cache). The delta is attached and
the backbone frozen as the recipe does it, so the parameter counts are exact. The memory is then computed
per category:

- **weights**: the frozen backbone on one GPU: whole (single, ddp, ZeRO-2) or sharded (fsdp, ZeRO-3), plus
  the compute-dtype copies an engine gathers (FSDP units, ZeRO-3 live parameters);
- **deltas**: the trainable parameters and their gradients, with the engine's gradient buffers;
- **optimizer**: AdamW's two moments, plus fp32 master weights where the engine keeps them; offloaded
  state is reported in the CPU column;
- **activations**: what autograd keeps for backward (every block's saved tensors, or with gradient
  checkpointing each block's input) plus the peak of one block's recomputation and backward; attention is
  a fused kernel, except on bmt, whose ModelCenter T5 attends eagerly (keeping score-sized tensors) in
  BMTrain blocks that always recompute;
- **workspace**: the logits and loss buffers where they exceed the block peak, the CUDA context and
  NCCL's buffers (constants, below).

Every figure is a model of the code paths of this repository's engines with torch 2.x and transformers
5.x on a GPU; the assumptions are stated in the docstrings of the functions that use them.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from opendelta_dist.errors import OpenDeltaError
from opendelta_dist.estimate.errors import EstimateError
from opendelta_dist.estimate.memory import GIB, MemoryEstimate, estimate_memory
from opendelta_dist.train.engines.memory import ParameterCounts, dtype_name

ESTIMATOR_KEYS = ("world_size", "micro_batch_size", "input_tokens", "target_tokens", "format", "gpu_memory")
FORMATS = ("table", "json")
CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


# ============================================================================================ configuration


def compose(overrides: Sequence[str]) -> dict[str, Any]:
    """The run configuration ``launch/train.py`` would run with ``overrides``, as plain Python.

    Args:
        overrides: Hydra overrides (``+recipe=lora_t5_11b``, ``engine=fsdp``, ``model.dtype=bf16``).

    Returns:
        The composed and resolved configuration.

    Raises:
        EstimateError: an unknown recipe, engine or other config group option, or a key that does not exist.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if not CONFIG_DIR.is_dir():
        raise EstimateError(f"no configs/ directory at {CONFIG_DIR}: run the estimator from a source checkout")
    _check_group_choices(overrides)
    try:
        with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
            cfg = hydra_compose("config", overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as exc:
        lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()] or [type(exc).__name__]
        raise EstimateError(f"the configuration does not compose: {' '.join(lines[:2])}") from exc
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def _check_group_choices(overrides: Sequence[str]) -> None:
    """Name the available choices when an override picks an option of a config group that does not exist."""
    for item in overrides:
        key, sep, value = item.partition("=")
        group = key.lstrip("+~")
        folder = CONFIG_DIR / group
        if not sep or "." in group or not folder.is_dir():
            continue
        choices = sorted(p.stem for p in folder.glob("*.yaml"))
        if value not in choices:
            raise EstimateError(f"unknown {group} {value!r}; choose one of {', '.join(choices)} ({folder})")


def split_arguments(argv: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """Separate the estimator's own ``key=value`` arguments from the Hydra overrides.

    Returns:
        The estimator's keys (see the module docstring) and the remaining overrides.
    """
    own: dict[str, str] = {}
    overrides: list[str] = []
    for item in argv:
        key, sep, value = item.partition("=")
        if sep and key in ESTIMATOR_KEYS:
            own[key] = value
        else:
            overrides.append(item)
    return own, overrides


# ============================================================================================ command line


def render_table(estimate: MemoryEstimate) -> Any:
    """A rich table of the breakdown: one row per category, GiB per GPU and in CPU memory, and the totals."""
    from rich.table import Table

    s = estimate.setup
    title = (
        f"{s['model']} + {s['delta']} on {s['engine']} x{s['world_size']}: micro batch {s['micro_batch_size']}, "
        f"{s['input_tokens']}" + (f" -> {s['target_tokens']}" if s["target_tokens"] else "") + " tokens, "
        f"model.dtype {s['model_dtype']}, {s['compute_dtype']} compute"
        + (", gradient checkpointing" if s["gradient_checkpointing"] else "")
    )
    table = Table(title=title, title_justify="left")
    table.add_column("per GPU")
    table.add_column("GiB", justify="right")
    table.add_column("CPU GiB", justify="right")
    table.add_column("what")
    for r in estimate.rows:
        table.add_row(r.name, f"{r.gpu / GIB:.2f}", f"{r.cpu / GIB:.2f}" if r.cpu else "", r.note)
    table.add_section()
    cpu = sum(r.cpu for r in estimate.rows)
    table.add_row(
        "total",
        f"{estimate.total / GIB:.2f}",
        f"{cpu / GIB:.2f}" if cpu else "",
        f"torch allocated peak {estimate.allocated / GIB:.2f} GiB (without CUDA context and NCCL)",
    )
    return table


def _parameters_line(counts: ParameterCounts) -> str:
    frozen = ", ".join(f"{n:,} {dtype_name(d)}" for d, n in counts.frozen.items())
    trainable = ", ".join(f"{n:,} {dtype_name(d)}" for d, n in counts.trainable.items()) or "none"
    return f"parameters: frozen {frozen}; trainable {trainable} (delta {counts.delta:,}, copies {counts.copies:,})"


def fits_line(estimate: MemoryEstimate, gpu_gib: float) -> str:
    """Whether the estimate fits one GPU of ``gpu_gib`` GiB, with the headroom or the excess and what to change."""
    need = estimate.total / GIB
    if need <= gpu_gib:
        left = gpu_gib - need
        return f"fits in {gpu_gib:g} GiB per GPU: {need:.2f} GiB needed, {left:.2f} GiB ({left / gpu_gib:.0%}) left"
    return (
        f"does not fit in {gpu_gib:g} GiB per GPU: {need:.2f} GiB needed, {need - gpu_gib:.2f} GiB over; a smaller "
        "micro_batch_size (train.grad_accum keeps the global batch), model.gradient_checkpointing=true, bf16 "
        "(engine.options.precision=bf16), more GPUs with a sharding engine (engine=fsdp, deepspeed stage 3, bmt) "
        "or optimizer offload each lower it"
    )


def _number_option(own: Mapping[str, str], key: str, integer: bool = True) -> Any:
    """The estimator's key ``key`` as a whole number of at least 1, or (``integer=False``) GiB above 0."""
    if key not in own:
        return None
    try:
        value = int(own[key]) if integer else float(own[key])
    except ValueError:
        raise EstimateError(
            f"{key} must be {'an integer' if integer else 'a number of GiB'}, not {own[key]!r}"
        ) from None
    if integer and value < 1:
        raise EstimateError(f"{key} must be at least 1, not {value}")
    if not integer and not value > 0:
        raise EstimateError(f"{key} must be above 0 GiB, not {value:g}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """Print the estimate for the run configuration on the command line; see the module docstring.

    Returns:
        0, or 1 after printing one line that says what is wrong and how to fix it.
    """
    from rich.console import Console

    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(__doc__)
        return 0
    try:
        own, overrides = split_arguments(args)
        fmt = own.get("format", "table")
        if fmt not in FORMATS:
            raise EstimateError(f"format must be one of {', '.join(FORMATS)}, not {fmt!r}")
        estimate = estimate_memory(
            compose(overrides),
            world_size=_number_option(own, "world_size"),
            micro_batch_size=_number_option(own, "micro_batch_size"),
            input_tokens=_number_option(own, "input_tokens"),
            target_tokens=_number_option(own, "target_tokens"),
        )
        gpu_gib = _number_option(own, "gpu_memory", integer=False)
    except OpenDeltaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if fmt == "json":
        report = estimate.as_dict()
        if gpu_gib is not None:
            report["fits"] = {"gpu_memory_gib": gpu_gib, "fits": estimate.total / GIB <= gpu_gib}
        print(json.dumps(report, indent=2))
        return 0
    console = Console(width=max(Console().width, 140))
    console.print(render_table(estimate))
    console.print(_parameters_line(estimate.parameters), highlight=False)
    for note in estimate.notes:
        console.print(f"- {note}", highlight=False)
    if gpu_gib is not None:
        console.print(fits_line(estimate, gpu_gib), highlight=False)
    return 0
