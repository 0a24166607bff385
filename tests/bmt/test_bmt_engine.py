"""The bmt engine on one GPU against the single engine on the same GPU: the tiny recipe, LoRA, 12 steps.

Both runs are one process with the same batches and seed, so they differ only by the engine: ModelCenter's T5
in BMTrain blocks with BMTrain's Adam, against transformers' T5 with torch's AdamW (fp32 both: BMTrain's fp32
Adam is torch's functional Adam, equal to AdamW without weight decay). Both draw the backbone and then the delta
from the GPU's generator (``model.init_device=cuda``): the bmt backend makes its parameters on the GPU, where the
single engine's LoRA would otherwise be drawn on the CPU, from another generator. Loss curves agree within 1e-3
relative (the two T5 implementations sum in other orders); the delta the bmt engine saves, under transformers'
names, loads on a transformers T5 with the logits of the single engine's delta within 1e-3.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from opendelta_dist import AutoDeltaModel
from tests.bmt.common import needs_bmt
from tests.bmt.emulated_cuda import EMULATION_ENV
from tests.models import batch
from tests.train.launch import ROOT, check, launch, metrics

pytestmark = [pytest.mark.gpu, pytest.mark.slow, needs_bmt]
ROLES = "[attn.q,attn.k,attn.v,attn.proj,crossattn.q,crossattn.k,crossattn.v,crossattn.proj,ff.w1,ff.w2]"
RUN = [
    "+recipe=lora_t5_tiny",
    "device=cuda",
    "model.init_device=cuda",  # both engines draw the backbone and the delta from the GPU's generator
    "train.max_steps=12",
    "train.log_every=1",
    "train.eval_every=0",
    "checkpoint.every=6",
    "delta.common_structure=true",
    f"delta.modified_modules={ROLES}",
]


def _tiny_t5():
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from opendelta_dist.train.models import ModelConfig, build_model

    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "configs")):
        cfg = OmegaConf.to_container(compose("config", overrides=["+recipe=lora_t5_tiny"]), resolve=True)
    torch.manual_seed(cfg["seed"])
    return build_model(ModelConfig(**cfg["model"])).eval()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    out = {}
    for engine in ("single", "bmt"):
        run_dir = tmp_path_factory.mktemp(engine) / "run"
        check(launch([*RUN, f"engine={engine}", f"run_dir={run_dir}"], nproc=1))
        out[engine] = run_dir
    return out


def test_bmt_follows_the_single_engine_and_its_delta_loads_on_transformers(runs):
    ours, ref = [r["loss"] for r in metrics(runs["bmt"])], [r["loss"] for r in metrics(runs["single"])]
    assert len(ours) == 12 and ours[-1] < ours[0]
    assert ours == pytest.approx(ref, rel=1e-3)
    saved, ref_saved = (load_file(runs[e] / "final_delta" / "delta_model.safetensors") for e in ("bmt", "single"))
    assert saved.keys() == ref_saved.keys()  # transformers' names
    inputs = {k: v for k, v in batch("t5").items() if k != "labels"}
    inputs["decoder_input_ids"] = torch.tensor([[0, 5, 9], [0, 7, 3]])
    logits = {}
    for engine in ("bmt", "single"):
        model = _tiny_t5()
        AutoDeltaModel.from_finetuned(runs[engine] / "final_delta", model, check_hash=False)
        with torch.no_grad():
            logits[engine] = model(**inputs).logits
    torch.testing.assert_close(logits["bmt"], logits["single"], rtol=1e-3, atol=1e-3)


@pytest.mark.emulated
def test_a_killed_bmt_run_resumes_from_its_last_checkpoint(runs, tmp_path):
    from opendelta_dist.train.recipe import FAIL_AT_STEP_ENV, FAIL_RANK_ENV

    run_dir = tmp_path / "run"
    result = launch(
        [*RUN, "engine=bmt", "resume=auto", f"run_dir={run_dir}"],
        nproc=1,
        env={FAIL_AT_STEP_ENV: "9", FAIL_RANK_ENV: "0"},
        max_restarts=1,
    )
    check(result)
    assert "resumed from" in result.stdout and "step_00000006" in result.stdout
    ours, ref = (load_file(d / "final_delta" / "delta_model.safetensors") for d in (run_dir, runs["bmt"]))
    for key, value in ref.items():
        torch.testing.assert_close(ours[key], value, rtol=0, atol=1e-5)


def test_robust_adapterdrop_bypasses_the_lowest_blocks_deltas_on_every_rank(tmp_path):
    """Robust AdapterDrop on the bmt engine: layer 0 dropped at every step (``robust_drop=[1, 1]``). Its blocks run
    no backward, so BMTrain's gradient hooks there never fire; its deltas never change, those above train, every
    rank steps alike (2 ranks under the emulation, every GPU of the machine up to 2 on GPUs)."""
    emulated = os.environ.get(EMULATION_ENV) == "1"
    nproc = 2 if emulated else min(2, torch.cuda.device_count())
    run_dir = tmp_path / "run"
    overrides = [*RUN, "engine=bmt", "train.max_steps=3", "checkpoint.every=1", "checkpoint.keep_last=3"]
    check(launch([*overrides, "delta.robust_drop=[1,1]", "optim.weight_decay=0.1", f"run_dir={run_dir}"], nproc=nproc))
    assert [r["dropped_layers"] for r in metrics(run_dir)] == [1.0, 1.0, 1.0]
    first = load_file(run_dir / "checkpoints" / "step_00000001" / "delta" / "delta_model.safetensors")
    last = load_file(run_dir / "final_delta" / "delta_model.safetensors")
    bottom = [k for k in first if ".block.0." in k]
    assert bottom and first.keys() == last.keys()
    assert all(torch.equal(first[k], last[k]) for k in bottom)
    assert any(not torch.equal(first[k], last[k]) for k in first if k not in bottom)


def test_frozen_blocks_keep_no_gradient_storage():
    """After a training step, no block storage of frozen weights requires or holds a gradient, and the
    memory held after the step is the weights plus the delta's state, not a second copy of the weights."""
    from opendelta_dist import LoraModel
    from opendelta_dist.train.engines import OptimizerSpec, build_engine
    from opendelta_dist.train.models import ModelConfig
    from opendelta_dist.train.topology import Topology

    engine = build_engine("bmt", Topology.from_environment("cuda"))
    config = {"model_type": "t5", "vocab_size": 384, "d_model": 256, "d_kv": 32, "d_ff": 1024, "num_layers": 4}
    model = engine.build_backbone(ModelConfig(config={**config, "num_heads": 8, "dropout_rate": 0.0}))
    weights = torch.cuda.memory_allocated()
    delta = LoraModel(model, modified_modules=["attn.q", "attn.v"], common_structure=True, backend="bmt")
    delta.freeze_module()
    engine.prepare(model, delta, OptimizerSpec(lr=1e-3, total_steps=2))
    assert engine.frozen_storages > 0
    step = {k: v.cuda() for k, v in batch("t5", size=4, length=16).items()}
    step["input_ids"] %= 384
    step["labels"] %= 384
    engine.micro_step(step, last=True)
    engine.optimizer_step()
    from bmtrain.block_layer import Block

    storages = [s for b in model.modules() if isinstance(b, Block) for s in b._storage_params.values()]
    assert storages and all(not s.requires_grad and s.grad is None for s in storages)
    if os.environ.get(EMULATION_ENV) != "1":  # the emulated device has no memory to measure
        held = torch.cuda.memory_allocated()
        assert held - weights < 0.25 * weights, (held, weights)


