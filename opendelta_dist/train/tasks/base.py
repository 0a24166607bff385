"""The :class:`Task` protocol: what a training run needs to know about its task, and nothing about engines.

The recipe asks the task for the tokenizer, the backbone's head, the module the engine trains (the backbone
itself, or a prompt model around it), the data set and collate function, and the evaluation sums of a batch.
The engine calls ``module(**batch)`` and reads ``.loss`` (training) and ``.logits`` (evaluation, through
:meth:`Task.eval_sums`), so a task's module returns a transformers-style output with both.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.data import Dataset

from opendelta_dist.train.data import IGNORE_INDEX, DataConfig, build_tokenizer
from opendelta_dist.train.models import ModelConfig

EvalSums = tuple[int, int, float, int]
"""One evaluation batch's ``(correct, total, loss_sum, loss_count)`` (``MetricAccumulator.update``)."""


class Task:
    """One task kind. Subclasses set the class attributes and implement the abstract methods.

    Attributes:
        name: the ``data.task`` value (the module's name).
        metric: the name of the metric :meth:`eval_sums` counts (``accuracy``, ``exact_match``).
        targets: what a row's target column becomes: ``"class"`` (a class id) or ``"text"``.
        wraps_model: :meth:`wrap_model` puts a module of the task's around the backbone (a fully fine-tuned run
            then saves that module's weights, not a transformers checkpoint).
    """

    name: ClassVar[str] = ""
    metric: ClassVar[str] = "accuracy"
    targets: ClassVar[str] = "class"
    wraps_model: ClassVar[bool] = False

    def __init__(self, data: DataConfig, model: ModelConfig, cfg: Mapping[str, Any]) -> None:
        """Keep the run's data and model configurations and its whole composed configuration.

        Args:
            data: the ``data`` group.
            model: the ``model`` group.
            cfg: the whole configuration (a task reads its own group from it, e.g. ``prompt``).
        """
        self.data = data
        self.model = model
        self.cfg = cfg

    @classmethod
    def model_head(cls, model_type: str | None) -> str:
        """The head the backbone is built with (``opendelta_dist.train.models.HEADS``) for a model type."""
        raise NotImplementedError

    def build_tokenizer(self) -> Any:
        """The run's tokenizer (``model.tokenizer``, else the model's own)."""
        return build_tokenizer(self.model.tokenizer or self.model.name_or_path)

    def wrap_model(self, backbone: nn.Module, tokenizer: Any) -> nn.Module:
        """The module the engine trains and the delta is attached to: the backbone itself by default.

        Args:
            backbone: the built backbone.
            tokenizer: the run's tokenizer.
        """
        return backbone

    def delta_options(self, options: dict[str, Any], module: nn.Module) -> dict[str, Any]:
        """The ``delta`` group as the task attaches it to ``module`` (unchanged by default; a prompt task adds its
        own trained modules to ``unfrozen_modules``, so the delta trains and saves them)."""
        return options

    def dataset(self, rows: list[dict[str, Any]], tokenizer: Any) -> Dataset:
        """The rows of one split (``load_rows(..., targets=self.targets)``) as model-ready items."""
        raise NotImplementedError

    def collate(self, items: list[dict[str, Any]], tokenizer: Any) -> dict[str, torch.Tensor]:
        """A batch of items, padded to the longest: exactly the keyword arguments of the module's forward."""
        raise NotImplementedError

    def tokens(self, batch: Mapping[str, torch.Tensor]) -> int:
        """The tokens a batch feeds the model (for tokens per second): its attention mask's, plus the target
        tokens of a decoder (labels that are not -100, or the decoder inputs)."""
        count = int(batch["attention_mask"].sum())
        labels = batch.get("labels")
        if labels is not None and labels.dim() > 1:
            count += int((labels != IGNORE_INDEX).sum())
        elif "decoder_input_ids" in batch:
            count += int(batch["decoder_input_ids"].numel())
        return count

    def eval_sums(self, output: Any, batch: Mapping[str, torch.Tensor]) -> EvalSums:
        """The evaluation sums of one batch from the module's output (``output.logits`` in fp32 and the labels)."""
        raise NotImplementedError

    @torch.no_grad()
    def predict(self, module: nn.Module, batch: Mapping[str, torch.Tensor], tokenizer: Any) -> list[Any]:
        """Predictions for a batch with the unwrapped, trained module in eval mode: class names (or ids), or text."""
        raise NotImplementedError

    def save(self, module: nn.Module, directory: Path) -> None:
        """Write what the task needs beside a saved delta to rebuild the module (nothing by default)."""

    @classmethod
    def check_config(cls, cfg: Mapping[str, Any]) -> None:
        """Refuse, before anything is built or written, a run configuration the task cannot use (its own group:
        e.g. a prompt task's template and verbalizer). Nothing to check by default.

        Raises:
            DeltaConfigError: the first problem, named with its fix.
        """

    @classmethod
    def check_engine(cls, engine: str) -> None:
        """Refuse an engine the task cannot run on (every engine by default).

        Raises:
            DeltaConfigError: the task does not run on ``engine``.
        """
