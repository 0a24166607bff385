"""Checkpoints written by the real OpenDelta 0.3.2 load here and compute what OpenDelta computed.

The fixtures in ``tests/fixtures/opendelta_0_3_2/`` were written by PyPI ``opendelta==0.3.2`` on
``transformers==4.36.2`` (regenerate them with ``bash scripts/opendelta-fixtures.sh``; this test never needs
OpenDelta). For each tiny backbone of :mod:`tests.models` and each OpenDelta method, in OpenDelta's default
configuration and in custom ones, a case directory holds OpenDelta's untouched ``save_finetuned`` output
(``config.json`` + ``pytorch_model.bin``), the outputs of OpenDelta's modified model on a fixed input
(``outputs.safetensors``) and ``case.json`` (options, what was saved, or the exception OpenDelta raised).
Each backbone directory holds the backbone's exact weights (transformers 4.36 and 5 initialise some
differently), the fixed input and the backbone's own outputs.

- :func:`test_loads_opendelta_checkpoint`: ``AutoDeltaModel.from_finetuned(case_dir, backbone_model=...)``
  reproduces OpenDelta's logits within ``ATOL`` (and, for the classification models, whose logits only see the
  first token, the last hidden state too; for decoder-only soft prompts, on the real tokens' positions, which
  are all our output has), every checkpoint. The model is run as ``from_finetuned`` leaves it: OpenDelta's ends
  in ``backbone_model.eval()``. Where OpenDelta computed otherwise than this library does
  (:data:`OPENDELTA_COMPAT`), loading turns ``opendelta_compat`` on and says so;
  :func:`test_opendelta_compat_switched_off` checks that ``opendelta_compat=False`` gives this library's own
  computation, which differs there, and :func:`test_opendelta_compat_survives_save_and_load` that a re-saved
  checkpoint keeps it.
- :func:`test_configuration_opendelta_failed_on`: where OpenDelta itself crashed (no checkpoint), this library
  either builds the delta (and runs it) or refuses with an error naming the reason, as
  :data:`OPENDELTA_FAILED` records.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import opendelta_dist
from opendelta_dist.errors import UnsupportedModuleError
from tests import models as tm

FIXTURES = Path(__file__).parent / "fixtures" / "opendelta_0_3_2"
INDEX: dict[str, Any] = json.loads((FIXTURES / "index.json").read_text())
CASES: dict[str, dict[str, Any]] = INDEX["cases"]
ATOL = 1e-4


def _each(backbones: str, method_case: str, known: Any) -> dict[str, Any]:
    return {f"{b}/{method_case}": known for b in backbones.split()}


ALL = "t5 bert gpt2 bart roberta"
NOT_BART = "t5 bert gpt2 roberta"  # OpenDelta 0.3.2 has no structure map for BART: its default cases failed

#: The checkpoints on which OpenDelta 0.3.2 computed otherwise than this library does, so that loading them turns
#: ``opendelta_compat`` on (with a notice): case id -> a pattern of the notice
OPENDELTA_COMPAT: dict[str, str] = {
    # OpenDelta's T5 prefix hands on no position bias: later blocks run without one
    **{f"t5/prefix/{c}": "T5's relative position bias" for c in ["small_reparam", "no_reparam"]},
    # transformers 4.36's SDPA BART decoder got no mask, and is_causal aligned it with the first prefix key
    **{f"bart/prefix/{c}": "causal mask of a decoder" for c in ["self_attn_reparam", "self_attn_no_reparam"]},
    # OpenDelta's soft prompt sits at the start of each row; RoBERTa's head reads the first soft token
    **{
        f"{b}/soft_prompt/{c}": "at the start of each row"
        for b in ALL.split()
        for c in ["n5", "n5_random", "n100_random"]
    },
}


@dataclass(frozen=True)
class Builds:
    """This library builds the delta OpenDelta crashed on (and runs it on the fixed input)."""

    note: str


@dataclass(frozen=True)
class Refuses:
    """This library refuses the configuration with ``raises``, naming the reason (``match`` is in the message)."""

    raises: type[BaseException]
    match: str
    note: str


NO_BART_MAP = Builds(
    "OpenDelta 0.3.2 has no common-structure map for BART (KeyError 'Available Models with default "
    "configurations are ...'); ours has BART's roles"
)
COMPACTER_BOTTLENECK = Refuses(
    UnsupportedModuleError,
    r"maps 32 -> 2 features, which are not both multiples of hypercomplex_division=4",
    "the default reduction_factor=16 gives a 2-wide bottleneck on these 32-wide models, which OpenDelta's "
    "PHMLinear cannot split into hypercomplex_division=4 parts (AssertionError at the first forward); ours "
    "refuses it when building, naming both options",
)
LOW_RANK_RANK2 = Builds(
    "OpenDelta's LowRankLinear computes W_left * W_right elementwise, which only broadcasts for rank 1 "
    "(RuntimeError at the first forward); ours builds a rank-2 factorisation"
)
SOFT_PROMPT_100_ON_99 = Builds(
    "OpenDelta's token_init embeds token ids 0..99, out of the 99-token vocabulary (IndexError); ours cycles "
    "through the non-special token ids"
)

#: case id -> what this library does with a configuration OpenDelta 0.3.2 itself failed on
OPENDELTA_FAILED: dict[str, Builds | Refuses] = {
    **{f"bart/{m}/default": NO_BART_MAP for m in ["lora", "adapter", "bitfit", "low_rank_adapter", "parallel_adapter"]},
    **{f"bart/{m}": NO_BART_MAP for m in ["compacter/rf8", "prefix/small_reparam", "prefix/no_reparam"]},
    "bart/low_rank_adapter/rank2": Builds(NO_BART_MAP.note + "; and " + LOW_RANK_RANK2.note),
    **_each(NOT_BART, "compacter/default", COMPACTER_BOTTLENECK),
    "bart/compacter/default": Refuses(
        COMPACTER_BOTTLENECK.raises,
        COMPACTER_BOTTLENECK.match,
        f"{NO_BART_MAP.note}; and {COMPACTER_BOTTLENECK.note}",
    ),
    **_each(NOT_BART, "low_rank_adapter/rank2", LOW_RANK_RANK2),
    **_each(ALL, "soft_prompt/default", SOFT_PROMPT_100_ON_99),
    "t5/bitfit/default": Builds(
        "OpenDelta adds a bias to T5's bias-less Linear layers by initialising c.bias before registering it "
        "(AttributeError: 'NoneType' object has no attribute 'uniform_'); ours adds zero biases"
    ),
    "gpt2/lora/r4_explicit": Builds(
        "OpenDelta's LoRA reads in_features, which GPT-2's Conv1D lacks (AttributeError); ours handles Conv1D"
    ),
    "bart/parallel_adapter/b8_pairs": Builds(
        "OpenDelta's parallel adapter reads the hidden states from args[0], but BART calls its attention with "
        "hidden_states= as a keyword (IndexError at the first forward); ours reads keyword calls too"
    ),
}


# ----------------------------------------------------------------------------------------------------------------


def _case(case_id: str) -> dict[str, Any]:
    return json.loads((FIXTURES / CASES[case_id]["dir"] / "case.json").read_text())


@cache
def _backbone_state(backbone: str) -> dict[str, torch.Tensor]:
    return load_file(FIXTURES / backbone / "backbone.safetensors")


@cache
def _reference(backbone: str) -> dict[str, torch.Tensor]:
    return load_file(FIXTURES / backbone / "reference.safetensors")


def _inputs(backbone: str) -> dict[str, torch.Tensor]:
    return {k.removeprefix("input."): v.clone() for k, v in _reference(backbone).items() if k.startswith("input.")}


def _classification(backbone: str) -> bool:
    return tm.FAMILIES[backbone].classification


def _backbone(backbone: str) -> torch.nn.Module:
    """Our tests' tiny model of ``backbone``, holding exactly the weights OpenDelta's backbone had."""
    model = tm.build(backbone)
    model.load_state_dict(_backbone_state(backbone), strict=True)
    return model.eval()


@torch.no_grad()
def _outputs(model: torch.nn.Module, backbone: str) -> dict[str, torch.Tensor]:
    if _classification(backbone):
        res = model(**_inputs(backbone), output_hidden_states=True)
        return {"logits": res.logits, "last_hidden_state": res.hidden_states[-1]}
    return {"logits": model(**_inputs(backbone)).logits}


def _assert_close(name: str, mine: torch.Tensor, theirs: torch.Tensor, prompt_positions: bool) -> None:
    if prompt_positions and mine.dim() >= 2 and theirs.dim() == mine.dim() and theirs.shape[1] > mine.shape[1]:
        # OpenDelta's output keeps the soft prompt's positions in front; ours has the real tokens' only
        theirs = theirs[:, theirs.shape[1] - mine.shape[1] :]
    torch.testing.assert_close(
        mine, theirs, rtol=0, atol=ATOL, msg=lambda m: f"{name} differs from OpenDelta 0.3.2's: {m}"
    )


def _loaded_params() -> list[Any]:
    return [pytest.param(case_id, id=case_id) for case_id, s in CASES.items() if s["opendelta_ok"]]


def _load(case_dir: Path, model: torch.nn.Module, **kwargs: Any) -> tuple[Any, list[str]]:
    """``from_finetuned`` onto ``model``; the delta and the messages of the opendelta_compat notices it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        delta = opendelta_dist.AutoDeltaModel.from_finetuned(case_dir, backbone_model=model, **kwargs)
    notices = [str(w.message) for w in caught if "opendelta_compat" in str(w.message)]
    assert all(issubclass(w.category, UserWarning) for w in caught if "opendelta_compat" in str(w.message))
    return delta, notices


