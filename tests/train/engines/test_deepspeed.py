"""The deepspeed engine: ZeRO 2/3 on 2 gloo ranks against the single engine on the whole batch.

DeepSpeed compiles ``deepspeed_shm_comm`` (~50 s) and, for optimizer offload, ``cpu_adam`` (~60 s)
the first time they are used, into ``TORCH_EXTENSIONS_DIR``: the set-up compiles both into
``.venv/torch_extensions`` and ``scripts/test.sh`` names it (run outside it, the tests default to
``~/.cache/opendelta_dist/torch_extensions``, so that happens once per machine). On 2 CPU cores the
file takes about a minute with the ops compiled, three minutes without.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from transformers import T5ForConditionalGeneration

from opendelta_dist import LoraModel
from opendelta_dist.errors import BackendUnavailableError, DeltaConfigError
from opendelta_dist.train.engines.base import OptimizerSpec
from opendelta_dist.train.engines.deepspeed import DeepSpeedEngine
from opendelta_dist.train.engines.single import SingleEngine
from opendelta_dist.train.topology import Topology
from tests.train.distributed import run_distributed
from tests.train.engines.common import PER_RANK, WORLD, global_batch, micro_batches, random_delta, tiny_t5

SPEC = OptimizerSpec(lr=1e-2, warmup_steps=0, total_steps=6, max_grad_norm=0.5, grad_accum=PER_RANK)
STEPS = 4
SAVE_AFTER = 2  # the training state is saved after this many steps, then training resumes from it
NO_PERSISTENCE = {"zero_optimization": {"stage3_param_persistence_threshold": 0}}  # partition even tiny tensors
# a delta tensor the optimizer does not own (frozen by the user) in the run that loads a delta
FROZEN_KEY = "encoder.block.0.layer.0.SelfAttention.q.lora.lora_A"

CASES = {
    "zero2": dict(stage=2),
    "zero3": dict(stage=3, extra_config=NO_PERSISTENCE),
    "zero3-persistent": dict(stage=3),  # DeepSpeed's default: tensors under 1e5 values stay whole after a forward
    "zero3-offload": dict(stage=3, offload_optimizer=True, offload_params=True, extra_config=NO_PERSISTENCE),
    "zero2-bf16": dict(stage=2, precision="bf16"),
}

needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed")


def build_model(frozen: tuple[str, ...] = ()) -> tuple[T5ForConditionalGeneration, LoraModel]:
    """The tiny T5 with a frozen backbone and LoRA on q and v (the same weights on every call).

    Args:
        frozen: delta tensors to freeze too.
    """
    model = tiny_t5()
    delta = LoraModel(backbone_model=model)
    delta.freeze_module()
    tensors = dict(delta.named_delta_tensors())
    for key in frozen:
        tensors[key].requires_grad_(False)
    return model, delta


# ----------------------------------------------------------------- workers (one process per rank)


def _setup() -> Topology:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "opendelta_dist" / "torch_extensions"))
    topology = Topology.from_environment("cpu")
    topology.init_process_group()
    return topology


def _train(engine: DeepSpeedEngine, first: int, last: int) -> list[dict[str, Any]]:
    """Optimizer steps ``first..last-1``; per step this rank's micro-batch losses, the norm and the lr."""
    rank = dist.get_rank()
    records = []
    for step in range(first, last):
        batches = micro_batches(step, rank)
        losses = [float(engine.micro_step(b, last=i == len(batches) - 1)) for i, b in enumerate(batches)]
        lr = engine.lr()
        records.append({"losses": losses, "norm": engine.optimizer_step(), "lr": lr})
    return records


def _shapes(delta: LoraModel) -> dict[str, Any]:
    """What the module holds locally and what gather_delta gives (checks (b))."""
    return {
        "local": {k: tuple(p.shape) for k, p in delta.named_delta_tensors()},
        "full": {
            k: tuple(p.ds_shape) if hasattr(p, "ds_shape") else tuple(p.shape) for k, p in delta.named_delta_tensors()
        },
    }


