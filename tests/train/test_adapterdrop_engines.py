"""Robust AdapterDrop through the recipe on every CPU engine (2 gloo processes where the engine is distributed).

Each engine row runs, in one pair of processes, on the tiny T5 (2 layers in each stack):

- ``robust_drop=[1, 1]`` (layer 0 dropped at every step) for 3 steps, a checkpoint after each: from the first
  checkpoint to the end the dropped layer's tensors never change (they get no gradient, so weight decay does not
  touch them either), the others train; no unused-parameter error, no hang. DeepSpeed's ZeRO optimizer steps its
  flat partitions whole: a dropped delta has a zero gradient there, which weight decay (and momentum from the steps
  that used it) still moves, so its rows run without decay; with the layer dropped from the first step its Adam
  moments stay zero and it stays put;
- ``robust_drop=[0, 1]`` for 4 steps straight, and for 2 steps then resumed to 4: the resumed run draws the same
  layers and ends with the same delta, bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from opendelta_dist.errors import DeltaConfigError
from opendelta_dist.train.engines import engine_class
from tests.train.distributed import run_distributed
from tests.train.test_tasks import compose_run

BASE = [
    "+recipe=lora_t5_tiny",
    "delta=lora",
    "train.global_batch_size=4",
    "train.eval_every=0",
    "train.eval_batch_size=8",
    "+data.max_eval_rows=8",
    "device=cpu",
    "optim.scheduler=constant",  # the same learning rates in a run stopped early and resumed with more steps
]

#: engine -> (overrides, processes)
ENGINES: dict[str, tuple[list[str], int]] = {
    "single": (["engine=single", "optim.weight_decay=0.1"], 1),
    "ddp": (["engine=ddp", "optim.weight_decay=0.1"], 2),
    "fsdp": (["engine=fsdp", "optim.weight_decay=0.1"], 2),
    "deepspeed2": (["engine=deepspeed", "engine.options.stage=2"], 2),
    "deepspeed3": (["engine=deepspeed", "engine.options.stage=3"], 2),
}


def _runs(engine: list[str], base: str) -> dict[str, dict[str, float]]:
    import torch.distributed as dist

    from opendelta_dist.train.recipe import run

    def go(name: str, *overrides: str) -> dict[str, float]:
        cfg = compose_run([*BASE, *engine, *overrides, f"run_dir={base}/{name}"])
        # every rank checks that run_dir is free before rank 0 writes there: under torchrun the process group
        # only starts after that check; here it is open already, so the ranks start each run together
        dist.barrier()
        return run(OmegaConf.create(cfg))

    results = {}
    dist.init_process_group("gloo")
    try:
        results["three"] = go(
            "three", "delta.robust_drop=[1,1]", "train.max_steps=3", "checkpoint.every=1", "checkpoint.keep_last=3"
        )
        results["straight"] = go("straight", "delta.robust_drop=[0,1]", "train.max_steps=4", "checkpoint.every=2")
        go("resumed", "delta.robust_drop=[0,1]", "train.max_steps=2", "checkpoint.every=2")
        results["resumed"] = go(
            "resumed", "delta.robust_drop=[0,1]", "train.max_steps=4", "checkpoint.every=2", "resume=auto"
        )
        if not engine_class(compose_run([*BASE, *engine])["engine"]["name"]).splits_model:
            # BitFit trains biases in place: a dropped layer's slots give way to the backbone's own per step
            results["bitfit"] = go("bitfit", "delta=bitfit", "delta.robust_drop=[0,1]", "train.max_steps=3")
    finally:
        dist.destroy_process_group()
    return results


def _final(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "final_delta" / "delta_model.safetensors")


@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_robust_adapterdrop_on_every_engine(engine, tmp_path):
    overrides, processes = ENGINES[engine]
    results = run_distributed(_runs, overrides, str(tmp_path), world_size=processes)
    for rank in results:
        assert rank == results[0]  # every rank evaluated the same delta
    one = load_file(tmp_path / "three" / "checkpoints" / "step_00000001" / "delta" / "delta_model.safetensors")
    three = _final(tmp_path / "three")
    assert one.keys() == three.keys()
    bottom = [k for k in one if ".block.0." in k]
    top = [k for k in one if ".block.1." in k]
    assert bottom and top
    for key in bottom:  # dropped at every step: never updated
        assert torch.equal(one[key], three[key]), key
    logged = [json.loads(line) for line in (tmp_path / "three" / "metrics.jsonl").read_text().splitlines()]
    assert [m["dropped_layers"] for m in logged if m["split"] == "train"] == [1.0]  # what each log line reports
    header = (tmp_path / "three" / "train.log").read_text().splitlines()[0]
    assert header.startswith("training lora (robust AdapterDrop of the lowest 1 to 1 layers per step) on "), header
    assert any(not torch.equal(one[key], three[key]) for key in top)
    straight, resumed = _final(tmp_path / "straight"), _final(tmp_path / "resumed")
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    assert results[0]["straight"] == results[0]["resumed"]


def test_robust_adapterdrop_of_in_place_deltas_on_a_sharding_engine_is_refused_before_anything_is_written(tmp_path):
    cfg = compose_run([*BASE, "delta=bitfit", "delta.robust_drop=[0,1]", "engine=fsdp", f"run_dir={tmp_path}/run"])
    results = run_distributed(_refused, cfg, world_size=2)
    for message in results:
        assert "BitFitModel trains parameters in place" in message and "Use leave_out" in message
    assert not (tmp_path / "run").exists()


def _refused(cfg: dict) -> str:
    import torch.distributed as dist

    from opendelta_dist.train.recipe import run

    dist.init_process_group("gloo")
    try:
        run(OmegaConf.create(cfg))
    except DeltaConfigError as error:
        return str(error)
    finally:
        dist.destroy_process_group()
    raise AssertionError("the run was not refused")


def test_an_engine_that_does_not_drop_layers_per_step_refuses_robust_adapterdrop_before_attaching(monkeypatch):
    from opendelta_dist.train.tuning import attach_delta
    from tests.models import build

    monkeypatch.setattr(engine_class("ddp"), "drops_layers_per_step", False)  # an engine plugin may declare so
    model = build("t5")
    with pytest.raises(DeltaConfigError, match=r"not supported on engine=ddp yet; drop layers statically"):
        attach_delta(model, {"delta_type": "lora", "robust_drop": [0, 1]}, "ddp")
    assert all(p.requires_grad for p in model.parameters())  # nothing was attached or frozen


@pytest.mark.parametrize("leave_out", [[], [0]], ids=["every-layer", "leave-out-0"])
def test_with_gradient_checkpointing_backward_stops_at_the_lowest_block_that_trains(leave_out):
    """A checkpointed block recomputes its forward in backward: below the lowest block with a delta, neither
    recomputation nor backward runs (the embeddings' output needs no gradient)."""
    from opendelta_dist import LoraModel
    from opendelta_dist.train.models import ModelConfig, build_model

    cfg = compose_run([*BASE, "model.gradient_checkpointing=true"])
    model = build_model(ModelConfig(**cfg["model"]))
    LoraModel(model, leave_out=leave_out).freeze_module(set_state_dict=False)
    model.train()
    # the self-attention sub-layer: recomputation stops once it has what backward needs, before the block ends
    calls = {name: 0 for name in ("encoder.block.0", "encoder.block.1")}
    for name in calls:
        model.get_submodule(f"{name}.layer.0").register_forward_pre_hook(
            lambda module, args, name=name: calls.__setitem__(name, calls[name] + 1)
        )
    inputs = {"input_ids": torch.randint(3, 100, (2, 6)), "labels": torch.randint(3, 100, (2, 4))}
    model(**inputs).loss.backward()
    # a block that runs backward runs forward twice (once more to recompute)
    assert calls == {"encoder.block.0": 1 if leave_out else 2, "encoder.block.1": 2}
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad and ".block.0." not in n)
