"""An **emulation** of one CUDA device per process on the CPU, under which the real BMTrain 1.0.1 and
ModelCenter 1.0.2 run: the tier of the bmt tests that CI runs where there is no GPU.

What it provides, and nothing more:

- **the device**: every ``"cuda"`` device a Python call names (torch's tensor factories' ``device=``,
  ``Tensor.to``, ``.cuda()``, ``new_*``) is the CPU, every tensor says it ``is_cuda``, pinning and
  ``record_stream`` do nothing;
  ``torch.cuda``'s streams, events, RNG, legacy ``FloatStorage``/``FloatTensor`` types and device queries are
  CPU stand-ins (streams are in-order no-ops: the CPU runs everything in program order);
- **NCCL**: the functions of BMTrain's C extension that its ``bmtrain.nccl`` wrappers call with raw pointers
  (communicator, all-gather, reduce-scatter, all-reduce, broadcast, reduce, send/recv), on a gloo group of
  each communicator's own (plain copies at world size 1). A communicator is keyed by its unique id in the
  launcher's store, as NCCL's is, so ranks that read different ids never meet (a stale id hangs here as it
  does on GPUs, until the store's timeout);
- **BMTrain's CUDA-only kernels**: its fused Adam for fp16 and bf16 weights, bit for bit what nvcc compiles of
  BMTrain's ``csrc/cuda/adam_cuda.cu``, and its ``has_inf_nan`` overflow check (the CPU Adam of
  ``AdamOffloadOptimizer`` is BMTrain's own compiled code and runs as it is).

What it cannot be: a device apart from the host. A tensor left on the CPU works with the emulated GPU's, ``.cuda()``
returns the tensor itself, one generator serves both, streams run in program order (a missing stream wait cannot
show), and nothing measures memory. Those are the GPU check's (``scripts/gpu-check.sh``, ``docs/bmt.md``).

Everything above these (BMTrain's ``DistributedParameter``, blocks, ZeRO contexts, hooks, optimizers and
their manager, ModelCenter's T5, the project's backend and engine) is the real code. No kernel, NCCL, memory
or speed is measured here: a result of this tier never counts as a GPU result.

Use :func:`install` at the start of a process, before BMTrain is initialised, or run a script under it with
``python -m tests.bmt.emulated_cuda SCRIPT ARGS...`` (what the tests launch under torchrun).
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import runpy
import sys
import threading
from datetime import timedelta
from typing import Any

import numpy as np
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
    # an sm_80 device (one of the architectures BMTrain is built for): torch.distributed's broadcast asks
    cuda.get_device_capability = lambda device=None: (8, 0)
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
#
# BMTrain's Python wrappers (``bmtrain.nccl``: checks, dtypes, counts) stay; the functions of its C extension they
# call with raw pointers are replaced, so every caller is covered, those that imported a wrapper by name too.


def _on_host_view(fn: Any) -> Any:
    """``fn`` run with tensors on the CPU as they really are (gloo's view)."""

    def call(*args: Any, **kwargs: Any) -> Any:
        with _host_view():
            return fn(*args, **kwargs)

    return call


#: ``ncclDataType_t`` (``bmtrain/nccl/enums.py``) -> torch dtype
_DTYPES = {
    0: torch.int8,
    1: torch.uint8,
    2: torch.int32,
    3: torch.uint32,
    4: torch.int64,
    5: torch.uint64,
    6: torch.float16,
    7: torch.float32,
    8: torch.float64,
    9: torch.bfloat16,
}
_SUM, _PROD, _MAX, _MIN, _AVG = range(5)  # ``ncclRedOp_t``
_GLOO_OPS = {_SUM: dist.ReduceOp.SUM, _PROD: dist.ReduceOp.PRODUCT, _MAX: dist.ReduceOp.MAX, _MIN: dist.ReduceOp.MIN}


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


def _buffer(pointer: int, count: int, datatype: int | torch.dtype) -> torch.Tensor:
    """The ``count`` elements at ``pointer`` (the emulated device's memory is the process's) as a tensor; the
    dtype as NCCL's ``ncclDataType_t`` or torch's."""
    dtype = datatype if isinstance(datatype, torch.dtype) else _DTYPES[datatype]
    if count == 0:
        return torch.empty(0, dtype=dtype)
    size = count * dtype.itemsize
    return torch.frombuffer((ctypes.c_uint8 * size).from_address(pointer), dtype=torch.uint8).view(dtype)


def _bytes(tensor: torch.Tensor) -> torch.Tensor:
    """What gloo moves bit for bit: the bytes (gloo knows fewer dtypes than NCCL; a copy is dtype-blind)."""
    return tensor.view(torch.uint8)


def _reduce_all(tensor: torch.Tensor, op: int, comm: _Comm) -> torch.Tensor:
    """``tensor`` reduced over the ranks as NCCL reduces it. 16-bit floats are added in fp32 and rounded once:
    NCCL's result at two ranks (one addition, one rounding); with more ranks it rounds at every ring step, which
    may differ in the last bit. ``avg`` divides floats (NCCL multiplies by 1/n, the same at two ranks) and
    truncates integers."""
    wide = tensor.float() if tensor.dtype in (torch.bfloat16, torch.float16) else tensor.clone()
    if comm.world_size > 1:
        comm.all_reduce(wide, _GLOO_OPS[_SUM if op == _AVG else op])
    if op == _AVG:
        wide = wide / comm.world_size if wide.is_floating_point() else wide.div(comm.world_size, rounding_mode="trunc")
    return wide.to(tensor.dtype)


def _get_unique_id() -> bytes:
    return os.urandom(128)


@_on_host_view
def _comm_init_rank(unique_id: bytes, world_size: int, rank: int) -> int:
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
    pointer = next(_NEXT)
    _COMMS[pointer] = _Comm(world_size, rank, group)
    return pointer


@_on_host_view
def _all_gather(send: int, recv: int, count: int, datatype: int, comm: int, stream: int) -> None:
    c = _COMMS[comm]
    source, target = _buffer(send, count, datatype), _buffer(recv, count * c.world_size, datatype)
    if c.world_size == 1:
        target.copy_(source)
    else:
        c.all_gather(list(_bytes(target).chunk(c.world_size)), _bytes(source).clone())


@_on_host_view
def _reduce_scatter(send: int, recv: int, count: int, datatype: int, op: int, comm: int, stream: int) -> None:
    c = _COMMS[comm]
    reduced = _reduce_all(_buffer(send, count * c.world_size, datatype), op, c)
    _buffer(recv, count, datatype).copy_(reduced[c.rank * count : (c.rank + 1) * count])


@_on_host_view
def _all_reduce(send: int, recv: int, count: int, datatype: int, op: int, comm: int, stream: int) -> None:
    c = _COMMS[comm]
    _buffer(recv, count, datatype).copy_(_reduce_all(_buffer(send, count, datatype), op, c))


@_on_host_view
def _broadcast(send: int, recv: int, count: int, datatype: int, root: int, comm: int, stream: int) -> None:
    c = _COMMS[comm]
    target = _buffer(recv, count, datatype)
    if c.rank == root and send != recv:
        target.copy_(_buffer(send, count, datatype))
    if c.world_size > 1:
        c.broadcast(_bytes(target), root)


@_on_host_view
def _reduce(send: int, recv: int, count: int, datatype: int, op: int, root: int, comm: int, stream: int) -> None:
    c = _COMMS[comm]
    reduced = _reduce_all(_buffer(send, count, datatype), op, c)
    if c.rank == root:
        _buffer(recv, count, datatype).copy_(reduced)


@_on_host_view
def _send(send: int, count: int, datatype: int, peer: int, comm: int, stream: int) -> None:
    _COMMS[comm].group.send([_bytes(_buffer(send, count, datatype))], peer, 0).wait()


@_on_host_view
def _recv(recv: int, count: int, datatype: int, peer: int, comm: int, stream: int) -> None:
    _COMMS[comm].group.recv([_bytes(_buffer(recv, count, datatype))], peer, 0).wait()


def _patch_nccl() -> None:
    from bmtrain import C

    table = {
        "ncclGetUniqueId": _get_unique_id,
        "ncclCommInitRank": _comm_init_rank,
        "ncclCommDestroy": lambda comm: _COMMS.pop(comm, None) and None,
        "ncclCommCount": lambda comm: _COMMS[comm].world_size,
        "ncclCommUserRank": lambda comm: _COMMS[comm].rank,
        "ncclAllGather": _all_gather,
        "ncclReduceScatter": _reduce_scatter,
        "ncclAllReduce": _all_reduce,
        "ncclBroadcast": _broadcast,
        "ncclReduce": _reduce,
        "ncclSend": _send,
        "ncclRecv": _recv,
        # gloo's collectives are synchronous and every rank issues them in one order; a group of point-to-point
        # calls (BMTrain's pipeline, which the project does not use) could wait on gloo where NCCL would not
        "ncclGroupStart": lambda: None,
        "ncclGroupEnd": lambda: None,
    }
    for name, fn in table.items():
        setattr(C, name, fn)


# ----------------------------------------------------------------------------- BMTrain's CUDA kernels
#
# What nvcc makes of BMTrain's ``csrc/cuda/adam_cuda.cu`` (checked against its compiled SASS): constants in fp32
# (``1 - beta`` of the fp32 ``beta``), nvcc's fused multiply-adds (computed in fp64 and rounded once, which equals
# ``fmaf`` but in rare double-rounding cases), IEEE square roots (torch's fp32 CPU sqrt may be 1 ulp off: fp64).


def _f32(x: float) -> float:
    """``x`` as the fp32 the kernel launcher receives."""
    return float(np.float32(x))


def _fma(a: torch.Tensor, b: Any, c: Any) -> torch.Tensor:
    """fp32 ``a * b + c`` with one rounding, as CUDA's ``fmaf``."""
    b = b.double() if torch.is_tensor(b) else b
    c = c.double() if torch.is_tensor(c) else c
    return (a.double() * b + c).float()


def _sqrt(x: torch.Tensor) -> torch.Tensor:
    return x.double().sqrt().float()


def _constants(
    beta1: float, beta2: float, eps: float, lr: float, scale: float, weight_decay: float, bc1: float, bc2: float
) -> tuple:
    """The launcher's fp32 arguments and what the kernels compute of them in fp32: bias corrections, betas,
    ``1 - beta``, eps, lr, scale, ``lr * weight_decay``."""
    b1, b2 = _f32(beta1), _f32(beta2)
    return (
        _f32(bc1),
        _f32(bc2),
        b1,
        b2,
        _f32(np.float32(1) - np.float32(b1)),
        _f32(np.float32(1) - np.float32(b2)),
        _f32(eps),
        _f32(lr),
        _f32(scale),
        _f32(np.float32(lr) * np.float32(weight_decay)),
    )


def adam_fp16(param_fp32, param_fp16, g_fp16, m_fp16, v_fp32, *arguments: float) -> None:  # type: ignore[no-untyped-def]
    """``adam_fp32_accum``: m kept scaled in fp16, v scaled in fp32, AdamW's decay. ``arguments``: the
    launcher's beta1, beta2, eps, lr, scale, weight_decay, bias_correction1, bias_correction2."""
    c1, c2, b1, b2, one_b1, one_b2, eps, lr, scale, decay = _constants(*arguments)
    g = g_fp16.float()
    m = _fma(g, one_b1, m_fp16.float() * b1)
    v = _fma(v_fp32, b2, (g * one_b2) * g / scale)
    denominator = _fma(torch.full_like(v, eps), scale, _sqrt(v * scale / c2))
    p = _fma(param_fp32, -decay, param_fp32 - (m * lr) / c1 / denominator)
    param_fp32.copy_(p)
    param_fp16.copy_(p.half())
    v_fp32.copy_(v)
    m_fp16.copy_(m.half())


def adam_bf16(param_fp32, param_bf16, g_bf16, m_fp32, v_fp32, *arguments: float) -> None:  # type: ignore[no-untyped-def]
    """``adam_fp32_accum_bf16``: unscaled fp32 moments, AdamW's decay; the bf16 copy rounded to nearest.
    ``arguments`` as :func:`adam_fp16`'s."""
    c1, c2, b1, b2, one_b1, one_b2, eps, lr, scale, decay = _constants(*arguments)
    g = g_bf16.float() / scale
    m = _fma(m_fp32, b1, g * one_b1)
    v = _fma(v_fp32, b2, (g * one_b2) * g)
    p = _fma(param_fp32, -decay, param_fp32 - (m * lr) / c1 / (_sqrt(v / c2) + eps))
    param_fp32.copy_(p)
    param_bf16.copy_(p.bfloat16())
    v_fp32.copy_(v)
    m_fp32.copy_(m)


def _adam_launcher(kernel: Any, half: torch.dtype, moment: torch.dtype) -> Any:
    """``adam_*_launcher(n, param_fp32, param_h, g, m, v, *arguments, stream)``, on the buffers at the pointers."""

    def launch(n: int, p32: int, ph: int, g: int, m: int, v: int, *rest: float) -> None:
        if n <= 0:
            return
        *arguments, _stream = rest
        buffers = (_buffer(p32, n, torch.float32), _buffer(ph, n, half), _buffer(g, n, half))
        kernel(*buffers, _buffer(m, n, moment), _buffer(v, n, torch.float32), *arguments)

    return launch


def _has_nan_inf_launcher(half: torch.dtype) -> Any:
    """``has_nan_inf_*_launcher(n, g, mid, out, stream)``: sets ``out`` to 1 when ``g`` holds an inf or a NaN (never
    clears it)."""

    def launch(n: int, g: int, mid: int, out: int, stream: int) -> None:
        if n > 0 and not torch.isfinite(_buffer(g, n, half)).all():
            _buffer(out, 1, torch.uint8).fill_(1)

    return launch


def _not_emulated(name: str) -> Any:
    def launch(*args: Any) -> None:
        raise NotImplementedError(
            f"BMTrain's CUDA kernel {name} is not part of the CUDA emulation (tests/bmt/emulated_cuda.py): run this "
            "on a GPU, or emulate it there after BMTrain's csrc/cuda source"
        )

    return launch


_DTYPE_NAMES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def _patch_kernels() -> None:
    import bmtrain.optim._function as optim_fn
    from bmtrain import C

    # its Python wrappers (and their checks) run as they are; the CUDA launchers they call are these
    C.adam_fp16_launcher = _adam_launcher(adam_fp16, torch.float16, torch.float16)
    C.adam_bf16_launcher = _adam_launcher(adam_bf16, torch.bfloat16, torch.float32)
    for suffix, dtype in _DTYPE_NAMES.items():
        setattr(C, f"has_nan_inf_{suffix}_launcher", _has_nan_inf_launcher(dtype))
    # the fused cross entropy and softmax (bmt.loss.FusedCrossEntropy): not emulated, so never silently wrong
    for name in dir(C):
        if name.endswith("_launcher") and not name.startswith(("adam_", "has_nan_inf_")):
            setattr(C, name, _not_emulated(name))
    C.is_bf16_supported = lambda: True
    cpu_adam = optim_fn.adam_cpu

    def adam_cpu(*args: Any, **kwargs: Any) -> None:
        # BMTrain's own CPU kernel on the host copies of AdamOffloadOptimizer, which it checks are on the CPU
        with _host_view():
            cpu_adam(*args, **kwargs)

    optim_fn.adam_cpu = adam_cpu


# ----------------------------------------------------------------------------- installing

_INSTALLED = False


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
    try:
        install()
    except ImportError as exc:
        raise SystemExit(
            f"the CUDA emulation runs the real BMTrain and ModelCenter ({exc}): install them with bash "
            "scripts/install-bmt.sh (it needs nvcc, not a GPU)"
        ) from exc
    if argv[0] == "-m":
        sys.argv = [argv[1], *argv[2:]]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = list(argv)
        runpy.run_path(argv[0], run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
