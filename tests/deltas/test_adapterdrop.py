"""AdapterDrop on every per-layer method and every model family: ``leave_out`` (static), ``skip_layers`` (on the
live model), :class:`RobustDrop` (per step) and :func:`parallel_forward` (several tasks sharing the lower layers).

The deltas' parameters are randomised first, so that every layer's delta changes the output (LoRA and adapters
start as the identity), and a dropped layer shows.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from opendelta_dist import AdapterModel, AutoDeltaModel, BitFitModel, LoraModel, SoftPromptModel
from opendelta_dist.adapterdrop import RobustDrop, backbone_layers, parallel_forward
from opendelta_dist.errors import DeltaConfigError, DeltaStateError
from opendelta_dist.operations import UnfreezeParameter
from tests.deltas.test_methods import METHODS, OPTIONS, UNSUPPORTED
from tests.models import FAMILIES, batch, build, logits

PER_LAYER = sorted(m for m in METHODS if m != "soft_prompt")
CASES = [(m, f) for m in PER_LAYER for f in sorted(FAMILIES) if (m, f) not in UNSUPPORTED]


def _randomise(delta, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in delta.named_delta_tensors():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)


def _tensors(delta) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in delta.named_delta_tensors()}


def _primary(output):
    return output if isinstance(output, torch.Tensor) else output[0]


def _backward_runs(model: nn.Module, layers: dict, loss_of) -> dict[str, int]:
    """How many times backward runs through each layer's output, for one loss."""
    runs = dict.fromkeys(layers, 0)
    handles = []

    def hook(name):
        def forward_hook(module, args, output):
            out = _primary(output)
            if out.requires_grad:
                out.register_hook(lambda grad: runs.__setitem__(name, runs[name] + 1))

        return forward_hook

    for name in layers:
        handles.append(model.get_submodule(name).register_forward_hook(hook(name)))
    try:
        loss_of().backward()
    finally:
        for h in handles:
            h.remove()
    return runs


@pytest.mark.parametrize(("method", "family"), CASES)
def test_skip_and_leave_out_drop_the_same_layer_and_backward_stops_above_it(method, family, tmp_path):
    make = METHODS[method]
    # a reparameterised prefix's network is sized by its layers: per-layer prefixes compare tensor for tensor
    options = {**OPTIONS.get(method, {}), **({"reparameterize": False} if method == "prefix" else {})}
    model = build(family)
    delta = make(backbone_model=model, **options)
    delta.freeze_module(set_state_dict=False)
    _randomise(delta)
    inputs = batch(family)
    whole = logits(model, inputs)

    delta.skip_layers = [0]
    assert delta.skip_layers == [0]
    skipped = logits(model, inputs)
    assert not torch.allclose(skipped, whole, atol=1e-4), "layer 0's delta changed nothing: the test proves nothing"

    # the same delta built without layer 0 (leave_out), with the same tensors, computes what skipping computed
    static = make(backbone_model=build(family), leave_out=[0], **options)
    assert static.config.leave_out == [0]
    kept = _tensors(static)
    assert kept and set(kept) < set(_tensors(delta)), "leave_out removed no tensor"
    layers = [static.layer_of_operation(op) for op in static.operations]
    assert all(layer is None or layer.index != 0 for layer in layers)
    whole_tensors = _tensors(delta)
    with torch.no_grad():
        for key, p in static.named_delta_tensors():
            p.copy_(whole_tensors[key])
    torch.testing.assert_close(logits(static.backbone_model, inputs), skipped, rtol=1e-5, atol=1e-6)

    # leave_out is saved with the delta and survives a reload
    static.save_finetuned(tmp_path / "static")
    fresh = build(family)
    reloaded = AutoDeltaModel.from_finetuned(tmp_path / "static", backbone_model=fresh)
    assert reloaded.config.leave_out == [0]
    torch.testing.assert_close(logits(fresh, inputs), skipped, rtol=1e-5, atol=1e-6)

    # a bypassed delta gets no gradient, and backward does not run through the layer below the lowest active delta
    model.train()
    layers = backbone_layers(model)
    first_stack = next(iter(layers.values())).stack
    bottom = {n: layer for n, layer in layers.items() if layer.stack == first_stack}
    runs = _backward_runs(model, bottom, lambda: model(**inputs).loss)
    by_index = {layer.index: runs[n] for n, layer in bottom.items()}
    assert by_index[0] == 0 and by_index[1] == 1, by_index
    for op in delta.operations:
        layer = delta.layer_of_operation(op)
        if layer is not None and layer.index == 0:
            params = [op.parameter] if isinstance(op, UnfreezeParameter) else list(op.delta_module.parameters())
            assert all(p.grad is None for p in params), op.module_name

    # setting it back restores the whole delta, in place slots included
    delta.skip_layers = None
    torch.testing.assert_close(logits(model, inputs), whole)


