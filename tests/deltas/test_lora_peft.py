"""Our LoRA computes what PEFT's LoRA computes: same logits and same gradients on the same weights.

Each case builds a tiny randomly initialised model (``tests.models``), deep-copies it, attaches our
``LoraModel`` to one copy and PEFT's LoRA to the other (each library selecting the target layers its
own way), gives both the same non-zero ``A`` and ``B``, and compares outputs and gradients.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import peft
import pytest
import torch
from torch import nn

from opendelta_dist import LoraModel
from tests.models import batch, build, logits

R, ALPHA, ATOL = 8, 16, 1e-5


@dataclass(frozen=True)
class Case:
    """One model family and how each library is told which layers to modify."""

    name: str
    family: str
    ours: list[str] | None  # our modified_modules (None: the family's default)
    peft_targets: list[str] | str  # PEFT's target_modules (a str is a full-match regex)
    fan_in_fan_out: bool = False  # PEFT needs it for GPT-2's Conv1D, whose weight is (in, out)


CASES = [
    Case("t5-qv", "t5", ["q", "v"], ["q", "v"]),
    # our default on T5 is the self-attention q and v (not the cross-attention ones)
    Case("t5-default", "t5", None, r".*\.SelfAttention\.(q|v)"),
    Case("gpt2-c_attn", "gpt2", ["c_attn"], ["c_attn"], fan_in_fan_out=True),
]


@dataclass
class Pair:
    """The untouched model, the two LoRA copies, and their tied ``A``/``B`` per modified layer."""

    base: nn.Module
    ours: nn.Module
    peft: nn.Module
    tensors: dict[str, tuple[nn.Parameter, nn.Parameter]]  # "{layer}.lora_A" -> (ours, PEFT's)


def _pair(case: Case) -> Pair:
    """Build the model, put each library's LoRA on a copy, and give both copies the same A and B."""
    base = build(case.family).eval()
    ours_model, peft_model = copy.deepcopy(base), copy.deepcopy(base)

    delta = LoraModel(backbone_model=ours_model, lora_r=R, lora_alpha=ALPHA, modified_modules=case.ours)
    delta.freeze_module(exclude=["deltas"], set_state_dict=False)
    config = peft.LoraConfig(
        r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=case.peft_targets, fan_in_fan_out=case.fan_in_fan_out
    )
    peft.inject_adapter_in_model(config, peft_model)
    for name, p in peft_model.named_parameters():
        p.requires_grad_(".lora_" in name)

    ours_tensors = dict(delta.named_delta_tensors())
    ours_layers = {key.removesuffix(".lora.lora_A") for key in ours_tensors if key.endswith(".lora_A")}
    peft_layers = {n for n, m in peft_model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert ours_layers, "no layer was modified"
    assert ours_layers == peft_layers, "the two libraries modified different layers"

    gen = torch.Generator().manual_seed(1)
    tied: dict[str, tuple[nn.Parameter, nn.Parameter]] = {}
    for layer in sorted(ours_layers):
        wrapper = peft_model.get_submodule(layer)
        for part in ("lora_A", "lora_B"):
            ours_param = ours_tensors[f"{layer}.lora.{part}"]
            peft_param = getattr(wrapper, part)["default"].weight
            assert ours_param.shape == peft_param.shape, f"{layer}.{part}: the layouts differ"
            # B starts at zero in both: non-zero values make the comparison see the whole update
            value = 0.1 * torch.randn(ours_param.shape, generator=gen)
            with torch.no_grad():
                ours_param.copy_(value)
                peft_param.copy_(value)
            tied[f"{layer}.{part}"] = (ours_param, peft_param)
    return Pair(base, ours_model, peft_model, tied)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_logits_match_peft(case: Case) -> None:
    pair = _pair(case)
    inputs = batch(case.family)
    ours = logits(pair.ours, inputs)
    torch.testing.assert_close(ours, logits(pair.peft, inputs), atol=ATOL, rtol=0)
    # the update must change the output, or the equality above proves nothing
    assert (ours - logits(pair.base, inputs)).abs().max() > 100 * ATOL


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_gradients_match_peft(case: Case) -> None:
    pair = _pair(case)
    inputs = batch(case.family)
    pair.ours(**inputs).loss.backward()
    pair.peft(**inputs).loss.backward()
    for key, (ours_param, peft_param) in pair.tensors.items():
        assert ours_param.grad is not None and peft_param.grad is not None, f"{key}: no gradient"
        assert ours_param.grad.abs().max() > 0, f"{key}: zero gradient"
        torch.testing.assert_close(
            ours_param.grad, peft_param.grad, atol=ATOL, rtol=0, msg=lambda m, k=key: f"{k}: {m}"
        )
    leaked = [n for n, p in pair.ours.named_parameters() if p.grad is not None and ".lora." not in n]
    assert not leaked, f"frozen backbone parameters got gradients: {leaked[:3]}"
