"""The per-GPU memory of a run configuration: the engine's rows, the activations and the workspace."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from opendelta_dist.estimate.activations import ActivationEstimate, Shapes, estimate_activations
from opendelta_dist.estimate.blocks import architecture_of, describe_blocks
from opendelta_dist.estimate.errors import EstimateError
from opendelta_dist.estimate.parameters import attach_delta, build_meta_backbone, count_parameters
from opendelta_dist.train.engines import Engine, engine_class, engine_names
from opendelta_dist.train.engines.memory import Backbone, ParameterCounts, Row, dtype_name

GIB = 1024**3

CUDA_CONTEXT_BYTES = 512 * 1024**2
"""CUDA context, kernels and cuBLAS workspaces of one process: outside ``torch.cuda.memory_allocated``."""
NCCL_BUFFER_BYTES = 256 * 1024**2
"""NCCL's communicator buffers per process when ``world_size > 1``: outside the torch allocator."""

# ============================================================================================ engines


def engine_options(name: str, options: Mapping[str, Any] | None) -> tuple[dict[str, Any], list[str]]:
    """The engine's constructor options: the configured ones over the constructor's defaults.

    An option of another engine (a recipe written for fsdp sets ``engine.options.reshard_after_forward``
    for whichever engine is chosen) is set aside and named, so that ``engine=NAME`` can be compared on any recipe.

    Args:
        name: the engine's name.
        options: the configured ``engine.options``.

    Returns:
        The options, and the names of the options set aside.

    Raises:
        DeltaConfigError: an unknown engine.
        EstimateError: an option no engine takes.
    """
    defaults = engine_class(name).option_defaults()
    unknown = sorted(set(options or {}) - set(defaults))
    others = [engine_class(other).option_defaults() for other in engine_names()]
    foreign = [key for key in unknown if any(key in other for other in others)]
    typos = [key for key in unknown if key not in foreign]
    if typos:
        raise EstimateError(
            f"engine {name!r} takes no option {', '.join(typos)}; its options are {', '.join(defaults) or 'none'}"
        )
    return {**defaults, **{k: v for k, v in (options or {}).items() if k not in foreign}}, foreign


# ============================================================================================ the estimate


@dataclass
class MemoryEstimate:
    """The per-GPU memory breakdown of one run configuration.

    Attributes:
        setup: what was estimated (model, delta, engine, world size, batch, lengths, dtypes, checkpointing).
        parameters: the parameter counts.
        rows: weights, deltas, optimizer, activations, workspace.
        activations: the activation model's parts.
        notes: assumptions worth reading next to the figures.
    """

    setup: dict[str, Any]
    parameters: ParameterCounts
    rows: list[Row]
    activations: ActivationEstimate
    notes: list[str]

    @property
    def total(self) -> int:
        """Bytes per GPU: everything, the CUDA context and NCCL's buffers included."""
        return sum(r.gpu for r in self.rows)

    @property
    def constants(self) -> int:
        """Bytes outside the torch allocator (CUDA context, NCCL)."""
        return CUDA_CONTEXT_BYTES + (NCCL_BUFFER_BYTES if self.setup["world_size"] > 1 else 0)

    @property
    def allocated(self) -> int:
        """Bytes the torch allocator holds at the peak: comparable with ``torch.cuda.max_memory_allocated``."""
        return self.total - self.constants

    def row(self, name: str) -> Row:
        """The row called ``name``."""
        return next(r for r in self.rows if r.name == name)

    def as_dict(self) -> dict[str, Any]:
        """Plain values for JSON (bytes, with GiB beside the totals)."""
        a = self.activations
        return {
            "setup": self.setup,
            "parameters": self.parameters.as_dict(),
            "rows": {r.name: {"gpu_bytes": r.gpu, "cpu_bytes": r.cpu, "note": r.note} for r in self.rows},
            "activations": {
                "kept_bytes": a.kept,
                "recompute_bytes": a.recompute,
                "backward_bytes": a.backward,
                "loss_bytes": a.loss,
                "terms": a.terms,
            },
            "allocated_peak_bytes": self.allocated,
            "total_bytes": self.total,
            "cpu_bytes": sum(r.cpu for r in self.rows),
            "allocated_peak_gib": round(self.allocated / GIB, 3),
            "total_gib": round(self.total / GIB, 3),
            "notes": self.notes,
        }