def test_a_reparameterised_prefix_drops_layers_too():
    model = build("gpt2")
    delta = METHODS["prefix"](backbone_model=model, **OPTIONS["prefix"])
    delta.freeze_module(set_state_dict=False)
    _randomise(delta)
    inputs = batch("gpt2")
    whole = logits(model, inputs)
    delta.skip_layers = [0]
    assert not torch.allclose(logits(model, inputs), whole, atol=1e-4)
    runs = _backward_runs(model.train(), backbone_layers(model), lambda: model(**inputs).loss)
    assert sorted(runs.values()) == [0, 1]
    static = METHODS["prefix"](backbone_model=build("gpt2"), leave_out=[0], **OPTIONS["prefix"])
    assert [op.module_name for op in static.operations if op.delta_name == "prefix"] == ["transformer.h.1.attn"]


def test_leave_out_counts_in_every_stack():
    delta = LoraModel(build("t5"), leave_out=[1])
    names = [op.module_name for op in delta.operations]
    assert names and not any(".block.1." in n for n in names)
    assert any(n.startswith("encoder.block.0.") for n in names) and any(n.startswith("decoder.block.0.") for n in names)


def test_layers_of_a_model_of_no_known_family_are_its_module_list():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Linear(4, 8)
            self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(3))
            self.head = nn.Linear(8, 2)
            self.task_heads = nn.ModuleList(nn.Linear(8, 2) for _ in range(6))  # single modules: not layers

        def forward(self, x):
            x = self.embed(x)
            for block in self.blocks:
                x = block(x)
            return self.head(x)

    net = Net()
    assert sorted(layer.index for layer in backbone_layers(net).values()) == [0, 1, 2]
    delta = LoraModel(net, modified_modules=["0", "head"], leave_out=[0, 1])
    assert [op.module_name for op in delta.operations] == ["blocks.2.0", "head", "task_heads.0"]

    with pytest.raises(
        DeltaConfigError, match=r"leave_out=\[4\] names layer\(s\) \[4\], but the backbone's deepest stack has 3"
    ):
        LoraModel(net, modified_modules=["0"], leave_out=[4])

    plain = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(DeltaConfigError, match="has no layers this library can tell"):
        LoraModel(plain, modified_modules=["0"], leave_out=[0])
    # blocks held in an nn.Sequential (as timm's vision transformers hold theirs)
    stacked = nn.Sequential(*(nn.Sequential(nn.Linear(4, 4), nn.Tanh()) for _ in range(3)))
    assert sorted(layer.index for layer in backbone_layers(stacked).values()) == [0, 1, 2]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"leave_out": [2]}, r"leave_out=\[2\] names layer\(s\) \[2\], but the backbone's deepest stack has 2 layers"),
        ({"leave_out": [-1]}, r"leave_out takes layer indices counted from 0"),
        ({"leave_out": [0, 1]}, r"leaves every module LoraModel modifies without a delta"),
        ({"leave_out": 0}, r"leave_out takes a list of layer indices \(e\.g\. \[0\]\), not 0"),
    ],
)
def test_bad_leave_out_is_refused_with_the_reason(kwargs, message):
    model = build("bert")
    pristine = logits(model, batch("bert"))
    with pytest.raises(DeltaConfigError, match=message):
        LoraModel(model, **kwargs)
    assert torch.equal(logits(model, batch("bert")), pristine)


