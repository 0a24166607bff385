"""Tests of opendelta_dist.inspect on tiny randomly initialised BERT models."""

from __future__ import annotations

import io
import logging

import pytest
import torch
from rich.console import Console
from torch import nn
from transformers import BertConfig, BertModel

from opendelta_dist.deltas.lora import LoraModel
from opendelta_dist.errors import OptimizerMismatchError
from opendelta_dist.inspect import (
    check_optimizer,
    inspect_module_statistics,
    inspect_optimizer_statistics,
    print_module_statistics,
)

LORA_R = 8
HIDDEN = 32


def tiny_bert() -> BertModel:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=99, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37
    )
    return BertModel(config)


def lora_bert() -> tuple[BertModel, int]:
    """A tiny BERT with LoRA on query and value, the rest frozen; and its backbone's parameter count."""
    model = tiny_bert()
    backbone = sum(p.numel() for p in model.parameters())
    LoraModel(model, modified_modules=["query", "value"], lora_r=LORA_R).freeze_module(exclude=["deltas"])
    return model, backbone


def recording_console() -> Console:
    return Console(record=True, file=io.StringIO(), width=200)


# 2 layers x (query, value) x (A: r x in, B: out x r)
LORA_PARAMETERS = 2 * 2 * LORA_R * (HIDDEN + HIDDEN)


def test_module_statistics_count_delta_and_trainable_parameters() -> None:
    model, backbone = lora_bert()
    stats = inspect_module_statistics(model, verbose=False)
    total = backbone + LORA_PARAMETERS
    assert stats["total_parameters"] == total
    assert stats["delta_parameters"] == LORA_PARAMETERS
    assert stats["trainable_parameters"] == LORA_PARAMETERS
    assert stats["trainable_ratio"] == pytest.approx(LORA_PARAMETERS / total)
    assert stats["delta_ratio"] == pytest.approx(LORA_PARAMETERS / total)
    if not torch.cuda.is_available():
        assert stats["cudamem"] == 0.0
        assert stats["maxcudamem"] == 0.0


def test_module_statistics_count_a_shared_parameter_once() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model[1].weight = model[0].weight
    model[1].bias.requires_grad_(False)
    stats = inspect_module_statistics(model, verbose=False)
    assert stats["total_parameters"] == 16 + 4 + 4
    assert stats["trainable_parameters"] == 16 + 4
    assert stats["delta_parameters"] == 0


def test_module_statistics_on_a_model_without_parameters() -> None:
    stats = inspect_module_statistics(nn.ReLU(), verbose=False)
    assert stats["total_parameters"] == 0
    assert stats["trainable_ratio"] == 0.0


def test_module_statistics_verbose_logs(caplog: pytest.LogCaptureFixture) -> None:
    model, backbone = lora_bert()
    with caplog.at_level(logging.INFO, logger="opendelta_dist"):
        inspect_module_statistics(model)
    total = backbone + LORA_PARAMETERS
    assert f"Trainable Ratio: {LORA_PARAMETERS:,}/{total:,}=" in caplog.text
    assert f"Delta Parameter Ratio: {LORA_PARAMETERS:,}/{total:,}=" in caplog.text


STATS = {
    "total_parameters": 110_000,
    "trainable_parameters": 1_024,
    "trainable_ratio": 1_024 / 110_000,
    "delta_parameters": 512,
    "delta_ratio": 512 / 110_000,
    "cudamem": 1.5,
    "maxcudamem": 2.0,
}


def test_print_module_statistics_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    console = recording_console()
    print_module_statistics(STATS, console=console)
    assert console.export_text().splitlines() == [
        "Trainable Ratio: 1,024/110,000=0.93%",
        "Delta Parameter Ratio: 512/110,000=0.47%",
    ]


def test_print_module_statistics_with_cuda_and_switches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    console = recording_console()
    print_module_statistics(STATS, console=console)
    assert console.export_text().splitlines()[-1] == "Static Memory 1.50 GB, Max Memory 2.00 GB"
    print_module_statistics(STATS, delta_ratio=False, trainable_ratio=False, memory=False, console=console)
    assert console.export_text() == ""