def test_an_fp16_overflow_skips_the_step_and_the_schedule():
    """fp16 with a loss scale far too large: every overflowing step leaves the delta and the learning rate as
    they were and halves the scale; the first step that fits moves both, once."""
    from opendelta_dist import LoraModel
    from opendelta_dist.backends import full_tensor
    from opendelta_dist.train.engines import OptimizerSpec, build_engine
    from opendelta_dist.train.models import ModelConfig
    from opendelta_dist.train.topology import Topology

    first_scale = 2.0**40  # a gradient times 2**40 is beyond fp16's range (65504)
    engine = build_engine("bmt", Topology.from_environment("cuda"), {"precision": "fp16", "loss_scale": first_scale})
    config = {"model_type": "t5", "vocab_size": 384, "d_model": 256, "d_kv": 32, "d_ff": 1024, "num_layers": 2}
    model = engine.build_backbone(ModelConfig(config={**config, "num_heads": 8, "dropout_rate": 0.0}))
    delta = LoraModel(model, modified_modules=["attn.q", "attn.v"], common_structure=True, backend="bmt")
    delta.freeze_module()
    engine.prepare(model, delta, OptimizerSpec(lr=1e-3, warmup_steps=0, total_steps=100))
    step = {k: v.cuda() for k, v in batch("t5", size=4, length=16).items()}
    step["input_ids"] %= 384
    step["labels"] %= 384

    def values() -> dict[str, torch.Tensor]:
        return {k: full_tensor(p).float().clone() for k, p in delta.named_delta_tensors()}

    start, lr = values(), engine.scheduler.get_last_lr()
    skipped = 0
    while engine.scheduler.last_epoch == 0:
        assert skipped < 40, "no step fitted in fp16"
        scale = engine.manager.loss_scale
        engine.micro_step(step, last=True)
        engine.optimizer_step()
        if engine.scheduler.last_epoch == 0:
            skipped += 1
            assert engine.manager.loss_scale == scale / 2
            assert engine.scheduler.get_last_lr() == lr
            assert all(torch.equal(v, start[k]) for k, v in values().items())
    assert skipped >= 20 and engine.manager.loss_scale == first_scale / 2**skipped
    assert engine.scheduler.last_epoch == 1 and engine.scheduler.get_last_lr() != lr
    assert any(not torch.equal(v, start[k]) for k, v in values().items())