def deepspeed_worker(options: dict[str, Any], directory: str) -> dict[str, Any]:
    """Train, save the training state midway, resume it in a fresh engine, and load a delta into a third."""
    topology = _setup()
    model, delta = build_model()
    engine = DeepSpeedEngine(topology, **options)
    engine.prepare(model, delta, SPEC)
    optimized = {id(p) for p in engine.optimized_parameters()}
    out: dict[str, Any] = {
        "optimizer_holds_trainable": optimized == {id(p) for p in model.parameters() if p.requires_grad}
        and len(engine.optimized_parameters()) == len(optimized),
        "delta_is_trainable": optimized == {id(p) for _, p in delta.named_delta_tensors()},
    }
    out["records"] = _train(engine, 0, SAVE_AFTER)
    engine.save_training_state(Path(directory))
    out["saved"] = engine.gather_delta(delta)
    out["shapes"] = _shapes(delta)
    out["records"] += _train(engine, SAVE_AFTER, STEPS)
    out["final"] = engine.gather_delta(delta)
    out["eval_loss"] = float(engine.eval_forward(global_batch(STEPS)).loss)
    engine.close()
    out["state_bytes"] = sum(f.stat().st_size for f in (Path(directory) / "engine").iterdir())

    # (c) a fresh engine resumes from the saved delta and training state
    model, delta = build_model()
    engine = DeepSpeedEngine(topology, **options)
    engine.prepare(model, delta, SPEC)
    engine.load_delta(delta, out["saved"])
    engine.load_training_state(Path(directory))
    out["resumed_records"] = _train(engine, SAVE_AFTER, STEPS)
    out["resumed_final"] = engine.gather_delta(delta)
    engine.close()

    # (d) a delta loaded into a fresh engine is where training starts from
    model, delta = build_model(frozen=(FROZEN_KEY,))
    loaded = random_delta(delta)  # before stage 3 partitions the parameters
    engine = DeepSpeedEngine(topology, **options)
    engine.prepare(model, delta, SPEC)
    engine.load_delta(delta, loaded)
    out["after_load"] = engine.gather_delta(delta)
    out["loaded_records"] = _train(engine, 0, SAVE_AFTER)
    out["loaded_final"] = engine.gather_delta(delta)
    engine.close()
    topology.destroy_process_group()
    return out


def one_process_worker() -> dict[str, Any]:
    """One process: the engine opens a process group of its own, and the global batch is accumulated."""
    topology = _setup()
    model, delta = build_model()
    engine = DeepSpeedEngine(topology, stage=2)
    engine.prepare(model, delta, dataclasses.replace(SPEC, grad_accum=WORLD * PER_RANK))
    losses = []
    for step in range(STEPS):
        batches = [b for rank in range(WORLD) for b in micro_batches(step, rank)]
        losses.append([float(engine.micro_step(b, last=i == len(batches) - 1)) for i, b in enumerate(batches)])
        engine.optimizer_step()
    final = engine.gather_delta(delta)
    engine.close()
    return {"losses": losses, "final": final, "group_left": not dist.is_initialized()}


# ----------------------------------------------------------------- the reference (this process)


def single_engine_run(start: dict[str, torch.Tensor] | None, steps: int, frozen: tuple[str, ...] = ()) -> dict:
    """The single engine on the whole global batch of each step, in one micro-batch; then an evaluation."""
    model, delta = build_model(frozen)
    engine = SingleEngine(Topology(0, 1, 0, torch.device("cpu")))
    engine.prepare(model, delta, dataclasses.replace(SPEC, grad_accum=1))
    if start is not None:
        engine.load_delta(delta, start)
    records = []
    for step in range(steps):
        loss = float(engine.micro_step(global_batch(step), last=True))
        lr = engine.lr()
        records.append({"loss": loss, "norm": engine.optimizer_step(), "lr": lr})
    return {
        "records": records,
        "final": engine.gather_delta(delta),
        "eval_loss": float(engine.eval_forward(global_batch(steps)).loss),
    }


