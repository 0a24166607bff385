"""Who this process is in a run (opendelta_dist.train.topology): the device is checked where it is chosen."""

import pytest
import torch

from opendelta_dist.errors import DeltaConfigError
from opendelta_dist.train.topology import Topology


def test_cpu_and_auto():
    assert Topology.from_environment("cpu").device == torch.device("cpu")
    assert Topology.from_environment("auto").device.type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_an_unknown_device_is_refused():
    with pytest.raises(DeltaConfigError, match="device='gpu' is not a device; choose one of auto, cpu, cuda"):
        Topology.from_environment("gpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_refused_with_the_fix():
    with pytest.raises(DeltaConfigError, match=r"device=cuda, but CUDA is not available .*device=cpu"):
        Topology.from_environment("cuda")


def test_a_gpu_run_has_gloo_beside_nccl_for_cpu_tensors():
    """FSDP's CPU offload clips over CPU gradients: a NCCL-only group refuses them ("No backend type associated
    with device type cpu"), so a CUDA run's group carries CPU tensors on gloo."""
    assert Topology(0, 2, 0, torch.device("cuda", 0)).backend == "cpu:gloo,cuda:nccl"
    assert Topology(0, 2, 0, torch.device("cpu")).backend == "gloo"
