"""The task seam: every task trains with every delta method on every CPU engine (2 gloo processes), and a prompt
run's final delta holds the prompt's own trained tensors and reproduces its metric when loaded again.

Each engine row runs, in one pair of processes, every method of ``METHODS`` one after the other (3 steps each),
through the recipe as ``launch/train.py`` runs it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from safetensors.torch import load_file

from opendelta_dist.errors import DeltaConfigError
from opendelta_dist.train.tasks import build_task, task_class, task_names
from tests.train.distributed import run_distributed

ROOT = Path(__file__).resolve().parents[2]
BERT_TOKENIZER = ROOT / "tests" / "assets" / "tokenizers" / "bert"
TINY_BERT = (
    "+model.config={model_type: bert, vocab_size: 223, hidden_size: 32, num_hidden_layers: 2, "
    "num_attention_heads: 4, intermediate_size: 37, pad_token_id: 0, hidden_dropout_prob: 0.0, "
    "attention_probs_dropout_prob: 0.0}"
)

#: task -> the overrides of the tiny recipe (the tiny T5 and the tiny data set in the package) that run it
TASKS: dict[str, list[str]] = {
    "seq2seq": ["+recipe=lora_t5_tiny"],
    # a tiny BERT with a fresh classifier
    "classification": [
        "+recipe=lora_t5_tiny",
        "model.task=classification",
        "model.name_or_path=null",
        f"model.tokenizer={BERT_TOKENIZER}",
        TINY_BERT,
        "+data.label_names=[bad,good]",
    ],
    # a tiny BERT as a masked LM, with its tokenizer, reading the label words at "It was [MASK]."
    "prompt_classification": [
        "+recipe=prompt_lora_t5_tiny",
        "model.task=prompt_classification",
        "model.name_or_path=null",
        f"model.tokenizer={BERT_TOKENIZER}",
        TINY_BERT,
        "prompt=sst2_it_was",
        "prompt.template.class=mixed",
        'prompt.template.text=\'{"placeholder":"text_a"} {"soft":"it was"} {"mask"}.\'',
        "prompt.verbalizer.classes=[bad,good]",
        "prompt.verbalizer.label_words=[[bad,terrible],[good,great]]",
        "+data.label_names=[bad,good]",
    ],
    # the tiny T5 writes the target at the mask, after the soft tokens "It was"
    "prompt_generation": ["+recipe=prompt_lora_t5_tiny"],
}

#: every delta method, with the options the tiny models need
METHODS: dict[str, list[str]] = {
    "lora": [],
    "adapter": [],
    "bitfit": [],
    "low_rank_adapter": [],
    "compacter": ["delta.reduction_factor=4"],
    "parallel_adapter": [],
    "prefix": [],
    "soft_prompt": ["delta.soft_token_num=3"],
}

#: engine -> (overrides, processes)
ENGINES: dict[str, tuple[list[str], int]] = {
    "single": (["engine=single"], 1),
    "ddp": (["engine=ddp"], 2),
    "fsdp": (["engine=fsdp"], 2),
    "deepspeed": (["engine=deepspeed", "engine.options.stage=2"], 2),
}

SHORT = [
    "train.max_steps=3",
    "train.global_batch_size=4",
    "train.eval_every=0",
    "train.eval_batch_size=8",
    "+data.max_eval_rows=8",
    "checkpoint.every=0",
    "device=cpu",
]


def compose_run(overrides: list[str]) -> dict[str, Any]:
    """The composed configuration of ``launch/train.py`` with these overrides, as plain containers."""
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "configs")):
        return OmegaConf.to_container(compose("config", overrides=overrides), resolve=True)  # type: ignore[return-value]


def _train_every_method(task: str, engine: list[str], base: str) -> dict[str, dict[str, float]]:
    import torch.distributed as dist

    from opendelta_dist.train.recipe import run

    results = {}
    dist.init_process_group("gloo")  # one group for every run: a run leaves open a group it did not open
    try:
        for method, options in METHODS.items():
            overrides = [*TASKS[task], *engine, f"delta={method}", *options, *SHORT, f"run_dir={base}/{method}"]
            if task == "classification":  # the head of the classification task trains with every method
                overrides.append("delta.unfrozen_modules=[deltas,classifier]")
            dist.barrier()  # the ranks check that run_dir is free before rank 0 writes there: start together
            results[method] = run(OmegaConf.create(compose_run(overrides)))
    finally:
        dist.destroy_process_group()
    return results


def test_the_registry_names_every_task_module_and_refuses_others():
    assert set(task_names()) >= set(TASKS)
    for name in task_names():
        assert task_class(name).name == name
    with pytest.raises(DeltaConfigError, match=r"unknown task 'ranking'.*prompt_classification"):
        task_class("ranking")


#: the plain tasks' engine rows are in tests/train/test_training.py (seq2seq on every engine) and test_sst2.py; here
#: every method on one engine (the prompt tasks' rows cover what the engines treat differently, such as FSDP's units)
PLAIN_TASK_ENGINES = ("single",)


#: rows whose engine path another row covers (DDP: the soft verbalizer's test below; DeepSpeed with a T5: the
#: classification row's groups and test_training.py's seq2seq rows): they keep the suite within its 20 minutes, and
#: OPENDELTA_LONG_TESTS=1 runs them
LONG_ROWS = {
    ("prompt_classification", "ddp"),
    ("prompt_generation", "ddp"),
    ("prompt_generation", "deepspeed"),
    ("prompt_generation", "fsdp"),
}
LONG = pytest.mark.skipif(
    os.environ.get("OPENDELTA_LONG_TESTS") != "1",
    reason="an engine row another row covers; OPENDELTA_LONG_TESTS=1 runs it",
)


@pytest.mark.parametrize(
    ("task", "engine"),
    [
        pytest.param(t, e, marks=[LONG] if (t, e) in LONG_ROWS else [])
        for t in sorted(TASKS)
        for e in sorted(ENGINES)
        if t.startswith("prompt_") or e in PLAIN_TASK_ENGINES
    ],
)
def test_every_method_trains_on_every_engine(task, engine, tmp_path):
    overrides, processes = ENGINES[engine]
    results = run_distributed(_train_every_method, task, overrides, str(tmp_path), world_size=processes)
    metric = task_class(task).metric
    for method in METHODS:
        for rank in results:  # every rank evaluated the same rows and agrees
            assert rank[method].keys() == {"loss", metric}, method
            assert rank[method] == results[0][method], method
        final = tmp_path / method / "final_delta"
        assert (final / "config.json").is_file(), method
        if task.startswith("prompt_"):
            assert json.loads((final / "prompt_settings.json").read_text())["template"]["class"] == "mixed"
            saved = load_file(final / "delta_model.safetensors")
            soft = [name for name in saved if "template.soft_embedding" in name]
            assert soft, f"{method}: the soft tokens are not saved with the delta ({sorted(saved)[:5]}...)"
            assert not any("raw_embedding" in name or "word_embeddings" in name for name in saved), method


def test_a_prompt_run_reloads_and_reproduces_its_metric(tmp_path):
    from opendelta_dist.train.predict import evaluate, load_run, predict

    overrides = [*TASKS["prompt_classification"], "delta=lora", "engine=single", *SHORT, "train.max_steps=20"]
    overrides.append(f"run_dir={tmp_path}")
    results = run_distributed(_run, overrides, world_size=1)
    run = load_run(tmp_path)
    metrics, _ = evaluate(run)
    assert metrics["accuracy"] == pytest.approx(results[0]["accuracy"])
    assert metrics["loss"] == pytest.approx(results[0]["loss"], rel=1e-5)
    assert set(predict(run, ["the cast is great", "a dreadful script"])) <= {"bad", "good"}


def _run(overrides: list[str]) -> dict[str, float]:
    from opendelta_dist.train.recipe import run

    return run(OmegaConf.create(compose_run(overrides)))


def test_a_prompt_task_checks_its_group_before_building_anything(tmp_path):
    cfg = compose_run([*TASKS["prompt_generation"], f"run_dir={tmp_path}/run", "prompt=none"])
    with pytest.raises(DeltaConfigError, match="needs a template"):
        build_task(cfg)
    cfg = compose_run([*TASKS["prompt_generation"], "model.task=prompt_generation", "engine=bmt"])
    with pytest.raises(DeltaConfigError, match="engine=bmt builds models of its own"):
        task_class("prompt_generation").check_engine(cfg["engine"]["name"])


def test_a_soft_template_trains_its_own_tokens_and_not_the_models_embeddings(tmp_path):
    """SoftTemplate refers to the model's input embeddings (``template.raw_embedding``, as OpenPrompt's does):
    the delta keeps the template's own tokens trainable and leaves the shared embeddings frozen."""
    overrides = [
        *TASKS["prompt_classification"],
        "delta=lora",
        "engine=single",
        *SHORT,
        "prompt.template.class=soft",
        "prompt.template.num_tokens=3",
        "prompt.template.text=null",
        f"run_dir={tmp_path}",
    ]
    run_distributed(_run, overrides, world_size=1)
    saved = load_file(tmp_path / "final_delta" / "delta_model.safetensors")
    assert [name for name in saved if "lora" not in name] == ["prompt.prompt_model.template.soft_embeds"]
    assert saved["prompt.prompt_model.template.soft_embeds"].shape[0] == 3


