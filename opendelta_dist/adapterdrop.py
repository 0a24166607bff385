"""AdapterDrop: deltas removed from the lowest layers, for faster training and shared multi-task inference.

AdapterDrop (Rücklé et al., EMNLP 2021) observes that the deltas of the lowest transformer layers matter least.
Without them, backward stops at the lowest layer that still has a delta (the backbone is frozen, so nothing
below needs a gradient), and several task deltas can share one pass over the lower layers at inference.

Three ways to drop, each counting layers from 0 in every stack (an encoder-decoder's encoder and decoder each):

- **static** (``leave_out``, a delta option, as AdapterHub's ``adapters`` names it): the listed layers get no
  delta at all. Saved in the delta's config, so a reload builds the same structure.
- **robust** (:class:`RobustDrop`): while training, every step bypasses the deltas of the lowest ``n`` layers,
  ``n`` drawn per step from a range by a generator seeded with the run's seed and the step number, so every
  rank draws the same ``n`` and a resumed run the same sequence. One delta then serves any number of
  dropped layers at inference.
- **at inference** (:attr:`~opendelta_dist.basemodel.DeltaBase.skip_layers`, AdapterHub's name): the deltas
  of the listed layers are bypassed on the live model until the attribute changes.

A bypassed delta is not computed: its forward hooks pass the backbone's values through, and a parameter it
put into a slot of the backbone (BitFit's biases, ``unfrozen_modules``) gives way to the backbone's own.

:func:`parallel_forward` runs several task deltas that all leave out the lowest ``n`` layers over one input:
the lower layers run once, and each task's pass reuses their outputs.

Layers are the ``layer`` role of the model's family (:mod:`opendelta_dist.families`); in a model of no known
family, the items of its ``nn.ModuleList`` s of one module class.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import nn

from opendelta_dist.addressing import named_backbone_modules, select_modules
from opendelta_dist.errors import DeltaConfigError, DeltaStateError, UnknownModelFamilyError, warn_user
from opendelta_dist.operations import HoldModule, Operation, UnfreezeParameter
from opendelta_dist.structure import role_keys

if TYPE_CHECKING:
    from opendelta_dist.basemodel import DeltaBase

__all__ = ["Layer", "RobustDrop", "backbone_layers", "check_layer_indices", "layer_of", "parallel_forward"]


class Layer(NamedTuple):
    """Where a layer is: its stack (the module list holding it, by name) and its index there."""

    stack: str
    index: int


def backbone_layers(backbone: nn.Module, families: Mapping[str, Mapping[str, str]] | None = None) -> dict[str, Layer]:
    """The transformer layers of ``backbone``: module name -> :class:`Layer`.

    Args:
        backbone: the model (attached delta modules are not counted).
        families: model type -> roles, a backend's table (``Backend.families``); default transformers'.

    Returns:
        Every layer, in definition order; empty when the model has none that this library can tell.
    """
    try:
        keys = role_keys(backbone, ["layer"], **({"families": families} if families is not None else {}))
    except UnknownModelFamilyError:
        return _module_list_layers(backbone)
    names = select_modules(backbone, keys) if keys else []
    layers: dict[str, Layer] = {}
    for name in names:
        stack, _, index = name.rpartition(".")
        if index.isdigit() and not _inside(name, layers):
            layers[name] = Layer(stack, int(index))
    return layers or _module_list_layers(backbone)


def _inside(name: str, layers: Iterable[str]) -> bool:
    return any(name.startswith(f"{layer}.") for layer in layers)


def _module_list_layers(backbone: nn.Module) -> dict[str, Layer]:
    """The layers of a model of no known family: the items of every outermost ``nn.ModuleList`` (or
    ``nn.Sequential`` of two or more) whose items are all blocks of one class (the way such models hold their
    blocks). A block holds modules: a list of single linear layers (per-task heads) is not a stack of layers."""
    layers: dict[str, Layer] = {}
    for name, module in named_backbone_modules(backbone):
        if not isinstance(module, nn.ModuleList | nn.Sequential) or _inside(name, layers):
            continue
        if len(module) < (1 if isinstance(module, nn.ModuleList) else 2):
            continue
        if len({type(m) for m in module}) == 1 and all(any(True for _ in m.children()) for m in module):
            for i in range(len(module)):
                layers[f"{name}.{i}" if name else str(i)] = Layer(name, i)
    return layers


def layer_of(module_name: str, layers: Mapping[str, Layer]) -> Layer | None:
    """The layer the module ``module_name`` is (or is inside), or None when it is in no layer."""
    parts = module_name.split(".") if module_name else []
    for i in range(len(parts), 0, -1):
        found = layers.get(".".join(parts[:i]))
        if found is not None:
            return found
    return None


def stack_depths(layers: Mapping[str, Layer]) -> dict[str, int]:
    """Stack name -> number of layers in it."""
    depths: dict[str, int] = {}
    for layer in layers.values():
        depths[layer.stack] = max(depths.get(layer.stack, 0), layer.index + 1)
    return depths


def check_layer_indices(name: str, indices: Any, layers: Mapping[str, Layer], what: str) -> list[int]:
    """Validate layer indices given as option ``name`` against the model's layers.

    Args:
        name: the option, for the message (``leave_out``, ``skip_layers``).
        indices: the value given.
        layers: the model's layers (:func:`backbone_layers`).
        what: the delta method, for the message.

    Returns:
        The indices, sorted, each once.

    Raises:
        DeltaConfigError: an index is not an int from 0, or the model has no layers, or no stack that deep.
    """
    if isinstance(indices, str | bytes) or not isinstance(indices, Iterable):
        also = " or None" if name == "skip_layers" else ""
        raise DeltaConfigError(f"{name} takes a list of layer indices (e.g. [0]){also}, not {indices!r}")
    values = list(indices)
    if any(not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in values):
        raise DeltaConfigError(f"{name} takes layer indices counted from 0 (e.g. [0, 1, 2]), not {values!r}")
    if not values:
        return []
    if not layers:
        raise DeltaConfigError(
            f"{name}={values} drops the deltas of some layers, but {what}'s backbone has no layers this library can "
            "tell (no known model family, and no nn.ModuleList or nn.Sequential of blocks): AdapterDrop needs a "
            "layered model"
        )
    deepest = max(stack_depths(layers).values())
    too_deep = [i for i in values if i >= deepest]
    if too_deep:
        raise DeltaConfigError(
            f"{name}={values} names layer(s) {too_deep}, but the backbone's deepest stack has {deepest} layers "
            f"(0 to {deepest - 1}); give indices below {deepest}"
        )
    return sorted(set(values))


class LayerDropping:
    """What :class:`~opendelta_dist.basemodel.DeltaBase` adds for AdapterDrop (a mixin: the delta's operations
    and backbone come from there)."""

    backbone_model: nn.Module
    _operations: list[Operation]

    def _layer_table(self) -> dict[str, Layer]:
        """The backbone's layers, found once."""
        cached = self.__dict__.get("_adapterdrop_layers")
        if cached is None:
            cached = backbone_layers(self.backbone_model, self.backend_mapping.families)  # type: ignore[attr-defined]
            self.__dict__["_adapterdrop_layers"] = cached
        return cached

    def layer_of_operation(self, op: Operation) -> Layer | None:
        """The layer ``op`` modifies, or None when its module is in no layer (an embedding, a head)."""
        return layer_of(op.module_name, self._layer_table())

    def _layered_operations(self) -> list[tuple[Operation, Layer]]:
        return [(op, layer) for op in self._operations if (layer := self.layer_of_operation(op)) is not None]

    def is_left_out(self, module_name: str) -> bool:
        """Whether ``module_name`` is inside a layer this delta's ``leave_out`` names."""
        leave_out = self.config.leave_out  # type: ignore[attr-defined]
        if not leave_out:
            return False
        layer = layer_of(module_name, self._layer_table())
        return layer is not None and layer.index in leave_out

    def _leave_out_names(self, names: list[str]) -> list[str]:
        """``names`` without the modules of the layers the config leaves out."""
        given = self.config.leave_out  # type: ignore[attr-defined]
        if given is None:
            return names
        layers = self._layer_table()
        leave_out = set(check_layer_indices("leave_out", given, layers, type(self).__name__))
        kept = [n for n in names if (layer := layer_of(n, layers)) is None or layer.index not in leave_out]
        if len(kept) < len(names):
            self.__dict__["_left_out_at_selection"] = True
        return kept

    def _apply_leave_out(self, ops: list[Operation]) -> list[Operation]:
        """The operations outside the left-out layers; refuses a ``leave_out`` with nothing to leave out.

        Raises:
            DeltaConfigError: ``leave_out`` is set but names no layer of the backbone, the delta has no per-layer
                module, or no operation is left.
        """
        given = self.config.leave_out or []  # type: ignore[attr-defined]
        if not given:
            return ops
        what = type(self).__name__
        layers = self._layer_table()
        leave_out = set(check_layer_indices("leave_out", given, layers, what))
        kept = [op for op in ops if (layer := layer_of(op.module_name, layers)) is None or layer.index not in leave_out]
        if not any(layer_of(op.module_name, layers) is not None for op in ops) and not self.__dict__.get(
            "_left_out_at_selection"
        ):
            raise DeltaConfigError(
                f"leave_out={given}: {what} modifies no module inside a layer of the backbone (its modules: "
                f"{sorted({op.module_name or '<root>' for op in ops})[:4]}), so there is nothing to leave out; "
                "AdapterDrop applies to methods that modify per-layer modules (LoRA, adapters, BitFit, prefix)"
            )
        if not kept:
            raise DeltaConfigError(
                f"leave_out={given} leaves every module {what} modifies without a delta; leave out fewer layers"
            )
        return kept

    def without_left_out(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A checkpoint's tensors without those of layers this delta leaves out (a delta saved with more layers,
        loaded with a larger ``leave_out``)."""
        leave_out = set(self.config.leave_out or ())  # type: ignore[attr-defined]
        if not leave_out:
            return tensors
        own = {key for key, _ in self.named_delta_tensors()}  # type: ignore[attr-defined]
        layers = self._layer_table()
        return {
            key: value
            for key, value in tensors.items()
            if key in own or (layer := layer_of(key, layers)) is None or layer.index not in leave_out
        }

    def bypassed_slot_tensors(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """The tensors of this delta's bypassed parameter slots (which hold the backbone's own value meanwhile),
        under their state-dict keys: a state dict taken while layers are skipped still holds the delta's."""
        return {
            prefix + key: p.detach()
            for op in self._operations
            if isinstance(op, UnfreezeParameter) and op.skipped and op.installed
            for key, p in op.named_tensors()
        }

    # ------------------------------------------------------------------ dropping on the live model

    @property
    def skip_layers(self) -> list[int]:
        """Layer indices (in every stack) whose deltas are bypassed now; empty when none is.

        Setting it bypasses the deltas of those layers until it is set again (``[]`` or None: none): AdapterHub's
        ``skip_layers``, on the live model. The layers left out by ``leave_out`` have no delta to bypass.

        Raises:
            DeltaConfigError: an index is not a layer of the backbone, or the delta modifies no per-layer module.
            DeltaStateError: the delta is a merged LoRA (its update is inside the weights).
        """
        return list(self.__dict__.get("_skip_layers", []))

    @skip_layers.setter
    def skip_layers(self, layers: Iterable[int] | None) -> None:
        what = type(self).__name__
        skip = check_layer_indices("skip_layers", [] if layers is None else layers, self._layer_table(), what)
        if skip == self.__dict__.get("_skip_layers", []):
            return
        if skip and getattr(self, "merged", False):
            raise DeltaStateError(
                f"this {what} is merged into the backbone's weights, so no layer's update can be bypassed: "
                "unmerge() it before setting skip_layers"
            )
        if skip and not self._layered_operations():
            raise DeltaConfigError(
                f"skip_layers={skip}: {what} modifies no module inside a layer of the backbone, so there is nothing "
                "to bypass; AdapterDrop applies to methods that modify per-layer modules"
            )
        self.__dict__["_skip_layers"] = skip
        self._refresh_skipped()

    @contextlib.contextmanager
    def bypassed(self) -> Iterator[None]:
        """Inside the ``with`` block the backbone computes as if the delta were detached, without detaching it
        (switching costs a flag per operation): PEFT's ``disable_adapter()``. Several attached task deltas serve
        one at a time this way."""
        before = self.__dict__.get("_bypassed", False)
        self._bypass(True)
        try:
            yield
        finally:
            self._bypass(before)

    def _bypass(self, bypassed: bool) -> None:
        """Bypass the whole delta (True) or only the layers of :attr:`skip_layers` (False)."""
        self.__dict__["_bypassed"] = bypassed
        self._refresh_skipped()

    def _refresh_skipped(self) -> None:
        everything = self.__dict__.get("_bypassed", False)
        skip = set(self.__dict__.get("_skip_layers", []))
        layers = self._layer_table() if skip else {}
        for op in self._operations:
            layer = layer_of(op.module_name, layers) if skip else None
            op.set_skipped(everything or (layer is not None and layer.index in skip))

    def drop_lowest(self, n: int) -> None:
        """Bypass the deltas of the lowest ``n`` layers of every stack (``skip_layers = range(n)``)."""
        self.skip_layers = range(n)

    @contextlib.contextmanager
    def skipping(self, layers: Iterable[int] | None) -> Iterator[None]:
        """Bypass the deltas of ``layers`` inside the ``with`` block, then restore the previous ``skip_layers``."""
        before = self.skip_layers
        self.skip_layers = layers
        try:
            yield
        finally:
            self.skip_layers = before

    @property
    def robust_drop(self) -> RobustDrop | None:
        """The :class:`RobustDrop` that drops this delta's lowest layers per training step, if one was made."""
        return self.__dict__.get("_robust_drop")

    def layer_count(self) -> int:
        """The number of layers of the backbone's deepest stack (0 when it has none this library can tell)."""
        return max(stack_depths(self._layer_table()).values(), default=0)

    def check_droppable(self, in_place_ok: bool) -> None:
        """Refuse per-step dropping where it cannot work.

        Args:
            in_place_ok: the model's parameter objects stay those the delta made (no engine shards or replaces
                them), so a parameter slot can be switched back to the backbone's own per step.

        Raises:
            DeltaConfigError: the delta modifies no per-layer module, or trains parameters in place inside
                layers where the engine replaced the parameter objects.
        """
        what = type(self).__name__
        layered = self._layered_operations()
        if not layered:
            raise DeltaConfigError(
                f"robust AdapterDrop: {what} modifies no module inside a layer of the backbone, so there is nothing "
                "to drop; AdapterDrop applies to methods that modify per-layer modules"
            )
        in_place = [op.module_name for op, _ in layered if isinstance(op, UnfreezeParameter)]
        if in_place and not in_place_ok:
            raise DeltaConfigError(
                f"robust AdapterDrop: {what} trains parameters in place inside layers ({in_place[0]}, ...), and "
                "this engine replaces the parameter objects (it shards them), so they cannot give way to the "
                "backbone's own per step. Use leave_out for a static drop, an engine that keeps each rank's "
                "parameters whole, or a method that adds modules (LoRA, adapters)"
            )


