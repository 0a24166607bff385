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
from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutput

from opendelta_dist.errors import DeltaConfigError
from opendelta_dist.train.data import IGNORE_INDEX
from opendelta_dist.train.metrics import teacher_forced_exact_match
from opendelta_dist.train.tasks import prompting
from opendelta_dist.train.tasks.base import EvalSums


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


class PromptGeneration(prompting.PromptTask):
    """Text generation at the template's mask (see the module docstring)."""

    name = "prompt_generation"
    metric = "exact_match"
    targets = "text"
    needs_verbalizer = False
    teacher_forcing = True

    @classmethod
    def model_head(cls, model_type: str | None) -> str:
        """``seq2seq`` for encoder-decoders, ``causal_lm`` for decoders; masked LMs cannot generate.

        Raises:
            DeltaConfigError: a masked LM, or no model type.
        """
        head = super().model_head(model_type)
        if head == "masked_lm":
            raise DeltaConfigError(
                f"model type {model_type!r} is a masked LM, which does not generate text; use "
                "model.task=prompt_classification (label words at the mask), or a T5/BART/GPT-2-like model"
            )
        return head

    def wrap_model(self, backbone: nn.Module, tokenizer: Any) -> nn.Module:
        """``PromptGenerator(PromptForGeneration(backbone, template))``."""
        from opendelta_dist.prompts import PromptForGeneration

        return PromptGenerator(
            PromptForGeneration(backbone, self.build_prompt(backbone, tokenizer), tokenizer=tokenizer)
        )

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
        first = rows["loss_ids"].argmax(-1)  # the first target token of each teacher-forced row
        if prompt.config.is_encoder_decoder:  # decoding starts after the mask's sentinel, before the target
            rows["loss_ids"] = nn.functional.one_hot(first - 1, rows["loss_ids"].shape[-1])
        else:  # the context is what precedes the target
            rows["input_ids_len"] = first
        return prompt.generate(rows, max_new_tokens=self.data.max_target_length, do_sample=False)[1]
