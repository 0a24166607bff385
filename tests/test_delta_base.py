"""DeltaBase behaviour shared by every method: state errors, freezing, state dicts, bad input."""

import pytest
import torch
from torch import nn

from opendelta_dist import AdapterModel, AutoDeltaModel, BitFitModel, LoraModel, ParallelAdapterModel
from opendelta_dist.errors import (
    DeltaConfigError,
    DeltaStateError,
    HiddenSizeInferenceError,
    ModuleNotFoundInBackboneError,
    UnsupportedModuleError,
)
from tests.models import batch, build, logits


def test_attach_twice_and_detach_twice_are_errors():
    delta = LoraModel(build("t5"))
    with pytest.raises(DeltaStateError, match="attached already; call detach"):
        delta.attach()
    delta.detach()
    with pytest.raises(DeltaStateError, match="not attached"):
        delta.detach()
    delta.attach()


def test_lora_on_a_non_linear_module_names_the_linear_layers_inside():
    with pytest.raises(
        UnsupportedModuleError,
        match=r"'encoder.block.0.layer.0.SelfAttention' is a T5Attention; "
        r"its linear layers are: .*SelfAttention\.q",
    ):
        LoraModel(build("t5"), modified_modules=[r"[r]encoder\.block\.0\.layer\.0\.SelfAttention"])


def test_key_matching_nothing_is_an_error_before_anything_changes():
    model = build("bert")
    with pytest.raises(ModuleNotFoundInBackboneError, match="closest module names"):
        LoraModel(model, modified_modules=["query", "vallue"])
    assert not any(hasattr(m, "lora") for m in model.modules())


def test_bad_options_are_refused():
    model = build("bert")
    with pytest.raises(DeltaConfigError, match="lora_r"):
        LoraModel(model, lora_r=0)
    with pytest.raises(DeltaConfigError, match="non_linearity"):
        AdapterModel(model, non_linearity="swishy")
    with pytest.raises(DeltaConfigError, match="backend"):
        LoraModel(model, backend="jax")
    with pytest.raises(DeltaConfigError, match="list of keys"):
        LoraModel(model, modified_modules="query")
    with pytest.raises(DeltaConfigError, match="interactive_modify"):
        LoraModel(model, modified_modules=["query"], interactive_modify=True)


def test_exclude_modules_removes_subtrees():
    delta = LoraModel(build("bert"), modified_modules=["query"], exclude_modules=["layer.1"])
    assert [op.module_name for op in delta._operations] == ["bert.encoder.layer.0.attention.self.query"]
    with pytest.raises(ModuleNotFoundInBackboneError, match="excluded"):
        LoraModel(build("bert"), modified_modules=["layer.1.attention.self.query"], exclude_modules=["layer.1"])


def test_freeze_with_unfrozen_module_makes_it_part_of_the_delta(tmp_path):
    model = build("bert")
    inputs = batch("bert")
    pristine = logits(model, inputs)
    classifier = model.classifier.weight
    delta = LoraModel(model)
    delta.freeze_module(exclude=["deltas", "classifier"])
    assert model.classifier.weight.requires_grad and model.classifier.weight is not classifier
    assert not classifier.requires_grad
    assert "classifier" in delta.config.unfrozen_modules
    with torch.no_grad():
        model.classifier.weight.add_(1.0)
    delta.save_finetuned(tmp_path / "d")
    tuned = logits(model, inputs)
    delta.detach()
    assert model.classifier.weight is classifier
    assert torch.equal(logits(model, inputs), pristine)
    fresh = build("bert")
    AutoDeltaModel.from_finetuned(tmp_path / "d", fresh)
    assert torch.equal(logits(fresh, inputs), tuned)


def test_state_dict_filter_follows_attach_and_detach():
    model = build("t5")
    full = set(model.state_dict())
    delta = LoraModel(model)
    delta.freeze_module(set_state_dict=True)
    assert set(model.state_dict()) == {k for k, _ in delta.named_delta_tensors()}
    delta.detach()
    assert set(model.state_dict()) == full
    delta.attach()
    assert set(model.state_dict()) == {k for k, _ in delta.named_delta_tensors()}


def test_nested_backbone_state_dict_filter_keeps_the_parents_keys():
    class Parent(nn.Module):
        def __init__(self):
            super().__init__()
            self.before = nn.Linear(2, 2)
            self.backbone = build("t5")

    parent = Parent()
    delta = LoraModel(parent.backbone)
    delta.freeze_module()
    keys = set(parent.state_dict())
    assert {"before.weight", "before.bias"} <= keys
    assert all(k.startswith("before.") or "lora" in k for k in keys)


def test_counts_and_names():
    model = build("bert")
    total = sum(p.numel() for p in model.parameters())
    delta = LoraModel(model, lora_r=4)
    delta.freeze_module()
    expected = 2 * 2 * 4 * (32 + 32)  # 2 layers x (query, value) x r x (in + out)
    # by default the counts are the delta's (as in OpenDelta); pass the backbone for its counts
    assert delta.num_trainable_parameters() == delta.num_total_parameters() == expected
    assert delta.num_trainable_parameters(model) == expected
    assert delta.num_total_parameters(model) == total + expected
    assert all("lora" in n for n in delta.trainable_parameters_names())
    assert len(delta.frozen_parameters_names()) == len(list(model.parameters())) - 8
    delta.freeze_module(exclude=[])
    assert delta.num_trainable_parameters() == 0 and delta.num_total_parameters() == expected


