"""An **emulation** of one CUDA device per process on the CPU, under which the real BMTrain 1.0.1 and
ModelCenter 1.0.2 run: the tier of the bmt tests that CI runs where there is no GPU.

What it provides, and nothing more:

- **the device**: every ``"cuda"`` device a Python call names (torch's tensor factories' ``device=``,
  ``Tensor.to``, ``.cuda()``, ``new_*``) is the CPU, every tensor says it ``is_cuda``, pinning and
  ``record_stream`` do nothing;
  ``torch.cuda``'s streams, events, RNG, legacy ``FloatStorage``/``FloatTensor`` types and device queries are
  CPU stand-ins (streams are in-order no-ops: the CPU runs everything in program order);
- **NCCL**: ``bmtrain.nccl``'s communicator and collectives (all-gather, reduce-scatter, all-reduce,
  broadcast, reduce, send/recv) on a gloo process group (plain copies at world size 1). A communicator
  is keyed by its unique id in the launcher's store, as NCCL's is, so ranks that read different ids never
  meet (a stale id hangs here as it does on GPUs, until the store's timeout);
- **BMTrain's CUDA-only kernels**: its fused Adam for fp16 and bf16 weights and its ``has_inf_nan``
  overflow check, re-written in torch after BMTrain's ``csrc/cuda`` kernels (the CPU Adam of
  ``AdamOffloadOptimizer`` is BMTrain's own compiled code and runs as it is).

Everything above these (BMTrain's ``DistributedParameter``, blocks, ZeRO contexts, hooks, optimizers and
their manager, ModelCenter's T5, the project's backend and engine) is the real code. No kernel, NCCL, memory
or speed is measured here: a result of this tier never counts as a GPU result.

Use :func:`install` at the start of a process, before BMTrain is initialised, or run a script under it with
``python -m tests.bmt.emulated_cuda SCRIPT ARGS...`` (what the tests launch under torchrun).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import runpy
import sys
import threading
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.utils._device

#: set in the environment of every process running under the emulation (and read by the tests)
EMULATION_ENV = "OPENDELTA_EMULATED_CUDA"

_CPU = torch.device("cpu")
#: torch's functions that make tensors on a ``device`` (BMTrain and ModelCenter name ``"cuda"`` in them)
_FACTORIES = [
    "tensor",
    "as_tensor",
    "empty",
    "empty_strided",
    "zeros",
    "ones",
    "full",
    "arange",
    "range",
    "rand",
    "randn",
    "randint",
    "randperm",
    "normal",
    "scalar_tensor",
    "eye",
    "linspace",
    "logspace",
    "tril_indices",
    "triu_indices",
    "empty_like",
    "zeros_like",
    "ones_like",
    "full_like",
    "rand_like",
    "randn_like",
    "randint_like",
]
_NEW = ("new_empty", "new_zeros", "new_ones", "new_full", "new_tensor")


def _host(device: Any) -> Any:
    """The CPU for a CUDA device (a string, a ``torch.device`` or an index); anything else as it is."""
    if isinstance(device, torch.device):
        return _CPU if device.type == "cuda" else device
    if isinstance(device, str) and device.split(":")[0] == "cuda":
        return _CPU
    if isinstance(device, int) and not isinstance(device, bool):
        return _CPU
    return device


def _on_host(fn: Any) -> Any:
    """``fn`` with its ``device`` keyword on the CPU and no pinning."""

    def call(*args: Any, **kwargs: Any) -> Any:
        if "device" in kwargs:
            kwargs["device"] = _host(kwargs["device"])
        kwargs.pop("pin_memory", None)
        return fn(*args, **kwargs)

    call.__wrapped__ = fn  # type: ignore[attr-defined]
    return call


class _HostView(threading.local):
    """While ``on``, tensors say where they really are (BMTrain's CPU Adam checks its host copies, gloo
    refuses CUDA tensors)."""

    on = False


_HOST_VIEW = _HostView()


@contextlib.contextmanager
def _host_view() -> Any:
    before, _HOST_VIEW.on = _HOST_VIEW.on, True
    try:
        yield
    finally:
        _HOST_VIEW.on = before


def _patch_tensors() -> None:
    """Factories, ``Tensor.to``/``.cuda()``/``new_*`` on the CPU; every tensor says it is on CUDA."""
    # ``with torch.device("meta")`` recognises torch's own factories, listed once: list them before the wrapping
    torch.utils._device._device_constructors()
    context = torch.utils._device.DeviceContext
    enter_device = context.__init__

    def on_host(self: Any, device: Any) -> None:  # ``with torch.device("cuda")``: the CPU
        enter_device(self, _host(torch.device(device)))

    context.__init__ = on_host
    for name in _FACTORIES:
        setattr(torch, name, _on_host(getattr(torch, name)))
    tensor = torch.Tensor
    for name in _NEW:
        setattr(tensor, name, _on_host(getattr(tensor, name)))
    to = tensor.to

    def moved(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args and not isinstance(args[0], (torch.dtype, torch.Tensor)):
            args = (_host(args[0]), *args[1:])
        if "device" in kwargs:
            kwargs["device"] = _host(kwargs["device"])
        return to(self, *args, **kwargs)

    tensor.to = moved  # type: ignore[method-assign]
    tensor.cuda = lambda self, device=None, non_blocking=False, **k: self  # type: ignore[method-assign]
    tensor.pin_memory = lambda self, device=None: self  # type: ignore[method-assign]
    tensor.is_pinned = lambda self, device=None: False  # type: ignore[method-assign]
    is_cuda = property(lambda self: not _HOST_VIEW.on)
    tensor.is_cuda = torch.TypedStorage.is_cuda = torch.UntypedStorage.is_cuda = is_cuda  # type: ignore[assignment,method-assign]
    # and on this process's GPU, so that code that asks where a tensor is takes its CUDA path
    real = torch._C.TensorBase.device.__get__
    here = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))

    def device(self: torch.Tensor) -> torch.device:
        where = real(self)
        return here if where.type == "cpu" and not _HOST_VIEW.on else where

    tensor.device = property(device)  # type: ignore[assignment,method-assign]
    # streams are no-ops: nothing to record
    tensor.record_stream = lambda self, stream: None  # type: ignore[method-assign]


class _Stream:
    """A CUDA stream on the CPU: work runs in program order, so there is nothing to wait for."""

    cuda_stream = 0

    def __init__(self, device: Any = None, priority: int = 0, **_: Any) -> None:
        self.priority = priority

    def wait_stream(self, stream: Any) -> None:
        return None

    def wait_event(self, event: Any) -> None:
        return None

    def record_event(self, event: Any = None) -> _Event:
        return event or _Event()

    def synchronize(self) -> None:
        return None

    def query(self) -> bool:
        return True

    def __enter__(self) -> _Stream:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


class _Event:
    """A CUDA event on the CPU: always complete."""

    def __init__(self, *_: Any, **__: Any) -> None:
        return None

    def record(self, stream: Any = None) -> None:
        return None

    def wait(self, stream: Any = None) -> None:
        return None

    def synchronize(self) -> None:
        return None

    def query(self) -> bool:
        return True

    def elapsed_time(self, other: Any) -> float:
        return 0.0


_CURRENT = _Stream()


def _local_devices() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    cuda.is_available = lambda: True
    cuda.device_count = _local_devices
    cuda.current_device = lambda: int(os.environ.get("LOCAL_RANK", "0"))
    cuda.set_device = lambda device: None
    cuda.synchronize = lambda device=None: None
    cuda.is_bf16_supported = lambda *a, **k: True
    cuda.Stream = _Stream
    cuda.Event = _Event
    cuda.current_stream = lambda device=None: _CURRENT
    cuda.default_stream = lambda device=None: _CURRENT
    cuda.stream = lambda stream: contextlib.nullcontext(stream)
    # the emulated device computes on the CPU, so its random numbers come from the CPU's generator
    cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    cuda.set_rng_state = lambda state, device="cuda": torch.set_rng_state(state)
    cuda.get_rng_state_all = lambda: [torch.get_rng_state()]
    cuda.set_rng_state_all = lambda states: torch.set_rng_state(states[0])
    cuda.manual_seed = lambda seed: None
    cuda.manual_seed_all = lambda seed: None
    # nothing is measured: the emulation has no device memory
    for name in ("memory_allocated", "max_memory_allocated", "memory_reserved", "max_memory_reserved"):
        setattr(cuda, name, lambda device=None: 0)
    cuda.reset_peak_memory_stats = lambda device=None: None
    cuda.empty_cache = lambda: None
    for kind in ("Float", "Double", "Half", "BFloat16", "Char", "Byte", "Short", "Int", "Long", "Bool"):
        setattr(cuda, f"{kind}Storage", getattr(torch, f"{kind}Storage"))
        setattr(cuda, f"{kind}Tensor", getattr(torch, f"{kind}Tensor"))
    # torch's NCCL backend is gloo here (a CUDA group of the recipe, a cpu:gloo,cuda:nccl one of FSDP's)
    init, new_group = dist.init_process_group, dist.new_group

    def gloo(backend: Any) -> Any:
        return "gloo" if backend is not None and "nccl" in str(backend) else backend

    dist.init_process_group = lambda backend=None, *a, **k: init(gloo(backend), *a, **k)  # type: ignore[assignment]
    dist.new_group = lambda *a, backend=None, **k: new_group(*a, backend=gloo(backend), **k)  # type: ignore[assignment]


# ----------------------------------------------------------------------------- NCCL on gloo


def _on_host_view(fn: Any) -> Any:
    """``fn`` run with tensors on the CPU as they really are (gloo's view)."""

    def call(*args: Any, **kwargs: Any) -> Any:
        with _host_view():
            return fn(*args, **kwargs)

    return call


class _Comm:
    """An emulated NCCL communicator: this rank's place, and the gloo group of its unique id (None for one rank)."""

    def __init__(self, world_size: int, rank: int, group: Any) -> None:
        self.world_size, self.rank, self.group = world_size, rank, group

    def all_reduce(self, tensor: torch.Tensor, op: Any) -> None:
        options = dist.AllreduceOptions()
        options.reduceOp = op
        self.group.allreduce([tensor], options).wait()

    def all_gather(self, parts: list[torch.Tensor], tensor: torch.Tensor) -> None:
        self.group.allgather([parts], [tensor]).wait()

    def broadcast(self, tensor: torch.Tensor, root: int) -> None:
        options = dist.BroadcastOptions()
        options.rootRank, options.rootTensor = root, 0
        self.group.broadcast([tensor], options).wait()


_COMMS: dict[int, _Comm] = {}
_NEXT = itertools.count(1)


def _comm(comm: Any) -> _Comm:
    return _COMMS[comm.ptr]


def _tensor(storage: Any) -> torch.Tensor:
    """A flat tensor over a (typed) storage, sharing its memory."""
    out = torch.empty(0, dtype=storage.dtype)
    out.set_(storage)
    return out


def _wire(tensor: torch.Tensor) -> torch.Tensor:
    """What gloo moves bit for bit: the bytes (gloo knows fewer dtypes than NCCL; a copy is dtype-blind)."""
    return tensor.view(torch.uint8)


_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN, "prod": dist.ReduceOp.PRODUCT}


