"""The memory estimator: per-GPU memory of a training run, before running it.

``python -m opendelta_dist.estimate +recipe=NAME world_size=N``: the command line, its keys and what each
figure counts are described in :mod:`opendelta_dist.estimate.cli`. The parts:

- :mod:`~opendelta_dist.estimate.cli`: composing the run configuration, the arguments, the table and JSON;
- :mod:`~opendelta_dist.estimate.memory`: the estimate, from the engine's rows (each engine's memory model
  lives in its file in :mod:`opendelta_dist.train.engines`), the activations and the workspace;
- :mod:`~opendelta_dist.estimate.parameters`: the backbone on the meta device, its delta, its parameter counts;
- :mod:`~opendelta_dist.estimate.blocks`: its architecture and transformer blocks, read through the family
  descriptions of :mod:`opendelta_dist.families`;
- :mod:`~opendelta_dist.estimate.activations`: what autograd keeps for backward, per block formula (fused
  attention, or the eager attention an engine's own model declares).
"""

from __future__ import annotations

from opendelta_dist.estimate.activations import (
    ActivationEstimate,
    Shapes,
    activation_saves,
    bert_block_saves,
    block_backward_transient,
    block_input_bytes,
    block_saves,
    dropout_saves,
    eager_attention_saves,
    estimate_activations,
    fused_attention_saves,
    gpt2_block_saves,
    layer_norm_saves,
    llama_block_saves,
    loss_buffers,
    outside_block_saves,
    rms_norm_saves,
    t5_block_saves,
)
from opendelta_dist.estimate.blocks import BlockInfo, architecture_of, describe_blocks
from opendelta_dist.estimate.cli import (
    CONFIG_DIR,
    ESTIMATOR_KEYS,
    FORMATS,
    compose,
    main,
    render_table,
    split_arguments,
)
from opendelta_dist.estimate.errors import EstimateError
from opendelta_dist.estimate.memory import (
    CUDA_CONTEXT_BYTES,
    GIB,
    NCCL_BUFFER_BYTES,
    MemoryEstimate,
    engine_options,
    estimate_memory,
)
from opendelta_dist.estimate.parameters import attach_delta, build_meta_backbone, count_parameters
from opendelta_dist.families import Architecture

__all__ = [
    "CONFIG_DIR",
    "CUDA_CONTEXT_BYTES",
    "ESTIMATOR_KEYS",
    "FORMATS",
    "GIB",
    "NCCL_BUFFER_BYTES",
    "ActivationEstimate",
    "Architecture",
    "BlockInfo",
    "EstimateError",
    "MemoryEstimate",
    "Shapes",
    "activation_saves",
    "architecture_of",
    "attach_delta",
    "bert_block_saves",
    "block_backward_transient",
    "block_input_bytes",
    "block_saves",
    "build_meta_backbone",
    "compose",
    "count_parameters",
    "describe_blocks",
    "dropout_saves",
    "eager_attention_saves",
    "engine_options",
    "estimate_activations",
    "estimate_memory",
    "fused_attention_saves",
    "gpt2_block_saves",
    "layer_norm_saves",
    "llama_block_saves",
    "loss_buffers",
    "main",
    "outside_block_saves",
    "render_table",
    "rms_norm_saves",
    "split_arguments",
    "t5_block_saves",
]