def test_generated_predictions_start_after_the_mask_not_at_the_target(tmp_path):
    """On an encoder-decoder the decoder is given ``<pad> <extra_id_0>`` and writes the target; the teacher-forced
    rows of evaluation must not hand it the target's first token (a SentencePiece tokenizer makes it a word)."""
    import torch

    from opendelta_dist.prompts import InputExample, PromptForGeneration
    from opendelta_dist.prompts.data import collate
    from opendelta_dist.prompts.dataloader import example_to_features
    from opendelta_dist.train.predict import evaluate, load_run, predict
    from opendelta_dist.train.tasks.prompting import build_wrapper

    tokenizer = ROOT / "tests" / "assets" / "tokenizers" / "t5"
    overrides = [
        *TASKS["prompt_generation"],
        f"model.tokenizer={tokenizer}",
        "model.config.vocab_size=230",
        "engine=single",
        *SHORT,
        "train.max_steps=40",
        "optim.lr=3e-2",
        f"run_dir={tmp_path}",
    ]
    run_distributed(_run, overrides, world_size=1)
    run = load_run(tmp_path)
    texts = ["the cast is great", "a dreadful script", "a wonderful movie"]
    prompt = run.model.prompt
    wrapper = build_wrapper(run.task_kind.settings, prompt.plm, run.tokenizer, teacher_forcing=False)
    rows = [example_to_features(InputExample(guid=i, text_a=t), prompt.template, wrapper) for i, t in enumerate(texts)]
    batch = {k: v for k, v in dict(collate(rows, run.tokenizer.pad_token_id)).items() if isinstance(v, torch.Tensor)}
    with torch.no_grad():
        expected = PromptForGeneration.generate(prompt, batch, max_new_tokens=8, do_sample=False)[1]
    assert predict(run, texts) == expected
    metrics, rows_out = evaluate(run)
    assert metrics["generated_exact_match"] > 0.5, rows_out[:4]