def _reduce_all(tensor: torch.Tensor, op: str, comm: _Comm) -> torch.Tensor:
    """``tensor`` reduced over the ranks, computed in fp32 for 16-bit floats (NCCL accumulates wider too)."""
    wide = tensor.float() if tensor.dtype in (torch.bfloat16, torch.float16) else tensor.clone()
    if comm.world_size > 1:
        comm.all_reduce(wide, _OPS["sum" if op == "avg" else op])
    if op == "avg":
        wide /= comm.world_size
    return wide.to(tensor.dtype)


def _get_unique_id() -> bytes:
    return os.urandom(128)


@_on_host_view
def _comm_init_rank(unique_id: bytes, world_size: int, rank: int) -> Any:
    from bmtrain.nccl import NCCLCommunicator

    group = None
    if world_size > 1:
        # ranks meet in the launcher's store (torchrun's agent's, or the one BMTrain's rank 0 opened) under keys of
        # this unique id, as NCCL's ranks meet through the id: ranks that read different ids never meet (a rank
        # that read a stale id waits until the timeout, or reaches the dead peers of an earlier attempt)
        timeout = timedelta(seconds=float(os.environ.get("OPENDELTA_EMULATED_NCCL_TIMEOUT", "300")))
        store = dist.TCPStore(
            os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, is_master=False, timeout=timeout
        )
        keyed = dist.PrefixStore(f"emulated-nccl/{unique_id.hex()[:32]}", store)
        group = dist.ProcessGroupGloo(keyed, rank, world_size, timeout)
    ptr = next(_NEXT)
    _COMMS[ptr] = _Comm(world_size, rank, group)
    return NCCLCommunicator(ptr)


