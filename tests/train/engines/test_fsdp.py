"""The fsdp engine: FSDP2 on 2 gloo ranks against the single engine on the whole batch.

Each distributed test is one 2-process run (a few seconds of start-up each); the checks of a run are
grouped by what the brief of the engine asks: (a) the same training as the single engine, (b) only
the trainable parameters get gradients and optimizer state, (c) full gathered tensors and a loading
round trip, (d) a saved training state resumes exactly, (e) a meta-device backbone is materialised.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn
from transformers import T5ForConditionalGeneration

from opendelta_dist import BitFitModel, LoraModel
from opendelta_dist.basemodel import DeltaBase
from opendelta_dist.errors import DeltaCheckpointError, DeltaConfigError
from opendelta_dist.operations import UnfreezeParameter
from opendelta_dist.train.engines.base import Engine, OptimizerSpec
from opendelta_dist.train.engines.fsdp import FSDPEngine, initialise_backbone, transformer_blocks
from opendelta_dist.train.engines.single import SingleEngine
from opendelta_dist.train.topology import Topology
from tests.models import FAMILIES, build
from tests.train.distributed import run_distributed
from tests.train.engines.common import CONFIG, PER_RANK, WORLD, global_batch, micro_batches, random_delta, tiny_t5

SPEC = OptimizerSpec(lr=1e-2, warmup_steps=1, total_steps=6, max_grad_norm=0.5, grad_accum=PER_RANK)
STEPS = 4
SAVE_AFTER = 2  # the training state is saved after this many steps, then training resumes from it
TOL = 1e-5  # fp32 FSDP differs from one process only in summation order
DELTAS = {"lora": LoraModel, "bitfit": BitFitModel}
CPU = Topology(0, 1, 0, torch.device("cpu"))
# BitFit's self-attention key biases have an analytically zero gradient (a bias added to every key shifts
# all scores of a query alike, which the softmax ignores): what they get is rounding noise (~1e-9) that
# depends on the summation order, and Adam turns it into full steps. They are compared loosely.
NOISE_ONLY = ("SelfAttention.k.bias",)


def build_model(kind: str = "lora", meta: bool = False) -> tuple[T5ForConditionalGeneration, DeltaBase]:
    """The tiny T5 with a frozen backbone and a delta (the same weights on every call unless on meta)."""
    model = tiny_t5(meta)
    delta = DELTAS[kind](model)
    delta.freeze_module()
    return model, delta


# ----------------------------------------------------------------- workers (one process per rank)


def _setup() -> Topology:
    topology = Topology.from_environment("cpu")
    topology.init_process_group()
    return topology


def _train(engine: FSDPEngine, first: int, last: int, checks: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Optimizer steps ``first..last-1``: per step this rank's micro-batch losses, the norm and the lr.

    With ``checks``, record after the first step's backward which parameters hold gradients.
    """
    rank = dist.get_rank()
    records = []
    for step in range(first, last):
        batches = micro_batches(step, rank)
        losses = [float(engine.micro_step(b, last=i == len(batches) - 1)) for i, b in enumerate(batches)]
        if checks is not None and step == first:
            named = list(engine.module.named_parameters())
            checks["frozen_with_grad"] = [n for n, p in named if not p.requires_grad and p.grad is not None]
            checks["trainable_without_grad"] = [n for n, p in named if p.requires_grad and p.grad is None]
        lr = engine.lr()
        records.append({"losses": losses, "norm": engine.optimizer_step(), "lr": lr})
    return records


def fsdp_worker(kind: str, directory: str) -> dict[str, Any]:
    """Train with a save midway, resume in a fresh engine, then load a delta into it."""
    from torch.distributed.tensor import DTensor

    topology = _setup()
    model, delta = build_model(kind)
    unfrozen_ops = [op for op in delta._operations if isinstance(op, UnfreezeParameter)]
    engine = FSDPEngine(topology)
    engine.prepare(model, delta, SPEC)
    held = engine.optimized_parameters()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(held) == len({id(p) for p in held})
    named = dict(delta.named_delta_tensors())
    out: dict[str, Any] = {
        "unfrozen_ops": len(unfrozen_ops),
        "optimizer_holds_trainable": {id(p) for p in held} == {id(p) for p in trainable},
        "delta_is_live": {id(p) for p in named.values()} == {id(p) for p in held},
        "all_dtensors": all(isinstance(p, DTensor) for p in model.parameters()),
        "holders_live": all(op.parameter is op.target._parameters[op.param_name] for op in unfrozen_ops),
        "local": {k: tuple(p.to_local().shape) for k, p in named.items()},
        "checks": {},
    }
    out["records"] = _train(engine, 0, SAVE_AFTER, out["checks"])
    engine.save_training_state(Path(directory))
    out["saved"] = engine.gather_delta(delta)
    out["records"] += _train(engine, SAVE_AFTER, STEPS)
    out["final"] = engine.gather_delta(delta)
    engine.close()

    # (d) a fresh engine resumes from the saved delta and training state; (c) then loads another delta
    model, delta = build_model(kind)
    engine = FSDPEngine(topology)
    engine.prepare(model, delta, SPEC)
    engine.load_delta(delta, out["saved"])
    out["reloaded"] = engine.gather_delta(delta)
    engine.load_training_state(Path(directory))
    out["resumed_records"] = _train(engine, SAVE_AFTER, STEPS)
    out["resumed_final"] = engine.gather_delta(delta)
    engine.load_delta(delta, random_delta(delta))
    out["after_load"] = engine.gather_delta(delta)
    try:
        engine.load_delta(delta, {k: v[:1] for k, v in out["saved"].items()})
    except DeltaCheckpointError as exc:
        out["bad_load"] = str(exc)
    engine.close()
    topology.destroy_process_group()
    return out


