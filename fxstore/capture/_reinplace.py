"""Give back the in-place adds torch.fx drops: ``out += identity`` traced as ``add(out, identity)``.

A ``torch.fx`` proxy has no ``__iadd__``, so a residual block's ``out += identity`` is recorded
as an out-of-place ``operator.add`` and the rewritten graph allocates one more feature map
per block than the model does. :func:`reinplace` turns such an ``add`` (or ``sub``) back into
a write into its left operand wherever the graph proves it safe:

- the left operand is a fresh tensor: the output of an op that allocates its result and does
  not keep it for backward (a convolution, a linear layer, a normalisation, an arithmetic op:
  see ``_FRESH_MODULES``/``_FRESH_FUNCTIONS``/``_FRESH_METHODS``), so it is never a graph input,
  a parameter, a buffer, a view of one, or a tensor autograd saved;
- the ``add`` is the only reader of that value and of everything the alias analysis puts in
  its class, so nothing later sees the overwritten value, and no earlier op saved it for
  backward; a stored feature is read by the graph's output, so it is never overwritten.

What only the call knows (shapes, dtypes, strides, autograd state) is checked when it runs by
:func:`add_` / :func:`sub_`: they write in place when the result is exactly what the
out-of-place op returns (same dtype, shape and strides) and fall back to the out-of-place op
otherwise. Under ``torch.compile`` and ``torch.export`` they are the plain out-of-place op
(inductor reinplaces by itself, and a program must not specialise on those checks). For a
resnet block the generated code changes from ``add = operator.add(bn3, relu)`` to::

    add = fxstore_capture__reinplace_add_(layer1_0_bn3, relu)
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from . import _taps
from ._alias import AliasAnalysis

__all__ = ["reinplace", "add_", "sub_"]

# Modules (exact types: a subclass may return anything) whose output is newly allocated and
# not saved for backward (they save their input, weights and statistics, never their output).
_FRESH_MODULES = frozenset(
    {nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear,
     nn.Bilinear, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.LayerNorm, nn.GroupNorm,
     nn.RMSNorm, nn.Embedding}
)
_FRESH_FUNCTIONS: frozenset[Callable[..., Any]] = frozenset(
    {operator.add, operator.sub, operator.mul, operator.truediv, operator.matmul, torch.add, torch.sub,
     torch.mul, torch.matmul, torch.cat, F.linear, F.conv1d, F.conv2d, F.conv3d, F.layer_norm, F.batch_norm,
     F.group_norm}
)
_FRESH_METHODS = frozenset({"add", "sub", "mul", "div", "matmul"})


def add_(a: Any, b: Any) -> Any:
    """``a + b``, written into ``a`` when that gives the same tensor (the in-place form of ``operator.add``).

    Example:
        >>> a = torch.ones(2, 3)
        >>> add_(a, torch.ones(2, 3)) is a
        True
        >>> add_(torch.ones(3), torch.ones(2, 3)).shape  # broadcasts past ``a``: out of place
        torch.Size([2, 3])
        >>> add_(a, torch.ones(2, 3, dtype=torch.float64)).dtype  # promotes: out of place
        torch.float64
    """
    return operator.iadd(a, b) if _writable(a, b) else operator.add(a, b)


def sub_(a: Any, b: Any) -> Any:
    """``a - b``, written into ``a`` when that gives the same tensor (the in-place form of ``operator.sub``).

    Example:
        >>> a = torch.ones(2)
        >>> sub_(a, 1.0) is a, a
        (True, tensor([0., 0.]))
    """
    return operator.isub(a, b) if _writable(a, b) else operator.sub(a, b)


_REPLACEMENTS: dict[Any, Callable[[Any, Any], Any]] = {operator.add: add_, operator.sub: sub_, torch.add: add_,
                                                        torch.sub: sub_, "add": add_, "sub": sub_}


def _writable(a: Any, b: Any) -> bool:
    """Whether ``a op= b`` returns exactly what ``a op b`` would, and autograd allows it."""
    if torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return False
    if type(a) is not torch.Tensor or a.is_leaf and a.requires_grad and torch.is_grad_enabled():
        return False
    if isinstance(b, (bool, int, float)):
        return torch.result_type(a, b) == a.dtype
    if type(b) is not torch.Tensor or b.device != a.device or torch.result_type(a, b) != a.dtype:
        return False
    dense = a.is_contiguous() or (a.dim() == 4 and a.is_contiguous(memory_format=torch.channels_last))
    if not dense:
        return False
    if b.numel() == 1 and b.dim() <= a.dim():  # a scalar tensor: the result takes ``a``'s layout
        return True
    return b.shape == a.shape and b.stride() == a.stride()  # same layout: so is the out-of-place result


def reinplace(graph: fx.Graph, root: nn.Module) -> int:
    """Rewrite each out-of-place ``add``/``sub`` whose left operand nobody else reads into :func:`add_`/:func:`sub_`.

    Run it after the capture passes, so stored values are read by the output and stay intact.

    Args:
        graph: The rewritten graph, changed in place.
        root: The module owning the graph's ``call_module`` targets.

    Returns:
        How many nodes were rewritten.

    Example:
        >>> import torchvision
        >>> gm = torch.fx.symbolic_trace(torchvision.models.resnet18())
        >>> reinplace(gm.graph, gm)  # the 8 residual ``out += identity``
        8
    """
    analysis = AliasAnalysis(graph, root)
    order = {node: index for index, node in enumerate(graph.nodes)}
    members: dict[fx.Node, list[fx.Node]] = {}
    for node in graph.nodes:
        members.setdefault(analysis.find(node), []).append(node)
    count = 0
    for node in list(graph.nodes):
        replacement = _replacement(node)
        if replacement is None:
            continue
        left, right = node.args
        if left is right or not _fresh(left, root) or set(left.users) != {node}:
            continue
        # A tap's copy is a fresh clone; the analysis puts it in one class with the tap's ticket.
        aliases = [left] if _is_tap_copy(left) else members[analysis.find(left)]
        if any(m.op in ("placeholder", "get_attr") for m in aliases):
            continue
        if any(order[user] > order[node] for m in aliases for user in m.users):
            continue
        with graph.inserting_after(node):
            new = graph.call_function(replacement, (left, right))
        node.replace_all_uses_with(new)
        new.meta.update(node.meta)
        graph.erase_node(node)
        count += 1
    if count:
        graph.lint()
    return count


def _replacement(node: fx.Node) -> Callable[[Any, Any], Any] | None:
    """The in-place form of ``node`` if it is a two-operand ``add``/``sub`` on a node, else ``None``."""
    if node.kwargs or len(node.args) != 2 or not isinstance(node.args[0], fx.Node):
        return None
    if node.op == "call_function" and node.target in (operator.add, operator.sub, torch.add, torch.sub):
        return _REPLACEMENTS[node.target]
    if node.op == "call_method" and node.target in ("add", "sub"):
        return _REPLACEMENTS[node.target]
    return None


def _fresh(node: fx.Node, root: nn.Module) -> bool:
    """Whether ``node``'s value is newly allocated by an op that does not save it for backward."""
    if node.op == "call_module":
        try:
            return type(root.get_submodule(str(node.target))) in _FRESH_MODULES
        except AttributeError:
            return False
    if node.op == "call_function":
        return _is_tap_copy(node) or node.target in _FRESH_FUNCTIONS
    if node.op == "call_method":
        return node.target in _FRESH_METHODS
    return False


def _is_tap_copy(node: fx.Node) -> bool:
    """``tap(v, anchor)[0]``: a gradient tap's copy of ``v`` (its backward saves only the ticket)."""
    source = node.args[0] if node.op == "call_function" and node.target is operator.getitem else None
    return (isinstance(source, fx.Node) and source.target is _taps.tap
            and node.args[1] == 0)