def test_adapterdrop_on_a_method_without_layers_names_the_method():
    with pytest.raises(DeltaConfigError, match=r"SoftPromptModel modifies no module inside a layer"):
        SoftPromptModel(build("bert"), soft_token_num=2, leave_out=[0])
    prompt = SoftPromptModel(build("bert"), soft_token_num=2)
    with pytest.raises(DeltaConfigError, match=r"skip_layers=\[0\]: SoftPromptModel modifies no module inside"):
        prompt.skip_layers = [0]
    with pytest.raises(DeltaConfigError, match=r"robust AdapterDrop: SoftPromptModel modifies no module inside"):
        prompt.check_droppable(True)
    with pytest.raises(DeltaConfigError, match=r"robust AdapterDrop: SoftPromptModel modifies no module inside"):
        RobustDrop(prompt, 0, 1)
    head_only = LoraModel(build("bert"), modified_modules=["classifier"])
    with pytest.raises(DeltaConfigError, match=r"robust AdapterDrop: LoraModel modifies no module inside"):
        RobustDrop(head_only, 0, 1)


def test_bad_skip_layers_and_merged_lora_are_refused():
    delta = LoraModel(build("bert"))
    with pytest.raises(DeltaConfigError, match=r"deepest stack has 2 layers"):
        delta.skip_layers = [5]
    with pytest.raises(DeltaConfigError, match="counted from 0"):
        delta.skip_layers = [-1]
    with pytest.raises(DeltaConfigError, match=r"skip_layers takes a list of layer indices \(e\.g\. \[0\]\) or None"):
        delta.skip_layers = 0
    delta.merge()
    with pytest.raises(DeltaStateError, match=r"merged .* unmerge\(\) it before setting skip_layers"):
        delta.skip_layers = [0]


@pytest.mark.parametrize(
    ("low", "high", "message"),
    [
        (0, 2, r"robust_drop=\[0, 2\] drops up to 2 layers, but LoraModel's backbone has 2 .* give high <= 1"),
        (-1, 1, r"robust_drop=\[-1, 1\] is negative"),
        (2, 1, r"robust_drop=\[2, 1\] is reversed"),
    ],
)
def test_bad_robust_ranges_are_refused(low, high, message):
    with pytest.raises(DeltaConfigError, match=message):
        RobustDrop(LoraModel(build("bert")), low, high)


def test_robust_dropping_of_a_delta_in_one_layer_is_refused_as_impossible():
    with pytest.raises(
        DeltaConfigError, match=r"needs deltas in two layers or more, .* only in layer 1 \(leave_out=\[0\]\)"
    ):
        RobustDrop(LoraModel(build("t5"), leave_out=[0]), 0, 1)


def _three_layer_bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32)
    return BertForSequenceClassification(config)


def test_a_robust_range_within_leave_out_is_refused_for_dropping_nothing():
    RobustDrop(LoraModel(_three_layer_bert(), leave_out=[0]), 0, 2)  # n = 2 drops layer 1's delta
    with pytest.raises(
        DeltaConfigError, match=r"drops no delta at any step: .* lowest layer with a delta is 1 .* give high > 1"
    ):
        RobustDrop(LoraModel(_three_layer_bert(), leave_out=[0]), 0, 1)


def test_robust_drop_draws_per_step_from_the_seed_alone():
    delta = LoraModel(build("t5"))
    a, b = RobustDrop(delta, 0, 1, seed=7), RobustDrop(delta, 0, 1, seed=7)
    draws = [a.draw(step) for step in range(64)]
    assert draws == [b.draw(step) for step in range(64)]  # every rank, and a resumed run, draw the same
    assert set(draws) == {0, 1}
    other = RobustDrop(delta, 0, 1, seed=8)
    assert draws != [other.draw(step) for step in range(64)]
    assert delta.robust_drop is other  # the delta's schedule is the last one made for it
    step = draws.index(1)
    assert a.before_step(step) == 1 and delta.skip_layers == [0]
    a.for_eval()
    assert delta.skip_layers == []


