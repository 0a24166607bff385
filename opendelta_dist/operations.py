"""The only ways a delta touches a backbone, each exactly reversible.

=====================  =========================================================================
operation              effect on the target module
=====================  =========================================================================
``InsertSequential``   ``before``: the delta transforms the module's input;
                       ``after``: the delta transforms the module's output
``InsertParallel``     the delta runs on the module's input and its result is added to the output
``Replace``            the delta module takes the target's place in its parent
``UnfreezeParameter``  one of the target's parameters is replaced by a trainable delta-owned copy
                       (or an empty ``bias`` slot is filled); the original is kept untouched
``RewriteCall``        the delta rewrites the target's call arguments and its output (e.g. to give
                       an attention layer extra keys and values)
``HoldModule``         the delta module only becomes a child of the target (parameters that several
                       operations of one delta share live there)
=====================  =========================================================================

``install`` applies an operation and ``uninstall`` undoes it exactly: the module tree, parameters,
buffers, hooks and ``forward`` of the backbone are what they were before. The module's ``forward``
is never rewritten (a forward pre-hook and a forward hook dispatch to the deltas), so its signature
and docstring stay those of the backbone.

**Stacking order.** Several deltas can modify one module. Each operation carries an ``order``
(the creation order of its delta, then its position inside the delta). Whatever the order of
``attach``/``detach`` calls, a module computes: the ``before`` operations on the input in increasing
order, the module itself, then the ``after`` and parallel operations on the output in increasing
order (a parallel delta sees the module's input after the ``before`` deltas). When two attached
deltas unfreeze the same parameter, the one created last is in effect.
"""

from __future__ import annotations

import inspect
import weakref
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from opendelta_dist.addressing import is_delta_module, mark_delta_module, named_backbone_modules, replaced_module
from opendelta_dist.backends import backend_of
from opendelta_dist.errors import DeltaStateError, UnsupportedModuleError

Order = tuple[int, int]


def _first_tensor(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[str | int, torch.Tensor]:
    """The module's primary input: its first positional tensor, else ``hidden_states``, else its first tensor kwarg."""
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor):
            return i, a
    if isinstance(kwargs.get("hidden_states"), torch.Tensor):
        return "hidden_states", kwargs["hidden_states"]
    for k, v in kwargs.items():
        if isinstance(v, torch.Tensor):
            return k, v
    raise UnsupportedModuleError("the module was called without a tensor input, so a delta has nothing to act on")


def _map_primary(output: Any, fn: Any) -> Any:
    """Apply ``fn`` to the primary tensor of a module output (a tensor, tuple or ModelOutput)."""
    if isinstance(output, torch.Tensor):
        return fn(output)
    if isinstance(output, tuple):
        return (fn(output[0]), *output[1:])
    if isinstance(output, list):
        return [fn(output[0]), *output[1:]]
    if isinstance(output, Mapping) and output:
        key = next(iter(output))
        output[key] = fn(output[key])  # type: ignore[index]
        return output
    raise UnsupportedModuleError(
        f"cannot modify a module output of type {type(output).__name__}: a delta needs a tensor, a tuple "
        "whose first item is a tensor, or a ModelOutput"
    )


