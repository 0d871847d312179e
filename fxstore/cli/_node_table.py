"""The table behind ``fxstore nodes``: every selectable node, its kind and output shape."""

from __future__ import annotations

import contextlib
import fnmatch
import io
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from ..capture import TraceOptions, trace
from ..errors import ConfigError, TraceError

__all__ = ["node_rows", "format_table"]


def _kind(node: fx.Node, root: nn.Module) -> str:
    if node.op == "call_module":
        return type(root.get_submodule(str(node.target))).__name__
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    if node.op == "call_method":
        return f".{node.target}()"
    return {"placeholder": "input", "get_attr": "attribute", "output": "output"}.get(node.op, node.op)


def _shape(node: fx.Node) -> str:
    meta = node.meta.get("tensor_meta")
    if meta is None:
        return "-"
    if hasattr(meta, "shape"):
        return "x".join(map(str, meta.shape)) or "scalar"
    if isinstance(meta, (list, tuple)):
        return "(" + ", ".join(_shape_of(m) for m in meta) + ")"
    return "-"


def _shape_of(meta: object) -> str:
    return "x".join(map(str, meta.shape)) if hasattr(meta, "shape") else "-"


def node_rows(model: nn.Module, pattern: str | None = None,
              input_shape: Sequence[int] | None = None,
              example_inputs: tuple[Any, ...] | None = None) -> list[tuple[str, str, str]]:
    """``(name, kind, output shape)`` for every node of ``model`` (eval mode) matching ``pattern``.

    Args:
        model: The model.
        pattern: A glob over node names (``"layer4.*"``); default: all nodes.
        input_shape: Shape of one dummy input *with* batch axis, for shape propagation;
            ``None`` leaves the shape column as ``-``.
        example_inputs: Inputs for the frontend fxstore falls back to when torch.fx cannot
            trace the model (Hugging Face models: token ids); the rows then list the module
            paths and nodes of that capture, with their shapes for these inputs.

    Raises:
        ConfigError: the dummy input does not fit the model.
        TraceError: the model cannot be traced.

    Example:
        >>> import torchvision
        >>> from fxstore.cli._node_table import node_rows
        >>> node_rows(torchvision.models.resnet18(), "layer4.1.relu*", (1, 3, 64, 64))
        [('layer4.1.relu', 'ReLU', '1x512x2x2'), ('layer4.1.relu_1', 'ReLU', '1x512x2x2')]
    """
    try:
        traced = trace(model, TraceOptions.build(), False)
    except TraceError:
        if example_inputs is None:
            raise
        return _captured_rows(model, pattern, example_inputs)
    if input_shape is not None:
        module = fx.GraphModule(traced.root, traced.graph)
        try:
            # ShapeProp prints the traceback of a failing node itself; the error below says it in one line
            with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
                ShapeProp(module).propagate(torch.zeros(tuple(input_shape)))
        except TraceError:
            raise
        except Exception as e:  # the model's own error on the dummy input
            cause = e
            while cause.__cause__ is not None:  # ShapeProp wraps the model's error with a traceback text
                cause = cause.__cause__
            reason = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
            raise ConfigError(
                f"{type(model).__name__} fails on a dummy input of shape {tuple(input_shape)}: "
                f"{type(cause).__name__}: {reason}\n"
                "Hint: give the input shape the model expects (--input-shape C H W)."
            ) from e
    rows = []
    for node, name in traced.names.items():
        if pattern is None or fnmatch.fnmatchcase(name, pattern):
            rows.append((name, _kind(node, traced.root), _shape(node) if input_shape is not None else "-"))
    return rows


def _captured_rows(model: nn.Module, pattern: str | None, example_inputs: tuple[Any, ...]) -> list[tuple[str, str, str]]:
    """Rows from the frontend ``FeatureExtractor`` picks (module outputs first, then every node)."""
    from ..capture import FeatureExtractor

    ex = FeatureExtractor(model, None, example_inputs=example_inputs)
    report = ex.trace_report
    rows = [(path, f"module ({report.frontend})", "-") for path in report.modules]
    rows += [(name, f"node ({report.frontend})", "-") for name in report.names]
    return [r for r in rows if pattern is None or fnmatch.fnmatchcase(r[0], pattern)]


def format_table(rows: Sequence[tuple[str, ...]], header: tuple[str, ...] = ("node", "kind", "shape")) -> str:
    """Rows as a left-aligned plain-text table with a header.

    Example:
        >>> from fxstore.cli._node_table import format_table
        >>> print(format_table([("conv1", "Conv2d", "1x64x32x32")]))
        node   kind    shape
        conv1  Conv2d  1x64x32x32
    """
    table = [header, *rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in table)