@_on_host_view
def _all_gather(src: Any, dst: Any, comm: Any) -> None:
    c = _comm(comm)
    source, target = _tensor(src), _tensor(dst)
    if c.world_size == 1:
        target[: source.numel()].copy_(source)
        return
    c.all_gather(list(_wire(target).chunk(c.world_size)), _wire(source).clone())


@_on_host_view
def _reduce_scatter(src: Any, dst: Any, op: str, comm: Any) -> None:
    c = _comm(comm)
    source, target = _tensor(src), _tensor(dst)
    reduced = _reduce_all(source, op, c)
    n = target.numel()
    target.copy_(reduced[c.rank * n : (c.rank + 1) * n])


@_on_host_view
def _all_reduce(src: Any, dst: Any, op: str, comm: Any) -> None:
    c = _comm(comm)
    _tensor(dst).copy_(_reduce_all(_tensor(src), op, c))


@_on_host_view
def _broadcast(src: Any, dst: Any, root: int, comm: Any) -> None:
    c = _comm(comm)
    source, target = _tensor(src), _tensor(dst)
    if c.rank == root and target.data_ptr() != source.data_ptr():
        target.copy_(source)
    if c.world_size > 1:
        c.broadcast(_wire(target), root)


@_on_host_view
def _reduce(src: Any, dst: Any, op: str, root: int, comm: Any) -> None:
    c = _comm(comm)
    reduced = _reduce_all(_tensor(src), op, c)
    if c.rank == root:
        _tensor(dst).copy_(reduced)


