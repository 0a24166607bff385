"""LoRA: a trainable low-rank update ``B A x * alpha / r`` beside frozen linear layers (Hu et al., 2021)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from opendelta_dist.auto_delta import register_delta_method
from opendelta_dist.backends import Backend
from opendelta_dist.basemodel import DeltaBase
from opendelta_dist.config import BaseDeltaConfig, check_positive_int
from opendelta_dist.errors import DeltaConfigError, DeltaStateError, UnsupportedModuleError
from opendelta_dist.operations import InsertParallel, Operation


@dataclass
class LoraConfig(BaseDeltaConfig):
    """Options of :class:`LoraModel`."""

    delta_type: ClassVar[str] = "lora"

    lora_r: int = 8
    lora_alpha: int | float = 16
    lora_dropout: float = 0.0


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
        self.lora_A = backend.parameter(torch.empty(r, in_features, device=device, dtype=dtype))
        self.lora_B = backend.parameter(torch.zeros(out_features, r, device=device, dtype=dtype))
        if self.lora_A.device.type != "meta":
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """``lora_A`` Kaiming-uniform, ``lora_B`` zero (also after materialising from the meta device)."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def delta_weight(self) -> torch.Tensor:
        """The update as an (out, in) matrix, ``B A * alpha / r``, in float32."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The update for input ``x``; the caller adds it to the linear layer's output."""
        # scaling the (tokens, r) intermediate is cheaper than scaling the (tokens, out) result
        hidden = F.linear(self.lora_dropout(x).to(self.lora_A.dtype), self.lora_A) * self.scaling
        return F.linear(hidden, self.lora_B)


@register_delta_method
class LoraModel(DeltaBase):
    """LoRA on the linear layers of a backbone (``nn.Linear`` and transformers' ``Conv1D``).

    Args:
        backbone_model: the model to modify.
        lora_r: rank of the update.
        lora_alpha: the update is scaled by ``lora_alpha / lora_r``.
        lora_dropout: dropout on the update's input.
        modified_modules: keys of the linear layers to modify; default the self-attention query and
            value projections of a known model family.
        unfrozen_modules, exclude_modules, common_structure, interactive_modify, backend: as
            :class:`~opendelta_dist.basemodel.DeltaBase`.
    """

    delta_type: ClassVar[str] = "lora"
    config_class = LoraConfig
    default_modified_modules: ClassVar[list[Any]] = ["attn@.q@", "attn@.v@"]

    def __init__(
        self,
        backbone_model: nn.Module,
        lora_r: int = 8,
        lora_alpha: int | float = 16,
        lora_dropout: float = 0.0,
        modified_modules: list[str] | None = None,
        unfrozen_modules: list[str] | None = None,
        exclude_modules: list[str] | None = None,
        common_structure: bool | None = None,
        interactive_modify: bool | int = False,
        backend: str = "hf",
    ) -> None:
        check_positive_int("lora_r", lora_r)
        if not 0.0 <= lora_dropout < 1.0:
            raise DeltaConfigError(f"lora_dropout must be in [0, 1), not {lora_dropout!r}")
        self.lora_r = lora_r
        self.lora_alpha = lora_alpha
        self.lora_dropout = lora_dropout
        # while merged: each folded operation with the weight it had before (None: subtract to unmerge)
        self._merged: list[tuple[int, InsertParallel, torch.Tensor | None]] = []
        super().__init__(
            backbone_model,
            modified_modules=modified_modules,
            exclude_modules=exclude_modules,
            unfrozen_modules=unfrozen_modules,
            common_structure=common_structure,
            interactive_modify=interactive_modify,
            backend=backend,
        )

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
            self.lora_r,
            self.lora_alpha,
            self.lora_dropout,
            self.backend_mapping,
            device=weight.device,
            dtype=weight.dtype,
        )
        return [InsertParallel(name, layer, "lora")]

    def save_peft(self, path: str | Path, base_model_name_or_path: str | None = None) -> Path:
        """Save this delta in HF PEFT's format, for ``peft.PeftModel.from_pretrained(backbone, path)``.

        See :func:`opendelta_dist.peft_format.save_peft`.
        """
        from opendelta_dist.peft_format import save_peft

        if self._merged:
            raise DeltaStateError("this LoRA is merged into the backbone's weights; call unmerge() before saving it")
        return save_peft(self, path, base_model_name_or_path)

    # ------------------------------------------------------------------ merging

    @property
    def merged(self) -> bool:
        """Whether the LoRA updates are folded into the backbone's weights now."""
        return bool(self._merged)

    def _lora_operations(self) -> list[tuple[int, InsertParallel]]:
        return [(i, op) for i, op in enumerate(self._operations) if isinstance(op, InsertParallel)]

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
        if not self._attached:
            raise DeltaStateError("this LoRA is not attached; attach() it before merging it into the backbone")
        merged: list[tuple[int, InsertParallel, torch.Tensor | None]] = []
        try:
            with torch.no_grad():
                for i, op in self._lora_operations():
                    target = op.target
                    assert target is not None
                    weight = target.weight
                    original = weight.detach().to("cpu", copy=True) if exact_unmerge else None
                    weight.add_(self._oriented(target, op.delta_module.delta_weight()).to(weight.dtype))
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
                weight = target.weight
                if original is not None:
                    weight.copy_(original)
                else:
                    weight.sub_(self._oriented(target, op.delta_module.delta_weight()).to(weight.dtype))
                op.install(self.backbone_model, (self._serial, i))
        self._merged = []
        if self._filter_state_dict:
            self.set_active_state_dict(self.backbone_model)

    def _oriented(self, target: nn.Module, update: torch.Tensor) -> torch.Tensor:
        # transformers' Conv1D stores its weight as (in, out)
        return update if isinstance(target, nn.Linear) else update.T

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
