"""Who this process is in a run: rank, world size, device; and the process group's life cycle."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from opendelta_dist.errors import DeltaConfigError

DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class Topology:
    """This process's place in the run (read from torchrun's environment variables).

    Attributes:
        rank: global rank.
        world_size: number of processes.
        local_rank: rank on this node (selects the GPU).
        device: where this process computes.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that prints and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether a process group is (to be) used."""
        return self.world_size > 1

    @classmethod
    def from_environment(cls, device: str = "auto") -> Topology:
        """Read ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` (set by torchrun; absent means one process).

        Args:
            device: ``"cpu"``, ``"cuda"`` or ``"auto"`` (CUDA when available).

        Raises:
            DeltaConfigError: the device is none of these, or it is ``cuda`` and this process has no GPU.
        """
        rank = int(os.environ.get("RANK", 0))
        world = int(os.environ.get("WORLD_SIZE", 1))
        local = int(os.environ.get("LOCAL_RANK", 0))
        if device not in DEVICES:
            raise DeltaConfigError(f"device={device!r} is not a device; choose one of {', '.join(DEVICES)}")
        use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
        if use_cuda:
            _check_gpu(device, local)
        return cls(rank, world, local, torch.device("cuda", local) if use_cuda else torch.device("cpu"))

    @property
    def backend(self) -> str:
        """The process group's backends: gloo on the CPU; on GPUs, NCCL for CUDA tensors and gloo for CPU ones
        (FSDP's CPU offload reduces its gradient norm over CPU tensors, which NCCL alone refuses)."""
        return "cpu:gloo,cuda:nccl" if self.device.type == "cuda" else "gloo"

    def init_process_group(self) -> None:
        """Join the process group (gloo on CPU, NCCL on GPU) when there is more than one process."""
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if not self.distributed or dist.is_initialized():
            return
        object.__setattr__(self, "_joined", True)  # this process opened the group, so it leaves it
        backend = self.backend
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
        if attempt is None or "MASTER_ADDR" not in os.environ:
            dist.init_process_group(backend)
            return
        # Under torchrun the store outlives a restart, and the addresses the ranks of the failed attempt
        # published in it are still there: a restarted gloo group would connect to dead ranks. Each
        # attempt therefore gets keys of its own.
        store = dist.TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            self.world_size,
            is_master=False,
            timeout=timedelta(minutes=30),
        )
        prefixed = dist.PrefixStore(f"opendelta_dist/attempt{attempt}", store)
        dist.init_process_group(backend, store=prefixed, rank=self.rank, world_size=self.world_size)

    def ensure_process_group(self) -> bool:
        """Join the run's process group, or open a local one of size 1 for a single process (sharding
        engines need a group even then).

        Returns:
            Whether a local group was opened (the caller closes it with :meth:`destroy_process_group`).
        """
        if dist.is_initialized():
            return False
        if self.distributed:
            self.init_process_group()
            return False
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        backend = self.backend
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        return True

    def barrier(self) -> None:
        """Wait for every rank (no-op with one process)."""
        if dist.is_initialized():
            dist.barrier()

    def destroy_process_group(self) -> None:
        """Leave the process group, if :meth:`init_process_group` joined it (a group the caller opened before the
        run, e.g. several runs in one process group, stays open)."""
        if getattr(self, "_joined", False) and dist.is_initialized():
            dist.destroy_process_group()
            object.__setattr__(self, "_joined", False)


def _check_gpu(device: str, local_rank: int) -> None:
    """Refuse a CUDA device (``device=cuda``, or ``auto`` on a GPU machine) where this process has no GPU
    of its own.

    Args:
        device: the configured ``device``, for the message.
        local_rank: this process's rank on its node: the index of its GPU.

    Raises:
        DeltaConfigError: CUDA is not available, or there are fewer GPUs than processes on this node.
    """
    if not torch.cuda.is_available():
        why = "this PyTorch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise DeltaConfigError(
            f"device=cuda, but CUDA is not available ({why}); train on the CPU with device=cpu, or use device=auto "
            "to take a GPU when there is one"
        )
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise DeltaConfigError(
            f"device={device}: the process of local rank {local_rank} needs GPU {local_rank}, but this node has "
            f"{count}; start at most {count} processes per node (torchrun --nproc_per_node={count})"
        )