def _assert_opendelta_outputs(model: torch.nn.Module, case_id: str) -> dict[str, torch.Tensor]:
    summary = CASES[case_id]
    expected = load_file(FIXTURES / summary["dir"] / "outputs.safetensors")
    mine = _outputs(model, summary["backbone"])
    for name, value in mine.items():
        _assert_close(name, value, expected[name], prompt_positions=summary["method"] == "soft_prompt")
    return mine


def _failed_params() -> list[Any]:
    return [pytest.param(case_id, id=case_id) for case_id, s in CASES.items() if not s["opendelta_ok"]]


# ----------------------------------------------------------------------------------------------------------------


def test_index_matches_fixtures_and_tables() -> None:
    assert INDEX["versions"]["opendelta"] == "0.3.2" and INDEX["versions"]["transformers"] == "4.36.2"
    for case_id, summary in CASES.items():
        case_dir = FIXTURES / summary["dir"]
        case = _case(case_id)
        assert case["id"] == case_id and case["opendelta"]["ok"] == summary["opendelta_ok"]
        files = {f.name for f in case_dir.iterdir()}
        if summary["opendelta_ok"]:
            assert {"case.json", "config.json", "pytorch_model.bin", "outputs.safetensors"} <= files, case_id
            # the fixture is a reference only where OpenDelta's own from_finetuned reproduces the saved outputs
            assert case["opendelta_reload"]["reproduces"], (case_id, case["opendelta_reload"])
        else:
            assert files == {"case.json"}, case_id
    ok = {c for c, s in CASES.items() if s["opendelta_ok"]}
    failed = set(CASES) - ok
    assert set(OPENDELTA_COMPAT) <= ok, f"OPENDELTA_COMPAT names cases with no checkpoint: {set(OPENDELTA_COMPAT) - ok}"
    assert set(OPENDELTA_FAILED) == failed, (
        f"OPENDELTA_FAILED must name exactly the cases OpenDelta failed on: missing {failed - set(OPENDELTA_FAILED)}, "
        f"extra {set(OPENDELTA_FAILED) - failed}"
    )
    for case_id, expected in OPENDELTA_FAILED.items():  # each note names the exception OpenDelta raised
        assert _case(case_id)["opendelta"]["error_type"] in expected.note, (case_id, _case(case_id)["opendelta"])


