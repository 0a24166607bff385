"""``prompt_classification``: a template puts each row around a mask, a verbalizer reads the classes from the
label words the language model predicts there (OpenPrompt's ``PromptForClassification``), cross entropy, accuracy.

Any language model with a word-predicting head: masked LMs (BERT, RoBERTa), causal LMs (GPT-2, Llama) and
encoder-decoders (T5, BART). The ``prompt`` group gives the template and the verbalizer
(:mod:`opendelta_dist.train.tasks.prompting`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset
from transformers.modeling_outputs import SequenceClassifierOutput

from opendelta_dist.errors import DeltaConfigError
from opendelta_dist.train.tasks import prompting
from opendelta_dist.train.tasks.base import EvalSums
from opendelta_dist.train.tasks.classification import class_sums


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


class PromptClassification(prompting.PromptTask):
    """Classification by a template, a mask and label words (see the module docstring)."""

    name = "prompt_classification"
    metric = "accuracy"
    targets = "class"

    def __init__(self, data: Any, model: Any, cfg: Mapping[str, Any]) -> None:
        """Read the ``prompt`` group; the classes are the verbalizer's, checked against the data's names."""
        super().__init__(data, model, cfg)
        self.classes = self.settings.classes(data.label_names)

    def wrap_model(self, backbone: nn.Module, tokenizer: Any) -> nn.Module:
        """``PromptClassifier(PromptForClassification(backbone, template, verbalizer))``."""
        from opendelta_dist.prompts import PromptForClassification

        template = self.build_prompt(backbone, tokenizer)
        verbalizer = prompting.build_verbalizer(self.settings, self.classes, backbone, tokenizer)
        return PromptClassifier(PromptForClassification(backbone, template, verbalizer))

    def dataset(self, rows: list[dict[str, Any]], tokenizer: Any) -> Dataset:
        """Rows wrapped by the template and tokenized; class ids out of the verbalizer's range are refused."""
        bad = next((r["target"] for r in rows if not 0 <= int(r["target"]) < len(self.classes)), None)
        if bad is not None:
            raise DeltaConfigError(
                f"the data has class id {bad}, and the verbalizer has {len(self.classes)} classes "
                f"({', '.join(self.classes)}); give label words for every class of the data (prompt.verbalizer)"
            )
        return super().dataset(rows, tokenizer)

    def eval_sums(self, output: Any, batch: Mapping[str, torch.Tensor]) -> EvalSums:
        """Per-example cross entropy and accuracy of the class logits."""
        return class_sums(output.logits, batch["label"])

    @torch.no_grad()
    def predict(self, module: nn.Module, batch: Mapping[str, torch.Tensor], tokenizer: Any) -> list[Any]:
        """The arg-max class's name."""
        inputs = {k: v for k, v in batch.items() if k != "label"}
        return [self.classes[int(c)] for c in module(**inputs).logits.argmax(-1)]