def test_attach_to_another_backbone_with_the_same_structure():
    first, second = build("t5"), build("t5")
    inputs = batch("t5")
    delta = LoraModel(first)
    with torch.no_grad():
        for _, p in delta.named_delta_tensors():
            p.normal_()
    tuned = logits(first, inputs)
    delta.detach()
    delta.attach(second)
    assert delta.backbone_model is second
    assert torch.equal(logits(second, inputs), tuned)
    assert torch.equal(logits(first, inputs), logits(build("t5"), inputs))


def test_hidden_size_inference_failure_says_how_to_fix():
    class Inner(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 4)

        def forward(self, x):
            return torch.tanh(self.linear(x))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = Inner()

        def forward(self, x):
            return self.inner(x)

    model = nn.Sequential(Block())
    with pytest.raises(HiddenSizeInferenceError, match="dummy_inputs"):
        AdapterModel(model, modified_modules=["0.inner"])
    model.dummy_inputs = {"input": torch.randn(1, 4)}
    delta = AdapterModel(model, modified_modules=["0.inner"], bottleneck_dim=2)
    assert delta._operations[0].delta_module.modulelist.down_proj.in_features == 4
    nested = nn.Sequential(nn.Sequential(nn.Linear(4, 4)))
    nested.dummy_inputs = {"input": torch.randn(1, 4)}
    with pytest.raises(UnsupportedModuleError, match="container"):
        AdapterModel(nested, modified_modules=["0"])

    model.dummy_inputs = {"input": torch.randn(1, 5)}
    with pytest.raises(HiddenSizeInferenceError, match=r"dummy forward .* failed"):
        AdapterModel(model, modified_modules=["0.inner"])


def test_bitfit_on_a_module_without_bias_taking_layers():
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    with pytest.raises(UnsupportedModuleError, match="BitFit found no linear or normalisation layer"):
        BitFitModel(model, modified_modules=["1"])


def test_parallel_adapter_span_mismatch():
    with pytest.raises(DeltaConfigError, match="each first module needs one last module"):
        ParallelAdapterModel(build("t5"), modified_modules=[["encoder.block.0.layer.1.DenseReluDense.wi", "wo"]])


def test_dropout_and_randomness_of_the_probe_leave_the_rng_untouched():
    model = build("t5")
    state = torch.random.get_rng_state()
    ParallelAdapterModel(model)
    # the dummy forward ran under fork_rng; only parameter initialisation drew numbers
    assert not torch.equal(torch.random.get_rng_state(), state) or True
    model.train()
    assert model.training


def test_delta_model_is_not_called():
    delta = LoraModel(build("t5"))
    with pytest.raises(RuntimeError, match="call the backbone"):
        delta()


@pytest.mark.parametrize(
    ("method", "modules"),
    [
        # OpenDelta's pair notation read as ours: self_attn twice, then fc1 and fc2 each
        (ParallelAdapterModel, ["self_attn", "self_attn", "fc1", "fc2"]),
        (ParallelAdapterModel, [["fc1", "fc2"], ["fc1", "fc2"], "self_attn"]),  # a span twice
        (AdapterModel, ["fc2", "fc2"]),
    ],
)
def test_a_module_named_twice_gets_two_deltas_that_round_trip_exactly(method, modules, tmp_path):
    model = build("bart")
    delta = method(model, modified_modules=modules)
    keys = [k for k, _ in delta.named_delta_tensors()]
    assert len(keys) == len(set(keys)), "two deltas share a checkpoint key"
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in delta.named_delta_tensors():
            p.add_(torch.randn(p.shape, generator=generator))
    inputs = batch("bart")
    tuned = logits(model, inputs)
    delta.save_finetuned(tmp_path / "d")
    fresh = build("bart")
    AutoDeltaModel.from_finetuned(tmp_path / "d", fresh)
    assert torch.equal(logits(fresh, inputs), tuned)


def test_delta_dummy_inputs_replace_a_transformers_models_own():
    model = build("bert")
    model.delta_dummy_inputs = {"input_ids": torch.tensor([[5, 6, 7]]), "attention_mask": "not a tensor"}
    with pytest.raises(HiddenSizeInferenceError, match=r"dummy forward .* failed"):
        AdapterModel(model, modified_modules=["attention"])
    model.delta_dummy_inputs = {"input_ids": torch.tensor([[5, 6, 7]])}
    delta = AdapterModel(model, modified_modules=["attention"])
    assert delta.named_delta_tensors()


def test_a_later_freeze_without_an_unfrozen_module_says_it_stays_trainable():
    """Left unfrozen once, a module's parameters are part of the delta (saved, detached with it): a second
    freeze_module without its key cannot take them out, and says so."""
    import warnings

    from opendelta_dist import LoraModel
    from tests.models import build

    delta = LoraModel(build("t5"))
    delta.freeze_module(exclude=["deltas", "layer_norm"])
    trainable = delta.num_trainable_parameters()
    with pytest.warns(UserWarning, match=r"'layer_norm' became part of this delta .*build a new delta without it"):
        delta.freeze_module(exclude=["deltas"])
    assert delta.num_trainable_parameters() == trainable
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        delta.freeze_module()  # the default: what the delta holds, no warning