@_on_host_view
def _send(src: Any, peer: int, comm: Any) -> None:
    _comm(comm).group.send([_wire(_tensor(src))], peer, 0).wait()


@_on_host_view
def _recv(dst: Any, peer: int, comm: Any) -> None:
    _comm(comm).group.recv([_wire(_tensor(dst))], peer, 0).wait()


def _patch_nccl() -> None:
    import bmtrain.distributed.ops as ops
    import bmtrain.nccl as nccl

    table = {
        "getUniqueId": _get_unique_id,
        "commInitRank": _comm_init_rank,
        "commDestroy": lambda comm: comm._destroy_ptr(),
        "commCount": lambda comm: _comm(comm).world_size,
        "commRank": lambda comm: _comm(comm).rank,
        "allGather": _all_gather,
        "reduceScatter": _reduce_scatter,
        "allReduce": _all_reduce,
        "broadcast": _broadcast,
        "reduce": _reduce,
        "send": _send,
        "recv": _recv,
        "groupStart": lambda: None,  # gloo's collectives are synchronous and every rank issues them in one order
        "groupEnd": lambda: None,
    }
    for name, fn in table.items():
        setattr(nccl, name, fn)
    # bmtrain.distributed.ops imported some of them by name
    ops.ncclAllGather, ops.ncclAllReduce = _all_gather, _all_reduce
    ops.ncclBroadcast, ops.ncclReduceScatter, ops.recv = _broadcast, _reduce_scatter, _recv


# ----------------------------------------------------------------------------- BMTrain's CUDA kernels


