"""The ``bmt`` backend: delta parameters as BMTrain ``DistributedParameter``s, on ModelCenter backbones.

A ``DistributedParameter`` keeps only this rank's partition of the flattened tensor (ZeRO-3); a module whose
class derives from ``bmtrain.DistributedModule`` all-gathers it whole on every attribute access
(``self.weight``), with autograd, so the methods' own forward code runs unchanged on the whole tensors and the
gradients are reduce-scattered back into the partitions. This backend makes the delta's parameters that way:

- **Making:** every parameter is created on this process's GPU in its final dtype, filled by its init function
  on the whole tensor, the same on every rank (rank 0's values are broadcast), and partitioned; the init
  function is kept as BMTrain's ``init_method``. :meth:`BMTBackend.prepare_module` turns every delta module
  that holds such parameters into a ``DistributedModule`` (its class is swapped in place, as BMTrain's own
  model wrapper does), so its forward reads whole tensors.
- **Reading whole:** :meth:`BMTBackend.full_tensor` all-gathers: a **collective**. Every rank must call it, in
  the same order; so must it every attribute access of a delta module's parameter (``repr`` included) and
  the dummy forward that finds hidden sizes. The delta methods do all of these on every rank alike.
- **Recognising:** ModelCenter's ``Linear`` (weight ``[out, in]``, bias None or a parameter) and
  ``LayerNorm`` (RMS norm when it has no bias), and the module names of ModelCenter's T5 for the
  common-structure roles (``attn.q`` is ``self_att.self_attention.project_q``, ...); torch's and
  transformers' layers and families as the ``hf`` backend knows them (a transformers model on the GPU takes
  bmt deltas too).

The backbone's own weights inside BMTrain ``Block``s are partitions of the block's storage and are only whole
inside the block's forward: reading one whole (LoRA's ``merge``, a BitFit copy of an existing bias) is refused
with the reason. Prefix tuning and soft prompts need transformers' attention modules and input embeddings,
which ModelCenter models do not have: they declare the ``transformers`` capability, which this backend lacks,
so they refuse ``backend="bmt"`` by name.

BMTrain must be initialised (``bmtrain.init_distributed``, which the ``bmt`` engine calls under torchrun) on
a machine with a CUDA GPU before a delta is made; importing this module needs only the ``bmt`` extra.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping
from typing import Any

import bmtrain as bmt
import torch
from model_center.layer import LayerNorm as MCLayerNorm
from model_center.layer import Linear as MCLinear
from torch import nn

from opendelta_dist.backends import BiasKind, InitFn, WeightLayout
from opendelta_dist.backends.hf import BACKEND as HF
from opendelta_dist.backends.hf import torch_linear_bias_init, torch_linear_weight_init
from opendelta_dist.errors import DeltaConfigError, WholeValueUnavailableError

#: the model type under which :attr:`BMTBackend.families` lists ModelCenter's T5 (its class path)
MODELCENTER_T5 = "model_center.model.t5.T5"

_LAYER = r"(?:encoder|decoder)\.layers\.\d+"
_SELF = rf"{_LAYER}\.self_att\.self_attention"
_CROSS = r"decoder\.layers\.\d+\.cross_att\.self_attention"
_FFN = rf"{_LAYER}\.ffn\.ffn"  # the feed-forward network; ``{_LAYER}.ffn`` is the sub-layer (norm, residual)

#: common-structure role -> module-name pattern in ModelCenter's T5
T5_ROLES: dict[str, str] = {
    "layer": _LAYER,
    "attn": _SELF,
    "attn.q": rf"{_SELF}\.project_q",
    "attn.k": rf"{_SELF}\.project_k",
    "attn.v": rf"{_SELF}\.project_v",
    "attn.proj": rf"{_SELF}\.attention_out",
    "crossattn": _CROSS,
    "crossattn.q": rf"{_CROSS}\.project_q",
    "crossattn.k": rf"{_CROSS}\.project_k",
    "crossattn.v": rf"{_CROSS}\.project_v",
    "crossattn.proj": rf"{_CROSS}\.attention_out",
    "ff": rf"{_LAYER}\.ffn",
    "ff.w1": rf"{_FFN}\.w_in\.(?:w|w_0)",
    "ff.w2": rf"{_FFN}\.w_out",
    "layer_norm": (
        rf"(?:{_LAYER}\.(?:self_att|cross_att)\.layernorm_before_attention|{_LAYER}\.ffn\.layernorm_before_ffn"
        r"|(?:encoder|decoder)\.output_layernorm)"
    ),
}

_DISTRIBUTED_CLASSES: dict[type, type] = {}


def _require_initialized() -> None:
    if not bmt.config.get("initialized", False):
        raise DeltaConfigError(
            "the bmt backend makes BMTrain DistributedParameters, which need BMTrain initialised on a CUDA GPU: "
            "call bmtrain.init_distributed() first (the bmt engine does, under torchrun), or use backend='hf'"
        )


def _in_block(param: torch.Tensor) -> bool:
    return bool(getattr(param, "_in_block", False))


def _refuse_in_block(param: torch.Tensor, what: str) -> None:
    if _in_block(param):
        raise WholeValueUnavailableError(
            f"cannot {what} a backbone weight inside a BMTrain Block (shape {tuple(param._original_shape)}): it "
            "is a partition of the block's storage and whole only inside the block's forward. Keep the delta "
            "apart (do not merge it into the backbone on bmt), or merge on a transformers model loaded with "
            "the saved delta (backend='hf')"
        )


def _no_undo() -> None:
    return None


def _written() -> None:
    """Order BMTrain's next gathers after what this stream wrote into partitions: ``gather`` all-gathers on
    BMTrain's load stream without waiting for the current one (as ``bmtrain.init_parameters`` and its optimizer
    step end, so do the backend's writes)."""
    bmt.config["load_stream"].wait_stream(torch.cuda.current_stream())