def meta_worker(options: dict[str, Any]) -> dict[str, Any]:
    """Build on meta, shard, materialise, train two steps (with the engine options given)."""
    topology = _setup()
    model, delta = build_model("lora", meta=True)
    engine = FSDPEngine(topology, **options)
    engine.prepare(model, delta, SPEC)
    tensors = engine.gather_delta(delta)
    weight = model.encoder.block[0].layer[0].SelfAttention.q.weight.full_tensor()
    out = {
        "meta_left": [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta],
        "tied": model.lm_head.weight is model.shared.weight,
        "q_std": float(weight.std()),
        "delta": tensors,
        "records": _train(engine, 0, 2),
        "final": engine.gather_delta(delta),
    }
    engine.close()
    topology.destroy_process_group()
    return out


# ----------------------------------------------------------------- the reference (this process)


def single_engine_run(kind: str, steps: int) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
    """The single engine on the whole global batch of each step, in one micro-batch."""
    model, delta = build_model(kind)
    engine = SingleEngine(CPU)
    engine.prepare(model, delta, dataclasses.replace(SPEC, grad_accum=1))
    return whole_batch_steps(engine, 0, steps), engine.gather_delta(delta)


def whole_batch_steps(engine: Engine, first: int, last: int) -> list[dict[str, Any]]:
    """Optimizer steps ``first..last-1`` in this process, each on the whole global batch in one micro-batch."""
    records = []
    for step in range(first, last):
        loss = float(engine.micro_step(global_batch(step), last=True))
        lr = engine.lr()
        records.append({"loss": loss, "norm": engine.optimizer_step(), "lr": lr})
    return records


def mean_losses(records: list[list[dict[str, Any]]]) -> list[float]:
    """The global batch's mean loss per step, from every rank's micro-batch losses (all the same size)."""
    return [sum(sum(r["losses"]) for r in step) / (WORLD * PER_RANK) for step in zip(*records)]