def test_optimizer_statistics_report_every_group() -> None:
    model, _ = lora_bert()
    lora = [p for n, p in model.named_parameters() if "lora" in n]
    pooler = list(model.pooler.parameters())
    optimizer = torch.optim.AdamW(
        [{"params": lora, "lr": 1e-3, "weight_decay": 0.0}, {"params": pooler, "lr": 1e-4, "weight_decay": 0.01}]
    )
    console = recording_console()
    stats = inspect_optimizer_statistics(optimizer, console=console)
    assert list(stats) == ["param_group_0", "param_group_1"]
    first, second = stats["param_group_0"], stats["param_group_1"]
    assert (first["num_tensors"], first["total_parameters"], first["trainable_parameters"]) == (8, 2048, 2048)
    assert first["trainable_ratio"] == 1.0
    assert (first["lr"], first["weight_decay"], first["betas"]) == (1e-3, 0.0, (0.9, 0.999))
    # the pooler is frozen by freeze_module
    assert (second["num_tensors"], second["total_parameters"], second["trainable_parameters"]) == (2, 32 * 33, 0)
    assert second["trainable_ratio"] == 0.0
    assert (second["lr"], second["weight_decay"]) == (1e-4, 0.01)
    table = console.export_text()
    assert "param_group_1" in table
    assert "0.0001" in table
    assert "betas" not in table  # equal in every group


def test_optimizer_statistics_not_verbose_prints_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    optimizer = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    assert inspect_optimizer_statistics(optimizer, verbose=False)["param_group_0"]["total_parameters"] == 6
    assert capsys.readouterr().out == ""


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def test_check_optimizer_accepts_the_trainable_parameters_in_any_groups() -> None:
    model, _ = lora_bert()
    params = trainable(model)
    check_optimizer(torch.optim.AdamW(trainable(model)), model)
    check_optimizer(torch.optim.AdamW([{"params": params[:3]}, {"params": params[3:], "lr": 0.1}]), model)


def test_check_optimizer_rejects_frozen_parameters() -> None:
    model = tiny_bert()
    optimizer = torch.optim.AdamW(model.parameters())  # built before freezing
    LoraModel(model, modified_modules=["query", "value"]).freeze_module(exclude=["deltas"])
    with pytest.raises(OptimizerMismatchError) as info:
        check_optimizer(optimizer, model)
    message = str(info.value)
    frozen = sum(1 for _ in tiny_bert().parameters())
    assert f"{frozen} frozen parameter(s) of the model: embeddings.word_embeddings.weight, " in message
    assert f"and {frozen - 5} more" in message
    # the new delta parameters are missing, too
    assert "it misses 8 trainable parameter(s) of the model: encoder.layer.0.attention.self.query.lora." in message
    assert "[p for p in model.parameters() if p.requires_grad]" in message


def test_check_optimizer_rejects_a_tensor_outside_the_model() -> None:
    model, _ = lora_bert()
    stray = nn.Parameter(torch.zeros(3, 5))
    with pytest.raises(OptimizerMismatchError, match=r"1 tensor\(s\) that are not parameters of the model: "):
        check_optimizer(torch.optim.AdamW([*trainable(model), stray]), model)
    with pytest.raises(OptimizerMismatchError, match=r"param_groups\[0\]\['params'\]\[8\] of shape \(3, 5\)"):
        check_optimizer(torch.optim.AdamW([*trainable(model), stray]), model)


def test_check_optimizer_rejects_a_missing_trainable_parameter() -> None:
    model, _ = lora_bert()
    model.pooler.dense.weight.requires_grad_(True)
    with pytest.raises(OptimizerMismatchError) as info:
        check_optimizer(torch.optim.AdamW([p for n, p in model.named_parameters() if "lora" in n]), model)
    assert "it misses 1 trainable parameter(s) of the model: pooler.dense.weight." in str(info.value)


def test_check_optimizer_rejects_a_parameter_in_two_groups() -> None:
    model, _ = lora_bert()
    params = trainable(model)
    optimizer = torch.optim.AdamW([{"params": params[:4]}, {"params": params[4:]}])
    # torch refuses such groups at construction; they can still be made by editing param_groups
    optimizer.param_groups[1]["params"].append(params[0])
    with pytest.raises(OptimizerMismatchError) as info:
        check_optimizer(optimizer, model)
    name = next(n for n, p in model.named_parameters() if p is params[0])
    assert f"1 tensor(s) more than once: {name} (groups 0 and 1)" in str(info.value)
    assert "misses" not in str(info.value)
