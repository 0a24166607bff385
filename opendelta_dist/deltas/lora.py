"""LoRA: a trainable low-rank update ``B A x * alpha / r`` beside frozen linear layers (Hu et al., 2021)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from opendelta_dist.auto_delta import register_delta_method
from opendelta_dist.backends import Backend, WeightLayout
from opendelta_dist.basemodel import DeltaBase
from opendelta_dist.config import OPTIONS, BaseDeltaConfig, check_positive_int, in_range, option
from opendelta_dist.deltas.lora_peft import save_peft
from opendelta_dist.errors import DeltaStateError, UnsupportedModuleError
from opendelta_dist.operations import InsertParallel, Operation


@dataclass
class LoraConfig(BaseDeltaConfig):
    """Options of :class:`LoraModel`."""

    delta_type: ClassVar[str] = "lora"
    parameter_order: ClassVar[tuple[str, ...]] = (
        OPTIONS,
        "modified_modules",
        "unfrozen_modules",
        "exclude_modules",
        "common_structure",
        "interactive_modify",
        "backend",
        "leave_out",
    )

    lora_r: int = option(8, "rank of the update.", check_positive_int)
    lora_alpha: int | float = option(16, "the update is scaled by ``lora_alpha / lora_r``.")
    lora_dropout: float = option(0.0, "dropout on the update's input.", in_range(0, 1))


#: ``lora_A`` starts Kaiming-uniform (``lora_B`` at zero)
LORA_A_INIT = partial(nn.init.kaiming_uniform_, a=math.sqrt(5))


class LowRankLinear(nn.Module):
    """The LoRA update of one linear layer: ``dropout(x) A^T B^T * (alpha / r)``.

    ``lora_A`` (r, in) starts Kaiming-uniform and ``lora_B`` (out, r) at zero, so a new delta leaves
    the layer's output unchanged.

    Args:
        in_features: the linear layer's input size.
        out_features: its output size.
        r: the rank.
        lora_alpha: the scale numerator.
        lora_dropout: dropout on the input of the update.
        backend: makes the parameters.
        device: where to put them.
        dtype: their dtype (the linear layer's).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int,
        lora_alpha: float,
        lora_dropout: float,
        backend: Backend,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.r = r
        self.lora_alpha = lora_alpha
        self.scaling = lora_alpha / r
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.lora_A = backend.parameter((r, in_features), LORA_A_INIT, device, dtype)
        self.lora_B = backend.parameter((out_features, r), nn.init.zeros_, device, dtype)

    def delta_weight(self) -> torch.Tensor:
        """The update as an (out, in) matrix, ``B A * alpha / r``, in float32."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The update for input ``x``; the caller adds it to the linear layer's output."""
        # each parameter is read once: on a sharded backend every read is a gather
        lora_a = self.lora_A
        # scaling the (tokens, r) intermediate is cheaper than scaling the (tokens, out) result
        hidden = F.linear(self.lora_dropout(x).to(lora_a.dtype), lora_a) * self.scaling
        return F.linear(hidden, self.lora_B)


@register_delta_method
class LoraModel(DeltaBase):
    """LoRA on the linear layers of a backbone (``nn.Linear`` and transformers' ``Conv1D``).

    ``modified_modules`` are keys of the linear layers to modify; by default the self-attention query
    and value projections of a known model family.
    """

    delta_type: ClassVar[str] = "lora"
    config_class = LoraConfig
    config: LoraConfig
    default_modified_modules: ClassVar[list[Any]] = ["attn@.q@", "attn@.v@"]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # while merged: each folded operation with the weight it had before (None: subtract to unmerge)
        self._merged: list[tuple[int, InsertParallel, torch.Tensor | None]] = []
        super().__init__(*args, **kwargs)

    def update_module(self, name: str, module: nn.Module, io_dims: tuple[int, int] | None) -> list[Operation]:
        """A :class:`LowRankLinear` in parallel to the linear layer ``name``."""
        dims = self.backend_mapping.linear_dims(module)
        if dims is None:
            linears = [n for n, m in module.named_modules() if n and self.backend_mapping.linear_dims(m)]
            inside = f"; its linear layers are: {', '.join(f'{name}.{n}' for n in linears[:6])}" if linears else ""
            raise UnsupportedModuleError(
                f"LoRA modifies linear layers, but {name!r} is a {type(module).__name__}{inside}. "
                "Aim modified_modules at linear layers."
            )
        weight = module.weight
        layer = LowRankLinear(
            dims[0],
            dims[1],
            self.config.lora_r,
            self.config.lora_alpha,
            self.config.lora_dropout,
            self.backend_mapping,
            device=weight.device,
            dtype=weight.dtype,
        )
        return [InsertParallel(name, layer, "lora")]

    def save_peft(self, path: str | Path, base_model_name_or_path: str | None = None) -> Path:
        """Save this delta in HF PEFT's format, for ``peft.PeftModel.from_pretrained(backbone, path)``.

        See :func:`opendelta_dist.deltas.lora_peft.save_peft`.
        """
        if self._merged:
            raise DeltaStateError("this LoRA is merged into the backbone's weights; call unmerge() before saving it")
        return save_peft(self, path, base_model_name_or_path)

    # ------------------------------------------------------------------ merging

    @property
    def merged(self) -> bool:
        """Whether the LoRA updates are folded into the backbone's weights now."""
        return bool(self._merged)

    def _lora_operations(self) -> list[tuple[int, InsertParallel]]:
        return [(i, op) for i, op in enumerate(self.operations) if isinstance(op, InsertParallel)]

    def merge(self, exact_unmerge: bool = True) -> None:
        """Fold every LoRA update into its linear layer's weight, for inference without overhead.

        The LoRA branches are taken out of the backbone, so it computes at the speed of the plain
        model, and ``backbone.state_dict()`` (thus ``save_pretrained``) holds the full merged weights:
        the result saves and loads as a plain transformers model. Other parts of the delta (layers
        unfrozen with ``unfrozen_modules``) stay in. Dropout on the LoRA input no longer applies.

        Args:
            exact_unmerge: keep a CPU copy of each modified weight so that :meth:`unmerge` restores it
                bit for bit; without it, ``unmerge`` subtracts the update again (equal within the
                weights' dtype rounding) and no memory is spent.

        Raises:
            DeltaStateError: the delta is merged already, or not attached.
        """
        if self._merged:
            raise DeltaStateError("this LoRA is merged already; call unmerge() before merging again")
        if self.skip_layers or self.__dict__.get("_bypassed"):
            raise DeltaStateError(
                "this LoRA bypasses some layers now (skip_layers or bypassed()), which a merge cannot keep: set "
                "skip_layers = None (or leave the bypassed() block) before merging, or build it with leave_out"
            )
        if not self._attached:
            raise DeltaStateError("this LoRA is not attached; attach() it before merging it into the backbone")
        merged: list[tuple[int, InsertParallel, torch.Tensor | None]] = []
        try:
            with torch.no_grad():
                for i, op in self._lora_operations():
                    target = op.target
                    assert target is not None
                    weight = self.backend_mapping.full_tensor(target._parameters["weight"])
                    original = weight.to("cpu", copy=True) if exact_unmerge else None
                    self._fold(target, weight + self._update(target, op, weight.dtype))
                    op.uninstall()
                    merged.append((i, op, original))
        except BaseException:
            self._merged = merged
            if merged:
                self.unmerge()
            raise
        self._merged = merged
        if self._state_dict_handle is not None:  # the merged backbone saves in full
            self._state_dict_handle.remove()
            self._state_dict_handle = None
        # a training step on the merged model would train nothing of the delta: refused with the fix
        self._merged_guard = self.backbone_model.register_forward_pre_hook(self._refuse_training_while_merged)

    def _refuse_training_while_merged(self, module: nn.Module, args: Any) -> None:
        if module.training and torch.is_grad_enabled():
            raise DeltaStateError(
                "this LoRA is merged into the backbone's weights (merge()), so its parameters take no part in a "
                "training forward: call delta.unmerge() before training, or model.eval() / torch.no_grad() to infer"
            )

    def unmerge(self) -> None:
        """Take the folded updates out of the weights again and put the LoRA branches back.

        Raises:
            DeltaStateError: the delta is not merged.
        """
        if not self._merged:
            raise DeltaStateError("this LoRA is not merged; nothing to unmerge")
        with torch.no_grad():
            for i, op, original in reversed(self._merged):
                target = self.backbone_model.get_submodule(op.module_name)
                if original is None:
                    weight = self.backend_mapping.full_tensor(target._parameters["weight"])
                    original = weight - self._update(target, op, weight.dtype)
                self._fold(target, original)
                op.install(self.backbone_model, (self._serial, i))
        self._merged = []
        self._merged_guard.remove()
        if self._filter_state_dict:
            self.set_active_state_dict(self.backbone_model)

    def _update(self, target: nn.Module, op: InsertParallel, dtype: torch.dtype) -> torch.Tensor:
        """The LoRA update of ``op`` in the layout of ``target``'s weight (Conv1D keeps (in, out))."""
        update = op.delta_module.delta_weight()
        if self.backend_mapping.weight_layout(target) is WeightLayout.IN_OUT:
            update = update.T
        return update.to(dtype)

    def _fold(self, target: nn.Module, weight: torch.Tensor) -> None:
        # through the backend: a sharded weight takes its partition of the whole new value
        self.backend_mapping.load_full(target._parameters["weight"], weight)

    def detach(self, module: nn.Module | None = None, reset_state_dict: bool = True) -> None:
        """As :meth:`DeltaBase.detach`; a merged LoRA is unmerged first, so the backbone is pristine."""
        if self._merged:
            self.unmerge()
        super().detach(module, reset_state_dict)

    def save_finetuned(self, finetuned_delta_path: str | Path = "./delta_checkpoints/", *args: Any, **kw: Any) -> Path:
        """As :meth:`DeltaBase.save_finetuned`; refused while merged (the backbone's weights are not its own then).

        Raises:
            DeltaStateError: the delta is merged.
        """
        if self._merged:
            raise DeltaStateError(
                "this LoRA is merged into the backbone's weights; call unmerge() before save_finetuned() (a checkpoint "
                "records the backbone it belongs to, which must be the unmerged one)"
            )
        return super().save_finetuned(finetuned_delta_path, *args, **kw)
