"""The engines on a GPU: one process, NCCL, bf16 compute. Skipped without CUDA."""

import pytest
import torch

from opendelta_dist import LoraModel
from opendelta_dist.train.engines import OptimizerSpec, build_engine
from opendelta_dist.train.topology import Topology
from tests.train.engines.common import global_batch, tiny_t5

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize(
    ("engine", "options"),
    [
        ("single", {}),
        ("fsdp", {"precision": "bf16"}),
        ("single", {"precision": "bf16"}),
        ("fsdp", {"cpu_offload": True}),
    ],
)
def test_engine_trains_on_cuda(engine, options):
    topology = Topology.from_environment("cuda")
    model = tiny_t5()
    delta = LoraModel(model)
    delta.freeze_module()
    runner = build_engine(engine, topology, options)
    runner.prepare(model, delta, OptimizerSpec(lr=1e-2, total_steps=5, max_grad_norm=1.0))
    losses = []
    for step in range(5):
        batch = {k: v.to(topology.device) for k, v in global_batch(step).items()}
        losses.append(float(runner.micro_step(batch, last=True)))
        runner.optimizer_step()
    tensors = runner.gather_delta(delta)
    runner.close()
    assert all(torch.isfinite(torch.tensor(losses)))
    assert all(t.device.type == "cpu" and t.numel() > 0 for t in tensors.values())