@pytest.mark.parametrize("backbone", sorted({s["backbone"] for s in CASES.values()}))
def test_backbone_matches_transformers_4_36(backbone: str) -> None:
    """Our transformers runs OpenDelta's backbone (no delta) to the outputs transformers 4.36.2 computed, so a
    difference in a case below is the delta's."""
    mine = _outputs(_backbone(backbone), backbone)
    for name, value in mine.items():
        _assert_close(name, value, _reference(backbone)[name], prompt_positions=False)


@pytest.mark.parametrize("case_id", _loaded_params())
def test_loads_opendelta_checkpoint(case_id: str) -> None:
    summary = CASES[case_id]
    model = _backbone(summary["backbone"])
    delta, notices = _load(FIXTURES / summary["dir"], model)
    _assert_opendelta_outputs(model, case_id)
    compat = getattr(delta.config, "opendelta_compat", False)
    # opendelta_compat is on exactly where OpenDelta computed otherwise, and then a notice says so (once)
    assert compat == (case_id in OPENDELTA_COMPAT), (case_id, compat)
    if compat:
        assert len(notices) == 1 and re.search(OPENDELTA_COMPAT[case_id], notices[0]), notices
    else:
        assert not notices, notices


#: compat cases whose computation this library's own changes on the fixed input (the others differ only with
#: left padding), one per root cause
DIFFERS_WITHOUT_COMPAT = ["t5/prefix/no_reparam", "bart/prefix/self_attn_reparam", "roberta/soft_prompt/n5"]


