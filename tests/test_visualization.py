"""Tests of opendelta_dist.visualization on tiny randomly initialised BERT and T5 models."""

from __future__ import annotations

import io
import re

import pytest
import torch
from rich.console import Console
from rich.tree import Tree
from torch import nn
from transformers import BertConfig, BertModel, T5Config, T5Model

from opendelta_dist.deltas.bitfit import BitFitModel
from opendelta_dist.deltas.lora import LoraModel
from opendelta_dist.visualization import Visualization


def tiny_bert(num_layers: int = 2) -> BertModel:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=num_layers, num_attention_heads=4, intermediate_size=37
    )
    return BertModel(config)


def tiny_t5(num_layers: int = 2) -> T5Model:
    torch.manual_seed(0)
    return T5Model(T5Config(vocab_size=99, d_model=32, d_kv=8, d_ff=37, num_layers=num_layers, num_heads=4))


def block_lines(text: str, class_name: str) -> list[str]:
    """The names of the nodes of class ``class_name``, in drawing order."""
    return re.findall(rf"(\S+) \({class_name}\)", text)


def ansi_codes_before(ansi: str, fragment: str) -> set[str]:
    """The SGR codes that open right before each occurrence of ``fragment`` in a styled rendering."""
    codes = set(re.findall(r"\x1b\[([0-9;]*)m" + re.escape(fragment), ansi))
    assert codes, f"{fragment!r} is not drawn with a style"
    return codes


def test_identical_blocks_fold_into_one_range() -> None:
    text = Visualization(tiny_bert(12)).structure_text()
    assert block_lines(text, "BertLayer") == ["0-11"]
    assert text.startswith("root (BertModel)\n")
    assert "word_embeddings (Embedding) weight:[99,32]\n" in text
    assert "query (Linear) weight:[32,32] bias:[32]\n" in text


def test_a_block_with_a_delta_splits_the_range() -> None:
    model = tiny_bert(5)
    LoraModel(model, modified_modules=["[r]layer\\.2\\.attention\\.self\\.query"]).freeze_module(exclude=["deltas"])
    text = Visualization(model).structure_text()
    assert block_lines(text, "BertLayer") == ["0-1", "2", "3-4"]
    assert text.count("lora (LowRankLinear) lora_A:[8,32] lora_B:[32,8]\n") == 1


def test_a_block_differing_only_in_trainable_status_is_not_merged() -> None:
    model = tiny_bert(4)
    for p in model.parameters():
        p.requires_grad_(False)
    model.encoder.layer[1].output.dense.weight.requires_grad_(True)
    assert block_lines(Visualization(model).structure_text(), "BertLayer") == ["0", "1", "2-3"]


def test_a_swapped_in_delta_bias_splits_the_range() -> None:
    model = tiny_bert(3)
    BitFitModel(model, modified_modules=["[r]layer\\.1\\.attention\\.self\\.query"]).freeze_module(exclude=["deltas"])
    assert block_lines(Visualization(model).structure_text(), "BertLayer") == ["0", "1", "2"]


def test_only_consecutive_identical_numbered_siblings_are_merged() -> None:
    blocks = nn.ModuleList([nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2), nn.Linear(2, 3), nn.Linear(2, 2)])
    model = nn.Sequential()
    model.add_module("blocks", blocks)
    text = Visualization(model).structure_text()
    # 1 has no parameters and is dropped, but 0 and 2 are not neighbours; 3 differs in shape
    assert block_lines(text, "Linear") == ["0", "2", "3", "4"]
    kept = Visualization(model).structure_text(keep_non_params=True)
    assert "1 (ReLU)" in kept


def test_t5_blocks_fold_only_when_identical() -> None:
    text = Visualization(tiny_t5(3)).structure_text()
    # block 0 holds the relative attention bias, the others are alike
    assert block_lines(text, "T5Block") == ["0", "1-2", "0", "1-2"]
    two_layers = Visualization(tiny_t5()).structure_text()
    assert block_lines(two_layers, "T5Block") == ["0", "1", "0", "1"]
    assert "relative_attention_bias (Embedding) weight:[32,4]" in two_layers


def test_modules_without_parameters_are_dropped_unless_kept() -> None:
    model = tiny_bert()
    assert "(Dropout)" not in Visualization(model).structure_text()
    assert "dropout (Dropout)" in Visualization(model).structure_text(keep_non_params=True)


def test_expand_params_draws_parameters_as_children() -> None:
    text = Visualization(tiny_bert()).structure_text(rootname="bert", expand_params=True)
    lines = text.splitlines()
    assert lines[0] == "bert (BertModel)"
    i = next(k for k, line in enumerate(lines) if line.endswith("word_embeddings (Embedding)"))
    assert lines[i + 1].endswith("── weight:[99,32]")


def test_delta_trainable_and_frozen_parameters_have_different_styles() -> None:
    model = tiny_bert()
    LoraModel(model, modified_modules=["query", "value"]).freeze_module(exclude=["deltas"])
    model.embeddings.word_embeddings.weight.requires_grad_(True)
    console = Console(record=True, force_terminal=True, color_system="truecolor", file=io.StringIO(), width=200)
    tree = Visualization(model).structure_graph(console=console)
    assert isinstance(tree, Tree)
    ansi = console.export_text(styles=True)
    delta = ansi_codes_before(ansi, "lora_A:[8,32]")
    trainable = ansi_codes_before(ansi, "weight:[99,32]")
    frozen = ansi_codes_before(ansi, "weight:[512,32]")
    assert len(delta | trainable | frozen) == 3  # each status one style, all three different
    assert ansi_codes_before(ansi, "lora\x1b[0m (LowRankLinear)")  # a delta module's name is marked
    assert "── query (Linear)" in ansi  # a backbone module's name is not


def test_output_is_plain_text_when_stdout_is_not_a_terminal(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
        monkeypatch.delenv(var, raising=False)
    model = tiny_bert()
    LoraModel(model, modified_modules=["query"]).freeze_module(exclude=["deltas"])
    Visualization(model).structure_graph()
    out = capsys.readouterr().out
    assert "\x1b[" not in out
    assert "0-1 (BertLayer)" in out
    assert "lora (LowRankLinear)" in out


def test_print_tree_false_prints_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    Visualization(tiny_bert()).structure_graph(printTree=False)
    assert capsys.readouterr().out == ""


def test_a_root_without_parameters_is_still_drawn() -> None:
    assert Visualization(nn.ReLU()).structure_text() == "root (ReLU)\n"


def test_rejects_a_non_module() -> None:
    with pytest.raises(TypeError, match=r"torch\.nn\.Module"):
        Visualization("bert")  # type: ignore[arg-type]
