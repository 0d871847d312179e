"""What a capture did to the traced graph, as plain data: stored, tapped, edited and pruned nodes.

Every frontend takes a :class:`Snapshot` of its traced graph *before* the rewrite (the passes change
the graph in place) and turns it into a :class:`GraphDescription` after it, where a node the pruning
removed is marked ``pruned``. The description is read-only and knows nothing of drawing: the
drawing workflow (``fxstore/draw``) reads it through ``FeatureExtractor.graph_description``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import fx, nn

from ._selection import Selected
from ._tracing import Traced

__all__ = ["CapturedNode", "GraphDescription", "Snapshot"]


@dataclasses.dataclass(frozen=True)
class CapturedNode:
    """One node of the traced graph and what the capture did with it.

    Attributes:
        name: Its selectable name (``fxstore.node_names``), unique in the description.
        op: The fx op: ``placeholder``, ``call_module``, ``call_function``, ``call_method``,
            ``get_attr`` or ``output``; ``python`` for a module the partial frontend kept as Python.
        target: What it computes, readable (``Conv2d``, ``add``, ``aten.addmm.default``).
        module: Path of the innermost module whose code made it (``""``: the model's own forward).
        inputs: Names of the nodes it reads, in order.
        shape: The value's shape where the frontend knows it (export: symbolic sizes as text).
        keys: Feature keys stored from it.
        grad_keys: Keys of the gradients tapped at it (``key + ":grad"``).
        edit: The type of the edit that replaces its value (``"Add"``, ``"Scale"``, ...), if any.
        pruned: Removed with the part of the graph the outputs do not need (``keep_output=False``).
    """

    name: str
    op: str
    target: str
    module: str
    inputs: tuple[str, ...]
    shape: tuple[int | str, ...] | None = None
    keys: tuple[str, ...] = ()
    grad_keys: tuple[str, ...] = ()
    edit: str | None = None
    pruned: bool = False

    @property
    def selected(self) -> bool:
        """Stored, tapped or edited: a node a drawing always shows."""
        return bool(self.keys or self.grad_keys or self.edit)


@dataclasses.dataclass(frozen=True)
class GraphDescription:
    """The captured graph of one mode: its nodes in graph order and the model's modules.

    Attributes:
        frontend: ``"fx"``, ``"export"`` or ``"partial"``.
        nodes: Every traced node (for ``"partial"``: every traced part's, then one ``python`` node
            per module kept as Python).
        modules: Path -> type name of every module of the model (``""``: the model).
        python_modules: For ``"partial"``: path of a module kept as Python -> why fx could not trace it.

    Example:
        >>> import torch, torchvision, fxstore
        >>> m = torchvision.models.resnet18()
        >>> ex = fxstore.FeatureExtractor(m, ["layer1"], grads=["layer2"], keep_output=False)
        >>> d = ex.graph_description
        >>> [(n.name, n.keys, n.grad_keys) for n in d.nodes if n.selected]
        [('layer1.1.relu_1', ('layer1',), ()), ('layer2.1.relu_1', (), ('layer2:grad',))]
        >>> d.node("fc").pruned, d.node("layer1.0.conv1").module
        (True, 'layer1.0.conv1')
    """

    frontend: str
    nodes: tuple[CapturedNode, ...]
    modules: Mapping[str, str]
    python_modules: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def node(self, name: str) -> CapturedNode:
        """The node called ``name`` (``KeyError`` if there is none)."""
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(name)


class Snapshot:
    """The traced graph's nodes before the rewrite, with the capture's marks.

    Args:
        frontend: The frontend's name.
        model: The user's model (module paths and types).
        graphs: ``(traced, prefix)`` per traced graph (the partial frontend has several; the prefix
            is the path of the module the graph was traced from).
        selected: The stored nodes; ``tapped``: the nodes whose gradients are tapped.
        edits: ``{node: type name of its edit}``.
        python: For ``"partial"``: path of a module kept as Python -> its stand-in node.
    """

    def __init__(self, frontend: str, model: nn.Module, graphs: Iterable[tuple[Traced, str]],
                 selected: list[Selected], tapped: list[Selected], edits: Mapping[fx.Node, str],
                 python: Mapping[str, fx.Node] | None = None) -> None:
        self.frontend = frontend
        self.modules = {path: type(module).__name__ for path, module in model.named_modules()}
        keys: dict[fx.Node, tuple[str, ...]] = {}
        for s in selected:
            keys[s.node] = keys.get(s.node, ()) + (s.key,)
        grads: dict[fx.Node, tuple[str, ...]] = {}
        for s in tapped:
            grads[s.node] = grads.get(s.node, ()) + (s.key + ":grad",)
        self.entries: list[tuple[fx.Node | None, CapturedNode]] = []
        taken: set[str] = set()
        for traced, prefix in graphs:
            names = {node: _unique(_join(prefix, traced.names.get(node, node.name)), taken)
                     for node in traced.graph.nodes}
            for node in traced.graph.nodes:
                module = self._module(node, prefix, traced.names.get(node, node.name))
                info = CapturedNode(
                    name=names[node], op=node.op, target=_target(node, traced.root), module=module,
                    inputs=tuple(names[i] for i in node.all_input_nodes if i in names), shape=_shape(node),
                    keys=keys.get(node, ()), grad_keys=grads.get(node, ()), edit=edits.get(node))
                self.entries.append((node, info))
        for path, node in (python or {}).items():
            info = CapturedNode(name=_unique(path, taken), op="python", target=self.modules.get(path, "Module"),
                                module=path, inputs=(), keys=keys.get(node, ()), grad_keys=grads.get(node, ()),
                                edit=edits.get(node))
            self.entries.append((None, info))

    def _module(self, node: fx.Node, prefix: str, name: str) -> str:
        """The innermost module whose code made ``node``."""
        stack = node.meta.get("nn_module_stack")
        if stack:
            for path, _ in reversed(list(stack.values())):
                path = path if isinstance(path, str) else ""
                if _join(prefix, path) in self.modules:
                    return _join(prefix, path)
        if node.op == "call_module" and isinstance(node.target, str) and _join(prefix, node.target) in self.modules:
            return _join(prefix, node.target)
        parts = name.split(".")
        for end in range(len(parts) - 1, 0, -1):
            if _join(prefix, ".".join(parts[:end])) in self.modules:
                return _join(prefix, ".".join(parts[:end]))
        return prefix

    def describe(self, graphs: Iterable[fx.Graph] = (), python_modules: Mapping[str, str] | None = None
                 ) -> GraphDescription:
        """The description after the rewrite: a node no longer in any of ``graphs`` was pruned.

        Without ``graphs`` (the partial frontend, which never prunes) nothing is marked pruned.
        """
        alive = {node for graph in graphs for node in graph.nodes}
        # the rewrite replaces the output node; the model's output survives unless keep_output=False dropped it
        returned = any(n.op == "output" and n.args[0][0] is not None for n in alive)
        nodes = tuple(info if node is None or not alive or node in alive or (node.op == "output" and returned)
                      else dataclasses.replace(info, pruned=True) for node, info in self.entries)
        return GraphDescription(self.frontend, nodes, dict(self.modules), dict(python_modules or {}))


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


def _unique(name: str, taken: set[str]) -> str:
    candidate, i = name, 1
    while candidate in taken:
        candidate, i = f"{name}#{i}", i + 1
    taken.add(candidate)
    return candidate


def _target(node: fx.Node, root: nn.Module) -> str:
    if node.op == "call_module":
        try:
            return type(root.get_submodule(str(node.target))).__name__
        except AttributeError:
            return str(node.target)
    if node.op == "call_function":
        if isinstance(node.target, torch._ops.OpOverload):
            return str(node.target)
        return getattr(node.target, "__name__", str(node.target))
    return str(node.target)


def _shape(node: fx.Node) -> tuple[int | str, ...] | None:
    value: Any = node.meta.get("val", node.meta.get("tensor_meta"))
    shape = getattr(value, "shape", None)
    if shape is None:
        return None
    return tuple(int(s) if isinstance(s, int) else str(s) for s in shape)
