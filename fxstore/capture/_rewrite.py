"""Graph passes: gradient taps, in-place protection, storage policy, outputs, pruning.

Each pass takes an ``fx.Graph`` and changes it in place. Together they turn a traced
model into ``forward(x) -> (output, (feature, ...), (ticket, ...))``. For a resnet with
``layer1`` selected, gradients tapped at ``layer1`` and the final output dropped, the
generated code reads (abridged)::

    def forward(self, x):
        anchor = fxstore_capture__taps_anchor()
        conv1 = self.conv1(x)
        ...
        layer1_2_relu_2 = getattr(self.layer1, "2").relu(add_2)
        tap = fxstore_capture__taps_tap(layer1_2_relu_2, anchor)
        getitem = tap[0]
        getitem_1 = tap[1];  tap = None
        return (None, (layer1_2_relu_2,), (getitem_1,))
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx, nn

from . import _edit_pass, _taps
from ._alias import AliasAnalysis
from ._policy import StoragePolicy

__all__ = ["add_grad_taps", "store_features", "set_outputs", "prune", "capture", "code_module"]


def add_grad_taps(graph: fx.Graph, nodes: Sequence[fx.Node]) -> dict[fx.Node, fx.Node]:
    """Insert a gradient tap (:func:`~._taps.tap`) after each node; consumers read its copy.

    Returns:
        The ticket node of each tapped node (returned among the features).
    """
    tickets: dict[fx.Node, fx.Node] = {}
    if not nodes:
        return tickets
    first = next(n for n in graph.nodes if n.op != "placeholder")
    with graph.inserting_before(first):
        anchor = graph.call_function(_taps.anchor, ())
    for node in nodes:
        if node in tickets:
            continue
        with graph.inserting_after(node):
            tap = graph.call_function(_taps.tap, (node, anchor))
        with graph.inserting_after(tap):
            tapped = graph.call_function(operator.getitem, (tap, 0))
        with graph.inserting_after(tapped):
            ticket = graph.call_function(operator.getitem, (tap, 1))
        own = (tap, tapped, ticket)
        node.replace_all_uses_with(tapped, delete_user_cb=lambda user, own=own: user not in own)
        tickets[node] = ticket
    return tickets


def store_features(
    graph: fx.Graph, nodes: Sequence[fx.Node], analysis: AliasAnalysis, policy: StoragePolicy
) -> dict[fx.Node, fx.Node]:
    """Build, right after each selected node, the value that will be stored.

    The chain is the policy's (``detach -> clone (only if overwritten later) -> transform
    -> dtype -> device``); each step is a graph node, so ``torch.compile`` can fuse the casts.

    Returns:
        The stored value's node for each selected node.
    """
    stored: dict[fx.Node, fx.Node] = {}
    for node in nodes:
        if node in stored:
            continue
        value = node
        for target, extra, kwargs, is_method in policy.steps(analysis.overwritten_later(node)):
            with graph.inserting_after(value):
                if is_method:
                    value = graph.call_method(target, (value, *extra), kwargs)
                else:
                    value = graph.call_function(target, (value, *extra), kwargs)
        stored[node] = value
    return stored


def set_outputs(graph: fx.Graph, features: Sequence[fx.Node], tickets: Sequence[fx.Node], keep_output: bool) -> None:
    """Replace the graph's output with ``(output or None, features, tickets)``."""
    output = next(node for node in reversed(graph.nodes) if node.op == "output")
    original = output.args[0] if keep_output else None
    with graph.inserting_before(output):
        graph.output((original, tuple(features), tuple(tickets)))
    graph.erase_node(output)


def _has_side_effects(node: fx.Node) -> bool:
    """Side effects that must survive pruning (asserts, prints); RNG use past the cut may go."""
    try:
        return node.is_impure(impure_random=False)
    except TypeError:  # torch versions before the ``impure_random`` argument
        return node.is_impure()


_GUARD_NAMES = ("_assert", "assert", "sym_constrain_range")


def _is_guard(node: fx.Node) -> bool:
    """An assertion: a side effect that only checks values (``torch._assert``, ATen's ``_assert_*``)."""
    if node.op != "call_function":
        return False
    target = node.target
    name = getattr(target, "__name__", "") if not isinstance(target, torch._ops.OpOverload) else target._opname
    return name.startswith(_GUARD_NAMES)