def mean_losses(per_rank: list[dict[str, Any]], key: str) -> list[float]:
    """The global batch's mean loss per step, from every rank's micro-batch losses (all the same size)."""
    steps = zip(*(r[key] for r in per_rank))
    return [sum(sum(rec["losses"]) for rec in step) / (WORLD * PER_RANK) for step in steps]


def assert_deltas_close(actual: dict, expected: dict, atol: float, rtol: float) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        assert actual[key].shape == expected[key].shape, key
        torch.testing.assert_close(actual[key], expected[key], atol=atol, rtol=rtol, msg=key)


@pytest.fixture(scope="module")
def reference() -> dict[str, Any]:
    run = single_engine_run(None, STEPS)
    loaded = random_delta(build_model()[1])
    from_loaded = single_engine_run(loaded, SAVE_AFTER, frozen=(FROZEN_KEY,))
    model, _ = build_model()
    return {
        **run,
        "loaded": loaded,
        "loaded_records": from_loaded["records"],
        "loaded_final": from_loaded["final"],
        "backbone_numel": sum(p.numel() for p in model.parameters() if not p.requires_grad),
    }


@pytest.mark.slow
@needs_deepspeed
@pytest.mark.parametrize("case", list(CASES))
def test_deepspeed_matches_single_engine(case: str, reference: dict[str, Any], tmp_path: Path) -> None:
    """(a) the losses, norms, lrs and delta of the single engine on the whole batch; (b) full gathered
    shapes; (c) a saved and loaded training state continues exactly; (d) a loaded delta is the start.

    Tolerances against the single engine: fp32 ZeRO differs only in summation order (measured
    2e-7), so 1e-5. bf16 computes in bf16: losses within 1%, norms within 5%, and the delta is not
    compared (Adam turns the bf16 noise of tiny gradients into whole steps). A resume repeats the
    run bit for bit, except with DeepSpeedCPUAdam (optimizer offload): it computes beta**step as a
    running float product, and with ``pow`` after a resume (1e-7 apart).
    """
    results = run_distributed(deepspeed_worker, CASES[case], str(tmp_path), world_size=WORLD)
    bf16 = CASES[case].get("precision") == "bf16"
    loss_tol, norm_tol = (1e-2, 5e-2) if bf16 else (1e-5, 1e-4)
    cpu_adam = CASES[case].get("offload_optimizer", False)
    ref = reference
    for out in results:
        assert out["optimizer_holds_trainable"] and out["delta_is_trainable"]
        assert out["state_bytes"] < 4 * ref["backbone_numel"]  # the frozen backbone is not in the training state
        # (b) full CPU tensors from gather_delta: fp32 masters, or the module's own dtype for a tensor
        # the optimizer does not own; [0]-shaped placeholders in the stage 3 module
        for name in ("saved", "final", "after_load", "loaded_final"):
            tensors = out[name]
            assert {k: tuple(v.shape) for k, v in tensors.items()} == out["shapes"]["full"]
            for key, value in tensors.items():
                frozen = key == FROZEN_KEY and name in ("after_load", "loaded_final")
                assert value.device.type == "cpu"
                assert value.dtype == (torch.bfloat16 if bf16 and frozen else torch.float32)
        if CASES[case].get("extra_config") == NO_PERSISTENCE:
            assert all(s == (0,) for s in out["shapes"]["local"].values())
        # (a) the schedule, the norms before clipping (clipping to 0.5 is active), the delta
        assert [r["lr"] for r in out["records"]] == pytest.approx([r["lr"] for r in ref["records"]], rel=1e-12)
        assert [r["norm"] for r in out["records"]] == pytest.approx([r["norm"] for r in ref["records"]], rel=norm_tol)
        assert out["eval_loss"] == pytest.approx(ref["eval_loss"], rel=loss_tol)
        if not bf16:
            assert_deltas_close(out["final"], ref["final"], 1e-5, 1e-5)
            assert_deltas_close(out["loaded_final"], ref["loaded_final"], 1e-5, 1e-5)
        # (c) resuming repeats the original run's last steps
        if cpu_adam:
            for resumed, original in zip(out["resumed_records"], out["records"][SAVE_AFTER:], strict=True):
                assert resumed["losses"] == pytest.approx(original["losses"], rel=1e-6)
            assert_deltas_close(out["resumed_final"], out["final"], 1e-6, 1e-6)
        else:
            assert out["resumed_records"] == out["records"][SAVE_AFTER:]
            assert_deltas_close(out["resumed_final"], out["final"], 0, 0)
        # (d) the loaded delta, exactly (fp32 masters included: the steps from it match the reference)
        loaded = dict(ref["loaded"])
        if bf16:  # the module holds it in bf16 and the optimizer has no master of it
            loaded[FROZEN_KEY] = loaded[FROZEN_KEY].to(torch.bfloat16)
        assert_deltas_close(out["after_load"], loaded, 0, 0)
        assert torch.equal(out["loaded_final"][FROZEN_KEY], loaded[FROZEN_KEY])
    for key in ("records", "loaded_records"):
        expected = [r["loss"] for r in ref[key]]
        assert mean_losses(results, key) == pytest.approx(expected, rel=loss_tol)
    for key in results[0]["final"]:
        assert torch.equal(results[0]["final"][key], results[1]["final"][key])