def test_in_place_deltas_are_refused_for_per_step_dropping_where_the_engine_replaces_parameters():
    delta = BitFitModel(build("bert"))
    delta.check_droppable(in_place_ok=True)
    with pytest.raises(DeltaConfigError, match=r"BitFitModel trains parameters in place .* Use leave_out for a static"):
        delta.check_droppable(in_place_ok=False)


def _task_delta(make, model, seed):
    delta = make(model)
    _randomise(delta, seed)
    return delta


TASKS = [
    lambda m: LoraModel(m, leave_out=[0], unfrozen_modules=["deltas", "classifier"]),
    lambda m: AdapterModel(m, leave_out=[0], unfrozen_modules=["deltas", "classifier"]),
    lambda m: BitFitModel(m, leave_out=[0], unfrozen_modules=["deltas", "classifier"]),
]


def test_parallel_forward_equals_each_tasks_own_forward_and_runs_the_shared_layers_once():
    inputs = {k: v for k, v in batch("bert", size=3).items() if k != "labels"}
    model = build("bert").eval()
    deltas = [_task_delta(make, model, seed=k) for k, make in enumerate(TASKS)]
    expected = []
    for make, delta in zip(TASKS, deltas, strict=True):  # each task alone on a backbone of its own
        own = build("bert").eval()
        alone = make(own)
        with torch.no_grad():
            for key, p in alone.named_delta_tensors():
                p.copy_(dict(delta.named_delta_tensors())[key])
            expected.append(own(**inputs).logits)
    calls = {"layer0": 0, "layer1": 0}
    for i in (0, 1):  # a layer computes when its feed-forward runs
        model.bert.encoder.layer[i].intermediate.register_forward_hook(
            lambda m, a, o, key=f"layer{i}": calls.__setitem__(key, calls[key] + 1)
        )
    with torch.no_grad():
        outputs = parallel_forward(model, deltas, shared_layers=1, **inputs)
    for out, want in zip(outputs, expected, strict=True):
        assert torch.equal(out.logits, want)
    assert calls == {"layer0": 1, "layer1": 3}
    assert len({tuple(o.logits.flatten().tolist()) for o in outputs}) == 3  # the tasks differ
    # afterwards every delta is attached and active again (the last one's classifier is in effect)
    assert all(not op.skipped for d in deltas for op in d.operations)
    # one task at a time, the others bypassed: each task's own forward again
    for k in range(len(deltas)):
        with contextlib.ExitStack() as others:
            for j, other in enumerate(deltas):
                if j != k:
                    others.enter_context(other.bypassed())
            assert torch.equal(model(**inputs).logits, expected[k])


def test_parallel_forward_refuses_deltas_in_the_shared_layers_or_below_them():
    model = build("bert").eval()
    inputs = {k: v for k, v in batch("bert").items() if k != "labels"}
    whole = LoraModel(model)
    with pytest.raises(
        DeltaConfigError, match=r"deltas\[0\] \(LoraModel\) modifies .*layer\.0.*leave_out=\[0\] in every"
    ):
        parallel_forward(model, [whole], shared_layers=1, **inputs)
    whole.skip_layers = [0]  # bypassing the layer makes it shareable
    assert len(parallel_forward(model, [whole], shared_layers=1, **inputs)) == 1
    whole.detach()
    with pytest.raises(DeltaConfigError, match=r"is not attached: attach\(\) it"):
        parallel_forward(model, [whole], shared_layers=1, **inputs)
    whole.attach()
    with pytest.raises(DeltaConfigError, match="is given twice"):
        parallel_forward(model, [whole, whole], shared_layers=1, **inputs)
    with pytest.raises(DeltaConfigError, match=r"is attached to another module \(BertForSequenceClassification\)"):
        parallel_forward(model.bert, [whole], shared_layers=1, **inputs)
    whole.detach()
    prompt = SoftPromptModel(model, soft_token_num=2)
    with pytest.raises(DeltaConfigError, match="runs before the shared layers end"):
        parallel_forward(model, [prompt], shared_layers=1, **inputs)


