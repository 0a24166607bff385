"""``prompt_classification``: a template puts each row around a mask, a verbalizer reads the classes from the
label words the language model predicts there (OpenPrompt's ``PromptForClassification``), cross entropy, accuracy.

Any language model with a word-predicting head: masked LMs (BERT, RoBERTa), causal LMs (GPT-2, Llama) and
encoder-decoders (T5, BART). The ``prompt`` group gives the template and the verbalizer
(:mod:`opendelta_dist.train.tasks.prompting`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset
from transformers.modeling_outputs import SequenceClassifierOutput

from opendelta_dist.errors import DeltaConfigError
from opendelta_dist.train.metrics import accuracy
from opendelta_dist.train.models import language_model_head
from opendelta_dist.train.tasks import prompting
from opendelta_dist.train.tasks.base import EvalSums, Task


class PromptClassifier(prompting.PromptTaskModule):
    """The module a prompt-classification run trains: ``prompt`` (a ``PromptForClassification``) and its loss.

    ``forward(**batch)`` returns the class logits and, where the batch has labels (``label``), their cross entropy.
    """

    def forward(self, **batch: torch.Tensor) -> SequenceClassifierOutput:
        """Class logits ``[batch, classes]`` (and the mean cross entropy when ``label`` is given)."""
        logits = self.prompt(batch)
        label = batch.get("label")
        loss = nn.functional.cross_entropy(logits.float(), label) if label is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


class PromptClassification(Task):
    """Classification by a template, a mask and label words (see the module docstring)."""

    name = "prompt_classification"
    metric = "accuracy"
    targets = "class"

    def __init__(self, data: Any, model: Any, cfg: Mapping[str, Any]) -> None:
        """Read the ``prompt`` group (checked by :meth:`check_config`)."""
        super().__init__(data, model, cfg)
        self.settings = prompting.PromptSettings.from_config(cfg, needs_verbalizer=True)
        self.classes = self.settings.classes(data.label_names)
        self._wrapper: Any = None
        self._template: Any = None

    @classmethod
    def model_head(cls, model_type: str | None) -> str:
        """The model type's language-model head (masked, causal or sequence-to-sequence)."""
        if model_type is None:
            raise DeltaConfigError("a prompt task needs the backbone's model_type; set model.config.model_type")
        return language_model_head(model_type)

    @classmethod
    def check_config(cls, cfg: Mapping[str, Any]) -> None:
        """The ``prompt`` group: a template and a verbalizer whose classes match the data's."""
        settings = prompting.PromptSettings.from_config(cfg, needs_verbalizer=True)
        settings.classes((cfg.get("data") or {}).get("label_names"))

    @classmethod
    def check_engine(cls, engine: str) -> None:
        """Every engine but ``bmt``, whose ModelCenter models have no prompt pipeline."""
        prompting.check_engine(engine)

    def wrap_model(self, backbone: nn.Module, tokenizer: Any) -> nn.Module:
        """``PromptClassifier(PromptForClassification(backbone, template, verbalizer))``."""
        from opendelta_dist.prompts import PromptForClassification

        template = prompting.build_template(self.settings, backbone, tokenizer)
        verbalizer = prompting.build_verbalizer(self.settings, self.classes, backbone, tokenizer)
        self._template = template
        self._wrapper = prompting.build_wrapper(self.settings, backbone, tokenizer)
        return PromptClassifier(PromptForClassification(backbone, template, verbalizer))

    def dataset(self, rows: list[dict[str, Any]], tokenizer: Any) -> Dataset:
        """Rows wrapped by the template and tokenized; class ids out of the verbalizer's range are refused."""
        prompting.require_model(self._wrapper)
        bad = next((r["target"] for r in rows if not 0 <= int(r["target"]) < len(self.classes)), None)
        if bad is not None:
            raise DeltaConfigError(
                f"the data has class id {bad}, and the verbalizer has {len(self.classes)} classes "
                f"({', '.join(self.classes)}); give label words for every class of the data (prompt.verbalizer)"
            )
        return prompting.wrap_rows(rows, self._template, self._wrapper, teacher_forcing=False, text_targets=False)

    def collate(self, items: list[dict[str, Any]], tokenizer: Any) -> dict[str, torch.Tensor]:
        """Padded to the longest row."""
        return prompting.collate_features(items, tokenizer.pad_token_id or 0)

    def eval_sums(self, output: Any, batch: Mapping[str, torch.Tensor]) -> EvalSums:
        """Per-example cross entropy and accuracy of the class logits."""
        logits, labels = output.logits.float(), batch["label"]
        losses = nn.functional.cross_entropy(logits, labels, reduction="none")
        correct, total = accuracy(logits, labels)
        return correct, total, float(losses.sum()), int(losses.numel())

    @torch.no_grad()
    def predict(self, module: nn.Module, batch: Mapping[str, torch.Tensor], tokenizer: Any) -> list[Any]:
        """The arg-max class's name."""
        inputs = {k: v for k, v in batch.items() if k != "label"}
        return [self.classes[int(c)] for c in module(**inputs).logits.argmax(-1)]

    def save(self, module: nn.Module, directory: Path) -> None:
        """``prompt_settings.json`` (the run's ``prompt`` group) beside the delta."""
        prompting.save_prompt_settings(self.cfg, directory)

    def delta_options(self, options: dict[str, Any], module: nn.Module) -> dict[str, Any]:
        """The delta keeps the prompt's own trained modules (soft tokens, a soft verbalizer) trainable, and saves
        them."""
        return prompting.with_prompt_modules(options, module, module.prompt.plm)
