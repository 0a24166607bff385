"""Contextual calibration (Zhao et al., 2021; Hu et al., 2022): the mean mask logits over a support set.

Typical use, as OpenPrompt 1.0.1's ``calibrate``::

    support = PromptDataLoader([InputExample(text_a="", text_b="")], template, tokenizer=tokenizer, ...)
    verbalizer.register_calibrate_logits(calibrate(prompt_model, support))

A :class:`~opendelta_dist.prompts.ManualVerbalizer` then divides its label-word probabilities by those of
these logits and renormalises (see :mod:`~opendelta_dist.prompts.verbalizers`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from opendelta_dist.prompts.errors import PromptError


def _to_device(batch: Any, device: torch.device) -> Any:
    if hasattr(batch, "to") and not isinstance(batch, dict):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return batch


@torch.no_grad()
def calibrate(prompt_model: nn.Module, dataloader: Iterable[Any]) -> torch.Tensor:
    """The mean over all examples of ``prompt_model.forward_without_verbalize`` (the mask logits).

    The model runs in eval mode (dropout off) and is put back in the mode it was in.

    Args:
        prompt_model: a :class:`~opendelta_dist.prompts.PromptForClassification`.
        dataloader: the support batches (e.g. a loader of one template-only example).

    Returns:
        ``[vocab]`` (``[masks, vocab]`` for a template with several masks), detached.

    Raises:
        PromptError: the loader gave no batch.
    """
    was_training = prompt_model.training
    prompt_model.eval()
    try:
        logits = [
            prompt_model.forward_without_verbalize(_to_device(batch, prompt_model.device)) for batch in dataloader
        ]
    finally:
        prompt_model.train(was_training)
    if not logits:
        raise PromptError("the calibration loader gave no batch: give it at least one example")
    return torch.cat(logits, dim=0).mean(dim=0)