@pytest.mark.parametrize("precision", [None, "bf16"])
def test_weight_decay_is_decoupled_as_adamw_in_every_precision(precision, monkeypatch):
    """BMTrain's own Adam couples the decay of fp32 weights into their gradient (an L2 term, which Adam then
    normalises); the engine decays them as AdamW does, as BMTrain's bf16 kernel does. At the first step LoRA's
    A has a zero gradient (B starts at zero), so AdamW leaves it at exactly ``A * (1 - lr * weight_decay)``.
    The engine's own writes come before BMTrain's load stream last waits for the step, as BMTrain's do: the
    next gather reads the decayed values."""
    import bmtrain as bmt

    from opendelta_dist import LoraModel
    from opendelta_dist.backends import full_tensor
    from opendelta_dist.train.engines import OptimizerSpec, build_engine
    from opendelta_dist.train.models import ModelConfig
    from opendelta_dist.train.topology import Topology

    engine = build_engine("bmt", Topology.from_environment("cuda"), {"precision": precision})
    config = {"model_type": "t5", "vocab_size": 384, "d_model": 256, "d_kv": 32, "d_ff": 1024, "num_layers": 2}
    model = engine.build_backbone(ModelConfig(config={**config, "num_heads": 8, "dropout_rate": 0.0}))
    delta = LoraModel(model, modified_modules=["attn.q", "attn.v"], common_structure=True, backend="bmt")
    delta.freeze_module()
    lr, decay = 0.1, 0.5
    engine.prepare(model, delta, OptimizerSpec(lr=lr, weight_decay=decay, warmup_steps=0, total_steps=100))
    step = {k: v.cuda() for k, v in batch("t5", size=4, length=16).items()}
    step["input_ids"] %= 384
    step["labels"] %= 384
    before = {k: full_tensor(p).float().clone() for k, p in delta.named_delta_tensors() if k.endswith("lora_A")}
    engine.micro_step(step, last=True)
    params = engine.optimized_parameters()
    waited: list[list[int]] = []

    class Recording(type(bmt.config["load_stream"])):  # the load stream, noting the weights' versions at each wait
        def wait_stream(self, stream) -> None:
            waited.append([p._version for p in params])
            super().wait_stream(stream)

    with monkeypatch.context() as patch:
        patch.setitem(bmt.config, "load_stream", Recording(priority=-1))
        engine.optimizer_step()
    assert waited and waited[-1] == [p._version for p in params], "a write after the load stream's last wait"
    after = {k: full_tensor(p).float() for k, p in delta.named_delta_tensors() if k.endswith("lora_A")}
    tolerance = {"rtol": 1e-6, "atol": 0} if precision is None else {"rtol": 1e-2, "atol": 0}
    for key, value in before.items():
        torch.testing.assert_close(after[key], value * (1 - lr * decay), **tolerance, msg=key)