@pytest.mark.parametrize("case_id", DIFFERS_WITHOUT_COMPAT)
def test_opendelta_compat_switched_off(case_id: str) -> None:
    """``opendelta_compat=False`` (a keyword override of from_finetuned) gives this library's own computation,
    without notice: there it is not OpenDelta's."""
    summary = CASES[case_id]
    model = _backbone(summary["backbone"])
    delta, notices = _load(FIXTURES / summary["dir"], model, opendelta_compat=False)
    assert delta.config.opendelta_compat is False and not notices
    expected = load_file(FIXTURES / summary["dir"] / "outputs.safetensors")
    logits = _outputs(model, summary["backbone"])["logits"]
    assert logits.shape == expected["logits"].shape
    assert (logits - expected["logits"]).abs().max() > 10 * ATOL, "this library's own computation is OpenDelta's"


@pytest.mark.parametrize("case_id", ["t5/prefix/small_reparam", "roberta/soft_prompt/n5_random"])
def test_opendelta_compat_survives_save_and_load(case_id: str, tmp_path: Path) -> None:
    """A delta loaded from an OpenDelta checkpoint, saved again, reloads with opendelta_compat (and its notice),
    computing what it computed."""
    summary = CASES[case_id]
    model = _backbone(summary["backbone"])
    delta, _ = _load(FIXTURES / summary["dir"], model)
    before = _outputs(model, summary["backbone"])
    delta.save_finetuned(tmp_path / "resaved")
    assert json.loads((tmp_path / "resaved" / "config.json").read_text())["opendelta_compat"] is True
    fresh = _backbone(summary["backbone"])
    again, notices = _load(tmp_path / "resaved", fresh)
    assert again.config.opendelta_compat is True and len(notices) == 1
    for name, value in _outputs(fresh, summary["backbone"]).items():
        assert torch.equal(value, before[name]), name


