"""Use what a run trained: rebuild its backbone as the run built it, load its final delta (or fully fine-tuned model)
and tokenizer, then predict on texts or evaluate on a file of rows.

    from opendelta_dist.train.predict import evaluate, load_run, predict

    run = load_run("outputs/lora_t5_tiny")                 # the run's model with its final delta, in eval mode
    predict(run, ["reverse: abc"])                          # ['cba']: generated text (seq2seq) or class names
    evaluate(run)                                           # loss and metric on the run's evaluation rows (or a file)

``python launch/predict.py run_dir=outputs/lora_t5_tiny`` does the same from the command line; a finished run
prints that command as its last line.

The backbone is the run's: its configuration (``run_dir/config.json``) and, for a random-weight model, the weights
the run's seed draws (as the run drew them, before anything else); a pretrained model is read again from its
checkpoint. The delta's backbone check refuses other weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from opendelta_dist.auto_delta import AutoDeltaModel
from opendelta_dist.basemodel import DeltaBase
from opendelta_dist.errors import DeltaConfigError
from opendelta_dist.train.data import DataConfig, DataError, load_rows
from opendelta_dist.train.metrics import MetricAccumulator, exact_match
from opendelta_dist.train.models import ModelConfig, auto_model_class, build_model, model_architecture
from opendelta_dist.train.tasks import Task, build_task
from opendelta_dist.train.tuning import load_full_model


@dataclass
class TrainedRun:
    """A finished run's model, ready to use.

    Attributes:
        run_dir: the run's directory.
        config: the run's composed configuration (``run_dir/config.json``).
        model: the backbone with the final delta attached (or the fully fine-tuned model), in eval mode.
        delta: the final delta; None after full fine-tuning.
        tokenizer: the run's tokenizer.
        data: the run's data configuration (lengths, columns, label names).
        task_kind: the run's task (``opendelta_dist.train.tasks``): rows to batches, predictions, metric.
    """

    run_dir: Path
    config: dict[str, Any]
    model: nn.Module
    delta: DeltaBase | None
    tokenizer: Any
    data: DataConfig
    task_kind: Task

    @property
    def task(self) -> str:
        """The task's name (``seq2seq``, ``classification``, ``prompt_classification``, ...)."""
        return self.data.task

    @property
    def device(self) -> torch.device:
        """Where the model is."""
        return next(self.model.parameters()).device


def load_run(run_dir: str | Path, device: str | torch.device = "cpu") -> TrainedRun:
    """Rebuild a finished run's backbone, load its final delta (or model) and tokenizer.

    Args:
        run_dir: the run's ``run_dir`` (it holds ``config.json`` and ``final_delta/`` or ``final_model/``).
        device: where to put the model.

    Returns:
        The run's model, in eval mode.

    Raises:
        DeltaConfigError: ``run_dir`` is not a run's directory, or the run did not finish.
        BackboneMismatchError: the rebuilt backbone is not the one the delta was trained on.
    """
    run_dir = Path(run_dir)
    config_file = run_dir / "config.json"
    if not config_file.is_file():
        raise DeltaConfigError(
            f"{run_dir} is not a run's directory (no config.json): give the run_dir a training run wrote"
        )
    cfg = json.loads(config_file.read_text())
    final_delta, final_model = run_dir / "final_delta", run_dir / "final_model"
    if not final_delta.is_dir() and not final_model.is_dir():
        raise DeltaConfigError(
            f"{run_dir} holds no final_delta/ or final_model/: the run has not finished; finish it with the same "
            "command and resume=auto, or load a checkpoint's delta (checkpoints/step_*/delta) with "
            "AutoDeltaModel.from_finetuned"
        )
    model_cfg = ModelConfig(**cfg["model"])
    # whole weights on the CPU, as the run's engines drew them (a meta-built run read its checkpoint later)
    model_cfg = replace(model_cfg, init_device="cpu", gradient_checkpointing=False)
    cfg["model"] = {**cfg["model"], "init_device": "cpu", "gradient_checkpointing": False}
    task = build_task(cfg)
    head = task.model_head(model_architecture(model_cfg).model_type)
    tokenizer = task.build_tokenizer()
    delta = None
    if final_delta.is_dir():
        torch.manual_seed(int(cfg.get("seed", 0)))  # a random-weight backbone: the run's, drawn first
        model = task.wrap_model(build_model(model_cfg, head=head), tokenizer)
        delta = AutoDeltaModel.from_finetuned(final_delta, backbone_model=model)
    elif task.wraps_model:  # the task's module around the backbone, whose weights final_model holds
        model = task.wrap_model(build_model(model_cfg, head=head), tokenizer)
        load_full_model(model, final_model)
    else:
        model = auto_model_class(head).from_pretrained(final_model)
    return TrainedRun(run_dir, cfg, model.to(device).eval(), delta, tokenizer, DataConfig(**cfg["data"]), task)