@pytest.mark.emulated
def test_what_bmtrain_keeps_is_what_the_estimator_counts():
    """BMTrain's own state after training steps, against the bmt rows of the memory estimate: the first encoder
    block stays gathered (its inputs need no gradient, so the hook that releases it never runs), no other block
    does, and ModelCenter's T5 holds an LM head apart from the embeddings that transformers' T5 ties."""
    from bmtrain.block_layer import Block

    from opendelta_dist import LoraModel
    from opendelta_dist.backends import full_numel
    from opendelta_dist.train.engines import OptimizerSpec, build_engine
    from opendelta_dist.train.models import ModelConfig, build_model
    from opendelta_dist.train.topology import Topology

    engine = build_engine("bmt", Topology.from_environment("cuda"))
    config = {"model_type": "t5", "vocab_size": 384, "d_model": 64, "d_kv": 16, "d_ff": 128, "num_layers": 3}
    config = {**config, "num_heads": 4, "dropout_rate": 0.0}
    model = engine.build_backbone(ModelConfig(config=config))
    reference = build_model(ModelConfig(config=config))
    head = reference.get_output_embeddings().weight
    assert head is reference.get_input_embeddings().weight
    transformers_numel = sum(p.numel() for p in reference.parameters())
    assert sum(full_numel(p) for p in model.parameters()) == transformers_numel + head.numel()

    delta = LoraModel(model, modified_modules=["attn.q", "attn.v"], common_structure=True, backend="bmt")
    delta.freeze_module()
    engine.prepare(model, delta, OptimizerSpec(lr=1e-3, total_steps=3))
    step = {k: v.cuda() for k, v in batch("t5", size=4, length=16).items()}
    step["input_ids"] %= 384
    step["labels"] %= 384
    for _ in range(3):
        engine.micro_step(step, last=True)
        engine.optimizer_step()
    gathered = [name for name, block in model.named_modules() if isinstance(block, Block) and block._ready]
    assert gathered == ["encoder.layers.0"]


@pytest.mark.emulated
def test_the_engines_modelcenter_t5_runs_no_torchscript():
    """ModelCenter's norms and gated GELU are eager in the engine's model (a scripted one can fail BMTrain's
    non-reentrant recomputation: tests/bmt/test_bmt_cpu.py)."""
    import model_center.layer.layernorm as layernorm

    from opendelta_dist.train.engines import build_engine
    from opendelta_dist.train.models import ModelConfig
    from opendelta_dist.train.topology import Topology

    engine = build_engine("bmt", Topology.from_environment("cuda"))
    config = {"model_type": "t5", "vocab_size": 64, "d_model": 16, "d_kv": 4, "d_ff": 32, "num_layers": 1}
    model = engine.build_backbone(ModelConfig(config={**config, "num_heads": 4, "feed_forward_proj": "gated-gelu"}))
    acts = [m.act for m in model.modules() if hasattr(m, "act")]
    assert acts and not any(isinstance(a, torch.jit.ScriptFunction) for a in acts)
    assert not isinstance(layernorm.rms_layernorm, torch.jit.ScriptFunction)
