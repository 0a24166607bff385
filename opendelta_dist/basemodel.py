"""``DeltaBase``: the life cycle every delta method shares.

A delta is built on a backbone in three steps: its module keys are resolved to backbone modules
(:mod:`~opendelta_dist.addressing`, :mod:`~opendelta_dist.structure`), the method turns each module
into reversible operations (:mod:`~opendelta_dist.operations`), and the operations are installed.
From then on ``detach``/``attach`` take the delta out of the backbone and put it back, exactly;
``freeze_module`` freezes everything else; ``save_finetuned``/``from_finetuned`` move the delta's
tensors (only those) through a checkpoint.

A method declares its options once, in its config class (:func:`~opendelta_dist.config.option`);
:meth:`DeltaBase.__init_subclass__` gives the method class its signature, the Args section of its
docstring and a read-only attribute per option from there, and the options live in ``delta.config``.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import itertools
import operator
import textwrap
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar, get_type_hints

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from opendelta_dist.adapterdrop import LayerDropping
from opendelta_dist.addressing import match_any, named_backbone_modules, select_modules
from opendelta_dist.backends import Backend, available_backends, backend_capabilities, full_numel, get_backend
from opendelta_dist.config import OPTIONS, BaseDeltaConfig
from opendelta_dist.errors import (
    DeltaConfigError,
    DeltaStateError,
    ModuleNotFoundInBackboneError,
    warn_user,
)
from opendelta_dist.operations import (
    Operation,
    UnfreezeParameter,
    delta_parameter_ids,
    is_fixed,
    original_parameter,
    pristine_named_parameters,
)
from opendelta_dist.probe import dummy_forward_dims
from opendelta_dist.sharing import DeltaSharing
from opendelta_dist.structure import OPENDELTA_ROLES, role_keys

DELTAS_TOKEN = "deltas"
_SERIAL = itertools.count(1)


def _excluded(name: str, exclude: Sequence[str]) -> bool:
    # a module is excluded when it or one of its ancestors matches an exclude key
    parts = name.split(".")
    return any(match_any(exclude, ".".join(parts[:i])) for i in range(1, len(parts) + 1))


class DeltaBase(LayerDropping, DeltaSharing, nn.Module):
    """Base class of every delta method.

    A method's own options are the fields of its ``config_class`` beyond :class:`BaseDeltaConfig`'s;
    the method reads them from ``self.config``. Its class takes them as parameters, in the positional
    order of ``config_class.parameter_order`` (see :meth:`__init_subclass__`).

    Args:
        backbone_model: the model to modify. It is modified in place and not registered as a
            submodule of the delta (``delta.state_dict()`` holds the delta's tensors only).
        modified_modules: module keys to modify (see :mod:`~opendelta_dist.addressing`); None for the
            method's default positions on a known model family.
        exclude_modules: keys of modules never to modify (with their submodules); default ``["lm_head"]``.
        unfrozen_modules: keys of modules ``freeze_module`` leaves trainable; ``"deltas"`` names the
            delta's own parameters; default ``["deltas"]``. Backbone parameters left trainable become
            part of the delta: they are saved with it and restored by ``detach``.
        common_structure: read ``modified_modules`` as common-structure roles (``attn.q``, ``ff.w2``).
        interactive_modify: choose ``modified_modules`` on a web page instead: True serves it on a free
            port of 127.0.0.1, an int on that port; the call prints the address and waits for the
            page's submit (see :mod:`~opendelta_dist.interactive`).
        backend: the name of a registered backend; ``"hf"`` (plain PyTorch and transformers) is always there.
        leave_out: layer indices (from 0, in every stack) that get no delta: static AdapterDrop
            (:mod:`~opendelta_dist.adapterdrop`).
    """

    delta_type: ClassVar[str] = ""
    config_class: ClassVar[type[BaseDeltaConfig]] = BaseDeltaConfig
    default_modified_modules: ClassVar[list[Any]] = []
    default_exclude_modules: ClassVar[list[str]] = ["lm_head"]
    default_unfrozen_modules: ClassVar[list[str]] = [DELTAS_TOKEN]
    #: other names of the method's delta_type that checkpoints may carry (OpenDelta's)
    delta_type_aliases: ClassVar[tuple[str, ...]] = ()
    #: what the method needs of a backend besides the protocol (see :mod:`opendelta_dist.backends`)
    required_capabilities: ClassVar[frozenset[str]] = frozenset()
    _need_pseudo_data: ClassVar[bool] = False

    backbone_model: nn.Module
    config: BaseDeltaConfig

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Give a method class its signature, its docstring's Args section and its option attributes.

        All three come from ``cls.config_class``: each option is a parameter with the config's type
        and default, a line of the Args section with the option's documentation, and a read-only
        attribute reading ``self.config`` (``delta.lora_r``, as OpenDelta's methods have).
        """
        super().__init_subclass__(**kwargs)
        cls.__signature__ = _delta_signature(cls.config_class)
        if cls.__dict__.get("__doc__"):
            cls.__doc__ = _with_args_section(cls.__doc__, cls.config_class)
        for f in cls.config_class.method_options():
            if not hasattr(cls, f.name):
                setattr(cls, f.name, property(operator.attrgetter(f"config.{f.name}"), doc=f.metadata["doc"]))

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """Bind the arguments to the class's signature (OpenDelta's positional order differs between
        methods) and build the delta with :meth:`_build`.

        Raises:
            TypeError: the arguments do not fit the signature.
        """
        super().__init__()
        try:
            bound = inspect.signature(type(self)).bind(*args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"{type(self).__name__}(): {exc}") from None
        self._build(**bound.arguments)

    def _build(
        self,
        backbone_model: nn.Module,
        modified_modules: Sequence[Any] | None = None,
        exclude_modules: Sequence[str] | None = None,
        unfrozen_modules: Sequence[str] | None = None,
        common_structure: bool | None = False,
        interactive_modify: bool | int = False,
        backend: str = "hf",
        leave_out: Sequence[int] | None = None,
        **options: Any,
    ) -> None:
        # the method's options are checked first, before a web page is served or the backbone changed
        if leave_out is not None and (isinstance(leave_out, str | bytes) or not isinstance(leave_out, Iterable)):
            raise DeltaConfigError(f"leave_out takes a list of layer indices (e.g. [0]), not {leave_out!r}")
        self.config = self.config_class(**options, leave_out=None if leave_out is None else list(leave_out))
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
        missing = sorted(self.required_capabilities - backend_capabilities(backend))
        if missing:
            raise DeltaConfigError(
                f"{type(self).__name__} needs {', '.join(map(repr, missing))} of its backend, which backend "
                f"{backend!r} does not provide; it runs on the backends {self.supported_backends()}"
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
        self.leave_out = self.config.leave_out
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
        """The config that rebuilds this delta: its method's options, with the common options as resolved."""
        common = {f.name: getattr(self, f.name) for f in dataclasses.fields(BaseDeltaConfig)}
        return dataclasses.replace(self.config, **common)

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
        resolved = role_keys(self.backbone_model, keys, families=self.backend_mapping.families)
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
        return self._leave_out_names(kept)

    def add_all_delta_to_backbone(self, backbone: nn.Module, modified_modules: Sequence[Any]) -> None:
        """Create the delta's operations for ``modified_modules`` and attach them to ``backbone``."""
        for op in self._apply_leave_out(self.build_operations(backbone, modified_modules)):
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

    @classmethod
    def supported_backends(cls) -> list[str]:
        """The installed backends that provide what this method needs."""
        return [b for b in available_backends() if cls.required_capabilities <= backend_capabilities(b)]

    def add_operation(self, op: Operation) -> None:
        """Register an operation of this delta (installed by the next ``attach``); its backend prepares its module.

        A second operation of the same name on the same module (``modified_modules`` naming a module twice)
        is named ``<name>_1``, ``<name>_2``, ... in order, so every tensor keeps its own checkpoint key.
        """
        if op.delta_name:
            taken = {o.delta_name for o in self._operations if o.module_name == op.module_name}
            base, k = op.delta_name, 0
            while op.delta_name in taken:
                k += 1
                op.delta_name = f"{base}_{k}"
        self.backend_mapping.prepare_module(op.delta_module)
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
            op = UnfreezeParameter(module_name, param_name, self.backend_mapping.parameter_from(initial))
        return op

    def _unfreeze_key(self, key: str) -> None:
        # an explicit unfreeze wins over exclude_modules (OpenDelta could never unfreeze lm_head)
        names = select_modules(self.backbone_model, [key])
        new_ops: list[Operation] = []
        # a module reachable under several names (a prompt template's reference to the model's input embeddings)
        # belongs where the backbone first names it: unfreezing the referring module leaves it alone
        home = {id(module): name for name, module in self.backbone_model.named_modules()}
        left_out = [n for n in names if self.is_left_out(n)]
        if names and len(left_out) == len(names):
            warn_user(
                f"unfrozen_modules {key!r} names modules only inside the layers leave_out={self.config.leave_out} "
                f"leaves without a delta ({left_out[0]}, ...): nothing of it trains"
            )
        for mname in names:
            for sub, module in named_backbone_modules(self.backbone_model.get_submodule(mname), prefix=mname):
                if home.get(id(module), sub) != sub or self.is_left_out(sub):  # leave_out: no delta in the layer
                    continue
                for pname in module._parameters:
                    # the backbone's own value, not another attached delta's copy in the slot
                    current = original_parameter(module, pname)
                    if current is None or (sub, pname) in self._unfrozen:
                        continue
                    op = self.unfreeze_parameter(sub, pname, self.backend_mapping.full_tensor(current).clone())
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
            dims.update(dummy_forward_dims(self.backbone_model, unknown))
        return dims

    # ------------------------------------------------------------------ attach / detach

    def reset_delta_parameters(self) -> None:
        """Initialise the delta's parameters again, as when they were made (after materialising them
        from the meta device); copies of backbone parameters start at zero."""
        for op in self._operations:
            self.backend_mapping.reset_module(op.delta_module)

    def replaced_parameter_names(self) -> set[str]:
        """Names of the backbone parameters this delta trains as its own copies (``unfrozen_modules``, BitFit)."""
        return {f"{module}.{param}" if module else param for module, param in self._unfrozen}

    @property
    def operations(self) -> tuple[Operation, ...]:
        """The delta's operations, in the order they are installed (read-only view)."""
        return tuple(self._operations)

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
                delta (saved with it, restored by ``detach``) for good: a later call without their key warns
                and leaves them trainable.
            set_state_dict: make ``module.state_dict()`` return only the trainable parameters, so a
                plain ``torch.save(model.state_dict())`` saves just what was tuned.
        """
        root = self.backbone_model if module is None else module
        if exclude is not None:
            kept = [key for key in self.unfrozen_modules if key != DELTAS_TOKEN and key not in exclude]
            if kept:
                warnings.warn(
                    f"{', '.join(map(repr, kept))} became part of this delta when first left unfrozen, and stays "
                    "trainable (saved and detached with the delta); to train fewer parameters, build a new delta "
                    "without it",
                    UserWarning,
                    stacklevel=2,
                )
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
            hook = functools.partial(_active_state_dict, self)  # torch marks the hook: a partial takes attributes
            self._state_dict_handle = module.register_state_dict_post_hook(hook)

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
        return sum(full_numel(p) for p in self.trainable_parameters(module))

    def num_total_parameters(self, module: nn.Module | None = None) -> int:
        """Number of scalars in ``module`` (default: the delta)."""
        root = self if module is None else module
        return sum(full_numel(p) for p in root.parameters())

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

    @classmethod
    def opendelta_options(cls, options: dict[str, Any], backbone: nn.Module) -> dict[str, Any]:
        """An OpenDelta 0.3.2 ``config.json`` in this method's terms, on ``backbone``.

        OpenDelta's common-structure roles become explicit module keys, placed where OpenDelta placed
        them (a span's two ends one each). A method whose OpenDelta options differ further converts
        them first and then calls this.
        """
        # OpenDelta names some methods otherwise (low_rank_adapter) and writes common_structure=None when
        # modified_modules are given
        options = {**options, "delta_type": cls.delta_type, "common_structure": bool(options.get("common_structure"))}
        if options["common_structure"] and isinstance(options.get("modified_modules"), list):
            keys: list[Any] = []
            for item in options["modified_modules"]:
                if isinstance(item, list):
                    keys.append([k for role in item for k in role_keys(backbone, [role], OPENDELTA_ROLES)])
                else:
                    keys.extend(role_keys(backbone, [item], OPENDELTA_ROLES))
            options["modified_modules"] = keys
            options["common_structure"] = False
        return options

    def opendelta_tensors(self, tensors: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
        """An OpenDelta 0.3.2 checkpoint's tensors under this delta's keys and shapes (the same by default).

        Raises:
            DeltaCheckpointError: the checkpoint holds tensors this method cannot read.
        """
        return tensors

    def save_peft(self, path: str | Path, base_model_name_or_path: str | None = None) -> Path:
        """PEFT's format holds LoRA adapters only (:meth:`LoraModel.save_peft`).

        Raises:
            DeltaConfigError: always, for this method: save it with :meth:`save_finetuned`.
        """
        raise DeltaConfigError(
            f"PEFT's adapter format is written for LoRA deltas only, not for {type(self).__name__}: save it with "
            "save_finetuned(path), which from_finetuned loads"
        )

    def merge(self, exact_unmerge: bool = True) -> None:
        """Only LoRA's update folds into the backbone's weights (:meth:`LoraModel.merge`).

        Raises:
            DeltaStateError: always, for this method.
        """
        raise DeltaStateError(
            f"{type(self).__name__} adds computation that no weight can absorb, so it cannot be merged (LoRA can): "
            "keep it attached for inference, or detach() it for the plain backbone"
        )

    def unmerge(self) -> None:
        """Only a merged LoRA unmerges (:meth:`LoraModel.unmerge`).

        Raises:
            DeltaStateError: always, for this method.
        """
        raise DeltaStateError(f"{type(self).__name__} is never merged, so there is nothing to unmerge")


def _delta_signature(config_class: type[BaseDeltaConfig]) -> inspect.Signature:
    """The signature of a method class: ``backbone_model``, then the method's options (with the
    config's types and defaults) and :meth:`DeltaBase._build`'s parameters, in ``config_class.parameter_order``
    (where an option named there has its place, and :data:`~opendelta_dist.config.OPTIONS` stands for the others)."""
    own = inspect.signature(DeltaBase._build, eval_str=True).parameters
    hints = get_type_hints(config_class)
    options = [
        inspect.Parameter(
            f.name,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
            # read off the field, not from a config built here: its checks may import transformers
            default=f.default_factory() if f.default is dataclasses.MISSING else f.default,
            annotation=hints[f.name],
        )
        for f in config_class.method_options()
    ]
    placed = {o.name: o for o in options if o.name in config_class.parameter_order}  # options named in the order
    rest = [o for o in options if o.name not in placed]
    parameters = [own["backbone_model"]]
    for name in config_class.parameter_order:
        parameters.extend(rest if name == OPTIONS else [placed.get(name) or own[name]])
    return inspect.Signature(parameters)


def _with_args_section(doc: str, config_class: type[BaseDeltaConfig]) -> str:
    """A method class's docstring with an Args section made from its config (before its Raises section)."""
    own = {f.name for f in config_class.method_options()}
    common = [name for name in config_class.parameter_order if name != OPTIONS and name not in own]
    entries = [
        ("backbone_model", "the model to modify."),
        *((f.name, f.metadata["doc"]) for f in config_class.method_options()),
        (", ".join(common), "as :class:`~opendelta_dist.basemodel.DeltaBase`."),
    ]
    lines = [
        textwrap.fill(
            f"{name}: {text}", 100, initial_indent="    ", subsequent_indent="        ", break_on_hyphens=False
        )
        for name, text in entries
    ]
    head, raises, tail = inspect.cleandoc(doc).partition("\nRaises:")
    return "\n".join([head.rstrip(), "", "Args:", *lines, *(["", f"Raises:{tail}"] if raises else [])])


DeltaBase.__signature__ = _delta_signature(BaseDeltaConfig)


def _active_state_dict(delta: DeltaBase, module: nn.Module, state_dict: dict[str, Any], prefix: str, meta: Any) -> None:
    _trainable_state_dict(module, state_dict, prefix, meta)
    state_dict.update(delta.bypassed_slot_tensors(prefix))  # a bypassed slot holds the backbone's own


def _trainable_state_dict(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    keep = {prefix + n for n, p in module.named_parameters() if p.requires_grad}
    for key in [k for k in state_dict if k.startswith(prefix) and k not in keep]:
        del state_dict[key]