def _live(graph: fx.Graph, analysis: AliasAnalysis, guards: set[fx.Node]) -> set[fx.Node]:
    """Nodes needed by the output, by side effects other than assertions, and by ``guards``."""
    live: set[fx.Node] = set()
    read_later: set[fx.Node] = set()
    for node in reversed(graph.nodes):
        written = analysis.written_by(node)
        keep = (
            node.op in ("placeholder", "output")
            or node in guards
            or any(user in live for user in node.users)
            or (written is not None and analysis.find(written) in read_later)
            or (node.op == "call_function" and not _is_guard(node) and _has_side_effects(node))
        )
        if keep:
            live.add(node)
            read_later.update(analysis.find(arg) for arg in node.all_input_nodes)
    return live


def _guards_of_live_values(graph: fx.Graph, live: set[fx.Node]) -> set[fx.Node]:
    """The assertions that check only values ``live`` computes anyway.

    A node outside ``live`` is *guard-only* when it is used, only by assertions or other
    guard-only nodes, and reads no module or parameter (``dim = x.dim(); eq = dim == 3``
    before ``_assert(eq)``; ``(x >= 0).all()``). An assertion is kept when everything it needs
    beyond ``live`` is guard-only. One that needs a value also used by the dropped part of the
    model (the next block's input check of a ViT encoder past the cut), or a layer's output
    that only the dropped model output used, guards the dropped part and goes with it.
    """
    guard_only: set[fx.Node] = set()
    for node in reversed(graph.nodes):
        if (node not in live and node.users and not _reads_model_state(node)
                and all(_is_guard(u) or u in guard_only for u in node.users)):
            guard_only.add(node)
    kept: set[fx.Node] = set()
    for node in graph.nodes:
        if not _is_guard(node) or not _has_side_effects(node):
            continue
        stack, seen = list(node.all_input_nodes), set()
        while stack:
            needed = stack.pop()
            if needed in live or needed in seen:
                continue
            if needed not in guard_only:
                break
            seen.add(needed)
            stack.extend(needed.all_input_nodes)
        else:
            kept.add(node)
    return kept


def _reads_model_state(node: fx.Node) -> bool:
    """A module call or an op on a parameter/buffer: model computation, never part of a check."""
    return node.op in ("call_module", "get_attr") or any(arg.op == "get_attr" for arg in node.all_input_nodes)


def prune(graph: fx.Graph, analysis: AliasAnalysis) -> None:
    """Remove every node the outputs do not need.

    Unlike ``Graph.eliminate_dead_code`` this keeps an in-place op whose result is unused
    but whose written memory a live node reads later (``x.relu_(); return x``), and drops
    in-place ops past the cut, so truncated extraction really runs less of the model.
    Assertions stay when they check values the outputs need (an input-shape check before
    the kept part still raises) and go when they check only values past the cut, which
    would otherwise keep the whole model alive (each ViT encoder block asserts on its input).
    """
    live = _live(graph, analysis, set())
    guards = _guards_of_live_values(graph, live)
    if guards:
        live = _live(graph, analysis, guards)
    for node in reversed(list(graph.nodes)):
        if node not in live:
            graph.erase_node(node)


def capture(
    graph: fx.Graph,
    root: nn.Module,
    features: Sequence[fx.Node],
    taps: Sequence[fx.Node],
    policy: StoragePolicy,
    edits: dict[fx.Node, tuple[str, str]] | None = None,
) -> None:
    """All passes in order: edits, tap gradients, store features, set the outputs, prune.

    Args:
        graph: The traced graph, changed in place.
        root: The module owning the graph's ``call_module`` targets.
        features: Nodes to store, in key order.
        taps: Nodes whose gradients are tapped, in key order.
        policy: The storage policy (``keep_output`` included).
        edits: ``{node: (edit module name, site label)}`` (:func:`~._edit_pass.edit_sites`);
            features and taps of an edited node read its edited value.

    Raises:
        EditError: an edit that nothing returned depends on.
    """
    sites = edits or {}
    edited = _edit_pass.insert_edits(graph, sites)
    features = [edited.get(n, n) for n in features]
    taps = [edited.get(n, n) for n in taps]
    tickets = add_grad_taps(graph, taps)
    stored = store_features(graph, features, AliasAnalysis(graph, root), policy)
    set_outputs(graph, [stored[n] for n in features], [tickets[n] for n in taps], policy.keep_output)
    prune(graph, AliasAnalysis(graph, root))
    _edit_pass.check_kept(graph, edited, sites)
    graph.lint()


def code_module(graph: fx.Graph) -> fx.GraphModule:
    """A GraphModule used only to generate (and pickle) the code of ``graph``.

    Its attributes are empty placeholders: the code runs with the extractor (or a shadow
    of a submodule) as ``self``, so every module and tensor is looked up on live objects.
    """
    targets: dict[str, Any] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            targets[node.target] = nn.Module()
        elif node.op == "get_attr":
            targets[node.target] = torch.empty(0)
    return fx.GraphModule(targets, graph, "FxStoreProgram")
