"""``DeltaBase``: the life cycle every delta method shares.

A delta is built on a backbone in three steps: its module keys are resolved to backbone modules
(:mod:`~opendelta_dist.addressing`, :mod:`~opendelta_dist.structure`), the method turns each module
into reversible operations (:mod:`~opendelta_dist.operations`), and the operations are installed.
From then on ``detach``/``attach`` take the delta out of the backbone and put it back, exactly;
``freeze_module`` freezes everything else; ``save_finetuned``/``from_finetuned`` move the delta's
tensors (only those) through a checkpoint.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from opendelta_dist.addressing import match_any, named_backbone_modules, select_modules
from opendelta_dist.backends import Backend, get_backend
from opendelta_dist.config import BaseDeltaConfig
from opendelta_dist.errors import (
    DeltaConfigError,
    DeltaStateError,
    HiddenSizeInferenceError,
    ModuleNotFoundInBackboneError,
)
from opendelta_dist.operations import (
    Operation,
    UnfreezeParameter,
    delta_parameter_ids,
    is_fixed,
    pristine_named_parameters,
)
from opendelta_dist.structure import role_keys

DELTAS_TOKEN = "deltas"
_SERIAL = itertools.count(1)


def _excluded(name: str, exclude: Sequence[str]) -> bool:
    # a module is excluded when it or one of its ancestors matches an exclude key
    parts = name.split(".")
    return any(match_any(exclude, ".".join(parts[:i])) for i in range(1, len(parts) + 1))


class DeltaBase(nn.Module):
    """Base class of every delta method.

    Args:
        backbone_model: the model to modify. It is modified in place and not registered as a
            submodule of the delta (``delta.state_dict()`` holds the delta's tensors only).
        modified_modules: module keys to modify (see :mod:`~opendelta_dist.addressing`); None for the
            method's default positions on a known model family.
        exclude_modules: keys of modules never to modify (with their submodules); default ``["lm_head"]``.
        unfrozen_modules: keys of modules ``freeze_module`` leaves trainable; ``"deltas"`` names the
            delta's own parameters; default ``["deltas"]``. Backbone parameters left trainable become
            part of the delta: they are saved with it and restored by ``detach``.
        interactive_modify: choose ``modified_modules`` on a web page instead: True serves it on a free
            port of 127.0.0.1, an int on that port; the call prints the address and waits for the
            page's submit (see :mod:`~opendelta_dist.interactive`).
        common_structure: read ``modified_modules`` as common-structure roles (``attn.q``, ``ff.w2``).
        backend: ``"hf"`` (plain PyTorch) or ``"bmt"`` (BMTrain).
    """

    delta_type: ClassVar[str] = ""
    config_class: ClassVar[type[BaseDeltaConfig]] = BaseDeltaConfig
    default_modified_modules: ClassVar[list[Any]] = []
    default_exclude_modules: ClassVar[list[str]] = ["lm_head"]
    default_unfrozen_modules: ClassVar[list[str]] = [DELTAS_TOKEN]
    _supported_backends: ClassVar[tuple[str, ...]] = ("hf", "bmt")
    _need_pseudo_data: ClassVar[bool] = False

    backbone_model: nn.Module

    def __init__(
        self,
        backbone_model: nn.Module,
        modified_modules: Sequence[Any] | None = None,
        exclude_modules: Sequence[str] | None = None,
        unfrozen_modules: Sequence[str] | None = None,
        interactive_modify: bool | int = False,
        common_structure: bool | None = False,
        backend: str = "hf",
    ) -> None:
        super().__init__()
        if not isinstance(backbone_model, nn.Module):
            raise TypeError(f"backbone_model must be a torch.nn.Module, not {type(backbone_model).__name__}")
        # kept out of the module tree: the delta's own parameters are its state, not the backbone's
        self.__dict__["backbone_model"] = backbone_model
        if interactive_modify:
            if modified_modules is not None or common_structure:
                raise DeltaConfigError(
                    "interactive_modify chooses the modules on a web page: pass it without modified_modules "
                    "and common_structure, or pass modified_modules=[...] without interactive_modify"
                )
            from opendelta_dist.interactive import modules_from_browser  # the web server only when asked for

            modified_modules = modules_from_browser(backbone_model, interactive_modify, type(self).__name__)
        if backend not in self._supported_backends:
            raise DeltaConfigError(
                f"{type(self).__name__} supports the backends {list(self._supported_backends)}, not {backend!r}"
            )
        self.backend = backend
        self.backend_mapping: Backend = get_backend(backend)
        if modified_modules is None:
            self.modified_modules = [
                list(m) if isinstance(m, (list, tuple)) else m for m in self.default_modified_modules
            ]
            self.common_structure = True
        else:
            if isinstance(modified_modules, str):
                raise DeltaConfigError(f"modified_modules must be a list of keys, e.g. [{modified_modules!r}]")
            self.modified_modules = [list(m) if isinstance(m, (list, tuple)) else m for m in modified_modules]
            self.common_structure = bool(common_structure)
        self.exclude_modules = list(self.default_exclude_modules if exclude_modules is None else exclude_modules)
        self.unfrozen_modules = list(self.default_unfrozen_modules if unfrozen_modules is None else unfrozen_modules)
        self.delta_modules = nn.ModuleList()
        self._serial = next(_SERIAL)
        self._operations: list[Operation] = []
        self._unfrozen: dict[tuple[str, str], UnfreezeParameter] = {}
        self._attached = False
        self._filter_state_dict = False
        self._state_dict_handle: RemovableHandle | None = None
        self.config = self.create_config_from_model()
        self.add_all_delta_to_backbone(self.backbone_model, self.modified_modules)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """A delta is not called: call the backbone, which runs the delta."""
        raise RuntimeError("a delta model is not called itself: call the backbone model it modifies")

    # ------------------------------------------------------------------ configuration

    def create_config_from_model(self) -> BaseDeltaConfig:
        """The config that rebuilds this delta: every option, read from the delta's attributes."""
        names = [f.name for f in dataclasses.fields(self.config_class)]
        return self.config_class(**{n: getattr(self, n) for n in names})

    @classmethod
    def from_config(
        cls, config: BaseDeltaConfig | dict[str, Any], backbone_model: nn.Module, check_hash: bool = True, **kwargs: Any
    ) -> DeltaBase:
        """Build this delta method on ``backbone_model`` from a config.

        Args:
            config: a config object or dict of options.
            backbone_model: the model to modify.
            check_hash: unused here (there is no checkpoint); kept for OpenDelta compatibility.
            kwargs: options overriding those of ``config``.

        Raises:
            DeltaConfigError: the config is for another delta type or has unknown options.
        """
        if isinstance(config, dict):
            config = cls.config_class.from_dict(config, **kwargs)
        elif kwargs:
            config = cls.config_class.from_dict(config.to_dict(), **kwargs)
        if config.delta_type != cls.delta_type:
            raise DeltaConfigError(f"{cls.__name__} cannot be built from a {config.delta_type!r} config")
        options = {k: v for k, v in config.to_dict().items() if k != "delta_type"}
        return cls(backbone_model, **options)

    # ------------------------------------------------------------------ building

    def _module_keys(self, keys: Sequence[str]) -> list[str]:
        if not self.common_structure:
            return list(keys)
        resolved = role_keys(self.backbone_model, keys)
        if not resolved:
            raise DeltaConfigError(f"none of the roles {list(keys)} exists in this model family")
        return resolved

    def select(self, keys: Sequence[str]) -> list[str]:
        """Resolve module keys (or roles, with ``common_structure``) to backbone module names.

        Raises:
            ModuleNotFoundInBackboneError: a key matched no module.
        """
        names = select_modules(self.backbone_model, self._module_keys(keys))
        kept = [n for n in names if not _excluded(n, self.exclude_modules)]
        if names and not kept:
            raise ModuleNotFoundInBackboneError(
                f"every module selected by {list(keys)} is excluded by exclude_modules={self.exclude_modules}"
            )
        return kept

    def add_all_delta_to_backbone(self, backbone: nn.Module, modified_modules: Sequence[Any]) -> None:
        """Create the delta's operations for ``modified_modules`` and attach them to ``backbone``."""
        for op in self.build_operations(backbone, modified_modules):
            self.add_operation(op)
        for key in self.unfrozen_modules:
            if key != DELTAS_TOKEN:
                self._unfreeze_key(key)
        self.attach()

    def build_operations(self, backbone: nn.Module, modified_modules: Sequence[Any]) -> list[Operation]:
        """The operations of this delta: :meth:`update_module` on every selected module."""
        names = self.select(modified_modules)
        io_dims = self.probe_io_dims(names) if self._need_pseudo_data else {}
        return [
            op for name in names for op in self.update_module(name, backbone.get_submodule(name), io_dims.get(name))
        ]

    def update_module(self, name: str, module: nn.Module, io_dims: tuple[int, int] | None) -> list[Operation]:
        """The operations that modify one selected module (implemented by each method).

        Args:
            name: the module's name in the backbone.
            module: the module.
            io_dims: ``(input size, output size)`` of the module's primary tensors, when the method
                asked for them (``_need_pseudo_data``).
        """
        raise NotImplementedError(f"{type(self).__name__} does not implement update_module")

    def add_operation(self, op: Operation) -> None:
        """Register an operation of this delta (installed by the next ``attach``)."""
        self._operations.append(op)
        self.delta_modules.append(op.delta_module)
        if isinstance(op, UnfreezeParameter):
            self._unfrozen[(op.module_name, op.param_name)] = op

    def unfreeze_parameter(self, module_name: str, param_name: str, initial: torch.Tensor) -> UnfreezeParameter:
        """An operation putting a trainable copy of ``initial`` into ``module_name.param_name``.

        Returns the existing operation when this delta unfreezes that slot already.
        """
        op = self._unfrozen.get((module_name, param_name))
        if op is None:
            op = UnfreezeParameter(module_name, param_name, self.backend_mapping.parameter(initial))
        return op

    def _unfreeze_key(self, key: str) -> None:
        # an explicit unfreeze wins over exclude_modules (OpenDelta could never unfreeze lm_head)
        names = select_modules(self.backbone_model, [key])
        new_ops: list[Operation] = []
        for mname in names:
            for sub, module in named_backbone_modules(self.backbone_model.get_submodule(mname), prefix=mname):
                for pname in module._parameters:
                    current = module._parameters[pname]
                    if current is None or (sub, pname) in self._unfrozen:
                        continue
                    op = self.unfreeze_parameter(sub, pname, current.detach().clone())
                    self.add_operation(op)
                    new_ops.append(op)
        if self._attached:
            for i, op in enumerate(new_ops, start=len(self._operations) - len(new_ops)):
                op.install(self.backbone_model, (self._serial, i))

    def probe_io_dims(self, names: Sequence[str]) -> dict[str, tuple[int, int]]:
        """Input and output sizes of modules, statically for linear layers, else by a dummy forward.

        The dummy forward uses ``backbone_model.dummy_inputs`` (transformers models have it), runs
        without gradients in eval mode and leaves the random number generators as they were.

        Raises:
            HiddenSizeInferenceError: the dummy forward failed or did not reach a module.
        """
        dims: dict[str, tuple[int, int]] = {}
        unknown: dict[str, nn.Module] = {}
        for name in names:
            module = self.backbone_model.get_submodule(name)
            static = self.backend_mapping.linear_dims(module)
            if static is not None:
                dims[name] = static
            else:
                unknown[name] = module
        if unknown:
            dims.update(_dummy_forward_dims(self.backbone_model, unknown))
        return dims

    # ------------------------------------------------------------------ attach / detach

    @property
    def attached(self) -> bool:
        """Whether the delta is in its backbone now."""
        return self._attached

    def attach(self, module: nn.Module | None = None, reset_state_dict: bool = True) -> None:
        """Put the delta (back) into a backbone.

        Args:
            module: the backbone; default the one the delta was built on. Another model with the
                same module names takes the delta too (the delta moves to it).
            reset_state_dict: re-apply ``freeze_module(set_state_dict=True)``'s state-dict filter.

        Raises:
            DeltaStateError: the delta is attached already.
        """
        if self._attached:
            raise DeltaStateError(
                f"this {type(self).__name__} is attached already; call detach() before attaching it again"
            )
        root = self.backbone_model if module is None else module
        done: list[Operation] = []
        try:
            for i, op in enumerate(self._operations):
                op.install(root, (self._serial, i))
                done.append(op)
        except BaseException:
            for op in reversed(done):
                op.uninstall()
            raise
        self.__dict__["backbone_model"] = root
        self._attached = True
        if reset_state_dict and self._filter_state_dict:
            self.set_active_state_dict(root)

    def detach(self, module: nn.Module | None = None, reset_state_dict: bool = True) -> None:
        """Take the delta out of its backbone, which then computes and saves as it did before.

        Args:
            module: the backbone (must be the one the delta is attached to); default that one.
            reset_state_dict: remove the state-dict filter ``freeze_module`` installed.

        Raises:
            DeltaStateError: the delta is not attached (or attached to another module).
        """
        if not self._attached:
            raise DeltaStateError(f"this {type(self).__name__} is not attached; nothing to detach")
        if module is not None and module is not self.backbone_model:
            raise DeltaStateError("the delta is attached to another module than the one given to detach()")
        for op in reversed(self._operations):
            op.uninstall()
        self._attached = False
        if reset_state_dict and self._state_dict_handle is not None:
            self._state_dict_handle.remove()
            self._state_dict_handle = None

    # ------------------------------------------------------------------ freezing and parameters

    def freeze_module(
        self, module: nn.Module | None = None, exclude: Sequence[str] | None = None, set_state_dict: bool = True
    ) -> None:
        """Freeze every parameter of the backbone except the delta's and those of ``exclude``.

        Args:
            module: the model to freeze; default the backbone.
            exclude: keys of modules to leave trainable; ``"deltas"`` names every delta's parameters.
                Default: ``unfrozen_modules``. Backbone parameters left trainable become part of this
                delta (saved with it, restored by ``detach``).
            set_state_dict: make ``module.state_dict()`` return only the trainable parameters, so a
                plain ``torch.save(model.state_dict())`` saves just what was tuned.
        """
        root = self.backbone_model if module is None else module
        exclude = list(self.unfrozen_modules if exclude is None else exclude)
        for key in exclude:
            if key != DELTAS_TOKEN and key not in self.unfrozen_modules:
                self._unfreeze_key(key)
                self.unfrozen_modules.append(key)
                self.config.unfrozen_modules = list(self.unfrozen_modules)
        keep = delta_parameter_ids(root) if DELTAS_TOKEN in exclude else set()
        keep.update(id(op.parameter) for op in self._unfrozen.values())
        # the backbone's own parameters that deltas swapped out are frozen too, for after a detach
        for p in itertools.chain(root.parameters(), (p for _, p in pristine_named_parameters(root))):
            p.requires_grad_(id(p) in keep and not is_fixed(p))
        if set_state_dict:
            self.set_active_state_dict(root)

    def set_active_state_dict(self, module: nn.Module) -> None:
        """Make ``module.state_dict()`` hold only the parameters that are trainable at call time."""
        self._filter_state_dict = True
        if self._state_dict_handle is None:
            self._state_dict_handle = module.register_state_dict_post_hook(_trainable_state_dict)

    def named_delta_tensors(self) -> Iterator[tuple[str, nn.Parameter]]:
        """The delta's tensors under their checkpoint keys (backbone-relative names)."""
        for op in self._operations:
            yield from op.named_tensors()

    def trainable_parameters_names(self, module: nn.Module | None = None) -> list[str]:
        """Names of the trainable parameters of ``module`` (default: the backbone)."""
        root = self.backbone_model if module is None else module
        return [n for n, p in root.named_parameters() if p.requires_grad]

    def frozen_parameters_names(self, module: nn.Module | None = None) -> list[str]:
        """Names of the frozen parameters of ``module`` (default: the backbone)."""
        root = self.backbone_model if module is None else module
        return [n for n, p in root.named_parameters() if not p.requires_grad]

    def trainable_parameters(self, module: nn.Module | None = None) -> list[nn.Parameter]:
        """The trainable parameters of ``module``; default the delta's own (what an optimizer takes)."""
        root = self if module is None else module
        return [p for p in root.parameters() if p.requires_grad]

    def num_trainable_parameters(self, module: nn.Module | None = None) -> int:
        """Number of trainable scalars in ``module`` (default: the delta)."""
        return sum(p.numel() for p in self.trainable_parameters(module))

    def num_total_parameters(self, module: nn.Module | None = None) -> int:
        """Number of scalars in ``module`` (default: the delta)."""
        root = self if module is None else module
        return sum(p.numel() for p in root.parameters())

    def log(
        self,
        module: nn.Module | None = None,
        delta_ratio: bool = True,
        trainable_ratio: bool = True,
        visualization: bool = True,
        cuda_memory: bool = True,
    ) -> dict[str, float]:
        """Print the backbone's module tree and the trainable and delta parameter ratios.

        Returns:
            The statistics of :func:`~opendelta_dist.inspect.inspect_module_statistics`.
        """
        from opendelta_dist.inspect import inspect_module_statistics, print_module_statistics
        from opendelta_dist.visualization import Visualization

        root = self.backbone_model if module is None else module
        if visualization:
            Visualization(root).structure_graph()
        stats = inspect_module_statistics(root, verbose=False)
        print_module_statistics(stats, delta_ratio=delta_ratio, trainable_ratio=trainable_ratio, memory=cuda_memory)
        return stats

    # ------------------------------------------------------------------ checkpoints

    def save_finetuned(
        self,
        finetuned_delta_path: str | Path = "./delta_checkpoints/",
        save_config: bool = True,
        state_dict: dict[str, torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> Path:
        """Save the delta: ``config.json`` plus its tensors as safetensors (nothing of the backbone).

        Args:
            finetuned_delta_path: directory to write (created if missing). Files are replaced
                atomically; other files in it are left alone.
            save_config: write ``config.json`` (a checkpoint without it cannot be loaded by itself).
            state_dict: tensors to save instead of the delta's own (e.g. gathered by an engine),
                keyed as :meth:`named_delta_tensors`.
            kwargs: OpenDelta's Delta Center options are not supported: passing ``push_to_dc=True``
                is an error.

        Returns:
            The checkpoint directory.
        """
        from opendelta_dist.saving import save_delta

        if kwargs.pop("push_to_dc", False):
            raise DeltaConfigError("uploading to OpenDelta's Delta Center (push_to_dc) is not supported")
        return save_delta(self, Path(finetuned_delta_path), save_config=save_config, state_dict=state_dict)

    @classmethod
    def from_finetuned(
        cls,
        finetuned_delta_path: str | Path,
        backbone_model: nn.Module,
        delta_config: BaseDeltaConfig | dict[str, Any] | None = None,
        check_hash: bool = True,
        **kwargs: Any,
    ) -> DeltaBase:
        """Build the delta saved at ``finetuned_delta_path`` on ``backbone_model`` and load its tensors.

        Args:
            finetuned_delta_path: a directory written by ``save_finetuned`` (or by OpenDelta 0.3.2).
            backbone_model: the model to modify; it must be the backbone the delta was trained on.
            delta_config: a config to use instead of the checkpoint's ``config.json``.
            check_hash: refuse a backbone whose structure or weights differ from the one the delta
                was saved with.
            kwargs: options overriding those of the config.

        Raises:
            DeltaCheckpointError: the checkpoint is missing, corrupted or does not fit the backbone.
            BackboneMismatchError: the backbone is not the one the delta was trained on.
        """
        from opendelta_dist.saving import load_delta

        return load_delta(
            finetuned_delta_path,
            backbone_model,
            expected_cls=cls,
            delta_config=delta_config,
            check_hash=check_hash,
            **kwargs,
        )


def _trainable_state_dict(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    keep = {prefix + n for n, p in module.named_parameters() if p.requires_grad}
    for key in [k for k in state_dict if k.startswith(prefix) and k not in keep]:
        del state_dict[key]


def _dummy_forward_dims(backbone: nn.Module, targets: dict[str, nn.Module]) -> dict[str, tuple[int, int]]:
    from opendelta_dist.operations import _first_tensor, _map_primary

    runners = _dummy_runners(backbone)
    fix = (
        "Either aim the delta at modules whose sizes are known without running the model (linear layers), "
        "or give the backbone an attribute `dummy_inputs` (a dict of keyword arguments for a small valid "
        "forward), e.g. model.dummy_inputs = {'input_ids': torch.tensor([[1, 2, 3]])}."
    )
    if not runners:
        raise HiddenSizeInferenceError(
            f"the hidden sizes of {sorted(targets)[:3]} are needed and can only be found by a dummy forward, "
            f"but {type(backbone).__name__} has no `dummy_inputs`. {fix}"
        )
    dims: dict[str, tuple[int, int]] = {}
    handles = []
    for name, module in targets.items():

        def record(mod: nn.Module, args: tuple, kwargs: dict, output: Any, name: str = name) -> None:
            _, x = _first_tensor(args, kwargs)
            out: list[int] = []
            _map_primary(output, lambda t: out.append(t.shape[-1]) or t)
            dims[name] = (x.shape[-1], out[0])

        handles.append(module.register_forward_hook(record, with_kwargs=True))
    training = backbone.training
    try:
        backbone.eval()
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            for runner, inputs in runners:
                runner(**inputs)
    except Exception as exc:
        raise HiddenSizeInferenceError(
            f"the dummy forward that finds the hidden sizes of the modified modules failed: "
            f"{type(exc).__name__}: {exc}. {fix}"
        ) from exc
    finally:
        for h in handles:
            h.remove()
        backbone.train(training)
    missing = [n for n in targets if n not in dims]
    if missing:
        raise HiddenSizeInferenceError(f"the dummy forward did not call the modules {missing[:5]}. {fix}")
    return dims


def _dummy_runners(backbone: nn.Module) -> list[tuple[nn.Module, dict[str, Any]]]:
    """The modules to call for a dummy forward, with their inputs on the right device."""
    candidates: list[tuple[str, nn.Module]] = []
    for name, module in named_backbone_modules(backbone):
        if any(name.startswith(p + ".") or p == "" for p, _ in candidates):
            continue
        if isinstance(getattr(module, "dummy_inputs", None), dict):
            candidates.append((name, module))
    runners = []
    for _, module in candidates:
        device = next((p.device for p in module.parameters()), torch.device("cpu"))
        inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in module.dummy_inputs.items()}
        runners.append((module, inputs))
    return runners
