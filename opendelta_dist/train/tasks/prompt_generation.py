"""``prompt_generation``: a template puts each row around a mask and the language model writes the row's target
text there (OpenPrompt's ``PromptForGeneration``, teacher forcing): the loss is the target tokens' cross entropy,
summed over each example and averaged over the batch (as OpenPrompt's); the metric is the teacher-forced exact
match (every target token the arg-max), and predictions are generated.

Encoder-decoders (T5: the mask becomes ``<extra_id_0>`` and the decoder writes the target after it) and causal LMs
(GPT-2: the target follows the text before the mask). The ``prompt`` group gives the template; the verbalizer is
not used (the targets are the data's text).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset
from transformers.modeling_outputs import CausalLMOutput

from opendelta_dist.errors import DeltaConfigError
from opendelta_dist.train.data import IGNORE_INDEX
from opendelta_dist.train.metrics import teacher_forced_exact_match
from opendelta_dist.train.models import language_model_head
from opendelta_dist.train.tasks import prompting
from opendelta_dist.train.tasks.base import EvalSums, Task


class PromptGenerator(prompting.PromptTaskModule):
    """The module a prompt-generation run trains: ``prompt`` (a ``PromptForGeneration``).

    ``forward(**batch)`` returns the shifted token logits, their labels (-100 outside the target) and the loss.
    """

    def forward(self, **batch: torch.Tensor) -> CausalLMOutput:
        """Shifted logits ``[batch, length - 1, vocab]`` and the teacher-forced loss; ``labels`` are attached to the
        output as ``output.labels``."""
        reference = batch["decoder_input_ids"] if self.config.is_encoder_decoder else batch["input_ids"]
        logits = self.prompt.prompt_model(batch).logits
        logits, labels = self.prompt.shift_logits_and_labels(logits, batch["loss_ids"], reference)
        token_losses = nn.functional.cross_entropy(
            logits.float().transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none"
        )
        output = CausalLMOutput(loss=token_losses.sum(-1).mean(), logits=logits)
        output["labels"] = labels
        return output


class PromptGeneration(Task):
    """Text generation at the template's mask (see the module docstring)."""

    name = "prompt_generation"
    metric = "exact_match"
    targets = "text"

    def __init__(self, data: Any, model: Any, cfg: Mapping[str, Any]) -> None:
        """Read the ``prompt`` group (checked by :meth:`check_config`)."""
        super().__init__(data, model, cfg)
        self.settings = prompting.PromptSettings.from_config(cfg, needs_verbalizer=False)
        self._wrapper: Any = None
        self._template: Any = None

    @classmethod
    def model_head(cls, model_type: str | None) -> str:
        """``seq2seq`` for encoder-decoders, ``causal_lm`` for decoders; masked LMs cannot generate.

        Raises:
            DeltaConfigError: a masked LM, or no model type.
        """
        if model_type is None:
            raise DeltaConfigError("a prompt task needs the backbone's model_type; set model.config.model_type")
        head = language_model_head(model_type)
        if head == "masked_lm":
            raise DeltaConfigError(
                f"model type {model_type!r} is a masked LM, which does not generate text; use "
                "model.task=prompt_classification (label words at the mask), or a T5/BART/GPT-2-like model"
            )
        return head

    @classmethod
    def check_config(cls, cfg: Mapping[str, Any]) -> None:
        """The ``prompt`` group has a template."""
        prompting.PromptSettings.from_config(cfg, needs_verbalizer=False)

    @classmethod
    def check_engine(cls, engine: str) -> None:
        """Every engine whose models are transformers models."""
        prompting.check_engine(engine)

    def wrap_model(self, backbone: nn.Module, tokenizer: Any) -> nn.Module:
        """``PromptGenerator(PromptForGeneration(backbone, template))``."""
        from opendelta_dist.prompts import PromptForGeneration

        self._template = prompting.build_template(self.settings, backbone, tokenizer)
        self._wrapper = prompting.build_wrapper(self.settings, backbone, tokenizer, teacher_forcing=True)
        return PromptGenerator(PromptForGeneration(backbone, self._template, tokenizer=tokenizer))

    def dataset(self, rows: list[dict[str, Any]], tokenizer: Any) -> Dataset:
        """Rows wrapped by the template with their target text, tokenized for teacher forcing."""
        prompting.require_model(self._wrapper)
        return prompting.wrap_rows(rows, self._template, self._wrapper, teacher_forcing=True, text_targets=True)

    def collate(self, items: list[dict[str, Any]], tokenizer: Any) -> dict[str, torch.Tensor]:
        """Padded to the longest row."""
        return prompting.collate_features(items, tokenizer.pad_token_id or 0)

    def eval_sums(self, output: Any, batch: Mapping[str, torch.Tensor]) -> EvalSums:
        """Per-example summed token cross entropy (the training loss) and teacher-forced exact match."""
        logits, labels = output.logits.float(), output["labels"]
        token_losses = nn.functional.cross_entropy(
            logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none"
        )
        correct, total = teacher_forced_exact_match(logits, labels)
        return correct, total, float(token_losses.sum()), int(labels.shape[0])

    @torch.no_grad()
    def predict(self, module: nn.Module, batch: Mapping[str, torch.Tensor], tokenizer: Any) -> list[Any]:
        """Greedy-generated text at the mask (at most ``data.max_target_length`` new tokens)."""
        prompt, rows = module.prompt, dict(batch)
        if not prompt.config.is_encoder_decoder:  # the context is what precedes the first target token
            rows["input_ids_len"] = rows["loss_ids"].argmax(-1)
        return prompt.generate(rows, max_new_tokens=self.data.max_target_length, do_sample=False)[1]

    def save(self, module: nn.Module, directory: Path) -> None:
        """``prompt_settings.json`` (the run's ``prompt`` group) beside the delta."""
        prompting.save_prompt_settings(self.cfg, directory)

    def delta_options(self, options: dict[str, Any], module: nn.Module) -> dict[str, Any]:
        """The delta keeps the prompt's own trained modules (soft tokens) trainable and saves them."""
        return prompting.with_prompt_modules(options, module, module.prompt.plm)
