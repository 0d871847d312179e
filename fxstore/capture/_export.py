"""The torch.export frontend: an ATen-level graph, named by module path, for models fx cannot trace.

``torch.export.export(model, args, strict=False)`` runs the model's Python once with fake
tensors and records every ATen operation, so it handles the data structures and control
flow on shapes that stop symbolic tracing (Hugging Face transformers). It needs example
inputs, and the graph it returns is specialised to their shapes: fxstore exports again for
every new input signature (shapes, dtypes, devices, non-tensor values).

Each node's ``meta["nn_module_stack"]`` says which module calls it ran in. fxstore names a
node ``{innermost module path}.{op}`` (``h.0.attn.c_attn.addmm``, ``h.0.mlp.add``), with
``_1``, ``_2`` for repeats, like torchvision's names for functional ops; the output of a
module call is each value computed inside the call and used outside it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import itertools
import logging
from collections import Counter
from collections.abc import Iterator
from typing import Any

import torch
from torch import fx, nn
from torch.utils import _pytree

from ..errors import TraceError
from ._tracing import Traced

__all__ = ["Exported", "export", "signature"]

_CONSTANTS = itertools.count()


@dataclasses.dataclass
class Exported:
    """An exported graph plus what running it needs.

    Attributes:
        traced: Graph, names and module calls (``root`` is the user's model).
        in_spec: Pytree spec of ``(args, kwargs)``; the graph takes the flat leaves.
        out_spec: Pytree spec of the model's output; the graph returns the flat leaves.
        constants: Tensors the graph reads that are not attributes of the model.
    """

    traced: Traced
    in_spec: _pytree.TreeSpec
    out_spec: _pytree.TreeSpec
    constants: dict[str, torch.Tensor]


def signature(leaves: list[Any], spec: _pytree.TreeSpec) -> tuple[Any, ...]:
    """What an exported graph is specialised to: structure, shapes, dtypes, devices, values."""
    parts: list[Any] = [str(spec)]
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            parts.append((tuple(leaf.shape), leaf.dtype, leaf.device.type))
        else:
            parts.append((type(leaf).__name__, leaf if isinstance(leaf, (bool, int, float, str, type(None))) else id(leaf)))
    return tuple(parts)


def export(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], training: bool) -> Exported:
    """Export ``model`` on example inputs and name the graph's nodes by module path.

    Args:
        model: The model (in the mode to capture); it is not modified.
        args: Example positional inputs.
        kwargs: Example keyword inputs.
        training: The mode the model is in (recorded for messages).

    Raises:
        TraceError: with the exporter's reason.
    """
    try:
        with _quiet_torch_logs():
            program = torch.export.export(model, tuple(args), dict(kwargs), strict=False)
    except Exception as e:  # export raises anything the model's code raises, and its own errors
        raise TraceError(
            f"torch.export could not export {type(model).__name__}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}\n"
            "Hint: check the example inputs, or capture this model with the hook backend "
            "(fxstore.HookForwardModuleStorage)."
        ) from e
    module = program.module()
    graph = module.graph
    for node in list(graph.nodes):
        if node.op == "call_module":  # the input guards export adds; fxstore checks signatures itself
            graph.erase_node(node)
    constants: dict[str, torch.Tensor] = {}
    for node in graph.nodes:
        if node.op == "get_attr" and not _has_attr(model, str(node.target)):
            name = f"_fx_const_{next(_CONSTANTS)}"
            constants[name] = _get_attr(module, str(node.target))
            setattr(module, name, constants[name])  # the graph's owning module must have it too (lint)
            node.target = name
    graph._codegen = fx.graph.CodeGen()  # flat inputs and outputs: fxstore handles the pytrees
    names = _node_names(graph)
    module_calls = _module_calls(graph)
    module_names = {id(m): name for name, m in model.named_modules()}
    traced = Traced(graph, model, names, module_calls, module_names, training)
    return Exported(traced, module._in_spec, module._out_spec, constants)


@contextlib.contextmanager
def _quiet_torch_logs() -> Iterator[None]:
    """Silence torch while exporting: a failed export prints (and logs) the partial graph.

    The failure itself reaches the user as a :class:`TraceError` (or as the reason the
    automatic choice moved on), so nothing is lost.
    """
    handlers = {h for name, logger in logging.root.manager.loggerDict.items()
                if name.startswith("torch") and isinstance(logger, logging.Logger) for h in logger.handlers}
    drop = _DropAll()
    for handler in handlers:
        handler.addFilter(drop)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for handler in handlers:
            handler.removeFilter(drop)


class _DropAll(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return False


def _node_names(graph: fx.Graph) -> dict[fx.Node, str]:
    names: dict[fx.Node, str] = {}
    seen: Counter[str] = Counter()
    for node in graph.nodes:
        if node.op == "output":
            continue
        if node.op == "placeholder":
            base = node.name
        elif node.op == "get_attr":
            base = str(node.target)
        else:
            path = _innermost(node)
            op = getattr(node.target, "_opname", None) or getattr(node.target, "__name__", str(node.target))
            base = f"{path}.{op}" if path else op
        names[node] = base if not seen[base] else f"{base}_{seen[base]}"
        seen[base] += 1
    return names


def _innermost(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return str(list(stack.values())[-1][0]) if stack else ""


def _module_calls(graph: fx.Graph) -> dict[str, list[tuple[fx.Node, ...]]]:
    """For every module call: the tensors computed inside it that are used outside it."""
    calls: dict[str, tuple[str, list[fx.Node]]] = {}
    for node in graph.nodes:
        for key, (path, _) in (node.meta.get("nn_module_stack") or {}).items():
            if path:
                calls.setdefault(key, (str(path), []))[1].append(node)
    module_calls: dict[str, list[tuple[fx.Node, ...]]] = {}
    for path, nodes in calls.values():
        members = set(nodes)
        outputs = tuple(
            n for n in nodes
            if isinstance(n.meta.get("val"), torch.Tensor) and any(user not in members for user in n.users)
        )
        if outputs:
            module_calls.setdefault(path, []).append(outputs)
    return module_calls


def _get_attr(module: nn.Module, target: str) -> Any:
    for atom in target.split("."):
        module = getattr(module, atom)
    return module


def _has_attr(module: nn.Module, target: str) -> bool:
    try:
        _get_attr(module, target)
    except AttributeError:
        return False
    return True


class ExportRunner:
    """Runs the export frontend's rewritten graphs, exporting again for new input signatures.

    Args:
        build: ``build(args, kwargs) -> (exported, selected, tapped, code)``, the rewrite for one signature.
        keep_output: Whether the model's output is returned.
    """

    def __init__(self, build: Any, keep_output: bool) -> None:
        self._build = build
        self._keep_output = keep_output
        self._programs: dict[tuple[Any, ...], tuple[Exported, tuple[str, ...], tuple[str, ...], Any]] = {}
        self.first: tuple[Exported, tuple[str, ...], tuple[str, ...], Any] | None = None

    def prepare(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Exported, tuple[str, ...], tuple[str, ...], Any]:
        leaves, spec = _pytree.tree_flatten((tuple(args), dict(kwargs)))
        key = signature(leaves, spec)
        program = self._programs.get(key)
        if program is None:
            if torch.compiler.is_compiling():
                raise TraceError(
                    "fxstore's export frontend met a new input signature inside torch.compile.\n"
                    "Hint: call the extractor once eagerly with inputs of this signature before compiling, "
                    "or pass example_inputs=... when building it."
                )
            program = self._build(tuple(args), dict(kwargs))
            self._programs[key] = program
            if self.first is None:
                self.first = program
        return program

    def __call__(self, owner: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        exported, keys, grad_keys, code = self.prepare(args, kwargs)
        leaves = _pytree.tree_leaves((tuple(args), dict(kwargs)))
        output, features, probes = code(owner, *leaves)
        result = dict(zip(keys, features))
        result.update(zip(grad_keys, probes))
        return (_pytree.tree_unflatten(list(output), exported.out_spec) if self._keep_output else None), result