def _resolve_world_size(engine: type[Engine], world_size: int | None) -> int:
    if engine.single_process:
        if world_size not in (None, 1):
            raise EstimateError(
                f"engine={engine.name} runs one process, not world_size={world_size}; use engine=ddp or fsdp"
            )
        return 1
    if world_size is None:
        raise EstimateError(
            f"engine={engine.name} splits the batch{' and the model' if engine.splits_model else ''} over the "
            "processes: give world_size=N (GPUs in the run: nodes x --nproc_per_node), e.g. world_size=8"
        )
    if world_size < 1:
        raise EstimateError(f"world_size must be at least 1, not {world_size}")
    return world_size


def _soft_tokens(model: torch.nn.Module) -> int:
    """The tokens a soft prompt puts before every input (the blocks see inputs that much longer)."""
    from opendelta_dist.deltas.soft_prompt import SoftPrompt

    return sum(int(m.soft_embeds.shape[0]) for m in model.modules() if isinstance(m, SoftPrompt))


def estimate_memory(
    cfg: Mapping[str, Any],
    world_size: int | None = None,
    micro_batch_size: int | None = None,
    input_tokens: int | None = None,
    target_tokens: int | None = None,
) -> MemoryEstimate:
    """Estimate the per-GPU memory of training the composed run configuration ``cfg``.

    Args:
        cfg: a run configuration (what :func:`compose` returns).
        world_size: processes of the run; needed unless the engine is ``single``.
        micro_batch_size: sequences per GPU per forward; default from ``train`` as the launcher computes it.
        input_tokens: input length; default ``data.max_length`` (a soft prompt's tokens are added to it).
        target_tokens: target length of seq2seq models; default ``data.max_target_length``.

    Returns:
        The estimate.

    Raises:
        OpenDeltaError: (an :class:`EstimateError` and others) the configuration cannot be estimated.
    """
    from opendelta_dist.operations import delta_parameter_ids
    from opendelta_dist.train.batching import check_batch
    from opendelta_dist.train.data import DataConfig
    from opendelta_dist.train.engines.fsdp import delta_submodules, transformer_blocks
    from opendelta_dist.train.models import DTYPES, ModelConfig

    name = str(cfg["engine"]["name"])
    engine = engine_class(name)
    options, foreign = engine_options(name, cfg["engine"].get("options"))
    world = _resolve_world_size(engine, world_size)
    train = cfg["train"]
    micro = micro_batch_size or check_batch(int(train["global_batch_size"]), world, int(train.get("grad_accum", 1)))
    model_cfg = ModelConfig(**cfg["model"])
    data = DataConfig(**cfg["data"])
    seq2seq = model_cfg.task == "seq2seq"

    model = build_meta_backbone(model_cfg)
    delta = attach_delta(model, cfg)
    counts = count_parameters(model, delta)
    arch = architecture_of(model.config)
    blocks = describe_blocks(model, arch.family)
    if not blocks:
        raise EstimateError(f"found no transformer blocks in the {arch.family} backbone; cannot estimate activations")

    in_blocks = {id(p) for blk in transformer_blocks(model) for p in blk.parameters()}
    in_deltas = {id(p) for sub in delta_submodules(model) for p in sub.parameters()} | delta_parameter_ids(model)
    root = sum(p.numel() for p in model.parameters() if id(p) not in in_blocks | in_deltas)
    model_dtype = DTYPES[model_cfg.dtype]
    sizes = [(p.numel(), p.requires_grad) for p in model.parameters()]
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    tied = head.weight.numel() if head is not None and head.weight is embeddings.weight else 0
    held = engine.memory_rows(Backbone(counts, blocks, root, sizes, model_dtype, tied), world, options)
    rows = list(held.rows)
    compute = engine.compute_dtype(options, model_dtype)

    shapes = Shapes(
        micro,
        (input_tokens or data.max_length) + _soft_tokens(model),
        (target_tokens or data.max_target_length) if seq2seq else 0,
        compute.itemsize,
    )
    # what an engine's own model does differently, declared on its class (the bmt engine's ModelCenter T5: eager
    # attention in BMTrain blocks that recompute in backward whatever model.gradient_checkpointing says)
    eager_attention = engine.eager_attention
    checkpointing = model_cfg.gradient_checkpointing or engine.recomputes_blocks
    acts = estimate_activations(arch, blocks, shapes, checkpointing, seq2seq, eager_attention)
    rows.append(Row("activations", acts.block_peak, 0, _activation_note(acts, checkpointing, compute)))
    nccl = NCCL_BUFFER_BYTES if world > 1 else 0
    workspace_parts = [f"CUDA context {CUDA_CONTEXT_BYTES / GIB:.2f}"]
    if nccl:
        workspace_parts.append(f"NCCL {nccl / GIB:.2f}")
    workspace_parts.extend(f"{what} {size / GIB:.2f}" for what, size in held.workspace.items() if size)
    if acts.loss_excess:
        workspace_parts.append(f"logits+loss beyond the block peak {acts.loss_excess / GIB:.2f}")
    elif acts.loss:
        workspace_parts.append(f"logits+loss ({acts.loss / GIB:.2f}) fit under the block peak")
    rows.append(
        Row(
            "workspace",
            CUDA_CONTEXT_BYTES + nccl + sum(held.workspace.values()) + acts.loss_excess,
            0,
            "GiB: " + ", ".join(workspace_parts),
        )
    )
    setup = {
        "model": model_cfg.name_or_path or model.config.model_type,
        "family": arch.family,
        "task": model_cfg.task,
        "delta": cfg["delta"].get("delta_type"),
        "engine": name,
        "engine_options": {k: v for k, v in options.items() if k != "extra_config" or v},
        "world_size": world,
        "micro_batch_size": micro,
        "input_tokens": shapes.input_tokens,
        "target_tokens": shapes.target_tokens,
        "model_dtype": model_cfg.dtype,
        "compute_dtype": dtype_name(compute),
        "gradient_checkpointing": checkpointing,
    }
    notes = _notes(model_cfg, counts, eager_attention, engine.reads_checkpoints_by_layer) + engine.memory_notes(options)
    if cfg.get("device") == "cpu":
        notes.insert(0, _CPU_NOTE)
    if foreign:
        notes.insert(
            0,
            f"set aside engine.options {', '.join(foreign)}: not options of {name} (the launcher would refuse "
            "them; override them away with ~engine.options.NAME)",
        )
    return MemoryEstimate(setup, counts, rows, acts, notes)