def distributed_class(cls: type) -> type:
    """``cls`` with ``bmtrain.DistributedModule`` mixed in (attribute reads gather whole parameters)."""
    if issubclass(cls, bmt.DistributedModule):
        return cls
    made = _DISTRIBUTED_CLASSES.get(cls)
    if made is None:
        made = type(f"Distributed{cls.__name__}", (cls, bmt.DistributedModule), {"__module__": cls.__module__})
        _DISTRIBUTED_CLASSES[cls] = made
    return made


class _WholeReading(nn.Module):
    """Reads a ``DistributedParameter`` in one of its slots whole (all-gathered, with autograd), as BMTrain's
    ``DistributedModule`` does, and nothing else of it differs (its state dict included)."""

    def __getattr__(self, name: str) -> Any:
        value = super().__getattr__(name)
        if isinstance(value, bmt.DistributedParameter) and not value._in_block:
            return value.gather()
        return value


_WHOLE_READING_CLASSES: dict[type, type] = {}
#: backbone modules made to read delta parameters whole: their own class and the number of slots holding one
_TARGETS: weakref.WeakKeyDictionary[nn.Module, list[Any]] = weakref.WeakKeyDictionary()


class BMTBackend:
    """Backend of BMTrain ``DistributedParameter``s on ModelCenter models (see the module docstring)."""

    name = "bmt"
    capabilities: frozenset[str] = frozenset()

    @property
    def families(self) -> Mapping[str, Mapping[str, str]]:
        """ModelCenter's T5 (under its class path) and transformers' families (a transformers model on the GPU
        takes ``DistributedParameter`` deltas too)."""
        return {**HF.families, MODELCENTER_T5: T5_ROLES}

    # ----------------------------------------------------------------- making

    def _whole(self, shape: tuple[int, ...], dtype: torch.dtype | None, init: InitFn | None) -> torch.Tensor:
        full = torch.empty(shape, dtype=dtype or torch.get_default_dtype(), device="cuda")
        with torch.no_grad():
            full.zero_() if init is None else init(full)
            if bmt.world_size() > 1:  # the same whole value on every rank, whatever their random states
                full = bmt.distributed.broadcast(full, 0)
        return full

    def parameter(
        self,
        shape: tuple[int, ...],
        init: InitFn,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> nn.Parameter:
        """A new ``DistributedParameter`` on this process's GPU, filled by ``init`` on the whole tensor.

        ``device`` must be a CUDA device or None (the parameter lives on BMTrain's current GPU); the meta
        device is refused: BMTrain has no deferred initialisation.
        """
        _require_initialized()
        if device is not None and torch.device(device).type != "cuda":
            raise DeltaConfigError(
                f"the bmt backend makes parameters on the GPU, not on {torch.device(device).type!r}: build the "
                "backbone with the bmt engine (ModelCenter on CUDA), or use backend='hf'"
            )
        param = bmt.DistributedParameter(self._whole(shape, dtype, init), requires_grad=True, init_method=init)
        _written()
        return param

    def parameter_from(self, data: torch.Tensor) -> nn.Parameter:
        """``data`` (the whole tensor, the same on every rank) as a trainable ``DistributedParameter``."""
        _require_initialized()
        param = bmt.DistributedParameter(data.detach().to("cuda"), requires_grad=True)
        _written()
        return param

    def reset_module(self, module: nn.Module) -> None:
        """Fill every delta parameter of ``module`` again from its init function (zero without one)."""
        for param in module.parameters():
            if isinstance(param, bmt.DistributedParameter) and not _in_block(param):
                whole = self._whole(tuple(param._original_shape), param.dtype, param._init_method)
                with torch.no_grad():
                    param._copy_data(whole)
        _written()

    def linear(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        device: torch.device | str | None,
        dtype: torch.dtype | None,
        init_weight: InitFn | None = None,
        init_bias: InitFn | None = None,
    ) -> nn.Module:
        """An ``nn.Linear`` of ``DistributedParameter``s (torch's init by default), made distributed."""
        layer = nn.Linear(in_features, out_features, bias=False, device="meta")
        layer.weight = self.parameter(
            (out_features, in_features), init_weight or torch_linear_weight_init, device, dtype
        )
        if bias:
            layer.bias = self.parameter(
                (out_features,), init_bias or torch_linear_bias_init(in_features), device, dtype
            )
        self.prepare_module(layer)
        return layer

    def prepare_module(self, module: nn.Module) -> None:
        """Make every submodule of ``module`` that holds parameters a ``DistributedModule``, in place.

        Plain parameters left in it are partitioned as they are (``DistributedParameter`` of their value),
        buffers move to the GPU.
        """
        _require_initialized()
        for sub in module.modules():
            for key, param in list(sub._parameters.items()):
                if param is not None and not isinstance(param, bmt.DistributedParameter):
                    sub._parameters[key] = bmt.DistributedParameter(
                        param.detach().to("cuda"), requires_grad=param.requires_grad
                    )
            for key, buffer in list(sub._buffers.items()):
                if buffer is not None and buffer.device.type != "cuda":
                    sub._buffers[key] = buffer.to("cuda")
            if any(p is not None for p in sub._parameters.values()):
                sub.__class__ = distributed_class(type(sub))
        _written()

    def prepare_target(self, module: nn.Module) -> Callable[[], None]:
        """Make a backbone module that is not a ``DistributedModule`` (a transformers layer on the GPU, whose
        bias slot BitFit fills) read this backend's parameters whole, until the returned undo is called for
        every slot that holds one."""
        if isinstance(module, bmt.DistributedModule):
            return _no_undo
        held = _TARGETS.get(module)
        if held is None:
            cls = type(module)
            made = _WHOLE_READING_CLASSES.get(cls)
            if made is None:
                made = type(f"WholeReading{cls.__name__}", (_WholeReading, cls), {"__module__": cls.__module__})
                _WHOLE_READING_CLASSES[cls] = made
            held = _TARGETS[module] = [cls, 0]
            module.__class__ = made
        held[1] += 1

        def undo() -> None:
            held[1] -= 1
            if held[1] == 0:
                module.__class__ = held[0]
                del _TARGETS[module]

        return undo

    # ----------------------------------------------------------------- reading whole

    def owns(self, tensor: torch.Tensor) -> bool:
        """BMTrain's ``DistributedParameter``s."""
        return isinstance(tensor, bmt.DistributedParameter)

    def full_tensor(self, param: torch.Tensor) -> torch.Tensor:
        """The whole value, all-gathered (a collective: every rank calls it in the same order), detached.

        Raises:
            WholeValueUnavailableError: ``param`` is a backbone weight inside a BMTrain ``Block``.
        """
        if not isinstance(param, bmt.DistributedParameter):
            return param.detach()
        _refuse_in_block(param, "read whole")
        with torch.no_grad():
            return param.gather().detach()

    def full_shape(self, param: torch.Tensor) -> torch.Size:
        """The whole shape (``_original_shape``), not the partition's."""
        if isinstance(param, bmt.DistributedParameter):
            return torch.Size(param._original_shape)
        return param.shape

    def load_full(self, param: torch.Tensor, value: torch.Tensor) -> None:
        """Copy this rank's partition of the whole ``value`` into ``param``.

        Raises:
            DeltaConfigError: ``param`` is a backbone weight inside a BMTrain ``Block``, or ``value`` has
                another shape.
        """
        if not isinstance(param, bmt.DistributedParameter):
            with torch.no_grad():
                param.copy_(value.to(device=param.device, dtype=param.dtype))
            return
        _refuse_in_block(param, "write whole")
        if tuple(value.shape) != tuple(param._original_shape):
            raise DeltaConfigError(
                f"a tensor of shape {tuple(value.shape)} for a {tuple(param._original_shape)} parameter"
            )
        with torch.no_grad():  # BMTrain copies this rank's slice of ``value.view(-1)``: it must be contiguous
            param._copy_data(value.to(device=param.device, dtype=param.dtype).contiguous())
        _written()

    # ----------------------------------------------------------------- recognising

    def weight_layout(self, module: nn.Module) -> WeightLayout | None:
        """``OUT_IN`` for ModelCenter's ``Linear``; the ``hf`` backend's answer for torch's and transformers'."""
        if isinstance(module, MCLinear):
            return WeightLayout.OUT_IN
        return HF.weight_layout(module)

    def linear_dims(self, module: nn.Module) -> tuple[int, int] | None:
        """``(dim_in, dim_out)`` of a ModelCenter ``Linear``; the ``hf`` backend's answer for other layers."""
        if isinstance(module, MCLinear):
            return module.dim_in, module.dim_out
        return HF.linear_dims(module)

    def bias_kind(self, module: nn.Module) -> tuple[BiasKind, int] | None:
        """ModelCenter's ``Linear`` and ``LayerNorm`` take a bias (its RMS norm, ``bias=None``, an added one);
        the ``hf`` backend's answer for other layers.

        ModelCenter's ``Linear`` without a bias keeps ``bias = None`` as a plain attribute, not as a parameter
        slot (``nn.Linear(bias=False)`` has one): the slot is registered here, empty, so that a delta can fill
        it (its forward reads ``self.bias`` as before, None until then).
        """
        if isinstance(module, MCLinear) and "bias" not in module._parameters and module.__dict__.get("bias") is None:
            module.__dict__.pop("bias", None)
            module.register_parameter("bias", None)
        bias = module._parameters.get("bias")
        if isinstance(module, MCLinear):
            return (BiasKind.EXISTING if bias is not None else BiasKind.EMPTY_SLOT), module.dim_out
        if isinstance(module, MCLayerNorm):
            return (BiasKind.EXISTING if bias is not None else BiasKind.ADDITIVE), module.dim_norm
        return HF.bias_kind(module)


BACKEND = BMTBackend()
