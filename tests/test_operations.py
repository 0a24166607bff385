import inspect

import pytest
import torch
from torch import nn

from opendelta_dist import AdapterModel, BitFitModel, LoraModel
from opendelta_dist.errors import DeltaStateError, UnsupportedModuleError
from opendelta_dist.operations import (
    InsertParallel,
    InsertSequential,
    Replace,
    UnfreezeParameter,
    delta_parameter_ids,
    pristine_named_parameters,
)
from tests.models import batch, build, logits


class Affine(nn.Module):
    """y = a * x + b, to make the order of stacked deltas visible."""

    def __init__(self, a: float, b: float) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a))
        self.b = nn.Parameter(torch.tensor(b))

    def forward(self, x):
        return self.a * x + self.b


class Identity(nn.Module):
    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """Multiply by scale."""
        return x * scale


def _snapshot(module: nn.Module):
    return (
        [(n, type(m)) for n, m in module.named_modules()],
        {k: v.clone() for k, v in module.state_dict().items()},
        {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in module.named_modules()},
    )


def _same(a, b):
    return (
        a[0] == b[0]
        and a[2] == b[2]
        and a[1].keys() == b[1].keys()
        and all(torch.equal(a[1][k], b[1][k]) for k in a[1])
    )


def test_each_operation_is_undone_exactly():
    root = nn.Sequential(Identity(), nn.Linear(3, 3, bias=False))
    before = _snapshot(root)
    ops = [
        InsertSequential("0", Affine(2.0, 0.0), "before_delta", position="before"),
        InsertSequential("0", Affine(1.0, 1.0), "after_delta", position="after"),
        InsertParallel("1", nn.Linear(3, 3, bias=False), "par"),
        UnfreezeParameter("1", "bias", nn.Parameter(torch.ones(3))),
    ]
    x = torch.randn(2, 3)
    plain = root(x)
    for i, op in enumerate(ops):
        op.install(root, (1, i))
    assert not torch.allclose(root(x), plain)
    assert "before_delta" in dict(root[0].named_children())
    for op in reversed(ops):
        op.uninstall()
    assert _same(_snapshot(root), before)
    assert root[1].bias is None
    assert torch.equal(root(x), plain)


def test_forward_signature_and_docstring_are_preserved():
    module = Identity()
    signature, doc, forward = inspect.signature(module.forward), module.forward.__doc__, type(module).forward
    op = InsertSequential("", Affine(2.0, 1.0), "d", position="after")
    op.install(module, (1, 0))
    assert inspect.signature(module.forward) == signature
    assert module.forward.__doc__ == doc
    assert type(module).forward is forward and "forward" not in module.__dict__
    # keyword arguments still reach the module
    assert torch.equal(module(torch.ones(2), scale=3.0), torch.full((2,), 7.0))


def test_stacking_order_follows_creation_not_attach_order():
    module = Identity()
    first = InsertSequential("", Affine(2.0, 0.0), "d", position="after")  # x * 2
    second = InsertSequential("", Affine(1.0, 1.0), "d", position="after")  # x + 1
    first.install(module, (1, 0))
    second.install(module, (2, 0))
    x = torch.ones(1)
    assert module(x).item() == 3.0  # (1 * 2) + 1
    first.uninstall()
    assert module(x).item() == 2.0
    first.install(module, (1, 0))  # re-attached last, still runs first
    assert module(x).item() == 3.0
    assert set(dict(module.named_children())) == {"d", "d_1"}


def test_parallel_sees_input_after_pre_deltas():
    module = Identity()
    InsertSequential("", Affine(3.0, 0.0), "pre", position="before").install(module, (1, 0))
    InsertParallel("", Affine(1.0, 0.0), "par").install(module, (1, 1))
    # input 1 -> pre: 3 -> module: 3 -> parallel adds its view of the input (3): 6
    assert module(torch.ones(1)).item() == 6.0


def test_tuple_outputs_keep_their_other_items():
    class Pair(nn.Module):
        def forward(self, x):
            return x, "extra"

    module = Pair()
    InsertSequential("", Affine(1.0, 1.0), "d", position="after").install(module, (1, 0))
    out, extra = module(torch.zeros(2))
    assert extra == "extra" and torch.equal(out, torch.ones(2))


def test_replace_and_restore():
    root = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    original = root[0]
    new = nn.Sequential(original, Affine(0.0, 5.0))
    op = Replace("0", new, "")
    op.install(root, (1, 0))
    assert root[0] is new
    assert torch.equal(root(torch.randn(3, 2)), torch.full((3, 2), 5.0))
    # only the replacement's own parameters belong to the delta
    assert sorted(k for k, _ in op.named_tensors()) == ["0.1.a", "0.1.b"]
    # the backbone's view sees through the replacement to the original
    assert [n for n, _ in pristine_named_parameters(root)] == ["0.weight", "0.bias"]
    assert delta_parameter_ids(root) == {id(new[1].a), id(new[1].b)}
    with pytest.raises(DeltaStateError):
        Replace("0", nn.Identity()).install(root, (2, 0))
    op.uninstall()
    assert root[0] is original


def test_unfreeze_keeps_the_original_untouched_and_latest_wins():
    layer = nn.Linear(2, 2)
    original = layer.bias
    saved = original.detach().clone()
    a = UnfreezeParameter("", "bias", nn.Parameter(torch.full((2,), 1.0)))
    b = UnfreezeParameter("", "bias", nn.Parameter(torch.full((2,), 2.0)))
    a.install(layer, (1, 0))
    b.install(layer, (2, 0))
    assert layer.bias is b.parameter
    b.uninstall()
    assert layer.bias is a.parameter
    b.install(layer, (2, 0))
    a.uninstall()
    assert layer.bias is b.parameter
    b.uninstall()
    assert layer.bias is original and torch.equal(layer.bias, saved)
    assert [n for n, _ in pristine_named_parameters(layer)] == ["weight", "bias"]


def test_containers_cannot_take_child_deltas():
    with pytest.raises(UnsupportedModuleError, match="container"):
        InsertParallel("", nn.Linear(2, 2), "d").install(nn.ModuleList([nn.Linear(2, 2)]), (1, 0))


def test_install_twice_and_uninstall_twice_are_errors():
    op = InsertParallel("", nn.Linear(2, 2), "d")
    op.install(nn.Linear(2, 2), (1, 0))
    with pytest.raises(DeltaStateError):
        op.install(nn.Linear(2, 2), (1, 0))
    op.uninstall()
    with pytest.raises(DeltaStateError):
        op.uninstall()


def test_deltas_of_different_methods_stack_and_detach_in_any_order():
    model = build("t5")
    inputs = batch("t5")
    pristine = logits(model, inputs)
    deltas = [LoraModel(model), AdapterModel(model), BitFitModel(model)]
    for d in deltas:
        with torch.no_grad():
            for _, p in d.named_delta_tensors():
                p.add_(torch.randn_like(p) * 0.1)
    combined = logits(model, inputs)
    assert len(delta_parameter_ids(model)) == sum(len(list(d.named_delta_tensors())) for d in deltas)
    for order in ([1, 0, 2], [2, 1, 0], [0, 2, 1]):
        for i in order:
            deltas[i].detach()
        assert torch.equal(logits(model, inputs), pristine)
        for i in reversed(order):
            deltas[i].attach()
        assert torch.equal(logits(model, inputs), combined)