def test_a_soft_verbalizer_trains_on_two_ranks(tmp_path):
    """The soft verbalizer's head (a copy of the model's output head) trains under DDP: no trainable tensor of it
    goes without a gradient (BERT's vocabulary bias, which nothing reads once the projection is replaced)."""
    overrides = [
        *TASKS["prompt_classification"],
        "delta=lora",
        "engine=ddp",
        *SHORT,
        "prompt.verbalizer.class=soft",
        f"run_dir={tmp_path}",
    ]
    results = run_distributed(_run, overrides)
    assert results[0] == results[1]
    saved = load_file(tmp_path / "final_delta" / "delta_model.safetensors")
    head = sorted(name for name in saved if "verbalizer.head" in name)
    assert head and not any(name.endswith("predictions.bias") for name in head), head


def test_full_fine_tuning_of_a_prompt_task_saves_and_reloads_the_whole_prompt_model(tmp_path):
    from opendelta_dist.train.predict import evaluate, load_run

    overrides = [*TASKS["prompt_classification"], "delta=none", "engine=single", *SHORT, f"run_dir={tmp_path}"]
    results = run_distributed(_run, overrides, world_size=1)
    assert (tmp_path / "final_model").is_dir()
    metrics, _ = evaluate(load_run(tmp_path))
    assert metrics["loss"] == pytest.approx(results[0]["loss"], rel=1e-5)