def assert_tensors_close(actual: dict, expected: dict, tol: float, noise_only: tuple[str, ...] = ()) -> None:
    """Every tensor within ``tol``; those whose key ends with one of ``noise_only`` within the steps Adam
    can take on a gradient of pure rounding noise (at most about ``lr`` per step)."""
    assert actual.keys() == expected.keys()
    for key in expected:
        assert actual[key].shape == expected[key].shape, key
        atol = STEPS * SPEC.lr if key.endswith(noise_only) else tol
        torch.testing.assert_close(actual[key], expected[key], atol=atol, rtol=tol, msg=key)


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(DELTAS))
def test_fsdp_matches_single_engine(kind: str, tmp_path: Path) -> None:
    """(a) losses, norms, lrs and the final delta of the single engine on the whole batch (within 1e-5,
    see NOISE_ONLY for the exception);
    (b) gradients and optimizer state for the trainable parameters only; (c) full gathered tensors
    and an exact load round trip; (d) a saved training state resumes bit for bit.

    BitFit on T5 unfreezes the empty bias slots of every linear layer in place (UnfreezeParameter)
    and adds a bias module after the RMS norms, so it covers both kinds of delta parameters.
    """
    ref_records, ref_final = single_engine_run(kind, STEPS)
    full_shapes = {k: tuple(p.shape) for k, p in build_model(kind)[1].named_delta_tensors()}
    results = run_distributed(fsdp_worker, kind, str(tmp_path), world_size=WORLD)
    for out in results:
        assert (out["unfrozen_ops"] > 0) == (kind == "bitfit")
        # (b)
        assert out["optimizer_holds_trainable"] and out["delta_is_live"] and out["holders_live"]
        assert out["all_dtensors"]
        assert out["checks"] == {"frozen_with_grad": [], "trainable_without_grad": []}
        # (c) full shapes (not the local shards, which are smaller), on CPU, and loading is exact
        assert any(out["local"][k] != s for k, s in full_shapes.items())
        for name in ("saved", "final", "reloaded", "resumed_final", "after_load"):
            assert {k: tuple(v.shape) for k, v in out[name].items()} == full_shapes
            assert all(v.device.type == "cpu" and v.dtype == torch.float32 for v in out[name].values())
        assert_tensors_close(out["reloaded"], out["saved"], 0)
        assert_tensors_close(out["after_load"], random_delta(build_model(kind)[1]), 0)
        assert "has shape" in out["bad_load"]
        # (a) the schedule, the norms before clipping (clipping to 0.5 is active), the delta
        assert [r["lr"] for r in out["records"]] == pytest.approx([r["lr"] for r in ref_records], rel=1e-12)
        assert [r["norm"] for r in out["records"]] == pytest.approx([r["norm"] for r in ref_records], rel=TOL)
        assert any(r["norm"] > SPEC.max_grad_norm for r in ref_records)
        assert_tensors_close(out["final"], ref_final, TOL, noise_only=NOISE_ONLY)
        # (d)
        assert out["resumed_records"] == out["records"][SAVE_AFTER:]
        assert_tensors_close(out["resumed_final"], out["final"], 0)
    assert mean_losses([r["records"] for r in results]) == pytest.approx([r["loss"] for r in ref_records], rel=TOL)
    for key, value in results[0]["final"].items():
        assert torch.equal(value, results[1]["final"][key])

    # the delta and training state saved by 2 ranks resume in 1 process (on the whole batches)
    model, delta = build_model(kind)
    engine = FSDPEngine(CPU)
    engine.prepare(model, delta, dataclasses.replace(SPEC, grad_accum=1))
    try:
        engine.load_delta(delta, results[0]["saved"])
        engine.load_training_state(tmp_path)
        records = whole_batch_steps(engine, SAVE_AFTER, STEPS)
        assert [r["norm"] for r in records] == pytest.approx([r["norm"] for r in ref_records[SAVE_AFTER:]], rel=TOL)
        assert_tensors_close(engine.gather_delta(delta), results[0]["final"], TOL, noise_only=NOISE_ONLY)
    finally:
        engine.close()


@pytest.mark.slow
def test_meta_device_backbone_is_materialised() -> None:
    """(e) A LoRA T5 built on meta is sharded, allocated and initialised on every rank, and trains.

    The run also uses the non-default options: parameters kept gathered after forward, CPU offload.
    """
    results = run_distributed(meta_worker, {"reshard_after_forward": False, "cpu_offload": True}, world_size=WORLD)
    d_model = 32
    for out in results:
        assert out["meta_left"] == [] and out["tied"]
        assert out["q_std"] == pytest.approx((d_model * 8) ** -0.5, rel=0.3)  # T5's init of q
        for key, value in out["delta"].items():
            if key.endswith("lora_B"):
                assert torch.equal(value, torch.zeros_like(value))
            else:  # Kaiming-uniform with a=sqrt(5): within 1/sqrt(fan_in), not all zero
                assert value.abs().max() <= d_model**-0.5 and value.abs().max() > 0
        assert all(math.isfinite(loss) for r in out["records"] for loss in r["losses"])
        assert any(not torch.equal(out["final"][k], v) for k, v in out["delta"].items())
    for key, value in results[0]["final"].items():
        assert torch.equal(value, results[1]["final"][key])


# ----------------------------------------------------------------- fast checks (one process)


def test_blocks_are_the_repeated_layers() -> None:
    model, _ = build_model("lora")
    names = {id(m): n for n, m in model.named_modules()}
    assert [names[id(b)] for b in transformer_blocks(model)] == [
        "encoder.block.0",
        "encoder.block.1",
        "decoder.block.0",
        "decoder.block.1",
    ]
    stack = nn.Sequential(nn.ModuleList([nn.Linear(2, 2), nn.ReLU()]), nn.ModuleList([nn.Linear(2, 2)] * 1))
    assert transformer_blocks(stack) == [stack[1][0]]  # distinct classes are not a stack; one layer is


@pytest.mark.parametrize("family", list(FAMILIES))
def test_blocks_of_every_family(family: str) -> None:
    model = build(family)
    names = {id(m): n for n, m in model.named_modules()}
    blocks = [names[id(b)] for b in transformer_blocks(model)]
    assert len(blocks) == (4 if FAMILIES[family].seq2seq else 2)
    assert all(n.rpartition(".")[2].isdigit() for n in blocks)