def test_bart_prefix_compat_follows_the_transformers_version(tmp_path: Path) -> None:
    """OpenDelta's BART decoder mask was misaligned only under transformers >= 4.36's SDPA attention: a checkpoint
    saved with an older transformers (eager attention, where OpenDelta computed as this library does) loads
    without opendelta_compat."""
    case_id = "bart/prefix/self_attn_no_reparam"
    source = FIXTURES / CASES[case_id]["dir"]
    older = tmp_path / "older"
    older.mkdir()
    (older / "pytorch_model.bin").write_bytes((source / "pytorch_model.bin").read_bytes())
    config = json.loads((source / "config.json").read_text())
    (older / "config.json").write_text(json.dumps({**config, "transformers_version": "4.26.1"}))
    model = _backbone("bart")
    delta, notices = _load(older, model)
    assert delta.config.opendelta_compat is False and not notices
    own = _backbone("bart")
    _load(source, own, opendelta_compat=False)
    assert torch.equal(_outputs(model, "bart")["logits"], _outputs(own, "bart")["logits"])


def test_bart_prefix_compat_keeps_a_padding_mask() -> None:
    """Where the decoder had padding, OpenDelta's layer got the mask and extended it as this library does: with a
    padded decoder row, opendelta_compat changes nothing."""
    source = FIXTURES / CASES["bart/prefix/self_attn_no_reparam"]["dir"]
    inputs = _inputs("bart")
    inputs["decoder_attention_mask"] = torch.ones_like(inputs["decoder_input_ids"])
    inputs["decoder_attention_mask"][0, -2:] = 0
    logits = []
    for compat in (True, False):
        model = _backbone("bart")
        _load(source, model, opendelta_compat=compat)
        with torch.no_grad():
            logits.append(model(**inputs).logits)
    torch.testing.assert_close(logits[0], logits[1], rtol=0, atol=1e-6)


@pytest.mark.parametrize("case_id", _failed_params())
def test_configuration_opendelta_failed_on(case_id: str, tmp_path: Path) -> None:
    """OpenDelta crashed on this configuration (case.json has its exception); we refuse it clearly, or build it,
    train it (one step changes its tensors and outputs) and round-trip it exactly through save and load."""
    case = _case(case_id)
    backbone = case["backbone"]
    model = _backbone(backbone)
    delta_cls = getattr(opendelta_dist, case["opendelta_class"])
    expected = OPENDELTA_FAILED[case_id]
    if isinstance(expected, Refuses):
        with pytest.raises(expected.raises, match=expected.match):
            delta_cls(backbone_model=model, **case["options"])
        return
    delta = delta_cls(backbone_model=model, **case["options"])
    assert any(True for _ in delta.parameters()), "the delta has no parameters"
    mine = _outputs(model, backbone)
    reference = _reference(backbone)
    for name, value in mine.items():
        assert torch.isfinite(value).all(), name
        if case["method"] != "soft_prompt":
            assert value.shape == reference[name].shape, name

    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # away from the initialisation, where zero factors (LoRA's B) block some gradients
        for _, p in delta.named_delta_tensors():
            p.add_(0.1 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    before = {k: p.detach().clone() for k, p in delta.named_delta_tensors()}
    delta.freeze_module(exclude=["deltas"])
    optimizer = torch.optim.SGD(delta.trainable_parameters(), lr=1.0)
    model.train()
    model(**_inputs(backbone)).logits.float().pow(2).mean().backward()
    optimizer.step()
    model.eval()
    # (not every tensor need move: e.g. a key projection's bias has no gradient, softmax ignores it)
    assert any(not torch.equal(p, before[k]) for k, p in delta.named_delta_tensors()), "the step trained nothing"
    trained = _outputs(model, backbone)
    assert any(not torch.equal(trained[name], mine[name]) for name in mine), "training changed no output"
    delta.save_finetuned(tmp_path / "delta")
    fresh = _backbone(backbone)
    opendelta_dist.AutoDeltaModel.from_finetuned(tmp_path / "delta", backbone_model=fresh)
    for name, value in _outputs(fresh, backbone).items():
        assert torch.equal(value, trained[name]), f"{name} after save and load differs from the trained model's"
