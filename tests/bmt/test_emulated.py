"""The bmt tier that runs without a GPU: the real BMTrain 1.0.1 and ModelCenter 1.0.2 (and the project's bmt
backend and engine) on the **CUDA emulation** of :mod:`tests.bmt.emulated_cuda`, at world size 1 and 2 (ZeRO
partitions over two ranks, BMTrain's NCCL calls carried by gloo).

It shows that the bmt code paths run and compute what transformers' T5 computes; it measures no kernel, NCCL,
memory or speed, and never counts as a GPU result (``scripts/gpu-check.sh`` is that).
"""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.bmt.common import needs_bmt
from tests.models import batch
from tests.train.distributed import run_distributed
from tests.train.launch import ROOT, check, launch, metrics, python_path

pytestmark = [pytest.mark.slow, needs_bmt]

#: a tiny T5 (ModelCenter's and transformers' alike), gated feed-forward as in T5 v1.1 and T5-11B's successors
T5 = {
    "model_type": "t5",
    "vocab_size": 96,
    "d_model": 32,
    "d_kv": 8,
    "d_ff": 48,
    "num_layers": 2,
    "num_heads": 4,
    "dropout_rate": 0.0,
    "feed_forward_proj": "gated-gelu",
}
#: every method the bmt backend supports, by role, in configurations that touch every kind of module
METHODS = {
    "lora": {"modified_modules": ["attn.q", "attn.v", "crossattn.q", "ff.w2"], "lora_r": 4},
    "adapter": {"modified_modules": ["attn", "ff"], "bottleneck_dim": 8},
    "parallel_adapter": {"modified_modules": ["attn", "ff"], "bottleneck_dim": 8},
    "lowrankadapter": {"modified_modules": ["attn.proj", "ff.w2"], "reduction_factor": 4},
    "compacter": {"modified_modules": ["attn.proj", "ff.w2"], "reduction_factor": 4},
    "bitfit": {"modified_modules": ["attn.q", "ff.w1", "layer_norm"]},
}
STEPS = 3


def _inputs() -> dict[str, torch.Tensor]:
    from opendelta_dist.train.engines.bmt import _modelcenter_inputs

    data = batch("t5", size=4, length=9)
    data["input_ids"] %= T5["vocab_size"]
    data["labels"] %= T5["vocab_size"]
    return {**_modelcenter_inputs(data, 0, 0), "labels": data["labels"]}


def _train_every_method(
    out: str, precision: str | None, methods: tuple[str, ...] = tuple(METHODS), offload: bool = False
) -> dict[str, dict[str, torch.Tensor]]:
    """One rank: ``methods`` on the bmt engine, trained ``STEPS`` steps on the same batch on every rank;
    rank 0 saves each delta into ``out/<method>`` as the recipe does. Returns each method's losses and
    evaluation logits."""
    from tests.bmt.emulated_cuda import install

    install()
    from opendelta_dist import AutoDeltaConfig, AutoDeltaModel
    from opendelta_dist.saving import save_delta
    from opendelta_dist.train.engines import OptimizerSpec, build_engine
    from opendelta_dist.train.models import ModelConfig
    from opendelta_dist.train.topology import Topology

    results = {}
    for method in methods:
        options = METHODS[method]
        engine = build_engine("bmt", Topology.from_environment("cuda"), {"precision": precision, "offload": offload})
        torch.manual_seed(0)  # transformers' T5 of this seed, as the test builds it
        model = engine.build_backbone(ModelConfig(config=T5))
        config = AutoDeltaConfig.from_dict({"delta_type": method, "common_structure": True, **options})
        delta = AutoDeltaModel.from_config(config, model, backend="bmt")
        delta.freeze_module(exclude=["deltas"])
        checksum = engine.backbone_checksum(model, delta)
        engine.prepare(model, delta, OptimizerSpec(lr=1e-2, warmup_steps=0, total_steps=STEPS))
        data = {k: v.cuda() for k, v in _inputs().items()}
        losses = []
        for _ in range(STEPS):
            losses.append(engine.micro_step(data, last=True).float())
            engine.optimizer_step()
        logits = engine.eval_forward(data).logits.float().cpu()
        tensors = engine.gather_delta(delta)
        if int(os.environ.get("RANK", "0")) == 0:
            save_delta(
                delta,
                Path(out) / method,
                state_dict=tensors,
                checksum=checksum,
                config_updates=engine.saved_delta_config(),
            )
        results[method] = {"losses": torch.stack(losses).cpu(), "logits": logits}
    return results