@pytest.mark.parametrize(("family", "save"), [("t5", "save_finetuned"), ("bert", "save_peft")], ids=["ours", "peft"])
def test_leave_out_at_load_time_drops_the_saved_layers_and_keeps_the_saved_leave_out(family, save, tmp_path):
    model = build(family)
    delta = LoraModel(model)
    _randomise(delta)
    inputs = batch(family)
    with delta.skipping([0]):
        expected = logits(model, inputs)
    getattr(delta, save)(tmp_path / "whole")  # this project's format, or PEFT's
    fresh = build(family)
    loaded = AutoDeltaModel.from_finetuned(tmp_path / "whole", backbone_model=fresh, leave_out=[0])
    assert loaded.config.leave_out == [0]
    assert all(getattr(loaded.layer_of_operation(op), "index", None) != 0 for op in loaded.operations)
    torch.testing.assert_close(logits(fresh, inputs), expected)
    loaded.save_finetuned(tmp_path / "static")
    with pytest.raises(DeltaConfigError, match=r"leave_out=\[0, 1\] leaves every module"):
        # the saved leave_out stays and the one given joins it: here nothing would be left
        AutoDeltaModel.from_finetuned(tmp_path / "static", backbone_model=build(family), leave_out=[1])


def test_parallel_forward_asks_no_cache_and_shares_only_the_layers_that_ran():
    model = build("gpt2").eval()
    deltas = [_task_delta(lambda m: LoraModel(m, leave_out=[0]), model, seed=k) for k in range(2)]
    inputs = {"input_ids": batch("gpt2")["input_ids"]}
    outputs = parallel_forward(model, deltas, shared_layers=1, **inputs)
    assert model.config.use_cache  # as it was
    for k, out in enumerate(outputs):
        assert out.past_key_values is None  # no partial cache to continue from
        with deltas[1 - k].bypassed():
            assert torch.equal(out.logits, model(**inputs, use_cache=False).logits)
    with pytest.raises(DeltaConfigError, match="scores inputs without a cache, but use_cache= is given"):
        parallel_forward(model, deltas, shared_layers=1, **inputs, use_cache=True)

    # an encoder-decoder shares the encoder's lowest layers: the decoder's may keep their deltas
    t5 = build("t5").eval()
    tasks = [_task_delta(lambda m: LoraModel(m, exclude_modules=["encoder.block.0"]), t5, seed=k) for k in range(2)]
    t5_inputs = {k: v for k, v in batch("t5").items() if k != "labels"}
    t5_inputs["decoder_input_ids"] = batch("t5")["labels"][:, :3]
    for k, out in enumerate(parallel_forward(t5, tasks, shared_layers=1, **t5_inputs)):
        with tasks[1 - k].bypassed():
            assert torch.equal(out.logits, t5(**t5_inputs).logits)


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_parallel_forward_shares_a_whole_encoder_below_decoder_deltas(family):
    model = build(family).eval()
    encoder = model.get_encoder()
    blocks = encoder.block if family == "t5" else encoder.layers
    decoder_only = r"[r]decoder\..*(SelfAttention\.q|self_attn\.q_proj)"
    tasks = [_task_delta(lambda m: LoraModel(m, modified_modules=[decoder_only]), model, seed=k) for k in range(3)]
    inputs = {k: v for k, v in batch(family).items() if k != "labels"}
    inputs["decoder_input_ids"] = batch(family)["labels"][:, :3]
    runs = [0] * len(blocks)
    for i, block in enumerate(blocks):  # a layer computes when its self-attention runs
        attention = block.layer[0] if family == "t5" else block.self_attn
        attention.register_forward_pre_hook(lambda m, a, i=i: runs.__setitem__(i, runs[i] + 1))
    with torch.no_grad():
        outputs = parallel_forward(model, tasks, shared_layers=len(blocks), **inputs)
    assert runs == [1] * len(blocks)  # every encoder layer ran once for the three tasks
    for k, out in enumerate(outputs):
        with torch.no_grad(), contextlib.ExitStack() as others:
            for j, other in enumerate(tasks):
                if j != k:
                    others.enter_context(other.bypassed())
            assert torch.equal(out.logits, model(**inputs, use_cache=False).logits)
    with pytest.warns(UserWarning, match=r"training mode.*call model.eval\(\) first") as warned:
        parallel_forward(model.train(), tasks, shared_layers=1, **inputs)
    assert sum("training mode" in str(w.message) for w in warned) == 1
    with pytest.raises(DeltaConfigError, match="shared_layers takes a number of layers from 0"):
        parallel_forward(model, tasks, shared_layers=-1, **inputs)
    # nothing shared: each task's own forward, after the same checks
    with torch.no_grad():
        alone = parallel_forward(model.eval(), tasks, shared_layers=0, **inputs)
    assert all(torch.equal(a.logits, b.logits) for a, b in zip(alone, outputs, strict=True))
    with pytest.raises(DeltaConfigError, match="is given twice"):
        parallel_forward(model, [tasks[0], tasks[0]], shared_layers=0, **inputs)
    with pytest.raises(DeltaConfigError, match="scores inputs without a cache"):
        parallel_forward(model, tasks, shared_layers=0, **inputs, use_cache=True)


