"""The bmt backend's own duties toward BMTrain, and what of BMTrain the CUDA emulation leaves to a GPU; on a GPU
(and in CI under the CUDA emulation)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.bmt.common import init_bmtrain, needs_bmt

pytestmark = [pytest.mark.gpu, needs_bmt]


@pytest.mark.emulated
def test_every_write_into_delta_partitions_is_ordered_before_bmtrains_next_gather(monkeypatch):
    """``DistributedParameter.gather`` all-gathers on BMTrain's load stream without waiting for the current one:
    each way the backend writes partitions (making, copying in, re-initialising, wrapping) ends with the load
    stream waiting for the current stream, as ``bmtrain.init_parameters`` does."""
    import bmtrain as bmt

    from opendelta_dist.backends import get_backend
    from opendelta_dist.backends.hf import torch_linear_weight_init

    init_bmtrain()
    backend = get_backend("bmt")
    waits: list[object] = []
    load = bmt.config["load_stream"]

    class Recording:
        def wait_stream(self, stream: object) -> None:
            waits.append(stream)
            load.wait_stream(stream)

    monkeypatch.setitem(bmt.config, "load_stream", Recording())

    def writes(action) -> int:
        before = len(waits)
        action()
        assert all(s == torch.cuda.current_stream() for s in waits[before:])
        return len(waits) - before

    made = {}
    assert writes(lambda: made.setdefault("p", backend.parameter((4, 3), torch_linear_weight_init, "cuda"))) >= 1
    assert writes(lambda: backend.parameter_from(torch.ones(5))) >= 1
    assert writes(lambda: backend.load_full(made["p"], torch.zeros(4, 3))) >= 1
    holder = nn.Module()
    holder.weight = made["p"]
    assert writes(lambda: backend.reset_module(holder)) >= 1
    assert writes(lambda: backend.prepare_module(nn.Linear(3, 2))) >= 1


def test_bmtrains_fused_cross_entropy_is_torchs_and_the_emulation_refuses_it():
    """A BMTrain kernel the CUDA emulation does not provide is refused there with the reason, never computed from
    host pointers; on a GPU, BMTrain's fused cross entropy gives torch's."""
    import os

    import bmtrain as bmt

    from tests.bmt.emulated_cuda import EMULATION_ENV

    init_bmtrain()
    torch.manual_seed(0)
    logits = torch.randn(6, 32, device="cuda", dtype=torch.half)
    target = torch.randint(0, 32, (6,), device="cuda")
    loss = bmt.loss.FusedCrossEntropy()
    if os.environ.get(EMULATION_ENV) == "1":
        with pytest.raises(NotImplementedError, match="cross_entropy_forward_fp16_launcher is not part of the CUDA"):
            loss(logits, target)
        return
    expected = nn.functional.cross_entropy(logits.float(), target)
    torch.testing.assert_close(loss(logits, target).float(), expected, rtol=1e-3, atol=1e-3)
