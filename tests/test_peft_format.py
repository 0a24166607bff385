"""LoRA deltas in PEFT's format both ways: PeftModel computes our logits, and PEFT adapters load as deltas."""

from __future__ import annotations

import json

import peft
import pytest
import torch

from opendelta_dist import AdapterModel, AutoDeltaModel, LoraModel
from opendelta_dist.deltas.lora_peft import save_peft
from opendelta_dist.errors import DeltaCheckpointError, DeltaConfigError
from tests.models import batch, build, logits

ATOL = 1e-5


def _randomise(params):
    with torch.no_grad():
        for p in params:
            p.normal_(std=0.3)


@pytest.mark.parametrize(
    ("family", "options"),
    [
        ("t5", {}),
        ("gpt2", {"modified_modules": ["c_attn"]}),  # Conv1D: PEFT's fan_in_fan_out
        ("bert", {"unfrozen_modules": ["deltas", "classifier"], "lora_r": 4, "lora_alpha": 32}),
    ],
)
def test_ours_exported_gives_our_logits_in_peft(family, options, tmp_path):
    model = build(family)
    delta = LoraModel(model, **options)
    _randomise(p for _, p in delta.named_delta_tensors())
    inputs = batch(family)
    ours = logits(model, inputs)
    delta.save_peft(tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert config["fan_in_fan_out"] is (family == "gpt2")

    in_peft = peft.PeftModel.from_pretrained(build(family), tmp_path / "peft")
    torch.testing.assert_close(logits(in_peft, inputs), ours, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    ("family", "peft_config"),
    [
        ("t5", {"target_modules": ["q", "v"]}),
        ("bert", {"target_modules": ["query", "value"], "modules_to_save": ["classifier"], "task_type": "SEQ_CLS"}),
        ("llama", {"target_modules": ["q_proj", "v_proj", "down_proj"], "use_rslora": True, "lora_dropout": 0.1}),
    ],
)
def test_peft_adapter_loads_as_a_delta_with_peft_logits(family, peft_config, tmp_path):
    trained = peft.get_peft_model(build(family), peft.LoraConfig(r=4, lora_alpha=8, **peft_config))
    _randomise(p for n, p in trained.named_parameters() if p.requires_grad)
    inputs = batch(family)
    reference = logits(trained, inputs)
    trained.save_pretrained(tmp_path / "peft")

    fresh = build(family)
    delta = AutoDeltaModel.from_finetuned(tmp_path / "peft", fresh)
    assert isinstance(delta, LoraModel)
    torch.testing.assert_close(logits(fresh, inputs), reference, atol=ATOL, rtol=0)
    # and it is an ordinary delta from then on: it saves in our format and detaches
    delta.save_finetuned(tmp_path / "ours")
    again = build(family)
    AutoDeltaModel.from_finetuned(tmp_path / "ours", again)
    assert torch.equal(logits(again, inputs), logits(fresh, inputs))
    delta.detach()
    assert torch.equal(logits(fresh, inputs), logits(build(family), inputs))


def test_export_of_a_non_lora_delta_is_refused(tmp_path):
    delta = AdapterModel(build("t5"))
    with pytest.raises(DeltaConfigError, match="PEFT's adapter format holds LoRA deltas only"):
        save_peft(delta, tmp_path / "x")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"use_dora": True}, "use_dora=True"),
        ({"rank_pattern": {"q": 2}}, "rank_pattern"),
        ({"bias": "all"}, "bias='all'"),
        ({"peft_type": "IA3"}, "PEFT 'IA3' adapter; only PEFT LoRA adapters"),
        ({"r": 6}, "declares r=6 but its tensors have ranks"),
    ],
)
def test_peft_adapters_a_delta_cannot_express_are_refused(change, match, tmp_path):
    trained = peft.get_peft_model(build("t5"), peft.LoraConfig(r=4, target_modules=["q"]))
    trained.save_pretrained(tmp_path / "peft")
    file = tmp_path / "peft" / "adapter_config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), **change}))
    fresh = build("t5")
    inputs = batch("t5")
    pristine = logits(fresh, inputs)
    with pytest.raises(DeltaCheckpointError, match=match):
        AutoDeltaModel.from_finetuned(tmp_path / "peft", fresh)
    assert torch.equal(logits(fresh, inputs), pristine)
    assert not any(".lora" in n for n, _ in fresh.named_modules())


@pytest.mark.parametrize(
    ("family", "auto_class", "task_type"),
    [("t5", "AutoPeftModelForSeq2SeqLM", "SEQ_2_SEQ_LM"), ("gpt2", "AutoPeftModelForCausalLM", "CAUSAL_LM")],
)
def test_an_export_loads_with_peft_auto_classes_from_its_own_config(family, auto_class, task_type, tmp_path):
    """The exported adapter_config.json names PEFT's task type and the base model, so PEFT's auto class rebuilds
    the whole tuned model from the adapter folder alone."""
    base = tmp_path / "base"
    build(family).save_pretrained(base)
    model = type(build(family)).from_pretrained(base).eval()
    torch.manual_seed(0)
    delta = LoraModel(model, modified_modules=None if family == "t5" else ["c_attn"])
    for p in delta.trainable_parameters():  # B starts at zero: make the adapter do something
        torch.nn.init.normal_(p, std=0.1)
    delta.save_peft(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == task_type and config["base_model_name_or_path"] == str(base)
    loaded = getattr(peft, auto_class).from_pretrained(tmp_path / "adapter").eval()
    inputs = {k: v for k, v in batch(family).items() if k != "labels"}
    if family == "t5":
        inputs["decoder_input_ids"] = torch.tensor([[0, 5, 9], [0, 7, 3]])
    torch.testing.assert_close(logits(loaded, inputs), logits(model, inputs), rtol=1e-5, atol=1e-5)