def test_one_process_matches_single_engine() -> None:
    """With one process the engine opens (and closes) a process group of its own and trains as ``single``."""
    ref_records, ref_final = single_engine_run("lora", 2)
    model, delta = build_model("lora")
    engine = FSDPEngine(CPU)
    engine.prepare(model, delta, dataclasses.replace(SPEC, grad_accum=1))
    try:
        records = whole_batch_steps(engine, 0, 2)
        assert [r["loss"] for r in records] == pytest.approx([r["loss"] for r in ref_records], rel=TOL)
        assert [r["norm"] for r in records] == pytest.approx([r["norm"] for r in ref_records], rel=TOL)
        assert_tensors_close(engine.gather_delta(delta), ref_final, TOL)
    finally:
        engine.close()
    assert not dist.is_initialized()


def test_bf16_precision_keeps_fp32_shards() -> None:
    """bf16 computes in bf16, the sharded parameters (and so the gathered delta) stay fp32."""
    model, delta = build_model("lora")
    engine = FSDPEngine(CPU, precision="bf16")
    engine.prepare(model, delta, dataclasses.replace(SPEC, grad_accum=1))
    try:
        loss = engine.micro_step(global_batch(0), last=True)
        assert torch.isfinite(loss)
        assert engine.optimizer_step() > 0
        assert {v.dtype for v in engine.gather_delta(delta).values()} == {torch.float32}
    finally:
        engine.close()


@pytest.mark.filterwarnings("ignore:DTensor random operators may not have complete support on cpu")
def test_meta_bitfit_starts_from_zero_biases() -> None:
    """BitFit on T5 fills empty bias slots and adds biases after the norms: both start at zero, also on meta."""
    model, delta = build_model("bitfit", meta=True)
    engine = FSDPEngine(CPU)
    engine.prepare(model, delta, dataclasses.replace(SPEC, grad_accum=1))
    try:
        assert all(torch.equal(v, torch.zeros_like(v)) for v in engine.gather_delta(delta).values())
        assert math.isfinite(whole_batch_steps(engine, 0, 1)[0]["loss"])
    finally:
        engine.close()


def test_other_backbones_are_initialised_by_reset_parameters() -> None:
    stack = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    with torch.no_grad():
        for p in stack.parameters():
            p.fill_(7.0)
    initialise_backbone(stack)
    assert not (stack[0].weight == 7.0).any() and torch.equal(stack[1].weight, torch.ones(4))


def test_meta_backbone_with_copied_parameters_is_refused() -> None:
    model, _ = build_model("lora", meta=True)
    delta = LoraModel(model, unfrozen_modules=["deltas", "lm_head"])  # lm_head.weight: a trainable copy
    delta.freeze_module()
    with pytest.raises(DeltaConfigError, match=r"copies of backbone parameters \(lm_head.weight\).*meta device"):
        FSDPEngine(CPU).prepare(model, delta, SPEC)
    assert not dist.is_initialized()


def test_unknown_precision_is_refused() -> None:
    with pytest.raises(DeltaConfigError, match=r"engine.options.precision='fp8': the fsdp engine computes in bf16"):
        FSDPEngine(CPU, precision="fp8")


def test_missing_training_state_is_reported(tmp_path: Path) -> None:
    model, delta = build_model("lora")
    engine = FSDPEngine(CPU)
    engine.prepare(model, delta, SPEC)
    try:
        with pytest.raises(DeltaCheckpointError, match="no FSDP training state"):
            engine.load_training_state(tmp_path)
    finally:
        engine.close()


def pretrained_worker(checkpoint: str) -> dict[str, Any]:
    """A backbone built on meta from a checkpoint's config, sharded, then filled from rank 0's copy."""
    from opendelta_dist.train.models import ModelConfig
    from opendelta_dist.train.models import build_model as build_backbone

    topology = Topology.from_environment("cpu")
    topology.init_process_group()
    cfg = ModelConfig(name_or_path=checkpoint, init_device="meta")
    model = build_backbone(cfg)
    delta = LoraModel(model)
    delta.freeze_module()
    engine = FSDPEngine(topology)
    engine.prepare(model, delta, OptimizerSpec())
    engine.load_pretrained(lambda: build_backbone(dataclasses.replace(cfg, init_device="cpu")).state_dict())
    full = {n: p.full_tensor().clone() for n, p in engine.module.named_parameters()}
    engine.close()
    topology.destroy_process_group()
    return {k: v for k, v in full.items() if "lora" not in k or k.endswith("lora_B")}


def test_pretrained_weights_fill_a_meta_built_sharded_backbone(tmp_path: Path) -> None:
    torch.manual_seed(3)
    reference = T5ForConditionalGeneration(CONFIG)
    reference.save_pretrained(tmp_path / "ckpt")
    results = run_distributed(pretrained_worker, str(tmp_path / "ckpt"), world_size=WORLD)
    expected = reference.state_dict()
    for rank_result in results:
        for name, value in rank_result.items():
            if name.endswith("lora_B"):
                assert torch.equal(value, torch.zeros_like(value))  # the delta keeps its own initialisation
            else:
                assert torch.equal(value, expected[name]), name