def _activation_note(acts: ActivationEstimate, checkpointing: bool, compute: torch.dtype) -> str:
    kept = f"{acts.kept / GIB:.2f} kept"
    if checkpointing:
        return (
            f"GiB, {dtype_name(compute)}: {kept} (block inputs), {acts.recompute / GIB:.2f} one block recomputed, "
            f"{acts.backward / GIB:.2f} its backward"
        )
    return f"GiB, {dtype_name(compute)}: {kept} (every block's saved tensors), {acts.backward / GIB:.2f} one backward"


_CPU_NOTE = (
    "this run is on the CPU (device=cpu): read each GPU figure as one process's RAM, without the workspace's CUDA "
    "context and NCCL buffers; activations are those of fused attention, which CPU kernels may exceed"
)


def _notes(model_cfg: Any, counts: ParameterCounts, eager_attention: bool, by_layer: bool) -> list[str]:
    attention = (
        "ModelCenter's eager attention, which keeps its softmax output, probabilities and dropout mask"
        if eager_attention
        else "fused SDPA attention kernels (flash / memory-efficient) as on a GPU"
    )
    notes = [
        f"activations assume batches padded to input_tokens (target_tokens) and {attention}",
        f"workspace counts {CUDA_CONTEXT_BYTES / GIB:.2f} GiB of CUDA context (not in torch.cuda.max_memory_allocated)"
        " and no allocator fragmentation (reserved memory can exceed the figures by a few percent)",
    ]
    if model_cfg.init_device == "meta" and model_cfg.name_or_path and not by_layer:
        notes.append(
            f"loading {model_cfg.name_or_path} into the shards, rank 0 also reads the whole checkpoint into CPU memory "
            f"({counts.frozen_bytes / GIB:.1f} GiB in {model_cfg.dtype})"
        )
    return notes
