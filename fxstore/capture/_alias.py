"""Which graph values may share memory, and which nodes write into them in place.

Hooks store a tensor and a later ``ReLU(inplace=True)`` overwrites it. fxstore instead
looks at the graph: values connected by view-like operations form an alias class, and a
selected value that is written to (through any member of its class) after it is produced
gets cloned. The same analysis keeps dead-code elimination from dropping an in-place op
whose effect a live node reads later.
"""

from __future__ import annotations

import functools
import inspect
import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

__all__ = ["AliasAnalysis"]

# Tensor methods whose result may share memory with ``self``.
_VIEW_METHODS = frozenset(
    """view view_as reshape reshape_as flatten unflatten squeeze unsqueeze transpose permute t
    expand expand_as narrow select unfold split split_with_sizes chunk unbind tensor_split diagonal
    movedim moveaxis swapaxes swapdims as_strided contiguous detach __getitem__ real imag to type
    float half double bfloat16 int long cpu cuda requires_grad_ align_to refine_names rename
    view_as_real view_as_complex squeeze_ unsqueeze_ transpose_ t_ as_strided_ detach_ mT mH T H
    values indices""".split()
)
_VIEW_FUNCTIONS: frozenset[Callable[..., Any]] = frozenset(
    {
        operator.getitem, getattr, torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze,
        torch.transpose, torch.permute, torch.t, torch.narrow, torch.select, torch.split, torch.chunk,
        torch.unbind, torch.tensor_split, torch.movedim, torch.moveaxis, torch.swapaxes, torch.swapdims,
        torch.diagonal, torch.as_strided, torch.detach, torch.view_as_real, torch.view_as_complex,
        torch.broadcast_to, torch.atleast_1d, torch.atleast_2d, torch.atleast_3d,
        F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
    }
)
# Modules whose output may be their input (or a view of it).
_VIEW_MODULES = (nn.Identity, nn.Flatten, nn.Unflatten, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
                 nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout, nn.Sequential)
_INPLACE_OPERATORS = frozenset(
    {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv, operator.imod,
     operator.ipow, operator.iand, operator.ior, operator.ixor, operator.ilshift, operator.irshift,
     operator.imatmul, operator.setitem}
)


@functools.cache
def _signature(fn: Callable[..., Any]) -> inspect.Signature | None:
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):
        return None


class AliasAnalysis:
    """Alias classes and in-place writes of one graph.

    Args:
        graph: The graph to analyse (read only).
        root: The module that owns the graph's ``call_module`` targets.
    """

    def __init__(self, graph: fx.Graph, root: nn.Module) -> None:
        self._root = root
        self._parent: dict[fx.Node, fx.Node] = {}
        self._order: dict[fx.Node, int] = {}
        self._writes: dict[fx.Node, fx.Node] = {}
        for index, node in enumerate(graph.nodes):
            self._order[node] = index
            source = self._view_source(node)
            if source is not None:
                self._union(node, source)
            written = self._written_value(node)
            if written is not None:
                self._writes[node] = written
                if node.op in ("call_module", "call_method") or isinstance(node.target, torch._ops.OpOverload):
                    self._union(node, written)  # ``relu_`` returns the tensor it wrote to
        self._write_positions: dict[fx.Node, list[int]] = {}
        for node, written in self._writes.items():
            self._write_positions.setdefault(self.find(written), []).append(self._order[node])

    def find(self, node: fx.Node) -> fx.Node:
        """The representative of ``node``'s alias class."""
        parent = self._parent.get(node, node)
        if parent is node:
            return node
        root = self.find(parent)
        self._parent[node] = root
        return root

    def written_by(self, node: fx.Node) -> fx.Node | None:
        """The value ``node`` writes into in place, if any."""
        return self._writes.get(node)

    def overwritten_later(self, node: fx.Node) -> bool:
        """Whether some node after ``node`` writes into memory ``node`` may share."""
        position = self._order[node]
        return any(p > position for p in self._write_positions.get(self.find(node), ()))

    def _union(self, a: fx.Node, b: fx.Node) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra is not rb:
            self._parent[ra] = rb

    def _view_source(self, node: fx.Node) -> fx.Node | None:
        first = node.args[0] if node.args else None
        if not isinstance(first, fx.Node):
            return None
        if isinstance(node.target, torch._ops.OpOverload):
            return _aten_view_source(node)
        if node.op == "call_method" and node.target in _VIEW_METHODS:
            return first
        if node.op == "call_function" and node.target in _VIEW_FUNCTIONS:
            return first
        if node.op == "call_module":
            module = self._module(node)
            if isinstance(module, _VIEW_MODULES):
                return first
        return None

    def _written_value(self, node: fx.Node) -> fx.Node | None:
        out = node.kwargs.get("out")
        if isinstance(out, fx.Node):
            return out
        first = node.args[0] if node.args else None
        if not isinstance(first, fx.Node):
            return None
        if node.op == "call_module":
            return first if getattr(self._module(node), "inplace", False) is True else None
        if node.op == "call_method":
            name = str(node.target)
            if name == "__setitem__" or (name.endswith("_") and not name.startswith("_")):
                return first
            return None
        if node.op != "call_function":
            return None
        target = node.target
        if isinstance(target, torch._ops.OpOverload):
            return _aten_written(node)
        if target in _INPLACE_OPERATORS:
            return first
        name = getattr(target, "__name__", "")
        if name.endswith("_") and not name.startswith("_"):
            return first
        if node.kwargs.get("inplace") is True:
            return first
        signature = _signature(target) if callable(target) else None
        if signature is not None and "inplace" in signature.parameters:
            try:
                bound = signature.bind(*node.args, **node.kwargs)
            except TypeError:
                return None
            if bound.arguments.get("inplace") is True:
                return first
        return None

    def _module(self, node: fx.Node) -> nn.Module | None:
        try:
            return self._root.get_submodule(str(node.target))
        except AttributeError:
            return None


# -- ATen operators (the torch.export frontend): read the schema's alias annotations -----------


def _aten_arguments(node: fx.Node) -> list[tuple[torch._C.Argument, Any]]:
    """``(schema argument, value)`` pairs of an ATen call, keyword arguments included."""
    schema = node.target._schema  # type: ignore[union-attr]
    pairs = []
    for index, argument in enumerate(schema.arguments):
        if index < len(node.args):
            pairs.append((argument, node.args[index]))
        elif argument.name in node.kwargs:
            pairs.append((argument, node.kwargs[argument.name]))
    return pairs


def _aten_view_source(node: fx.Node) -> fx.Node | None:
    """The input a view op (``Tensor(a) self -> Tensor(a)``) returns an alias of."""
    returned = {a for r in node.target._schema.returns if r.alias_info is not None  # type: ignore[union-attr]
                for a in r.alias_info.before_set}
    for argument, value in _aten_arguments(node):
        info = argument.alias_info
        if info is not None and not info.is_write and returned & set(info.before_set) and isinstance(value, fx.Node):
            return value
    return None


def _aten_written(node: fx.Node) -> fx.Node | None:
    """The input an in-place or ``out=`` op (``Tensor(a!) self``) writes into."""
    for argument, value in _aten_arguments(node):
        if argument.alias_info is not None and argument.alias_info.is_write and isinstance(value, fx.Node):
            return value
    return None
