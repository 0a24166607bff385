"""Low-rank adapter: true rank-r projections, OpenDelta's tensor names, option errors."""

from __future__ import annotations

import pytest
import torch

from opendelta_dist import LowRankAdapterModel
from opendelta_dist.backends.hf import BACKEND
from opendelta_dist.deltas.low_rank_adapter import LowRankLinear
from opendelta_dist.errors import DeltaConfigError
from tests.models import batch, build, logits


@pytest.mark.parametrize("rank", [1, 3])
def test_projection_is_a_true_rank_r_product(rank):
    torch.manual_seed(0)
    layer = LowRankLinear(16, 8, rank, "glorot-uniform", BACKEND)
    with torch.no_grad():
        layer.b.normal_()
    x = torch.randn(5, 16)
    weight = layer.W_left @ layer.W_right
    assert torch.linalg.matrix_rank(weight).item() == rank
    torch.testing.assert_close(layer(x), x @ weight + layer.b)


def test_adapter_is_residual_and_keyed_like_opendelta():
    model = build("t5")
    inputs = batch("t5")
    delta = LowRankAdapterModel(model, reduction_factor=4, low_rank_rank=2)
    keys = [k for k, _ in delta.named_delta_tensors()]
    assert "encoder.block.0.layer.0.SelfAttention.o.low_rank_adapter.down_sampler.W_left" in keys
    assert "encoder.block.0.layer.0.SelfAttention.o.low_rank_adapter.up_sampler.b" in keys
    shapes = {k: tuple(p.shape) for k, p in delta.named_delta_tensors()}
    prefix = "encoder.block.0.layer.0.SelfAttention.o.low_rank_adapter"
    assert shapes[f"{prefix}.down_sampler.W_left"] == (32, 2)
    assert shapes[f"{prefix}.up_sampler.W_right"] == (2, 32)
    # zeroing the up projection makes every adapter the identity
    with torch.no_grad():
        for key, p in delta.named_delta_tensors():
            if ".up_sampler." in key:
                p.zero_()
    tuned = logits(model, inputs)
    delta.detach()
    torch.testing.assert_close(tuned, logits(model, inputs))


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"low_rank_rank": 0}, "low_rank_rank must be a positive integer"),
        ({"reduction_factor": 1.5}, "reduction_factor must be a positive integer"),
        ({"low_rank_w_init": "xavier"}, "low_rank_w_init must be one of"),
        ({"non_linearity": "swishy"}, "unknown non_linearity"),
        ({"reduction_factor": 64}, "fewer than reduction_factor=64"),
    ],
)
def test_bad_options_are_refused_and_leave_the_backbone_alone(options, match):
    model = build("bert")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(Exception, match=match):
        LowRankAdapterModel(model, **options)
    assert list(model.state_dict()) == list(before)


def test_option_errors_are_config_errors():
    with pytest.raises(DeltaConfigError):
        LowRankAdapterModel(build("bert"), low_rank_rank=-1)