def _batches(run: TrainedRun, rows: list[dict[str, Any]], batch_size: int) -> Any:
    dataset = run.task_kind.dataset(rows, run.tokenizer)
    for start in range(0, len(dataset), batch_size):  # type: ignore[arg-type]
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]  # type: ignore[arg-type]
        batch = run.task_kind.collate(items, run.tokenizer)
        yield {k: v.to(run.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _predict_batch(run: TrainedRun, batch: dict[str, Any]) -> list[Any]:
    return run.task_kind.predict(run.model, batch, run.tokenizer)


@torch.no_grad()
def predict(run: TrainedRun, texts: list[str], batch_size: int = 16) -> list[Any]:
    """The run's predictions for input texts: greedy generated text (seq2seq), or the class (its name where the
    run's data names classes).

    Args:
        run: what :func:`load_run` returned.
        texts: the inputs, as the run's input column held them.
        batch_size: inputs per forward.

    Returns:
        One prediction per text.
    """
    # a placeholder target that every task reads (class 0, or an empty text)
    placeholder = 0 if run.task_kind.targets == "class" else ""
    rows = [{"input": text, "target": placeholder} for text in texts]
    return [p for batch in _batches(run, rows, batch_size) for p in _predict_batch(run, batch)]


@torch.no_grad()
def evaluate(
    run: TrainedRun, file: str | Path | None = None, batch_size: int = 32
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """The run's loss and metric, as training measured them (teacher-forced), on a file of rows or the run's own
    evaluation rows, and its predictions for each row (for seq2seq also the exact match of the generated text).

    Args:
        run: what :func:`load_run` returned.
        file: rows in the run's data format and columns (jsonl, json, csv, tsv); None for the run's evaluation set.
        batch_size: rows per forward.

    Returns:
        The metrics, and per row ``input``, ``target`` and ``prediction``.
    """
    if file is not None and not Path(file).is_file():
        raise DataError(
            f"file={file}: no such file of rows to evaluate on; give the path of a jsonl, json, csv or tsv file"
        )
    data = run.data if file is None else replace(run.data, train_file=str(file), eval_file=str(file))
    rows = load_rows(data, "eval", run.task_kind.targets)
    sums = MetricAccumulator(run.task_kind.metric)
    predictions: list[Any] = []
    for batch in _batches(run, rows, batch_size):
        output = run.model(**{k: v for k, v in batch.items() if isinstance(v, torch.Tensor)})
        sums.update(*run.task_kind.eval_sums(output, batch))
        guessed = _predict_batch(run, batch)
        predictions += guessed
    metrics = sums.compute(torch.device("cpu"))
    if run.task_kind.targets == "text" and rows:
        correct, total = exact_match(predictions, [str(r["target"]) for r in rows])
        metrics["generated_exact_match"] = correct / total
    rows_out = [
        {"input": r["input"], "target": r["target"], "prediction": p} for r, p in zip(rows, predictions, strict=True)
    ]
    return metrics, rows_out