def test_robust_dropping_is_refused_where_a_step_would_drop_every_layer_with_a_delta():
    delta = LoraModel(_three_layer_bert(), leave_out=[2])
    with pytest.raises(DeltaConfigError, match=r"has deltas only up to layer 1 \(leave_out=\[2\]\).* high <= 1"):
        RobustDrop(delta, 0, 2)


def test_a_lora_bypassing_layers_is_not_merged_and_a_state_dict_keeps_bypassed_slots():
    delta = LoraModel(build("bert"))
    delta.skip_layers = [0]
    with pytest.raises(DeltaStateError, match="bypasses some layers now"):
        delta.merge()
    delta.skip_layers = None
    delta.merge()
    delta.unmerge()

    model = build("bert")
    bitfit = BitFitModel(model)
    bitfit.freeze_module()  # model.state_dict() holds the delta's tensors only
    _randomise(bitfit)
    whole = model.state_dict()
    bitfit.skip_layers = [0]
    skipped = model.state_dict()
    assert skipped.keys() == whole.keys()
    for key in whole:
        assert torch.equal(skipped[key], whole[key]), key


def test_leave_out_leaves_parameters_unfrozen_in_place_out_of_its_layers_too():
    model = build("bert")
    delta = LoraModel(model, leave_out=[0], unfrozen_modules=["deltas", "LayerNorm", "classifier"])
    delta.freeze_module()
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(".layer.0." in n for n in trained)  # layer 0 gets neither a LoRA nor a trained LayerNorm
    assert any(".layer.1." in n and "LayerNorm" in n for n in trained) and "classifier.weight" in trained
    # the same as bypassing layer 0 on a delta built with every layer
    whole = LoraModel(build("bert"), unfrozen_modules=["deltas", "LayerNorm", "classifier"])
    whole.skip_layers = [0]
    assert {k for k, _ in delta.named_delta_tensors()} == {
        k for k, _ in whole.named_delta_tensors() if ".layer.0." not in k
    }


def test_unfrozen_modules_named_only_inside_left_out_layers_are_said_to_train_nothing():
    with pytest.warns(
        UserWarning, match=r"names modules only inside the layers leave_out=\[0\] .*nothing of it trains"
    ):
        LoraModel(build("bert"), leave_out=[0], unfrozen_modules=["deltas", "bert.encoder.layer.0.output.LayerNorm"])
