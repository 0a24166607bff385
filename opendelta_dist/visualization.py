"""Draw a model's module tree, with its deltas, as a rich tree.

Every node reads ``name (ClassName)`` followed by the module's own parameters as ``name:[d0,d1]``::

    root (BertModel)
    ├── embeddings (BertEmbeddings)
    │   ├── word_embeddings (Embedding) weight:[99,32]
    ...
    └── encoder (BertEncoder)
        └── layer (ModuleList)
            └── 0-11 (BertLayer)
                ├── attention (BertAttention)
                │   ├── self (BertSelfAttention)
                │   │   ├── query (Linear) weight:[32,32] bias:[32]
                │   │   │   └── lora (LowRankLinear) lora_A:[8,32] lora_B:[32,8]

Parameters are styled by status: :data:`DELTA_STYLE` for a delta's parameters, :data:`TRAINABLE_STYLE`
for other trainable ones and :data:`FROZEN_STYLE` for frozen ones; the names of delta modules are in
:data:`DELTA_MODULE_STYLE`. Consecutive numbered siblings (the blocks of a ``ModuleList``) whose
subtrees are identical in classes, parameter names, shapes and statuses are drawn once, named by
their range (``0-11``). :meth:`Visualization.folded_tree` gives the same folded tree as data
(:class:`FoldedModule`), for drawing it elsewhere (the ``interactive_modify`` page).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from rich.console import Console
from rich.text import Text
from rich.tree import Tree
from torch import nn

from opendelta_dist.addressing import is_delta_module
from opendelta_dist.backends import backend_of
from opendelta_dist.operations import delta_parameter_ids

FROZEN_STYLE = "grey50"
TRAINABLE_STYLE = "bold red"
DELTA_STYLE = "bold green"
DELTA_MODULE_STYLE = "bold green underline"

# wide enough that structure_text never wraps a line
_TEXT_WIDTH = 10_000


@dataclass(frozen=True)
class _Param:
    """One parameter as drawn."""

    name: str
    shape: tuple[int, ...]
    trainable: bool
    delta: bool

    @property
    def label(self) -> str:
        return f"{self.name}:[{','.join(map(str, self.shape))}]"

    def text(self) -> Text:
        if self.delta:
            style = DELTA_STYLE
        else:
            style = TRAINABLE_STYLE if self.trainable else FROZEN_STYLE
        return Text(self.label, style=style)


@dataclass(frozen=True)
class _Summary:
    """A module's subtree as drawn. Equal ``signature`` means identical drawings of the subtrees."""

    class_name: str
    delta: bool
    params: tuple[_Param, ...]
    children: tuple[tuple[str, _Summary], ...]
    signature: int


class _Summarizer:
    """Builds the summaries of a module tree bottom-up, each module once.

    Signatures are interned: a subtree's key holds its children's signatures (small ints), so
    comparing two subtrees never walks them again.
    """

    def __init__(self, delta_ids: set[int], keep_non_params: bool) -> None:
        self.delta_ids = delta_ids
        self.keep_non_params = keep_non_params
        self.summaries: dict[int, _Summary | None] = {}
        self.signatures: dict[tuple[object, ...], int] = {}

    def summarize(self, module: nn.Module) -> _Summary | None:
        """The summary of ``module``; None when it is dropped (no parameters in its subtree)."""
        if id(module) in self.summaries:
            return self.summaries[id(module)]
        params = tuple(
            # the whole shape: a sharded backend's parameter holds only its partition
            _Param(name, tuple(backend_of(p).full_shape(p)), p.requires_grad, id(p) in self.delta_ids)
            for name, p in module.named_parameters(recurse=False)
        )
        children: list[tuple[str, _Summary]] = []
        for name, child in module.named_children():
            summary = self.summarize(child)
            if summary is not None:
                children.append((name, summary))
        delta = is_delta_module(module)
        result: _Summary | None = None
        if params or children or self.keep_non_params:
            key = (type(module), delta, params, tuple((name, s.signature) for name, s in children))
            signature = self.signatures.setdefault(key, len(self.signatures))
            result = _Summary(type(module).__name__, delta, params, tuple(children), signature)
        self.summaries[id(module)] = result
        return result


def _fold(children: tuple[tuple[str, _Summary], ...]) -> list[tuple[str, tuple[str, ...], _Summary]]:
    """Merge runs of consecutively numbered siblings with identical subtrees into one entry.

    Returns:
        ``(label, names, summary)`` per entry: a run is labelled ``first-last`` and ``names`` holds
        every sibling name it stands for; any other child is its own one-name entry.
    """
    runs: list[tuple[list[str], _Summary]] = []
    for name, summary in children:
        if runs and name.isdecimal():
            names, previous = runs[-1]
            last = names[-1]
            if last.isdecimal() and int(last) + 1 == int(name) and previous.signature == summary.signature:
                names.append(name)
                continue
        runs.append(([name], summary))
    return [
        (names[0] if len(names) == 1 else f"{names[0]}-{names[-1]}", tuple(names), summary) for names, summary in runs
    ]