@pytest.mark.slow
@needs_deepspeed
def test_one_process(reference: dict[str, Any]) -> None:
    """Without torchrun the engine joins a one-process group itself (and leaves it on close)."""
    (out,) = run_distributed(one_process_worker, world_size=1)
    assert out["group_left"]
    assert [sum(losses) / len(losses) for losses in out["losses"]] == pytest.approx(
        [r["loss"] for r in reference["records"]], rel=1e-5
    )
    assert_deltas_close(out["final"], reference["final"], 1e-5, 1e-5)


# ----------------------------------------------------------------- fast checks (no process group)


def test_config_from_options_and_spec() -> None:
    engine = DeepSpeedEngine(
        Topology(0, 1, 0, torch.device("cpu")),
        stage=3,
        offload_optimizer=True,
        offload_params=True,
        precision="bf16",
        extra_config={"zero_optimization": {"stage3_param_persistence_threshold": 0}, "steps_per_print": 5},
    )
    config = engine.ds_config(dataclasses.replace(SPEC, max_grad_norm=None, grad_accum=4))
    assert config["gradient_accumulation_steps"] == 4
    assert config["gradient_clipping"] == 0.0
    assert config["bf16"] == {"enabled": True}
    assert config["steps_per_print"] == 5
    assert config["zero_optimization"] == {
        "stage": 3,
        "offload_optimizer": {"device": "cpu"},
        "offload_param": {"device": "cpu"},
        "stage3_param_persistence_threshold": 0,
    }
    assert "zero_force_ds_cpu_optimizer" not in config  # AdamW offloads as DeepSpeedCPUAdam
    assert engine.ds_config(dataclasses.replace(SPEC, name="sgd"))["zero_force_ds_cpu_optimizer"] is False


@pytest.mark.parametrize("options", [dict(stage=1), dict(stage=2, offload_params=True)])
def test_unsupported_options_are_refused(options: dict[str, Any]) -> None:
    with pytest.raises(DeltaConfigError, match="stage"):
        DeepSpeedEngine(Topology(0, 1, 0, torch.device("cpu")), **options)


def test_missing_deepspeed_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # makes `import deepspeed` fail
    model, delta = build_model()
    engine = DeepSpeedEngine(Topology(0, 1, 0, torch.device("cpu")))
    with pytest.raises(BackendUnavailableError, match=r"pip install 'opendelta-dist\[deepspeed\]'"):
        engine.prepare(model, delta, SPEC)