class RobustDrop:
    """Robust AdapterDrop: each training step bypasses the deltas of the lowest ``n`` layers (every stack).

    ``n`` is drawn from ``[low, high]`` (both included) by a generator seeded with ``seed`` and the step number:
    every rank draws the same ``n``, and a run resumed at step ``s`` draws what the uninterrupted run drew there.

    Args:
        delta: the delta to drop layers of.
        low: the fewest layers dropped in a step.
        high: the most layers dropped in a step (fewer than the backbone's layers: a step trains some delta).
        seed: the run's seed.

    Raises:
        DeltaConfigError: the range is negative, reversed or beyond the backbone's layers, or the delta has
            nothing per layer to drop.
    """

    def __init__(self, delta: DeltaBase, low: int, high: int, seed: int = 0) -> None:
        check_drop_range([low, high])
        delta.check_droppable(in_place_ok=True)  # a delta with something per layer (the engine checks the rest)
        layers = delta.layer_count()
        if high >= layers:
            raise DeltaConfigError(
                f"robust_drop=[{low}, {high}] drops up to {high} layers, but {type(delta).__name__}'s backbone has "
                f"{layers} (its deepest stack), and a step must leave a layer its delta to train: give high <= "
                f"{layers - 1}"
            )
        indices = [layer.index for _, layer in delta._layered_operations()]
        top, bottom = max(indices), min(indices)
        if top == bottom:
            raise DeltaConfigError(
                f"robust AdapterDrop needs deltas in two layers or more, but {type(delta).__name__} has deltas only in "
                f"layer {top} (leave_out={delta.config.leave_out}): a step would drop all of them or none. Leave out "
                "fewer layers, or drop statically with leave_out"
            )
        if high > top:
            raise DeltaConfigError(
                f"robust_drop=[{low}, {high}] drops up to {high} layers, but {type(delta).__name__} has deltas only "
                f"up to layer {top} (leave_out={delta.config.leave_out}), so some steps would train nothing: give "
                f"high <= {top}"
            )
        if high <= bottom:
            raise DeltaConfigError(
                f"robust_drop=[{low}, {high}] drops no delta at any step: {type(delta).__name__}'s lowest layer with "
                f"a delta is {bottom} (leave_out={delta.config.leave_out}), so dropping up to {high} layers bypasses "
                f"nothing; give high > {bottom}"
            )
        self.delta, self.low, self.high, self.seed = delta, low, high, int(seed)
        delta.__dict__["_robust_drop"] = self  # engines read it: the parameters a step uses vary

    def draw(self, step: int) -> int:
        """The number of layers dropped at ``step`` (0-based optimizer step)."""
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + step) % (1 << 63))
        return int(torch.randint(self.low, self.high + 1, (1,), generator=generator))

    def mean_dropped(self, steps: Iterable[int]) -> float:
        """The mean number of layers dropped over ``steps`` (what a log line since the last one reports)."""
        drawn = [self.draw(step) for step in steps]
        return sum(drawn) / max(len(drawn), 1)

    def before_step(self, step: int) -> int:
        """Drop the lowest ``draw(step)`` layers' deltas for the step about to run; returns that number."""
        n = self.draw(step)
        self.delta.drop_lowest(n)
        return n

    def for_eval(self) -> None:
        """Bypass nothing (evaluation sees the whole delta)."""
        self.delta.skip_layers = None