def _transformers_t5(dtype: torch.dtype = torch.float32, seed: int = 0):
    from opendelta_dist.train.models import ModelConfig, build_model

    torch.manual_seed(seed)
    return build_model(ModelConfig(config=T5)).to(dtype).eval()


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[tuple[int, str], tuple[Path, dict]]:
    """Every method trained at world sizes 1 and 2 in fp32, and at world size 2 (partitioned) in bf16."""
    out = {}
    for world in (1, 2):
        for precision in ("fp32", "bf16") if world == 2 else ("fp32",):
            where = tmp_path_factory.mktemp(f"bmt_ws{world}_{precision}")
            results = run_distributed(
                _train_every_method, str(where), None if precision == "fp32" else precision, world_size=world
            )
            out[world, precision] = (where, results)
    return out


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_bmt_trained_delta_loads_on_transformers_t5_with_the_bmt_models_outputs(trained, method):
    """fp32, both world sizes: the saved delta (transformers' names, backend hf) loads on transformers' T5 of the
    same weights as it is, and that model's logits are the bmt model's; on other weights it is refused."""
    from opendelta_dist import AutoDeltaModel
    from opendelta_dist.errors import BackboneMismatchError
    from opendelta_dist.saving import read_config_file

    data = _inputs()
    inputs = {k: v for k, v in data.items() if k != "labels"}
    for world in (1, 2):
        where, results = trained[world, "fp32"]
        assert read_config_file(where / method)["backend"] == "hf"
        model = _transformers_t5()
        AutoDeltaModel.from_finetuned(where / method, model)  # no backend= needed
        with torch.no_grad():
            ours = model(**inputs).logits
        torch.testing.assert_close(ours, results[0][method]["logits"], rtol=1e-4, atol=1e-4, msg=f"world {world}")
    # the checkpoint keeps values of the weights it was trained on: a T5 of other weights is refused
    with pytest.raises(BackboneMismatchError, match="sampled backbone values differ"):
        AutoDeltaModel.from_finetuned(where / method, _transformers_t5(seed=1))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_zero_partitions_over_two_ranks_train_as_one_rank(trained, method):
    """The same batch on every rank: two ranks' partitions (gathered, reduce-scattered) step as one rank's whole
    tensors, and the training moved the delta."""
    (one_dir, one), (two_dir, two) = trained[1, "fp32"], trained[2, "fp32"]
    assert two[0][method]["losses"][-1] < two[0][method]["losses"][0]
    torch.testing.assert_close(two[0][method]["losses"], one[0][method]["losses"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(two[1][method]["logits"], two[0][method]["logits"], rtol=0, atol=0)
    a, b = (
        load_file(one_dir / method / "delta_model.safetensors"),
        load_file(two_dir / method / "delta_model.safetensors"),
    )
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_bf16_trains_with_bmtrains_kernel_and_loads_on_transformers(trained, method):
    """bf16 (BMTrain's fused bf16 Adam, emulated), partitioned over two ranks: the loss falls, and the saved delta
    on transformers' T5 in bf16 gives the bmt model's logits within bf16's precision."""
    from opendelta_dist import AutoDeltaModel

    data = _inputs()
    inputs = {k: v for k, v in data.items() if k != "labels"}
    for world in (2,):
        where, results = trained[world, "bf16"]
        assert results[0][method]["losses"][-1] < results[0][method]["losses"][0]
        model = _transformers_t5(torch.bfloat16)
        AutoDeltaModel.from_finetuned(where / method, model)
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
        with torch.no_grad():
            ours = model(**inputs).logits.float()
        torch.testing.assert_close(ours, results[0][method]["logits"], rtol=0.05, atol=0.05, msg=f"world {world}")


def _contract_on_two_ranks() -> list[str]:
    """One rank: every method the bmt backend supports, on transformers' T5 and GPT-2 moved to the (emulated)
    GPU, against the hf backend: the same initial values, logits and saved tensors, the parameters partitioned
    over the ranks. Returns the cases it checked."""
    from tests.bmt.emulated_cuda import install

    install()
    from opendelta_dist.backends import full_tensor
    from opendelta_dist.registry import DELTA_METHODS
    from tests.backends.test_contract import OPTIONS
    from tests.bmt.common import init_bmtrain
    from tests.models import build, logits

    init_bmtrain()
    checked = []
    for family in ("t5", "gpt2"):
        inputs = {k: v.cuda() for k, v in batch(family).items()}
        for method in sorted(DELTA_METHODS):
            if "bmt" not in DELTA_METHODS[method].supported_backends():
                continue
            built = {}
            for backend in ("hf", "bmt"):
                model = build(family).cuda()
                torch.manual_seed(1234)
                delta = DELTA_METHODS[method](model, backend=backend, **OPTIONS.get(method, {}))
                delta.freeze_module(exclude=["deltas"])
                built[backend] = model, delta
            (ref_model, ref_delta), (model, delta) = built["hf"], built["bmt"]
            ours = {k: full_tensor(p) for k, p in delta.named_delta_tensors()}
            ref = {k: p.detach() for k, p in ref_delta.named_delta_tensors()}
            assert ours.keys() == ref.keys(), (method, family)
            for key, value in ours.items():
                assert torch.equal(value, ref[key]), (method, family, key)
            expected = logits(ref_model, inputs)
            torch.testing.assert_close(logits(model, inputs), expected, rtol=0, atol=1e-6)
            classes = [type(m) for m in model.modules()]
            delta.detach()  # the backbone as it was (BitFit's targets read their own parameters as before)
            assert not any(type(m).__name__.startswith("WholeReading") for m in model.modules()), method
            delta.attach()
            assert [type(m) for m in model.modules()] == classes
            torch.testing.assert_close(logits(model, inputs), expected, rtol=0, atol=1e-6)
            checked.append(f"{method}/{family}")
    return checked


def test_the_backend_contract_holds_with_partitions_over_two_ranks():
    """The bmt rows of the backend contract at world size 2 (``tests/backends/test_contract.py`` runs them on one
    rank): every method's parameters are partitions here, and a module that read one as the whole would differ."""
    from opendelta_dist.registry import DELTA_METHODS

    cases = run_distributed(_contract_on_two_ranks, world_size=2)
    supported = [m for m in DELTA_METHODS if "bmt" in DELTA_METHODS[m].supported_backends()]
    assert cases[0] == cases[1] and len(cases[0]) == 2 * len(supported)


def test_offload_steps_with_bmtrains_cpu_adam_as_its_gpu_kernel_does(trained, tmp_path):
    """``engine.options.offload``: BMTrain's own compiled CPU Adam (AdamOffloadOptimizer) on two ranks' partitions,
    in bf16, takes the steps the GPU kernel takes: the two agree within a bf16 step of the weights."""
    offloaded = run_distributed(_train_every_method, str(tmp_path), "bf16", ("lora", "compacter"), True, world_size=2)
    _, on_gpu = trained[2, "bf16"]
    for method in ("lora", "compacter"):
        ours, ref = offloaded[0][method], on_gpu[0][method]
        torch.testing.assert_close(ours["losses"], ref["losses"], rtol=1e-2, atol=1e-2)
        # BMTrain's CPU kernel truncates the bf16 copy of its fp32 master where CUDA's rounds to nearest
        torch.testing.assert_close(ours["logits"], ref["logits"], rtol=0.05, atol=0.05)
        assert not torch.equal(ours["losses"][0], ours["losses"][-1])


EMULATED_RUN = [
    "+recipe=lora_t5_tiny",
    "engine=bmt",
    "device=cuda",
    "train.max_steps=12",
    "train.log_every=1",
    "train.eval_every=6",
    "checkpoint.every=6",
    "delta.common_structure=true",
    "delta.modified_modules=[attn.q,attn.v,crossattn.q,ff.w2]",
]


def _emulated(env: dict[str, str] | None = None) -> dict[str, str]:
    from tests.bmt.emulated_cuda import EMULATION_ENV

    return {EMULATION_ENV: "1", **(env or {})}


@pytest.fixture(scope="module")
def recipe_runs(tmp_path_factory) -> dict[int, Path]:
    """The tiny recipe with engine=bmt on 1 and 2 emulated GPUs under torchrun."""
    out = {}
    for nproc in (1, 2):
        run_dir = tmp_path_factory.mktemp(f"recipe_ws{nproc}") / "run"
        check(launch([*EMULATED_RUN, f"run_dir={run_dir}"], nproc=nproc, env=_emulated()))
        out[nproc] = run_dir
    return out


def test_the_tiny_recipe_runs_on_bmt_at_world_sizes_1_and_2(recipe_runs):
    one, two = ([r["loss"] for r in metrics(recipe_runs[n])] for n in (1, 2))
    assert len(one) == 12 and one[-1] < one[0]
    assert two == pytest.approx(one, rel=5e-3)  # the batch split over two ranks: per-rank token means
    assert [r["step"] for r in metrics(recipe_runs[2], "eval")] == [6, 12]
    for nproc in (1, 2):
        assert (recipe_runs[nproc] / "final_delta" / "delta_model.safetensors").is_file()


@pytest.mark.skipif(
    os.environ.get("OPENDELTA_LONG_TESTS") != "1",
    reason="the signalled run below resumes bit-exact on two ranks too; OPENDELTA_LONG_TESTS=1 runs it",
)
def test_a_killed_bmt_run_on_two_ranks_resumes_bit_exact(recipe_runs, tmp_path):
    """Rank 1 dies at step 9; torchrun restarts both ranks, which resume from step 6 (each its own partition of
    Adam's state) and finish with the uninterrupted run's delta, bit for bit."""
    from opendelta_dist.train.recipe import FAIL_AT_STEP_ENV, FAIL_RANK_ENV

    run_dir = tmp_path / "run"
    result = launch(
        [*EMULATED_RUN, "resume=auto", f"run_dir={run_dir}"],
        nproc=2,
        env=_emulated({FAIL_AT_STEP_ENV: "9", FAIL_RANK_ENV: "1"}),
        max_restarts=1,
    )
    check(result)
    assert "resumed from" in result.stdout and "step_00000006" in result.stdout
    ours, ref = (load_file(d / "final_delta" / "delta_model.safetensors") for d in (run_dir, recipe_runs[2]))
    assert ours.keys() == ref.keys()
    for key, value in ref.items():
        assert torch.equal(ours[key], value), key


def test_a_signalled_bmt_run_stops_at_one_step_and_torchrun_restarts_it_bit_exact(recipe_runs, tmp_path):
    """SIGTERM reaches rank 1 mid-step 8: both ranks stop after step 8, write its checkpoint (each rank its
    partition of Adam's state) and exit 143; torchrun restarts them, they resume at step 8 (a restart
    continues its run) and end with the uninterrupted run's delta, bit for bit, every step logged once."""
    from opendelta_dist.train.stopping import SIGNAL_AT_ENV

    run_dir = tmp_path / "run"
    overrides = [*EMULATED_RUN, f"run_dir={run_dir}"]
    result = launch(overrides, nproc=2, env=_emulated({SIGNAL_AT_ENV: "1:8:step:TERM"}), max_restarts=1)
    check(result)
    assert "stopped at step 8 on SIGTERM (received by rank 1)" in result.stdout, result.stdout[-3000:]
    assert f"resumed from {run_dir}/checkpoints/step_00000008 at step 8" in result.stdout
    assert [r["step"] for r in metrics(run_dir)] == list(range(1, 13))
    ours, ref = (load_file(d / "final_delta" / "delta_model.safetensors") for d in (run_dir, recipe_runs[2]))
    assert ours.keys() == ref.keys()
    for key, value in ref.items():
        assert torch.equal(ours[key], value), key


def test_the_gpu_tests_of_the_bmt_backend_and_engine_pass_under_the_emulation(tmp_path):
    """The ``gpu`` tests of ``tests/bmt`` and the bmt rows of the backend contract, in one emulated process (world
    size 1): each passes, or is skipped for the one reason the emulation allows (a method the bmt backend refuses
    by name). What they would measure of the GPU itself (memory) they check only on a real one."""
    report = tmp_path / "report.xml"
    command = [
        sys.executable,
        "-m",
        "tests.bmt.emulated_cuda",
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-m",
        "gpu",
        # the killed run's resume is test_a_killed_bmt_run_on_two_ranks_resumes_bit_exact here, on two ranks
        "-k",
        "not killed_bmt_run_resumes_from",
        f"--junitxml={report}",
        "tests/bmt",
        "tests/backends/test_contract.py",
    ]
    env = {**os.environ, "PYTHONPATH": python_path()}
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    cases = ET.parse(report).getroot().iter("testcase")
    passed, skipped = [], []
    for case in cases:
        skip = case.find("skipped")
        (skipped if skip is not None else passed).append(f"{case.get('classname')}::{case.get('name')}")
        if skip is not None:
            assert "needs what the bmt backend lacks" in skip.get("message", ""), (
                case.get("name"),
                skip.get("message"),
            )
    assert len(skipped) == 4, skipped  # prefix and soft prompt on the two families
    expected = {"test_bmt_follows_the_single_engine", "test_frozen_blocks_keep_no"}
    expected |= {"test_an_fp16_overflow_skips", "test_weight_decay_is_decoupled", "test_the_method_runs_through"}
    for prefix in expected:
        assert any(name.split("::")[-1].startswith(prefix) for name in passed), prefix
    assert len(passed) >= 20, passed