@dataclass
class _ModuleState:
    """The deltas installed on one backbone module."""

    pre: list[InsertSequential] = field(default_factory=list)
    post: list[InsertSequential | InsertParallel] = field(default_factory=list)
    pre_handle: RemovableHandle | None = None
    post_handle: RemovableHandle | None = None
    # parameter name -> (the backbone's own parameter or None, unfreeze operations in effect)
    swaps: dict[str, tuple[nn.Parameter | None, list[UnfreezeParameter]]] = field(default_factory=dict)

    def run_pre(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        for op in self.pre:
            if not op.skipped:
                args, kwargs = op.transform_input(args, kwargs)
        return args, kwargs

    def run_post(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        for op in self.post:
            if not op.skipped:
                output = op.transform_output(args, kwargs, output)
        return output

    def empty(self) -> bool:
        return not (self.pre or self.post or self.swaps)


_STATES: weakref.WeakKeyDictionary[nn.Module, _ModuleState] = weakref.WeakKeyDictionary()


def _state(module: nn.Module) -> _ModuleState:
    st = _STATES.get(module)
    if st is None:
        st = _STATES[module] = _ModuleState()
    return st


def _release(module: nn.Module, st: _ModuleState) -> None:
    if not st.pre and st.pre_handle is not None:
        st.pre_handle.remove()
        st.pre_handle = None
    if not st.post and st.post_handle is not None:
        st.post_handle.remove()
        st.post_handle = None
    if st.empty():
        del _STATES[module]


class Operation(ABC):
    """One reversible modification of the backbone module called ``module_name``.

    Args:
        module_name: dotted name of the target module, relative to the backbone.
        delta_module: the module holding the delta's parameters.
        delta_name: the name the delta module takes as a child of the target, and in checkpoints.
    """

    def __init__(self, module_name: str, delta_module: nn.Module, delta_name: str) -> None:
        self.module_name = module_name
        self.delta_module = delta_module
        self.delta_name = delta_name
        self.order: Order = (0, 0)
        self.target: nn.Module | None = None
        self.skipped = False
        mark_delta_module(delta_module)

    def set_skipped(self, skipped: bool) -> None:
        """Bypass the operation (True: the module computes as if it were not there) or apply it again (AdapterDrop,
        :mod:`opendelta_dist.adapterdrop`). A bypassed delta module is not called."""
        self.skipped = skipped

    @property
    def installed(self) -> bool:
        """Whether the operation is applied to a backbone now."""
        return self.target is not None

    def install(self, root: nn.Module, order: Order) -> None:
        """Apply the operation to ``root``'s module ``module_name``.

        Raises:
            DeltaStateError: the operation is installed already.
            ModuleNotFoundInBackboneError: ``root`` has no such module.
        """
        if self.installed:
            raise DeltaStateError(f"operation on {self.module_name!r} is installed already")
        target = root.get_submodule(self.module_name) if self.module_name else root
        self.order = order
        self._install(root, target)
        self.target = target

    def uninstall(self) -> None:
        """Undo the operation exactly."""
        if self.target is None:
            raise DeltaStateError(f"operation on {self.module_name!r} is not installed")
        self._uninstall(self.target)
        self.target = None

    @abstractmethod
    def _install(self, root: nn.Module, target: nn.Module) -> None: ...

    @abstractmethod
    def _uninstall(self, target: nn.Module) -> None: ...

    def named_tensors(self) -> Iterator[tuple[str, nn.Parameter]]:
        """The delta's parameters under their checkpoint keys (backbone-relative names)."""
        prefix = ".".join(p for p in (self.module_name, self.delta_name) if p)
        for name, p in self.delta_module.named_parameters():
            yield f"{prefix}.{name}", p


class _ChildOperation(Operation):
    """An operation whose delta module becomes a child of the target while installed."""

    child_name: str | None = None

    def _install(self, root: nn.Module, target: nn.Module) -> None:
        if isinstance(target, (nn.ModuleList, nn.ModuleDict, nn.Sequential)):
            raise UnsupportedModuleError(
                f"{self.module_name!r} is a {type(target).__name__} (a container): a delta cannot be inserted "
                "into it; aim at the layers inside it or at the module that calls it"
            )
        name, k = self.delta_name, 0
        while name in target._modules or name in target._parameters or name in target._buffers:
            k += 1
            name = f"{self.delta_name}_{k}"
        self.child_name = name
        target.add_module(name, self.delta_module)
        self.delta_module.to(device=_device_of(target))
        self.delta_module.train(target.training)  # a delta put into a model in eval mode evaluates too
        self._add_hook(target, _state(target))

    def _uninstall(self, target: nn.Module) -> None:
        st = _state(target)
        for ops in (st.pre, st.post):
            if self in ops:
                ops.remove(self)
        del target._modules[self.child_name]  # type: ignore[arg-type]
        self.child_name = None
        _release(target, st)

    @abstractmethod
    def _add_hook(self, target: nn.Module, st: _ModuleState) -> None: ...


def _device_of(module: nn.Module) -> torch.device | None:
    for t in module.parameters():
        return None if t.device.type == "meta" else t.device
    for t in module.buffers():
        return t.device
    return None


def _insert_sorted(ops: list[Any], op: Operation) -> None:
    ops.append(op)
    ops.sort(key=lambda o: o.order)


class InsertSequential(_ChildOperation):
    """The delta transforms the target's input (``position="before"``) or output (``"after"``)."""

    def __init__(
        self, module_name: str, delta_module: nn.Module, delta_name: str, position: Literal["before", "after"]
    ) -> None:
        if position not in ("before", "after"):
            raise ValueError(f"position must be 'before' or 'after', not {position!r}")
        super().__init__(module_name, delta_module, delta_name)
        self.position = position

    def _add_hook(self, target: nn.Module, st: _ModuleState) -> None:
        if self.position == "before":
            _insert_sorted(st.pre, self)
            if st.pre_handle is None:
                st.pre_handle = target.register_forward_pre_hook(st.run_pre, with_kwargs=True)
        else:
            _insert_sorted(st.post, self)
            if st.post_handle is None:
                st.post_handle = target.register_forward_hook(st.run_post, with_kwargs=True)

    def transform_input(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Replace the module's first tensor input by the delta's transformation of it."""
        where, x = _first_tensor(args, kwargs)
        if isinstance(where, int):
            return (*args[:where], self.delta_module(x), *args[where + 1 :]), kwargs
        return args, {**kwargs, where: self.delta_module(x)}

    def transform_output(self, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        """Replace the module's primary output by the delta's transformation of it."""
        return _map_primary(output, self.delta_module)


class InsertParallel(_ChildOperation):
    """The delta runs beside the target on its input; its result is added to the target's output."""

    def _add_hook(self, target: nn.Module, st: _ModuleState) -> None:
        _insert_sorted(st.post, self)
        if st.post_handle is None:
            st.post_handle = target.register_forward_hook(st.run_post, with_kwargs=True)

    def transform_output(self, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        """Add the delta's result on the module input to the module's primary output."""
        _, x = _first_tensor(args, kwargs)
        delta = self.delta_module(x)
        return _map_primary(output, lambda out: out + delta.to(out.dtype))


class Replace(Operation):
    """The delta module takes the target's place in the target's parent.

    The delta module usually wraps the original (``replace_with(original)``); parameters the two
    share are the backbone's and are not saved with the delta.
    """

    def __init__(self, module_name: str, delta_module: nn.Module, delta_name: str = "") -> None:
        if not module_name:
            raise UnsupportedModuleError("the root module cannot be replaced; replace one of its submodules")
        super().__init__(module_name, delta_module, delta_name)
        self.original: nn.Module | None = None

    def _install(self, root: nn.Module, target: nn.Module) -> None:
        if is_delta_module(target):
            raise DeltaStateError(f"{self.module_name!r} is replaced by another delta already; detach that one first")
        parent_name, _, child = self.module_name.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        self.original = target
        mark_delta_module(self.delta_module, replaces=target)
        parent._modules[child] = self.delta_module

    def install(self, root: nn.Module, order: Order) -> None:
        """Replace ``root``'s module ``module_name`` by the delta module."""
        super().install(root, order)
        self.target = root  # the parent chain is resolved again from the root on uninstall

    def _uninstall(self, target: nn.Module) -> None:
        parent_name, _, child = self.module_name.rpartition(".")
        parent = target.get_submodule(parent_name) if parent_name else target
        if parent._modules.get(child) is not self.delta_module:
            raise DeltaStateError(f"{self.module_name!r} was changed after this delta replaced it; cannot restore it")
        parent._modules[child] = self.original
        self.original = None

    def named_tensors(self) -> Iterator[tuple[str, nn.Parameter]]:
        """The replacement's own parameters (not those it shares with the original module)."""
        shared = {id(p) for p in self.original.parameters()} if self.original is not None else set()
        prefix = ".".join(p for p in (self.module_name, self.delta_name) if p)
        for name, p in self.delta_module.named_parameters():
            if id(p) not in shared:
                yield f"{prefix}.{name}", p


class _ParameterHolder(nn.Module):
    def __init__(self, name: str, param: nn.Parameter) -> None:
        super().__init__()
        self.register_parameter(name, param)


class UnfreezeParameter(Operation):
    """Put a trainable delta-owned parameter in the target's slot ``param_name``.

    If the target has such a parameter, the delta's starts as a copy of it and the original stays
    untouched (frozen) until the operation is undone. If the slot is empty (``bias=None``), the
    delta's parameter fills it.

    Args:
        module_name: the target module.
        param_name: the parameter slot (``"bias"``, ``"weight"``, ...).
        delta_param: the trainable parameter to put there.
    """

    def __init__(self, module_name: str, param_name: str, delta_param: nn.Parameter) -> None:
        super().__init__(module_name, _ParameterHolder(param_name, delta_param), "")
        self.param_name = param_name

    @property
    def parameter(self) -> nn.Parameter:
        """The delta's parameter."""
        return self.delta_module._parameters[self.param_name]  # type: ignore[return-value]

    def _install(self, root: nn.Module, target: nn.Module) -> None:
        if self.param_name not in target._parameters:
            raise UnsupportedModuleError(
                f"{self.module_name!r} ({type(target).__name__}) has no parameter slot {self.param_name!r}"
            )
        st = _state(target)
        original, ops = st.swaps.get(self.param_name, (target._parameters[self.param_name], []))
        current = target._parameters[self.param_name]
        p = self.parameter
        own = backend_of(p).full_shape(p)
        shape = backend_of(current).full_shape(current) if current is not None else None
        if shape is not None and shape != own:  # whole shapes: either may be a partition
            raise UnsupportedModuleError(
                f"{self.module_name}.{self.param_name} has shape {tuple(shape)}, the delta's {tuple(own)}"
            )
        if current is not None and p.device != current.device:
            p.data = p.data.to(current.device)
        _insert_sorted(ops, self)
        st.swaps[self.param_name] = (original, ops)
        target._parameters[self.param_name] = _in_effect(original, ops)
        # the target reads the delta's parameter as its backend needs (whole, where the backend shards)
        self._undo_target = backend_of(p).prepare_target(target)

    def _uninstall(self, target: nn.Module) -> None:
        self._undo_target()
        st = _state(target)
        original, ops = st.swaps[self.param_name]
        ops.remove(self)
        target._parameters[self.param_name] = _in_effect(original, ops)
        if not ops:
            del st.swaps[self.param_name]
        _release(target, st)

    def set_skipped(self, skipped: bool) -> None:
        """Bypassed, the slot holds what it would hold without this operation (the backbone's own parameter, or
        another delta's)."""
        if skipped == self.skipped:
            return  # the slot stays as it is (an engine may have put its own parameter object there)
        super().set_skipped(skipped)
        if self.target is not None:
            original, ops = _state(self.target).swaps[self.param_name]
            self.target._parameters[self.param_name] = _in_effect(original, ops)

    def named_tensors(self) -> Iterator[tuple[str, nn.Parameter]]:
        """``{module_name}.{param_name}``: the slot's own name, as the backbone's state dict has it."""
        prefix = f"{self.module_name}." if self.module_name else ""
        yield f"{prefix}{self.param_name}", self.parameter


def _in_effect(original: nn.Parameter | None, ops: list[UnfreezeParameter]) -> nn.Parameter | None:
    """What a parameter slot holds: the parameter of the last operation not bypassed, else the backbone's own."""
    for op in reversed(ops):
        if not op.skipped:
            return op.parameter
    return original


def original_parameter(module: nn.Module, name: str) -> nn.Parameter | None:
    """The backbone's own parameter in ``module``'s slot ``name``, as if no delta were attached."""
    st = _STATES.get(module)
    if st is not None and name in st.swaps:
        return st.swaps[name][0]
    return module._parameters.get(name)


def pristine_named_parameters(root: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """The backbone's own parameters, as ``named_parameters`` would give them with no delta attached."""
    seen: set[int] = set()
    for mname, module in named_backbone_modules(root):
        for pname in module._parameters:
            p = original_parameter(module, pname)
            if p is None or id(p) in seen:
                continue
            seen.add(id(p))
            yield (f"{mname}.{pname}" if mname else pname), p


_FIXED = "_opendelta_fixed"


def mark_fixed(param: nn.Parameter) -> nn.Parameter:
    """Mark a delta parameter that is saved with its delta but never trained (e.g. a fixed random rule)."""
    setattr(param, _FIXED, True)
    return param.requires_grad_(False)


def is_fixed(param: nn.Parameter) -> bool:
    """Whether ``param`` was marked by :func:`mark_fixed`."""
    return getattr(param, _FIXED, False)


def delta_parameter_ids(root: nn.Module) -> set[int]:
    """``id()`` of every parameter that belongs to a delta attached anywhere in ``root``."""
    ids: set[int] = set()
    for module in root.modules():
        if is_delta_module(module):
            ids.update(id(p) for p in module.parameters())
            original = replaced_module(module)
            if original is not None:  # a replacement's wrapped original stays the backbone's
                ids.difference_update(id(p) for p in original.parameters())
        st = _STATES.get(module)
        if st is not None:
            for _, ops in st.swaps.values():
                ids.update(id(op.parameter) for op in ops)
    return ids


class InsertParallelSpan(_ChildOperation):
    """A parallel delta over a span of modules: it reads the input of ``module_name`` and adds its
    result to the output of ``end_module_name`` (e.g. from a feed-forward block's first linear layer to
    its last). The delta module is a child of the first module.
    """

    def __init__(self, module_name: str, delta_module: nn.Module, delta_name: str, end_module_name: str) -> None:
        super().__init__(module_name, delta_module, delta_name)
        self.end_module_name = end_module_name
        self.end: nn.Module | None = None
        self._pending: torch.Tensor | None = None

    def _install(self, root: nn.Module, target: nn.Module) -> None:
        end = root.get_submodule(self.end_module_name)
        super()._install(root, target)
        st = _state(end)
        _insert_sorted(st.post, self)
        if st.post_handle is None:
            st.post_handle = end.register_forward_hook(st.run_post, with_kwargs=True)
        self.end = end

    def _add_hook(self, target: nn.Module, st: _ModuleState) -> None:
        _insert_sorted(st.pre, self)
        if st.pre_handle is None:
            st.pre_handle = target.register_forward_pre_hook(st.run_pre, with_kwargs=True)

    def _uninstall(self, target: nn.Module) -> None:
        assert self.end is not None
        st = _state(self.end)
        st.post.remove(self)
        _release(self.end, st)
        self.end = None
        self._pending = None
        super()._uninstall(target)

    def transform_input(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Run the delta on the first module's input and keep the result for the last module."""
        _, x = _first_tensor(args, kwargs)
        self._pending = self.delta_module(x)
        return args, kwargs

    def transform_output(self, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        """Add the kept result to the last module's output."""
        delta, self._pending = self._pending, None
        if delta is None:
            raise UnsupportedModuleError(
                f"{self.end_module_name!r} ran without {self.module_name!r} running first: a parallel span must "
                "start at a module that runs before its end module in every forward"
            )
        return _map_primary(output, lambda out: out + delta.to(out.dtype))


class CallRewriter(nn.Module):
    """A delta module that rewrites its target's call (installed by :class:`RewriteCall`).

    Subclasses override :meth:`before_call` and/or :meth:`after_call`; the defaults change nothing.
    """

    def before_call(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The arguments ``module`` is called with instead of ``args``/``kwargs``."""
        return args, kwargs

    def after_call(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        """What ``module``'s call returns instead of ``output`` (``args``/``kwargs`` as rewritten)."""
        return output


class RewriteCall(_ChildOperation):
    """The delta module (a :class:`CallRewriter`) rewrites the target's arguments before its forward
    and its output after it. Reversible like the other operations: a forward pre-hook and a forward
    hook, both with keyword arguments, and the delta module as a child of the target.
    """

    delta_module: CallRewriter

    def __init__(self, module_name: str, delta_module: CallRewriter, delta_name: str) -> None:
        super().__init__(module_name, delta_module, delta_name)

    def _add_hook(self, target: nn.Module, st: _ModuleState) -> None:
        _insert_sorted(st.pre, self)
        _insert_sorted(st.post, self)
        if st.pre_handle is None:
            st.pre_handle = target.register_forward_pre_hook(st.run_pre, with_kwargs=True)
        if st.post_handle is None:
            st.post_handle = target.register_forward_hook(st.run_post, with_kwargs=True)

    def transform_input(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The target's call arguments, rewritten by the delta module."""
        assert self.target is not None
        return self.delta_module.before_call(self.target, args, kwargs)

    def transform_output(self, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        """The target's output, rewritten by the delta module."""
        assert self.target is not None
        return self.delta_module.after_call(self.target, args, kwargs, output)


class HoldModule(_ChildOperation):
    """The delta module becomes a child of the target and nothing more: the home of parameters that
    several other operations of one delta use (so engines wrap and save them with the backbone)."""

    def _add_hook(self, target: nn.Module, st: _ModuleState) -> None:
        return None


def call_as_keywords(
    params: tuple[str, ...], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Move a call's positional arguments into its keyword arguments.

    Args:
        params: the names of the forward's positional-or-keyword parameters, in order.
        args: the positional arguments.
        kwargs: the keyword arguments.

    Returns:
        ``((), kwargs)`` with every positional argument named; the call unchanged when there are more
        positional arguments than names (a ``*args`` forward).
    """
    if len(args) > len(params):
        return args, kwargs
    return (), {**dict(zip(params, args, strict=False)), **kwargs}


def positional_names(module: nn.Module) -> tuple[str, ...]:
    """The names of ``module.forward``'s positional-or-keyword parameters, in order."""
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.POSITIONAL_ONLY)
    return tuple(n for n, p in inspect.signature(module.forward).parameters.items() if p.kind in kinds)