def check_drop_range(value: Any) -> tuple[int, int]:
    """Validate a robust AdapterDrop range ``[low, high]``.

    Raises:
        DeltaConfigError: not two ints, negative, or reversed.
    """
    if (
        not isinstance(value, Sequence)
        or isinstance(value, str)
        or len(value) != 2
        or any(not isinstance(v, int) or isinstance(v, bool) for v in value)
    ):
        raise DeltaConfigError(
            f"robust_drop takes [low, high], the range of the number of lowest layers dropped per step (e.g. [0, 3]), "
            f"not {value!r}"
        )
    low, high = value
    if low < 0 or high < low:
        raise DeltaConfigError(
            f"robust_drop=[{low}, {high}] is {'negative' if low < 0 else 'reversed'}: "
            "give 0 <= low <= high, e.g. [0, 3]"
        )
    return low, high


# ================================================================================ parallel multi-task inference


#: the inputs that ask a model for a cache (of keys and values, or of a state)
CACHE_INPUTS = ("use_cache", "past_key_values", "cache", "cache_params", "past")


@contextlib.contextmanager
def _use_cache_off(config: Any) -> Iterator[None]:
    config.use_cache = False
    try:
        yield
    finally:
        config.use_cache = True


class _Stop(Exception):
    """Ends the shared pass at the first layer above the shared ones."""


