"""The memory estimator: exact parameter counts, engine scaling, activations against CPU measurements, CLI.

Activation memory is measured on CPU in two independent ways:

- the bytes autograd saves for backward while each block runs forward (``saved_tensors_hooks``: every
  distinct storage, parameters excluded), compared block by block with the formulas;
- the peak of all CPU allocations during a whole training step (forward, backward, optimizer step), from the
  torch profiler's memory timeline, compared with the estimate within ``STEP_TOLERANCE``.

Both use fused attention on CPU (SDPA's flash kernel), which keeps what the GPU's fused kernels keep;
the models have no dropout, since CPU attention with dropout falls back to the unfused path. The ``bmt``
engine's ModelCenter T5 attends eagerly: ModelCenter's own attention code is measured on CPU both ways.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from opendelta_dist.estimate import (
    GIB,
    Shapes,
    architecture_of,
    attach_delta,
    block_saves,
    build_meta_backbone,
    compose,
    count_parameters,
    describe_blocks,
    eager_attention_saves,
    estimate_memory,
    main,
    outside_block_saves,
)
from opendelta_dist.train.engines.fsdp import transformer_blocks
from opendelta_dist.train.models import ModelConfig, build_model
from tests.bmt.common import BMT_INSTALLED, NO_BMT

ROOT = Path(__file__).resolve().parents[1]
STEP_TOLERANCE = 0.15
"""Estimated / measured peak of a training step's activations, gradients and loss buffers, at most this far off 1."""

TINY = ["+recipe=lora_t5_tiny", "engine=single"]
T5_11B = ["+recipe=lora_t5_11b", "engine=fsdp"]  # the recipe runs on bmt by default; these tests read fsdp
# T5-11B's proportions (d_ff = 64 d_model, 16 d_model of attention) at a CPU-sized width
T5_11B_SHAPED = [
    *TINY,
    "model.config.d_model=64",
    "model.config.d_ff=4096",
    "model.config.d_kv=32",
    "model.config.num_heads=32",
    "model.config.vocab_size=512",
    "delta.modified_modules=[SelfAttention.q,SelfAttention.v]",
]
T5_SMALL = [
    *TINY,
    "model.config.d_model=128",
    "model.config.d_ff=1024",
    "model.config.d_kv=32",
    "model.config.num_heads=4",
    "model.config.num_layers=3",
    "model.config.vocab_size=512",
]
FAMILIES = {
    "bert": (
        {
            "model_type": "bert",
            "vocab_size": 512,
            "hidden_size": 128,
            "intermediate_size": 512,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0,
            "max_position_embeddings": 256,
        },
        ["query", "value"],
    ),
    "gpt2": (
        {
            "model_type": "gpt2",
            "vocab_size": 512,
            "n_embd": 128,
            "n_layer": 3,
            "n_head": 4,
            "n_positions": 256,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 0,
        },
        ["c_attn"],
    ),
    "llama": (
        {
            "model_type": "llama",
            "vocab_size": 512,
            "hidden_size": 128,
            "intermediate_size": 384,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 256,
            "pad_token_id": 0,
        },
        ["q_proj", "v_proj"],
    ),
}


def _classifier(family: str, checkpointing: bool = False) -> dict:
    """A run configuration whose model is a small classifier of ``family``, LoRA on its query/value."""
    cfg = compose(TINY)
    config, modules = FAMILIES[family]
    cfg["model"] = {
        "config": dict(config),
        "task": "classification",
        "num_labels": 2,
        "dtype": "fp32",
        "init_device": "cpu",
        "gradient_checkpointing": checkpointing,
    }
    cfg["delta"]["modified_modules"] = modules
    return cfg