def _label(name: str, summary: _Summary, expand_params: bool) -> Text:
    label = Text()
    label.append(name, style=DELTA_MODULE_STYLE if summary.delta else None)
    label.append(f" ({summary.class_name})")
    if not expand_params:
        for param in summary.params:
            label.append(" ")
            label.append_text(param.text())
    return label


def _grow(tree: Tree, summary: _Summary, expand_params: bool) -> None:
    """Add ``summary``'s parameters (when expanded) and folded children under ``tree``."""
    if expand_params:
        for param in summary.params:
            tree.add(param.text())
    for label, _, child in _fold(summary.children):
        _grow(tree.add(_label(label, child, expand_params)), child, expand_params)


@dataclass(frozen=True)
class FoldedModule:
    """One node of the folded module tree: a module, or a run of identical numbered sibling blocks.

    Attributes:
        label: the name drawn for the node: the module's name, or ``first-last`` for a run.
        names: the sibling names the node stands for: ``("query",)``, or ``("0", "1", ..., "11")``
            for a run; empty for the root.
        class_name: the module's class.
        params: its own parameters as drawn (``"weight:[32,32]"``).
        delta: whether the module was created by a delta (it is not part of the backbone).
        children: the folded children.
    """

    label: str
    names: tuple[str, ...]
    class_name: str
    params: tuple[str, ...]
    delta: bool
    children: tuple[FoldedModule, ...]


def _folded(label: str, names: tuple[str, ...], summary: _Summary) -> FoldedModule:
    children = tuple(_folded(*entry) for entry in _fold(summary.children))
    params = tuple(p.label for p in summary.params)
    return FoldedModule(label, names, summary.class_name, params, summary.delta, children)


class Visualization:
    """Draws the module tree of ``plm`` (with any deltas attached to it).

    Args:
        plm: the model to draw.

    Raises:
        TypeError: ``plm`` is not a module.
    """

    def __init__(self, plm: nn.Module) -> None:
        if not isinstance(plm, nn.Module):
            raise TypeError(f"Visualization needs a torch.nn.Module, not {type(plm).__name__}")
        self.plm = plm

    def _root_summary(self, keep_non_params: bool) -> _Summary:
        summarizer = _Summarizer(delta_parameter_ids(self.plm), keep_non_params)
        # the root is drawn even when it has no parameters
        return summarizer.summarize(self.plm) or _Summary(type(self.plm).__name__, False, (), (), -1)

    def folded_tree(self, rootname: str = "root", keep_non_params: bool = False) -> FoldedModule:
        """The module tree that :meth:`structure_graph` draws, as data.

        Args:
            rootname: the label of the root node.
            keep_non_params: keep modules that have no parameter in their subtree.

        Returns:
            The root node. A node stands for every module whose dotted name takes one of ``names`` at
            each level from the root's children down to it.
        """
        return _folded(rootname, (), self._root_summary(keep_non_params))

    def structure_graph(
        self,
        rootname: str = "root",
        expand_params: bool = False,
        keep_non_params: bool = False,
        printTree: bool = True,
        console: Console | None = None,
    ) -> Tree:
        """Build the module tree and, by default, print it.

        Args:
            rootname: the name shown for the root module.
            expand_params: draw each parameter as a child node instead of inline in its module's label.
            keep_non_params: keep modules that have no parameter in their subtree (dropouts, activations).
            printTree: print the tree.
            console: where to print; default a new ``Console()`` on stdout, which writes plain text
                when stdout is not a terminal.

        Returns:
            The rich tree.
        """
        root = self._root_summary(keep_non_params)
        tree = Tree(_label(rootname, root, expand_params))
        _grow(tree, root, expand_params)
        if printTree:
            (console or Console()).print(tree)
        return tree

    def structure_text(self, rootname: str = "root", expand_params: bool = False, keep_non_params: bool = False) -> str:
        """The module tree as plain text (no styles, no line wrapping), e.g. for logs.

        Args:
            rootname: the name shown for the root module.
            expand_params: draw each parameter as a child node.
            keep_non_params: keep modules that have no parameter in their subtree.

        Returns:
            The drawing, one line per node.
        """
        tree = self.structure_graph(rootname, expand_params, keep_non_params, printTree=False)
        console = Console(record=True, width=_TEXT_WIDTH, file=io.StringIO())
        console.print(tree)
        return console.export_text(styles=False)