def parallel_forward(model: nn.Module, deltas: Sequence[DeltaBase], shared_layers: int, **inputs: Any) -> list[Any]:
    """Run several task deltas over one input, sharing one pass over the lowest ``shared_layers`` layers.

    Every delta must be attached to ``model`` and have no active delta in those layers (trained with
    ``leave_out`` covering them, or bypassing them with ``skip_layers``). The lower layers run once, without any
    delta; then each task's pass runs with only its delta active, and those layers hand back the outputs of the
    shared pass instead of computing. Each result is what ``model(**inputs)`` returns with that delta alone
    (bit for bit: the same computations run; in eval mode, where dropout draws nothing). In an encoder-decoder the
    shared layers are the encoder's (all of them, when ``shared_layers`` is its depth): the decoder's lowest
    layers may keep their deltas. It scores inputs: no cache
    is asked for or returned (``use_cache`` is off meanwhile), so it does not generate.

    Args:
        model: the backbone, with every delta attached.
        deltas: the task deltas, in the order of the results.
        shared_layers: the number of lowest layers the tasks share (``n``).
        inputs: the model's keyword arguments.

    Returns:
        One model output per delta.

    Raises:
        DeltaConfigError: a delta is not attached to ``model`` or is given twice, modifies a shared layer or a
            module that runs before the shared layers end, or a cache is asked for.
    """
    if not deltas:
        return []
    if isinstance(shared_layers, bool) or not isinstance(shared_layers, int) or shared_layers < 0:
        raise DeltaConfigError(f"shared_layers takes a number of layers from 0, not {shared_layers!r}")
    layers = deltas[0]._layer_table()
    shared = {name for name, layer in layers.items() if layer.index < shared_layers}
    check_layer_indices("shared_layers", range(shared_layers), layers, type(deltas[0]).__name__)
    if len({id(d) for d in deltas}) < len(deltas):
        raise DeltaConfigError("a delta is given twice: give each task's delta once")
    for i, delta in enumerate(deltas):
        if not delta.attached:
            raise DeltaConfigError(f"deltas[{i}] ({type(delta).__name__}) is not attached: attach() it to the model")
        if delta.backbone_model is not model:
            raise DeltaConfigError(
                f"deltas[{i}] ({type(delta).__name__}) is attached to another module "
                f"({type(delta.backbone_model).__name__}): pass that module as the model"
            )
    caching = [k for k in CACHE_INPUTS if inputs.get(k) not in (None, False)]
    if caching:
        raise DeltaConfigError(
            f"parallel_forward scores inputs without a cache, but {caching[0]}= is given: the shared layers do not "
            "write into a cache, so one could not continue a generation; leave it out"
        )
    config = getattr(model, "config", None)
    if getattr(config, "use_cache", None):  # e.g. GPT-2 in eval mode: return no cache rather than a partial one
        with _use_cache_off(config):
            return parallel_forward(model, deltas, shared_layers, **inputs)
    if getattr(model, "training", False):
        warn_user(
            "parallel_forward runs a model in training mode: dropout in the shared layers draws once for every "
            "task, so an output is not that task's own forward; call model.eval() first"
        )
    if shared_layers == 0:  # nothing shared: each task's own forward
        return [_alone(model, deltas, k, inputs) for k in range(len(deltas))]
    modules = dict(named_backbone_modules(model))
    # the modules delta hooks compute in (a module that only holds a delta's parameters computes nothing)
    targets = {
        id(op.target): op.module_name
        for d in deltas
        for op in d.operations
        if op.target is not None and not isinstance(op, HoldModule)
    }
    outputs: dict[str, list[Any]] = {}
    ran: set[str] = set()

    def record(name: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            outputs.setdefault(name, []).append(output)

        return hook

    def stop(module: nn.Module, args: Any, output: Any) -> None:
        raise _Stop

    def note(module: nn.Module, args: Any) -> None:
        ran.add(targets[id(module)])

    states = [(d, d.__dict__.get("_bypassed", False)) for d in deltas]
    handles = [modules[n].register_forward_hook(record(n)) for n in shared]
    # the shared pass ends after the last shared layer of the first stack that runs (an encoder-decoder's
    # encoder, also when all its layers are shared): the record hooks of that layer run first
    last = [name for name, layer in layers.items() if layer.index == shared_layers - 1]
    handles += [modules[n].register_forward_hook(stop) for n in last]
    handles += [m.register_forward_pre_hook(note) for m in modules.values() if id(m) in targets]
    try:
        for d in deltas:
            d._bypass(True)
        with contextlib.suppress(_Stop):
            model(**inputs)
    finally:
        for h in handles:
            h.remove()
        for d, was in states:
            d._bypass(was)
    for i, delta in enumerate(deltas):  # the layers that ran in the shared pass must have no active delta
        busy = [
            op.module_name
            for op, lay in delta._layered_operations()
            if not op.skipped and (f"{lay.stack}.{lay.index}" if lay.stack else str(lay.index)) in outputs
        ]
        if busy:
            raise DeltaConfigError(
                f"deltas[{i}] ({type(delta).__name__}) modifies {busy[0]}, one of the lowest {shared_layers} layers "
                f"the tasks share: train it without deltas there (leave_out={list(range(shared_layers))} in every "
                "stack, or exclude_modules for the layers of one stack), or bypass them with its skip_layers"
            )
    early = sorted(name for name in ran if layer_of(name, layers) is None)
    if early:
        raise DeltaConfigError(
            f"a delta modifies {early[0] or 'the model itself'}, which runs before the shared layers end, so their "
            "outputs would depend on the task: parallel_forward shares only layers below every delta"
        )
    results = []
    for k in range(len(deltas)):
        replay = {n: list(v) for n, v in outputs.items()}
        try:
            for n in replay:  # the shared layers hand back what they computed, without computing
                modules[n].forward = _replay(replay[n])
            for j, d in enumerate(deltas):
                if j != k:
                    d._bypass(True)
            results.append(model(**inputs))
        finally:
            for n in replay:
                del modules[n].forward
            for d, was in states:
                d._bypass(was)
    return results


def _alone(model: nn.Module, deltas: Sequence[DeltaBase], k: int, inputs: dict[str, Any]) -> Any:
    """The model's output with ``deltas[k]`` alone active."""
    states = [(d, d.__dict__.get("_bypassed", False)) for d in deltas]
    try:
        for j, d in enumerate(deltas):
            if j != k:
                d._bypass(True)
        return model(**inputs)
    finally:
        for d, was in states:
            d._bypass(was)


def _replay(outputs: list[Any]) -> Any:
    def forward(*args: Any, **kwargs: Any) -> Any:
        return outputs.pop(0)

    return forward
