"""Draw an extractor's captured graph with graphviz: what it stores, taps, edits and prunes.

The picture is built from :attr:`FeatureExtractor.graph_description` (plain data from capture),
so it shows the traced model with fxstore's marks rather than the rewritten code: a stored node
is filled blue, a gradient tap has a thick red border, an edited node is filled orange with a
double border, and the part ``keep_output=False`` cuts away is grey and dashed. ``depth=d``
collapses every module deeper than ``d`` levels into one box, and each run of connected plain ops
in a shallower module's own code into one box too; a selected node is always shown (inside a box
named after the module it was collapsed from).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .._workflows import register
from ..capture import CapturedNode, FeatureExtractor, GraphDescription
from ..errors import ConfigError
from . import _deps

__all__ = ["draw", "build", "STYLES", "FORMATS"]

FORMATS = ("svg", "png", "pdf", "dot", "gv")
"""File suffixes ``draw(path)`` accepts: the first three are rendered with ``dot``, the last two are the source."""
_SOURCE = ("dot", "gv")

STYLES: dict[str, dict[str, str]] = {
    "tapped": {"color": "#d62728", "penwidth": "3"},
    "edited": {"style": "filled", "fillcolor": "#fdae6b", "peripheries": "2"},
    "stored": {"style": "filled", "fillcolor": "#9ecae1"},
    "pruned": {"style": "dashed", "color": "#aaaaaa", "fontcolor": "#888888"},
    "python": {"shape": "component", "style": "filled", "fillcolor": "#fff2b3"},
    "collapsed": {"shape": "box3d", "style": "filled", "fillcolor": "#eeeeee"},
}
"""The graphviz attributes of each mark, applied from the last to the first (a node both stored and
edited is filled with both colours)."""

_LEGEND = {"stored": "stored feature", "tapped": "gradient tap", "edited": "edit", "pruned": "pruned (not run)",
           "collapsed": "collapsed module", "python": "kept as Python"}
_OPTIONS = ("features", "direction")
_SKIPPED_OPS = ("get_attr",)  # parameters and constants: every module reads some, and they say nothing new
_CHECKS = ("_assert", "aten._assert", "aten.sym_", "sym_size", "sym_constrain")  # shape checks and size reads


@register("draw")
def draw(extractor: FeatureExtractor, path: str | os.PathLike[str] | None = None, *, depth: int | None = None,
         **options: Any) -> Any:
    """Draw ``extractor``'s captured graph (a ``graphviz.Digraph``; written to ``path`` when given).

    Stored nodes, gradient taps, edits and the part cut by ``keep_output=False`` are marked (a
    legend says how); a node's label has its name, what it computes, its feature or gradient key
    and its shape where known (the export frontend knows every shape; ``features=`` adds the
    shapes of a call's stored values). The partial frontend's modules kept as Python are boxes
    around the traced parts they call.

    Args:
        extractor: The extractor (its current mode's program is drawn).
        path: Write the picture there: ``.svg``, ``.png`` or ``.pdf`` (rendered with graphviz's
            ``dot``), ``.dot`` or ``.gv`` (the source).
        depth: Collapse modules nested deeper than this many levels into one box each (``0``:
            the whole model; ``None``: every node).
        **options: ``features`` (the features dict of a call: stored shapes in the labels),
            ``direction`` (``"TB"``, top to bottom, the default, or ``"LR"``).

    Returns:
        The ``graphviz.Digraph`` (it renders inline in Jupyter; ``.source`` is its DOT text).

    Raises:
        ConfigError: an unknown option, a bad ``depth``, ``path`` or ``direction``, or graphviz
            (the Python package, or ``dot`` when rendering) missing; the hint says how to install it.

    Example:
        >>> import torchvision, fxstore
        >>> m = torchvision.models.resnet18()
        >>> ex = fxstore.FeatureExtractor(m, ["layer2"], grads=["layer1"], keep_output=False)
        >>> dot = ex.draw(depth=1)
        >>> type(dot).__name__, '"layer1.1.relu_1"' in dot.source, '"module layer3 pruned"' in dot.source
        ('Digraph', True, True)
    """
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        raise ConfigError(f"draw() got unknown options {unknown}.\nHint: the options are {list(_OPTIONS)}.")
    if depth is not None and (isinstance(depth, bool) or not isinstance(depth, int) or depth < 0):
        raise ConfigError(f"draw(depth={depth!r}) is not a number of module levels.\n"
                          "Hint: pass depth=None (every node) or an int >= 0 (1: the model's children).")
    direction = options.get("direction", "TB")
    if direction not in ("TB", "LR"):
        raise ConfigError(f"draw(direction={direction!r}) is not a direction.\nHint: use 'TB' or 'LR'.")
    suffix = _suffix(path) if path is not None else None
    digraph = build(extractor.graph_description, depth, _shapes(options.get("features")), direction)
    if path is not None:
        data = digraph.source.encode() if suffix in _SOURCE else _deps.rendered(digraph, suffix)
        Path(path).write_bytes(data)
    return digraph


def _suffix(path: str | os.PathLike[str]) -> str:
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix not in FORMATS:
        raise ConfigError(f"draw({str(path)!r}): cannot tell the format from the suffix '.{suffix}'.\n"
                          "Hint: end the path with .svg, .png, .pdf, .dot or .gv.")
    return suffix


def _shapes(features: Mapping[str, Any] | None) -> dict[str, tuple[int, ...]]:
    if features is None:
        return {}
    if not isinstance(features, Mapping):
        raise ConfigError(f"draw(features=...) takes a call's features dict, not {type(features).__name__}.\n"
                          "Hint: out, feats = ex(x); ex.draw(features=feats).")
    return {k: tuple(v.shape) for k, v in features.items() if hasattr(v, "shape") and not k.endswith(":grad")}


@dataclasses.dataclass
class _Box:
    """A drawn node: one traced node, or the collapsed rest of a module."""

    id: str
    label: str
    marks: tuple[str, ...]
    cluster: str | None


def build(description: GraphDescription, depth: int | None = None, shapes: Mapping[str, tuple[int, ...]] | None = None,
          direction: str = "TB") -> Any:
    """The ``graphviz.Digraph`` of a graph description (see :func:`draw`).

    Example:
        >>> import torchvision, fxstore
        >>> from fxstore.draw import build
        >>> m = torchvision.models.resnet18()
        >>> dot = build(fxstore.FeatureExtractor(m, ["fc"]).graph_description, depth=0)
        >>> print(*[line.strip() for line in dot.body if "->" in line and "legend" not in line], sep="\\n")
        fc -> output
        "module <model>" -> fc
        x -> "module <model>"
    """
    graphviz = _deps.graphviz()
    shapes = shapes or {}
    nodes = [n for n in description.nodes if n.op not in _SKIPPED_OPS and not _is_check(n)]
    python = _python_paths(description)
    boxes: dict[str, _Box] = {}  # node name -> its box (several nodes share a collapsed one)
    clusters: dict[str, tuple[str, str | None, dict[str, str]]] = {}  # id -> (label, parent, attributes)
    for path in python:  # a frame per module kept as Python, inside the frame of the one that calls it
        parent = _python_cluster(path.rpartition(".")[0], python) if path else None
        clusters[f"cluster_python {path}"] = (f"{path or 'the model'} ({description.modules[path]}): kept as Python",
                                              parent, {"style": "dashed,filled", "fillcolor": "#fffbe6"})
    counts: dict[tuple[str, bool], int] = {}
    with_selected: set[str] = set()
    for node in nodes:
        group = _group(node, depth)
        if group is not None and node.selected:
            with_selected.add(group)
        elif group is not None:
            counts[(group, node.pruned)] = counts.get((group, node.pruned), 0) + 1
    runs = _runs(nodes, depth)
    for node in nodes:
        group = _group(node, depth)
        outer = _python_cluster(node.module, python)
        if node.name in runs:
            box_id, count = runs[node.name]
            text = f"{node.module or 'the model'}: {count} ops" + (" (pruned)" if node.pruned else "")
            boxes[node.name] = _Box(box_id, text, ("collapsed", "pruned") if node.pruned else ("collapsed",), outer)
            continue
        if group is None:
            boxes[node.name] = _Box(_id(node.name), _label(node, shapes), _marks(node), outer)
            continue
        outer = _python_cluster(group, python)
        kind = description.modules.get(group, "Module")
        if node.selected:  # shown inside a cluster named after the module it was collapsed from
            cluster = f"cluster_module {group}"
            clusters.setdefault(cluster, (f"{group or 'the model'} ({kind})", outer, {"style": "rounded"}))
            boxes[node.name] = _Box(_id(node.name), _label(node, shapes), _marks(node), cluster)
            continue
        count = counts[(group, node.pruned)]
        box_id = f"module {group or '<model>'}{' pruned' if node.pruned else ''}"  # a space: never a node's name
        text = f"{group or 'the model'}\\n{kind}" + (" (pruned)" if node.pruned else "") + (
            f"\\n{count} ops" if count > 1 else "")
        cluster = f"cluster_module {group}" if group in with_selected else outer
        marks = ("collapsed", "pruned") if node.pruned else ("collapsed",)
        boxes[node.name] = _Box(box_id, text, marks, cluster)

    dot = graphviz.Digraph("fxstore", graph_attr={"rankdir": direction, "fontname": "Helvetica", "fontsize": "11"},
                           node_attr={"shape": "box", "fontname": "Helvetica", "fontsize": "10"},
                           edge_attr={"arrowsize": "0.6"})
    members: dict[str | None, list[_Box]] = {}
    for box in {b.id: b for b in boxes.values()}.values():
        members.setdefault(box.cluster, []).append(box)
    _emit(dot, None, members, clusters)
    edges: set[tuple[str, str, bool]] = set()
    for node in nodes:
        for source in node.inputs:
            if source in boxes and boxes[source].id != boxes[node.name].id:
                edges.add((boxes[source].id, boxes[node.name].id, node.pruned))
    for tail, head, pruned in sorted(edges):
        dot.edge(tail, head, **({"style": "dashed", "color": "#aaaaaa"} if pruned else {}))
    _legend(dot, description, depth)
    return dot


def _emit(graph: Any, cluster: str | None, members: dict[str | None, list[_Box]],
          clusters: dict[str, tuple[str, str | None, dict[str, str]]]) -> None:
    """Write ``cluster``'s boxes into ``graph``, then its child clusters as subgraphs."""
    for box in members.get(cluster, []):
        graph.node(box.id, box.label, **_attributes(box.marks))
    for child, (label, parent, attributes) in clusters.items():
        if parent == cluster:
            with graph.subgraph(name=child) as sub:
                sub.attr(label=label, **attributes)
                _emit(sub, child, members, clusters)


def _attributes(marks: tuple[str, ...]) -> dict[str, str]:
    attributes: dict[str, str] = {}
    styles: list[str] = []
    for mark in sorted(marks, key=list(STYLES).index, reverse=True):  # python, collapsed first: the base shape
        attributes.update(STYLES[mark])
        styles += [s for s in STYLES[mark].get("style", "").split(",") if s and s not in styles]
    if styles:
        attributes["style"] = ",".join(styles)
    if "stored" in marks and "edited" in marks:
        attributes.update(style="striped", fillcolor=f"{STYLES['stored']['fillcolor']}:{STYLES['edited']['fillcolor']}")
    return attributes


def _marks(node: CapturedNode) -> tuple[str, ...]:
    marks = [("stored", node.keys), ("tapped", node.grad_keys), ("edited", node.edit), ("pruned", node.pruned),
             ("python", node.op == "python")]
    return tuple(mark for mark, on in marks if on)


def _label(node: CapturedNode, shapes: Mapping[str, tuple[int, ...]]) -> str:
    kind = {"placeholder": "input", "output": "output", "python": f"{node.target} (Python)"}
    lines = [node.name, kind.get(node.op, node.target)]
    shape = node.shape
    for key in node.keys:
        shape = shapes.get(key, shape)
        lines.append(f"stored: {key}")
    lines += [f"grad: {key}" for key in node.grad_keys]
    if node.edit:
        lines.append(f"edit: {node.edit}")
    if shape is not None:
        lines.append("(" + ", ".join(str(s) for s in shape) + ")")
    return "\\n".join(line.replace("\\", "\\\\") for line in lines)


def _is_check(node: CapturedNode) -> bool:
    """An assertion or a size read: export graphs hold many, and none computes a value worth a box."""
    return node.op == "call_function" and not node.selected and node.target.startswith(_CHECKS)


def _group(node: CapturedNode, depth: int | None) -> str | None:
    """The module ``node`` is collapsed into at ``depth`` (``None``: drawn as itself)."""
    if depth is None or node.op == "python" or (node.op in ("placeholder", "output") and not node.module):
        return None
    parts = node.module.split(".") if node.module else []
    return ".".join(parts[:depth]) if len(parts) >= depth else None


def _runs(nodes: list[CapturedNode], depth: int | None) -> dict[str, tuple[str, int]]:
    """With a depth, the connected plain ops of one module's own code drawn as one box each.

    A Hugging Face model builds its attention mask from dozens of ``arange``/``cumsum``/``index``
    ops in its own ``forward``, above the modules a depth collapses. Returns node name -> (box id,
    number of ops) for every run of two or more unselected ops (a run never mixes pruned and kept ops).
    """
    if depth is None:
        return {}
    plain = {n.name: n for n in nodes
             if n.op in ("call_function", "call_method") and not n.selected and _group(n, depth) is None}
    parent = {name: name for name in plain}

    def find(name: str) -> str:
        while parent[name] != name:
            parent[name] = parent[parent[name]]
            name = parent[name]
        return name

    for node in plain.values():
        for source in node.inputs:
            other = plain.get(source)
            if other is not None and other.module == node.module and other.pruned == node.pruned:
                parent[find(source)] = find(node.name)
    members: dict[str, list[str]] = {}
    for name in plain:
        members.setdefault(find(name), []).append(name)
    return {name: (f"ops {names[0]}", len(names)) for names in members.values() if len(names) > 1 for name in names}


def _python_paths(description: GraphDescription) -> list[str]:
    return [p for p in description.python_modules if p in description.modules]


def _python_cluster(module: str, python: list[str]) -> str | None:
    """The cluster of the innermost module kept as Python that contains ``module``."""
    inside = [p for p in python if p == "" or module == p or module.startswith(p + ".")]
    return f"cluster_python {max(inside, key=len)}" if inside else None


def _id(name: str) -> str:
    return name.replace(":", "_")  # ':' would read as a port in an edge


def _legend(dot: Any, description: GraphDescription, depth: int | None) -> None:
    shown = ["stored", "tapped", "edited", "pruned"]
    if depth is not None:
        shown.append("collapsed")
    if description.python_modules:
        shown.append("python")
    with dot.subgraph(name="cluster_legend") as legend:
        legend.attr(label="legend", style="rounded", color="#999999")
        for mark in shown:
            legend.node(f"legend {mark}", _LEGEND[mark], **_attributes((mark,)))
        for a, b in zip(shown, shown[1:]):
            legend.edge(f"legend {a}", f"legend {b}", style="invis")