def _real_model(cfg: dict) -> torch.nn.Module:
    """The configured backbone built on CPU with real weights, its delta attached, in training mode."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(**cfg["model"]))
    attach_delta(model, cfg)
    return model.train()


def _batch(model: torch.nn.Module, batch: int, tokens: int, targets: int) -> dict[str, torch.Tensor]:
    """Random ids, padding in the first sequence (the estimator assumes padded batches), labels."""
    vocab = model.config.vocab_size
    mask = torch.ones(batch, tokens, dtype=torch.long)
    mask[0, tokens // 2 :] = 0
    inputs = {"input_ids": torch.randint(2, vocab, (batch, tokens)), "attention_mask": mask}
    if targets:
        inputs["labels"] = torch.randint(2, vocab, (batch, targets))
    else:
        inputs["labels"] = torch.randint(0, 2, (batch,))
    return inputs


def _saved_per_block(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, int]:
    """Bytes of the distinct storages autograd saves while each block runs forward (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    names = {id(m): n for n, m in model.named_modules()}
    current = ["outside"]

    def entering(name: str):
        return lambda module, args: current.__setitem__(0, name)

    handles = []
    for block in transformer_blocks(model):
        handles.append(block.register_forward_pre_hook(entering(names[id(block)])))
        handles.append(block.register_forward_hook(lambda module, args, output: current.__setitem__(0, "outside")))
    owner: dict[int, str] = {}
    saved: dict[str, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in params and ptr not in owner:  # a storage shared by several saves counts once
            owner[ptr] = current[0]
            saved[current[0]] = saved.get(current[0], 0) + storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(**inputs)
    for handle in handles:
        handle.remove()
    return saved


def _peak_allocated(step) -> int:
    """Peak bytes of CPU tensors allocated during ``step()`` above what was allocated before it (the torch
    profiler's memory timeline: every tensor's creation and destruction, in order)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        step()
    current = peak = 0
    for _, action, _, size in prof._memory_profile().timeline:
        if action.name == "CREATE":
            current += size
        elif action.name == "DESTROY":
            current -= size
        peak = max(peak, current)
    return peak


def _measured_and_estimated_step(cfg: dict, batch: int, tokens: int, targets: int) -> tuple[int, int]:
    """The measured peak of one training step above the weights and optimizer state, and its estimate
    (activations, the loss buffers beyond them, the trainable parameters' gradients)."""
    estimate = estimate_memory(cfg, world_size=1, micro_batch_size=batch, input_tokens=tokens, target_tokens=targets)
    model = _real_model(cfg)
    inputs = _batch(model, batch, tokens, targets)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def step() -> None:
        model(**inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # the optimizer's state exists before the measured step, as it does in a long run
    acts = estimate.activations
    return _peak_allocated(step), acts.block_peak + acts.loss_excess + estimate.parameters.trainable_bytes


# --------------------------------------------------------------------------------------------- parameters


def _bert_bitfit() -> dict:
    cfg = _classifier("bert")
    cfg["delta"] = {"delta_type": "bitfit", "modified_modules": None, "unfrozen_modules": None, "exclude_modules": None}
    return cfg


@pytest.mark.parametrize(
    "make_cfg",
    [
        lambda: compose(TINY),
        lambda: compose([*TINY, "model.dtype=bf16"]),
        lambda: compose([*TINY, "delta=bitfit"]),
        lambda: compose([*TINY, "delta=adapter"]),
        lambda: compose([*TINY, "delta=none"]),
        lambda: compose([*TINY, "delta.unfrozen_modules=[deltas,lm_head]"]),
        _bert_bitfit,
    ],
    ids=["lora", "lora-bf16", "bitfit-new-biases", "adapter", "full", "lora+lm_head", "bert-bitfit-copies"],
)
def test_parameter_counts_equal_a_real_model(make_cfg):
    """Counts on the meta device equal the parameters a CPU-built model holds: by dtype, frozen and
    trainable, and in bytes of distinct storages (originals a delta copied included, tied weights once)."""
    from opendelta_dist.operations import pristine_named_parameters

    cfg = make_cfg()
    meta = build_meta_backbone(ModelConfig(**cfg["model"]))
    counts = count_parameters(meta, attach_delta(meta, cfg))

    real = _real_model(cfg)
    params = {id(p): p for _, p in pristine_named_parameters(real)} | {id(p): p for p in real.parameters()}
    frozen: dict[torch.dtype, int] = {}
    trainable: dict[torch.dtype, int] = {}
    storages: dict[bool, dict[int, int]] = {False: {}, True: {}}
    for p in params.values():
        bucket = trainable if p.requires_grad else frozen
        bucket[p.dtype] = bucket.get(p.dtype, 0) + p.numel()
        storages[p.requires_grad][p.untyped_storage().data_ptr()] = p.untyped_storage().nbytes()
    assert counts.frozen == frozen
    assert counts.trainable == trainable
    assert counts.frozen_bytes == sum(storages[False].values())
    assert counts.trainable_bytes == sum(storages[True].values())
    if cfg["delta"]["delta_type"] == "bitfit":
        # BERT's existing biases train as copies (the originals stay, frozen); T5 has none to copy
        assert (counts.copies > 0) == (cfg["model"]["task"] == "classification")
    if cfg["delta"]["delta_type"] == "none":
        assert counts.frozen_numel == 0 and counts.unfrozen_backbone == counts.trainable_numel


def test_t5_11b_is_built_offline_with_its_exact_parameter_count():
    d, inner, ff, vocab, layers, heads, buckets, rank = 1024, 128 * 128, 65536, 32128, 24, 128, 32, 8
    encoder_block = 4 * d * inner + 2 * d * ff + 2 * d
    decoder_block = 8 * d * inner + 2 * d * ff + 3 * d
    backbone = layers * (encoder_block + decoder_block) + vocab * d + 2 * buckets * heads + 2 * d
    assert backbone == 11_307_321_344
    estimate = estimate_memory(compose(T5_11B), world_size=8)
    assert estimate.parameters.frozen == {torch.float32: backbone}
    # LoRA r=8 on every self-attention q and v: (r x d) + (inner x r) each
    assert estimate.parameters.trainable == {torch.float32: 2 * layers * 2 * rank * (d + inner)}


# --------------------------------------------------------------------------------------------- engines


def _rows(overrides: list[str], world_size: int | None, **kwargs) -> dict[str, tuple[int, int]]:
    estimate = estimate_memory(compose([*T5_11B, *overrides]), world_size=world_size, micro_batch_size=8, **kwargs)
    return {r.name: (r.gpu, r.cpu) for r in estimate.rows}


def test_bmt_weights_are_modelcenters_with_three_blocks_gathered():
    """engine=bmt on T5-11B (bf16): the shards hold ModelCenter's T5, whose LM head is apart from the embeddings
    transformers' T5 ties; gathered are the running and next (decoder) blocks, the first encoder block, which
    BMTrain never releases (tests/bmt/test_bmt_engine.py shows both on the real BMTrain), and what is outside the
    blocks, the head included."""
    cfg = compose(["+recipe=lora_t5_11b"])
    assert cfg["engine"]["name"] == "bmt"
    meta = build_meta_backbone(ModelConfig(**cfg["model"]))
    head = meta.lm_head.weight.numel()
    assert meta.lm_head.weight is meta.shared.weight
    frozen = sum(p.numel() for p in meta.parameters())
    first_encoder, *decoders = (
        sum(p.numel() for p in b.parameters()) for b in (meta.encoder.block[0], *meta.decoder.block[:2])
    )  # the first decoder block (with the position bias) and another one are the largest
    in_blocks = sum(p.numel() for stack in (meta.encoder, meta.decoder) for b in stack.block for p in b.parameters())
    outside = frozen - in_blocks + head
    for world in (1, 8):
        weights = estimate_memory(cfg, world_size=world, micro_batch_size=8).rows[0]
        assert weights.name == "weights"
        shards = -(-(frozen + head) * 2 // world)
        assert weights.gpu == shards + (sum(decoders) + first_encoder + outside) * 2
    assert "first encoder block (never released)" in weights.note


def test_fsdp_and_zero3_shard_the_weights_ddp_and_zero2_do_not():
    frozen = 11_307_321_344 * 4
    fsdp1, fsdp8 = _rows([], 1), _rows([], 8)
    # the shard divides; the gathered units (compute dtype) stay
    assert fsdp1["weights"][0] - fsdp8["weights"][0] == pytest.approx(frozen * 7 / 8, abs=8)
    zero3 = ["engine=deepspeed", "engine.options.stage=3", "engine.options.precision=bf16"]
    z3_1, z3_8 = _rows(zero3, 1), _rows(zero3, 8)
    assert z3_1["weights"][0] - z3_8["weights"][0] == pytest.approx(frozen / 2 * 7 / 8, rel=1e-4)
    zero2 = ["engine=deepspeed", "engine.options.precision=bf16"]
    z2_1, z2_8 = _rows(zero2, 1), _rows(zero2, 8)
    assert z2_1["weights"] == z2_8["weights"] == (frozen // 2, 0)
    # ZeRO-2 partitions the optimizer state (and the gradients), not the weights
    assert z2_1["optimizer"][0] == pytest.approx(8 * z2_8["optimizer"][0], rel=1e-6)
    ddp1, ddp8 = _rows(["engine=ddp"], 1), _rows(["engine=ddp"], 8)
    assert ddp1["weights"] == ddp8["weights"] == (frozen, 0)
    assert ddp1["optimizer"] == ddp8["optimizer"]
    assert ddp8["deltas"][0] > ddp1["deltas"][0]  # DDP's all-reduce buckets, with more than one process


def test_offload_moves_the_optimizer_state_to_cpu():
    for base, offload in (
        (["engine=deepspeed"], "engine.options.offload_optimizer=true"),
        (["engine=deepspeed", "engine.options.stage=3"], "engine.options.offload_optimizer=true"),
        ([], "engine.options.cpu_offload=true"),
    ):
        kept, offloaded = _rows(base, 8), _rows([*base, offload], 8)
        assert kept["optimizer"][0] > 0 and kept["optimizer"][1] == 0
        assert offloaded["optimizer"] == (0, kept["optimizer"][0])
    cpu_offload = _rows(["engine.options.cpu_offload=true"], 8)
    assert cpu_offload["weights"][1] == pytest.approx(11_307_321_344 * 4 / 8, abs=8)


def test_bf16_halves_the_weights_and_precision_gathers_in_bf16():
    fp32 = _rows(["engine=single", "engine.options.precision=null"], None)
    bf16 = _rows(["engine=single", "engine.options.precision=null", "model.dtype=bf16"], None)
    assert bf16["weights"][0] * 2 == fp32["weights"][0]
    assert bf16["optimizer"][0] * 2 == fp32["optimizer"][0]
    ds32 = _rows(["engine=deepspeed", "engine.options.precision=null"], 8)
    ds16 = _rows(["engine=deepspeed", "engine.options.precision=bf16"], 8)
    assert ds16["weights"][0] * 2 == ds32["weights"][0]
    assert ds16["optimizer"] == ds32["optimizer"]  # fp32 masters and moments either way
    mixed, plain = _rows([], 8), _rows(["engine.options.precision=null"], 8)
    shard = 11_307_321_344 * 4 // 8
    assert (plain["weights"][0] - shard) == pytest.approx(2 * (mixed["weights"][0] - shard), abs=8)


def test_gradient_checkpointing_and_batch_size_scale_the_activations():
    def activations(overrides: list[str], batch: int) -> int:
        cfg = compose([*T5_11B, "engine=single", "engine.options.precision=null", *overrides])
        estimate = estimate_memory(cfg, micro_batch_size=batch, input_tokens=512, target_tokens=128)
        return estimate.row("activations").gpu

    with_checkpointing = activations([], 8)
    without = activations(["model.gradient_checkpointing=false"], 8)
    assert without > 10 * with_checkpointing
    assert activations([], 16) == pytest.approx(2 * with_checkpointing, rel=0.02)
    assert activations(["model.dtype=bf16"], 8) < 0.6 * with_checkpointing


def test_the_default_micro_batch_splits_the_global_batch():
    estimate = estimate_memory(compose(T5_11B), world_size=8)
    assert estimate.setup["micro_batch_size"] == 64 // 8
    assert estimate.setup["input_tokens"] == 512 and estimate.setup["target_tokens"] == 128  # data=files


# --------------------------------------------------------------------------------------------- activations


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["model.dtype=bf16"],
        ["delta.modified_modules=[SelfAttention.q,SelfAttention.v]"],
        # no gradient below the lowest block with a delta; the decoder's lowest blocks attend to an encoder
        # output that needs one
        ["delta.leave_out=[0,1]"],
    ],
    ids=["lora-all-linears", "bf16", "lora-qv", "leave-out-0-1"],
)
def test_t5_blocks_save_what_the_formula_says(overrides):
    cfg = compose([*T5_SMALL, *overrides])
    model = _real_model(cfg)
    batch, tokens, targets = 4, 96, 24
    saved = _saved_per_block(model, _batch(model, batch, tokens, targets))
    arch = architecture_of(model.config)
    blocks = describe_blocks(model, arch.family)
    shapes = Shapes(batch, tokens, targets, next(model.parameters()).dtype.itemsize)
    outside = outside_block_saves(arch, blocks, shapes, checkpointing=False)
    # the hook sees the encoder output first in the first block whose cross-attention keys/values train
    reads_encoder = next((blk.name for blk in blocks if "encoder_out" in blk.sites), None)
    for block in blocks:
        expected = sum(block_saves(arch, block, shapes, checkpointing=False).values())
        if block.name == reads_encoder:
            expected += outside["encoder output"]
        assert saved.get(block.name, 0) == expected, block.name
    if "delta.leave_out=[0,1]" in overrides:
        assert [blk.idle for blk in blocks] == [True, True, False, False, False, False]
    # the cross-entropy keeps its log-softmax (a loss buffer, not a kept activation), its int64 targets and
    # a scalar weight: bytes the estimate leaves out
    loss_keeps = (batch * targets * arch.vocab_size + 1) * shapes.bytes + batch * targets * 8
    assert saved["outside"] == outside["final norms"] + loss_keeps


@pytest.mark.parametrize("leave_out", [[], [0]], ids=["every-layer", "leave-out-0"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_other_families_blocks_save_what_the_formula_says(family, leave_out):
    cfg = _classifier(family)
    cfg["delta"]["leave_out"] = leave_out
    model = _real_model(cfg)
    saved = _saved_per_block(model, _batch(model, 4, 96, 0))
    arch = architecture_of(model.config)
    shapes = Shapes(4, 96, 0, 4)
    blocks = describe_blocks(model, arch.family)
    assert [blk.idle for blk in blocks] == [bool(leave_out), False, False]
    # the first block that runs backward also holds tensors shared by every block
    for block in blocks[1 + len(leave_out) :]:
        assert saved[block.name] == sum(block_saves(arch, block, shapes, checkpointing=False).values()), block.name
    for block in blocks[: len(leave_out)]:
        assert saved.get(block.name, 0) == 0 == sum(block_saves(arch, block, shapes, checkpointing=False).values())


@pytest.mark.parametrize(
    "delta", [{"delta_type": "bitfit"}, {"delta_type": "prefix"}, {"delta_type": "lora", "classifier": True}]
)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_blocks_below_the_lowest_delta_keep_nothing_whatever_trains_outside_the_blocks(family, delta):
    """A classifier, a final norm's BitFit bias or a prefix's network train outside the blocks, after or beside
    them: the blocks below the lowest delta still run no backward."""
    cfg = _classifier(family)
    cfg["delta"] = {"delta_type": delta["delta_type"], "modified_modules": None, "leave_out": [0, 1]}
    if delta.get("classifier"):
        cfg["delta"]["modified_modules"] = [
            *FAMILIES[family][1],
            "score" if family in ("gpt2", "llama") else "classifier",
        ]
    model = _real_model(cfg)
    saved = _saved_per_block(model, _batch(model, 4, 96, 0))
    blocks = describe_blocks(model, architecture_of(model.config).family)
    assert [blk.idle for blk in blocks] == [True, True, False]
    assert saved.get(blocks[0].name, 0) == saved.get(blocks[1].name, 0) == 0 < saved[blocks[2].name]


@pytest.mark.parametrize(
    ("overrides", "batch", "tokens", "targets"),
    [
        (T5_SMALL, 4, 96, 24),
        ([*T5_SMALL, "model.gradient_checkpointing=true"], 4, 96, 24),
        ([*T5_SMALL, "delta.leave_out=[0,1]"], 4, 96, 24),
        ([*T5_SMALL, "delta.leave_out=[0,1]", "model.gradient_checkpointing=true"], 4, 96, 24),
        ([*T5_SMALL, "delta=soft_prompt", "delta.soft_token_num=32"], 4, 96, 24),  # the encoder sees 128 tokens
        ([*T5_11B_SHAPED, "model.gradient_checkpointing=true"], 2, 128, 32),
        ([*T5_11B_SHAPED, "model.gradient_checkpointing=true", "model.dtype=bf16"], 2, 128, 32),
    ],
    ids=[
        "t5",
        "t5-checkpointing",
        "t5-leave-out",
        "t5-leave-out-checkpointing",
        "t5-soft-prompt",
        "t5-11b-shaped-checkpointing",
        "t5-11b-shaped-checkpointing-bf16",
    ],
)
def test_a_training_step_peaks_where_the_estimate_says(overrides, batch, tokens, targets):
    measured, estimated = _measured_and_estimated_step(compose(overrides), batch, tokens, targets)
    assert abs(estimated / measured - 1) < STEP_TOLERANCE, (measured, estimated)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_a_bert_training_step_peaks_where_the_estimate_says(checkpointing):
    measured, estimated = _measured_and_estimated_step(_classifier("bert", checkpointing), 4, 96, 0)
    assert abs(estimated / measured - 1) < STEP_TOLERANCE, (measured, estimated)


# --------------------------------------------------------------------------------------------- eager attention (bmt)


def _stored_saves(forward: Callable[[], object], exclude: set[int]) -> int:
    """Bytes of the distinct storages autograd saves while ``forward()`` runs, storages in ``exclude`` left out."""
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in exclude:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        forward()
    return sum(saved.values())


def _modelcenter_attention(
    batch: int, heads: int, head_dim: int, q_len: int, k_len: int, dropout: float, dtype: torch.dtype
) -> tuple[Callable[[], torch.Tensor], set[int]]:
    """ModelCenter's own ``Attention.forward`` on CPU inputs, and the storages of its stand-in's weights.

    ModelCenter's ``Attention`` cannot be built on CPU (its ``DistributedParameter``s need BMTrain initialised on a
    GPU), so its forward runs unbound on a stand-in holding torch ``Linear`` layers as the four projections, with the
    settings ModelCenter's T5 gives it: relative position bias (self-attention only; cross-attention gets none), no
    score scaling, ``-inf`` mask value, dropout ``dropout_rate``. The projections are frozen and the inputs require a
    gradient (a LoRA elsewhere in the block), so both matmuls keep both operands.
    """
    from model_center.layer.attention import Attention
    from torch import nn

    d_model = heads * head_dim
    torch.manual_seed(0)
    stand_in = nn.Module()
    for name in ("project_q", "project_k", "project_v", "attention_out"):
        setattr(stand_in, name, nn.Linear(d_model, d_model, bias=False, dtype=dtype).requires_grad_(False))
    stand_in.num_heads = stand_in.num_heads_kv = heads
    stand_in.dim_head = head_dim
    stand_in.attn_scale = False
    stand_in.pos_bias_type = "relative"
    stand_in.mask_value = float("-inf")
    stand_in.attention_dropout = nn.Dropout(dropout) if dropout else None
    stand_in.softmax = nn.Softmax(dim=-1)

    query = torch.randn(batch, q_len, d_model, dtype=dtype, requires_grad=True)
    cross = q_len != k_len
    key_value = torch.randn(batch, k_len, d_model, dtype=dtype, requires_grad=True) if cross else query
    mask = torch.ones(batch, q_len, k_len, dtype=torch.bool)
    mask[0, :, k_len // 2 :] = False  # a padded first sequence, as ModelCenter's T5 builds the mask
    bias = None if cross else torch.randn(heads, q_len, k_len, dtype=dtype)
    weights = {p.untyped_storage().data_ptr() for p in stand_in.parameters()}
    return lambda: Attention.forward(stand_in, query, key_value, mask, bias), weights


def _cpu_dropout(batch: int, heads: int, q_len: int, k_len: int, dropout: float, nbytes: int) -> int:
    """Bytes CPU dropout keeps beyond CUDA's: its scaled noise in the compute dtype, not a boolean mask."""
    return batch * heads * q_len * k_len * (nbytes - 1) if dropout else 0


@pytest.mark.skipif(not BMT_INSTALLED, reason=NO_BMT)
@pytest.mark.parametrize(("q_len", "k_len"), [(24, 24), (8, 24)], ids=["self-attention", "cross-attention"])
@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_modelcenter_attention_keeps_what_the_eager_formula_says(q_len, k_len, dropout, dtype):
    """ModelCenter's own attention code (:func:`_modelcenter_attention`), run on CPU, keeps for backward what
    ``eager_attention_saves`` says, but for CPU dropout's noise in place of CUDA's boolean mask."""
    batch, heads, head_dim = 3, 4, 8
    forward, weights = _modelcenter_attention(batch, heads, head_dim, q_len, k_len, dropout, dtype)
    measured = _stored_saves(forward, weights)
    nbytes = dtype.itemsize
    expected = eager_attention_saves(batch, heads, q_len, k_len, head_dim, nbytes, dropout)
    assert measured == expected + _cpu_dropout(batch, heads, q_len, k_len, dropout, nbytes)


@pytest.mark.skipif(not BMT_INSTALLED, reason=NO_BMT)
@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["no-dropout", "dropout"])
def test_modelcenter_attention_backward_adds_one_score_sized_gradient(dropout):
    """The peak of ModelCenter's attention forward and backward on CPU is what it keeps plus one score-sized
    gradient (what ``block_backward_transient`` adds for eager attention), and at most the query, key, value and
    output gradients more; the shapes make the scores large beside them."""
    batch, heads, head_dim, tokens = 2, 16, 4, 256
    forward, _ = _modelcenter_attention(batch, heads, head_dim, tokens, tokens, dropout, torch.float32)
    grad = torch.randn(batch, tokens, heads * head_dim)
    measured = _peak_allocated(lambda: forward().backward(grad))
    kept = eager_attention_saves(batch, heads, tokens, tokens, head_dim, 4, dropout)
    kept += _cpu_dropout(batch, heads, tokens, tokens, dropout, 4)
    score_gradient = batch * heads * tokens * tokens * 4
    qkvo_gradients = 4 * batch * tokens * heads * head_dim * 4
    assert kept + score_gradient <= measured <= kept + score_gradient + qkvo_gradients, (measured, kept)


@pytest.mark.parametrize("input_tokens", [512, 1024])
def test_bmt_counts_the_scores_modelcenter_attention_keeps(input_tokens):
    """On T5-11B (bf16, 8 sequences, LoRA on q and v), engine=bmt against fsdp's fused attention, both recomputing
    every block: the recomputed encoder block keeps ModelCenter's score-sized tensors instead of the fused kernel's
    output, log-sum-exp and additive mask, and its backward holds one score-sized gradient more."""
    batch, target_tokens, heads, head_dim, d_model, d_ff, nbytes = 8, 128, 128, 128, 1024, 65536, 2

    def activations(engine: str):
        cfg = compose(["+recipe=lora_t5_11b", f"engine={engine}", "model.dtype=bf16"])
        estimate = estimate_memory(
            cfg, world_size=1, micro_batch_size=batch, input_tokens=input_tokens, target_tokens=target_tokens
        )
        assert estimate.setup["compute_dtype"] == "bfloat16" and estimate.setup["gradient_checkpointing"]
        return estimate.activations

    eager, fused = activations("bmt"), activations("fsdp")
    scores = batch * heads * input_tokens * input_tokens
    # eager: the softmax output and the probabilities in bf16, the dropout's boolean mask, and the two
    # boolean padding masks (batch x input x input) of its two masked_fill calls
    eager_only = 2 * scores * nbytes + scores + 2 * batch * input_tokens * input_tokens
    # fused: its output (as large as the query), the fp32 log-sum-exp, the bf16 position bias + padding mask
    fused_only = batch * heads * input_tokens * head_dim * nbytes + batch * heads * input_tokens * 4 + scores * nbytes
    growth = eager_only - fused_only
    term = "encoder block: self-attention"
    assert eager.terms[term] - fused.terms[term] == growth
    assert eager.kept == fused.kept  # every block keeps only its input either way
    assert eager.recompute - fused.recompute == growth
    tokens = batch * input_tokens
    residual, ff = 2 * tokens * d_model * nbytes, 2 * tokens * d_ff * nbytes
    qkvo = 4 * tokens * heads * head_dim * nbytes
    assert fused.backward == residual + max(ff, qkvo)
    assert eager.backward == residual + max(ff, qkvo + scores * nbytes)
    assert eager.block_peak - fused.block_peak == growth + max(0, qkvo + scores * nbytes - ff)


def test_bmt_recomputes_its_blocks_whatever_the_model_configuration_says():
    base = ["+recipe=lora_t5_11b"]
    recomputed = estimate_memory(compose(base), world_size=8)
    configured_off = estimate_memory(compose([*base, "model.gradient_checkpointing=false"]), world_size=8)
    assert configured_off.setup["gradient_checkpointing"] is True
    assert configured_off.row("activations") == recomputed.row("activations")
    fsdp = estimate_memory(compose([*base, "engine=fsdp", "model.gradient_checkpointing=false"]), world_size=8)
    assert fsdp.setup["gradient_checkpointing"] is False
    assert "ModelCenter's eager attention" in recomputed.notes[0] and "fused SDPA" in fsdp.notes[0]


# --------------------------------------------------------------------------------------------- command line


def _program(*args: str) -> subprocess.CompletedProcess:
    """``python -m opendelta_dist.estimate ARGS`` as a user runs it."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "opendelta_dist.estimate", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _cli(*args: str) -> subprocess.CompletedProcess:
    """The command line's ``main`` in this process, its output captured (the program itself: :func:`_program`)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return subprocess.CompletedProcess(["opendelta_dist.estimate", *args], code, out.getvalue(), err.getvalue())


@pytest.mark.parametrize(
    "args",
    [
        ["+recipe=lora_t5_11b", "engine=fsdp", "world_size=8"],
        ["+recipe=lora_t5_11b", "engine=deepspeed", "world_size=8"],
        ["+recipe=lora_t5_11b", "world_size=1", "micro_batch_size=8", "input_tokens=512", "target_tokens=128"],
    ],
    ids=["fsdp", "deepspeed", "recipe-default"],
)
def test_the_cli_prints_the_table(args):
    result = _cli(*args)
    assert result.returncode == 0, result.stderr
    for row in ("weights", "deltas", "optimizer", "activations", "workspace", "total"):
        assert row in result.stdout
    assert "11,307,321,344" in result.stdout


def test_the_cli_writes_json_for_benchmarks():
    result = _cli("+recipe=lora_t5_11b", "engine=fsdp", "world_size=8", "format=json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert set(report["rows"]) == {"weights", "deltas", "optimizer", "activations", "workspace"}
    assert report["total_bytes"] == sum(r["gpu_bytes"] for r in report["rows"].values())
    assert 0 < report["allocated_peak_bytes"] < report["total_bytes"]
    assert report["setup"]["engine"] == "fsdp" and report["setup"]["world_size"] == 8


def test_the_cli_answers_whether_the_run_fits_a_gpu():
    """gpu_memory=N: the estimate against one GPU of N GiB, with the headroom, or the excess and what lowers it."""
    base = ["+recipe=lora_t5_11b", "world_size=1", "micro_batch_size=8"]
    report = json.loads(_cli(*base, "format=json").stdout)
    need = report["total_bytes"] / 2**30
    fits = _cli(*base, f"gpu_memory={need + 1:.2f}")
    assert fits.returncode == 0 and f"fits in {need + 1:.2f} GiB per GPU: {need:.2f} GiB needed" in fits.stdout
    tight = _cli(*base, f"gpu_memory={need - 1:.2f}")
    assert f"does not fit in {need - 1:.2f} GiB per GPU" in tight.stdout and "micro_batch_size" in tight.stdout
    verdict = json.loads(_cli(*base, "format=json", f"gpu_memory={need - 1:.2f}").stdout)["fits"]
    assert verdict == {"gpu_memory_gib": round(need - 1, 2), "fits": False}
    assert "gpu_memory must be above 0 GiB" in _cli(*base, "gpu_memory=0").stderr


def test_the_cli_refuses_bad_input_in_one_line():
    result = _program("+recipe=lora_t5_11b")
    assert result.returncode != 0
    assert result.stderr.strip() == (
        "error: engine=bmt splits the batch and the model over the processes: give world_size=N (GPUs in the "
        "run: nodes x --nproc_per_node), e.g. world_size=8"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["+recipe=lora_t5_nope", "world_size=8"], "unknown recipe 'lora_t5_nope'; choose one of"),
        (["+recipe=lora_t5_11b", "engine=bmtt", "world_size=8"], "unknown engine 'bmtt'; choose one of bmt, ddp,"),
        (["+recipe=lora_t5_11b", "engine=single", "world_size=2"], "engine=single runs one process"),
        (["+recipe=lora_t5_11b", "world_size=eight"], "world_size must be an integer"),
        (["+recipe=lora_t5_11b", "world_size=8", "format=xml"], "format must be one of table, json"),
        (["+recipe=lora_t5_11b", "world_size=8", "train.max_stepz=1"], "Could not override 'train.max_stepz'"),
        (
            ["+recipe=lora_minilm_sst2", "engine=bmt", "world_size=2"],
            "eager attention is modelled for ModelCenter's T5 (the bmt engine trains T5 only), not for a bert model",
        ),
        (
            ["+recipe=lora_t5_base", "world_size=2", "model.name_or_path=nobody/no-such-model"],
            "the architecture of 'nobody/no-such-model' is not available offline: add its transformers config",
        ),
    ],
)
def test_bad_input_names_the_fix(args, message, capsys):
    assert main(args) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_an_option_of_another_engine_is_set_aside_with_a_note():
    overrides = ["+recipe=lora_t5_11b", "engine=deepspeed", "+engine.options.cpu_offload=true"]  # an fsdp option
    estimate = estimate_memory(compose(overrides), world_size=8)
    assert "cpu_offload" not in estimate.setup["engine_options"]
    assert estimate.setup["engine_options"]["precision"] == "bf16"  # every engine takes the recipe's precision
    assert "set aside engine.options cpu_offload" in estimate.notes[0]
    assert estimate.total < 60 * GIB


def test_the_gpu_benchmark_estimates_every_variant_and_skips_without_cuda(capsys):
    import importlib

    benchmark = importlib.import_module("benchmarks.t5_11b_gpu")  # importing it touches no GPU
    for variant in ("fsdp", "deepspeed-zero2", "deepspeed-zero3", "peft"):
        report = benchmark.estimate(variant)
        assert report["setup"]["micro_batch_size"] == 8 and report["setup"]["input_tokens"] == 512
        assert report["allocated_peak_bytes"] < 40e9, variant  # the run fits a 40 GB GPU
    if not torch.cuda.is_available():
        assert benchmark.main([]) == 0
        assert capsys.readouterr().out.startswith("skipped: benchmarks/t5_11b_gpu.py needs a CUDA GPU")


def test_a_cpu_run_says_how_to_read_the_figures():
    cpu = estimate_memory(compose(["+recipe=lora_t5_tiny"]), world_size=2)
    assert cpu.notes[0].startswith("this run is on the CPU (device=cpu): read each GPU figure as one process's RAM")
    gpu = estimate_memory(compose(["+recipe=lora_t5_tiny", "device=cuda"]), world_size=2)
    assert not any("device=cpu" in note for note in gpu.notes)