def _adam_fp16(
    param_fp32, param_fp16, g_fp16, m_fp16, v_fp32, beta1, beta2, eps, lr, scale, weight_decay, step
) -> None:  # type: ignore[no-untyped-def]
    """``adam_fp32_accum`` of BMTrain's ``adam_cuda.cu``: m kept scaled in fp16, v scaled in fp32."""
    c1, c2 = 1 - beta1**step, 1 - beta2**step
    g = g_fp16.float()
    m = beta1 * m_fp16.float() + (1 - beta1) * g
    v = beta2 * v_fp32 + (1 - beta2) * g * g / scale
    p = param_fp32 - lr * m / c1 / ((v * scale / c2).sqrt() + eps * scale) - lr * weight_decay * param_fp32
    param_fp32.copy_(p)
    param_fp16.copy_(p.half())
    v_fp32.copy_(v)
    m_fp16.copy_(m.half())


def _adam_bf16(
    param_fp32, param_bf16, g_bf16, m_fp32, v_fp32, beta1, beta2, eps, lr, scale, weight_decay, step
) -> None:  # type: ignore[no-untyped-def]
    """``adam_fp32_accum_bf16`` of BMTrain's ``adam_cuda.cu``: unscaled fp32 moments, AdamW's decay."""
    c1, c2 = 1 - beta1**step, 1 - beta2**step
    g = g_bf16.float() / scale
    m = beta1 * m_fp32 + (1 - beta1) * g
    v = beta2 * v_fp32 + (1 - beta2) * g * g
    p = param_fp32 - lr * m / c1 / ((v / c2).sqrt() + eps) - lr * weight_decay * param_fp32
    param_fp32.copy_(p)
    param_bf16.copy_(p.bfloat16())
    v_fp32.copy_(v)
    m_fp32.copy_(m)


def _has_inf_nan(g_half: torch.Tensor, out: torch.Tensor) -> None:
    """``has_nan_inf_*_launcher``: sets ``out`` to 1 when ``g_half`` holds an inf or a NaN (never clears it)."""
    if not torch.isfinite(g_half).all():
        out.fill_(1)


def _patch_kernels() -> None:
    import bmtrain
    import bmtrain.loss._function as loss_fn
    import bmtrain.optim._function as optim_fn
    import bmtrain.optim.optim_manager as manager

    optim_fn.adam_fp16, optim_fn.adam_bf16 = _adam_fp16, _adam_bf16
    optim_fn.bf16_from_fp32 = lambda p: p.to(torch.bfloat16)
    optim_fn.fp16_from_fp32 = lambda p: p.to(torch.float16)
    loss_fn.has_inf_nan = manager.has_inf_nan = _has_inf_nan
    cpu_adam = optim_fn.adam_cpu

    def adam_cpu(*args: Any, **kwargs: Any) -> None:
        # BMTrain's own CPU kernel on the host copies of AdamOffloadOptimizer, which it checks are on the CPU
        with _host_view():
            cpu_adam(*args, **kwargs)

    optim_fn.adam_cpu = adam_cpu
    bmtrain.C.is_bf16_supported = lambda: True


# ----------------------------------------------------------------------------- installing

_INSTALLED = False


def installed() -> bool:
    """Whether this process runs under the emulation."""
    return _INSTALLED


def install() -> None:
    """Put this process under the emulation (see the module docstring). Idempotent; for the whole process."""
    global _INSTALLED
    if _INSTALLED:
        return
    _INSTALLED = True
    os.environ[EMULATION_ENV] = "1"
    _patch_tensors()
    _patch_torch_cuda()
    _patch_nccl()
    _patch_kernels()


def main(argv: list[str]) -> None:
    """``python -m tests.bmt.emulated_cuda SCRIPT ARGS...`` (or ``-m MODULE ARGS...``): run it under the emulation."""
    if not argv or (argv[0] == "-m" and len(argv) < 2):
        raise SystemExit("usage: python -m tests.bmt.emulated_cuda (SCRIPT | -m MODULE) [ARGS...]")
    install()
    if argv[0] == "-m":
        sys.argv = [argv[1], *argv[2:]]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = list(argv)
        runpy.run_path(argv[0], run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
