"""The torch.export frontend: an ATen-level graph, named by module path, for models fx cannot trace.

``torch.export.export(model, args, strict=False)`` runs the model's Python once with fake
tensors and records every ATen operation, so it handles the data structures and control
flow on shapes that stop symbolic tracing (Hugging Face transformers). It needs example
inputs. fxstore exports with every tensor dimension dynamic (``Dim.AUTO``: the exporter keeps
a dimension symbolic where the model allows it and specialises it where the model needs a
constant, such as a channel count), so one graph serves every batch size, sequence length
or image size the model's code does not branch on. What a graph serves is its
:class:`ShapeGuard`: the exporter's range constraints, equal dimensions, specialised sizes
and guards. :class:`ExportRunner` exports again only for inputs no cached graph admits (a
new structure, dtype or non-tensor value, or a shape outside the guards), and keeps the few
most recently used graphs.

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
import types
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import fx, nn
from torch.utils import _pytree

from ..errors import ConfigError, TraceError
from ._tracing import Traced

__all__ = ["Exported", "ExportRunner", "ShapeGuard", "export", "signature"]

_CONSTANTS = itertools.count()


@dataclasses.dataclass
class Exported:
    """An exported graph plus what running it needs.

    Attributes:
        traced: Graph, names and module calls (``root`` is the user's model).
        in_spec: Pytree spec of ``(args, kwargs)``; the graph takes the flat leaves.
        out_spec: Pytree spec of the model's output; the graph returns the flat leaves.
        constants: Tensors the graph reads that are not attributes of the model.
        guard: The input shapes the graph serves.
    """

    traced: Traced
    in_spec: _pytree.TreeSpec
    out_spec: _pytree.TreeSpec
    constants: dict[str, torch.Tensor]
    guard: ShapeGuard


def signature(leaves: list[Any], spec: _pytree.TreeSpec) -> tuple[Any, ...]:
    """What every exported graph is specialised to, whatever its shapes.

    The pytree structure, each tensor's rank, dtype and device, and the values of the other
    leaves. Sizes are left to each graph's :class:`ShapeGuard`.
    """
    parts: list[Any] = [str(spec)]
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            parts.append((leaf.dim(), leaf.dtype, leaf.device.type))
        else:
            parts.append((type(leaf).__name__, leaf if isinstance(leaf, (bool, int, float, str, type(None))) else id(leaf)))
    return tuple(parts)


class _Rejected(Exception):
    """An input shape a graph does not serve (raised by a failing guard, caught by :meth:`ShapeGuard.admits`)."""


class _AssertsReject:
    """Stands in for ``torch`` in the exporter's guard code: a failed ``torch._assert`` rejects.

    ``torch._assert`` itself cannot be used: under ``torch.compile`` a guard on a symbolic size
    becomes a graph node that fails while tracing. A plain ``if`` on the condition is a guard
    dynamo specialises on, so the same check picks the graph both eagerly and when compiled.
    """

    @staticmethod
    def _assert(condition: Any, message: str) -> None:
        if not condition:
            raise _Rejected(message)

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


class ShapeGuard:
    """Which input shapes one exported graph serves.

    The exporter writes its input checks (range constraints, dimensions that must be equal,
    sizes it specialised, guards from the model's code) as Python over the flat inputs;
    :meth:`admits` runs them as a predicate. Without that code (a graph exported with static
    shapes) exactly the example shapes are admitted.

    Args:
        check: ``check(*leaves)``, raising on a shape the graph does not serve; ``None``
            to admit exactly ``shapes``.
        shapes: The example input's tensor shapes (``None`` for non-tensor leaves).
        dynamic: Whether the graph was exported with dynamic dimensions.
    """

    def __init__(self, check: Callable[..., None] | None, shapes: Sequence[tuple[int, ...] | None], dynamic: bool) -> None:
        self._check = check
        self.shapes = tuple(shapes)
        self.dynamic = dynamic

    @classmethod
    def of(cls, module: fx.GraphModule, leaves: Sequence[Any], dynamic: bool) -> ShapeGuard:
        """The guard of ``program.module()`` exported on ``leaves``."""
        shapes = [tuple(leaf.shape) if isinstance(leaf, torch.Tensor) else None for leaf in leaves]
        code = _guard_code(getattr(module, "_guards_fn", None)) if dynamic else None
        if code is None:
            return cls(None, shapes, dynamic)
        return cls(types.FunctionType(code.__code__, {**code.__globals__, "torch": _AssertsReject()}, "admits"),
                   shapes, dynamic)

    def admits(self, leaves: Sequence[Any]) -> bool:
        """Whether the graph serves inputs with ``leaves``' shapes (traceable by ``torch.compile``)."""
        if self._check is None:
            return all(shape is None or tuple(leaf.shape) == shape for leaf, shape in zip(leaves, self.shapes))
        try:
            self._check(*leaves)
        except _Rejected:
            return False
        return True


def _guard_code(guards: Any) -> types.FunctionType | None:
    """The exporter's generated guard function (``def _(*args): torch._assert(...)``), unwrapped.

    ``ExportedProgram.module()`` attaches it as ``_guards_fn``, its ``forward`` wrapped in a
    dynamo config patch; the generated function itself is the one whose code comes from a string.
    """
    fn = getattr(guards, "forward", None)
    for _ in range(8):
        if not isinstance(fn, types.FunctionType):
            return None
        if fn.__code__.co_filename == "<string>" and fn.__closure__ is None:
            return fn
        cells = [c.cell_contents for c in fn.__closure__ or () if isinstance(c.cell_contents, types.FunctionType)]
        fn = cells[0] if len(cells) == 1 else None
    return None


def export(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], training: bool,
           dynamic: bool = True) -> Exported:
    """Export ``model`` on example inputs and name the graph's nodes by module path.

    Args:
        model: The model (in the mode to capture); it is not modified.
        args: Example positional inputs.
        kwargs: Example keyword inputs.
        training: The mode the model is in (recorded for messages).
        dynamic: Export every tensor dimension as ``Dim.AUTO`` (the exporter decides which stay
            symbolic); if that export fails, fxstore exports with static shapes instead.

    Raises:
        TraceError: with the exporter's reason.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU())
        >>> exported = export(model, (torch.rand(2, 4),), {}, training=False)
        >>> exported.guard.admits([torch.rand(7, 4)]), exported.guard.admits([torch.rand(7, 5)])
        (True, False)
    """
    args, kwargs = tuple(args), dict(kwargs)
    leaves = _pytree.tree_leaves((args, kwargs))
    program = None
    if dynamic:
        shapes = torch.export.ShapesCollection()
        for leaf in leaves:
            if isinstance(leaf, torch.Tensor):
                shapes[leaf] = tuple(torch.export.Dim.AUTO for _ in range(leaf.dim()))
        try:
            with _quiet_torch_logs():
                program = torch.export.export(model, args, kwargs, dynamic_shapes=shapes, strict=False)
        except Exception:  # some models export only with static shapes: try that below
            dynamic = False
    if program is None:
        try:
            with _quiet_torch_logs():
                program = torch.export.export(model, args, kwargs, strict=False)
        except Exception as e:  # export raises anything the model's code raises, and its own errors
            raise TraceError(
                f"torch.export could not export {type(model).__name__}: {type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}\n"
                "Hint: check the example inputs, or capture this model with the hook backend "
                "(fxstore.HookForwardModuleStorage)."
            ) from e
    module = program.module()
    guard = ShapeGuard.of(module, leaves, dynamic)
    graph = module.graph
    for node in list(graph.nodes):
        if node.op == "call_module":  # the input guards export adds; ShapeGuard runs them before the graph
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
    return Exported(traced, module._in_spec, module._out_spec, constants, guard)


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
        if node.op == "output" or node.op == "call_function" and _is_size(node):
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


def _is_size(node: fx.Node) -> bool:
    """A symbolic size (``sym_size``, size arithmetic) of a dynamic-shape graph: not a selectable value."""
    return isinstance(node.meta.get("val"), (torch.SymInt, torch.SymFloat, torch.SymBool, int, float, bool))


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


_Built = tuple[Exported, tuple[str, ...], tuple[str, ...], Any]


@dataclasses.dataclass
class _Cached:
    key: tuple[Any, ...]
    built: _Built


class ExportRunner:
    """Runs the export frontend's rewritten graphs, exporting again only when no cached graph fits.

    A graph fits a call when the call's :func:`signature` (structure, ranks, dtypes, devices,
    non-tensor values) is the one it was exported for and its :class:`ShapeGuard` admits the
    call's shapes. The ``max_programs`` most recently used graphs are kept.

    Args:
        build: ``build(args, kwargs) -> (exported, keys, grad_keys, code)``, the rewrite for one export.
        keep_output: Whether the model's output is returned.
        max_programs: How many graphs to keep (least recently used goes first).

    Attributes:
        exports: How many times the model was exported.
        first: The first graph built.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU())
        >>> from fxstore.capture import _rewrite
        >>> def build(args, kwargs):  # the extractor's rewrite, reduced to "return the output"
        ...     exported = export(model, args, kwargs, training=False)
        ...     _rewrite.set_outputs(exported.traced.graph, [], [], keep_output=True)
        ...     return exported, (), (), type(_rewrite.code_module(exported.traced.graph)).forward
        >>> runner = ExportRunner(build, keep_output=True)
        >>> outs = [runner(model, (torch.rand(b, 4),), {})[0].shape for b in (2, 5, 9)]
        >>> runner.exports, outs[-1]
        (1, torch.Size([9, 3]))
    """

    def __init__(self, build: Callable[[tuple[Any, ...], dict[str, Any]], _Built], keep_output: bool,
                 max_programs: int = 4) -> None:
        if not isinstance(max_programs, int) or max_programs < 1:
            raise ConfigError(f"max_programs={max_programs!r} must be a positive int.\nHint: use e.g. 4.")
        self._build = build
        self._keep_output = keep_output
        self.max_programs = max_programs
        self._programs: list[_Cached] = []  # most recently used last
        self.exports = 0
        self.first: _Built | None = None

    @property
    def programs(self) -> int:
        """How many graphs are cached now."""
        return len(self._programs)

    def prepare(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Built:
        """The graph for these inputs: a cached one that admits them, else a new export."""
        leaves, spec = _pytree.tree_flatten((tuple(args), dict(kwargs)))
        key = signature(leaves, spec)
        for index in range(len(self._programs) - 1, -1, -1):
            cached = self._programs[index]
            if cached.key == key and cached.built[0].guard.admits(leaves):
                if index != len(self._programs) - 1 and not torch.compiler.is_compiling():
                    self._programs.append(self._programs.pop(index))
                return cached.built
        if torch.compiler.is_compiling():
            raise TraceError(
                "fxstore's export frontend met inputs inside torch.compile that no exported graph serves "
                "(a new structure, dtype or non-tensor value, or a shape outside the exported ranges).\n"
                "Hint: call the extractor once eagerly with such inputs before compiling, "
                "or pass example_inputs=... when building it."
            )
        built = self._build(tuple(args), dict(kwargs))
        self.exports += 1
        self._programs.append(_Cached(key, built))
        del self._programs[:-self.max_programs]
        if self.first is None:
            self.first = built
        return built

    def __call__(self, owner: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        """Run the graph for these inputs (exporting first if no cached graph admits them)."""
        exported, keys, grad_keys, code = self.prepare(args, kwargs)
        leaves = _pytree.tree_leaves((tuple(args), dict(kwargs)))
        output, features, made = code(owner, *leaves)
        result = dict(zip(keys, features))
        result.update(zip(grad_keys, made))
        return (_pytree.tree_unflatten(list(output), exported.out_spec) if self._keep_output else None), result
