"""Partial tracing: keep untraceable modules as Python, rewrite their traceable children.

When ``torch.fx`` cannot trace a module (a detection model's top level loops over the
images; RAFT's refinement loop depends on data), fxstore traces each child instead,
recursing until it finds the largest traceable subtrees. Names follow the fx scheme with
the subtree's path in front (``backbone.body.layer1``, ``rpn.head.conv.0.0``); a module
kept as Python can still be selected by its path (its output, captured at run time).

At call time the model runs on a *shadow* tree: shallow copies of the Python modules
whose ``_modules`` point at the rewritten subtrees instead of the originals, so the
user's model is never changed. Each rewritten subtree returns its normal output to the
Python code around it and hands its features to a collector; calls after the first get
``@`` and the run's index (``rpn.head.conv@1``, ``rpn.head.conv@2``, ...).
"""

from __future__ import annotations

import dataclasses
import inspect
import warnings
from typing import Any

import torch
from torch import fx, nn
from torch.utils import _pytree

from ..errors import ConfigError, EditError, TraceError
from . import _rewrite, _taps
from ._keys import GRAD_SUFFIX, call_key, output_key
from ._policy import StoragePolicy
from ._registry import instance_wrapper, stateful_quantized
from ._selection import Selected
from ._tracing import Traced, TraceOptions, shadow_of, trace

__all__ = ["PartialTrace", "PartialRunner", "trace_partial"]


@dataclasses.dataclass
class PartialTrace:
    """Where a model was cut: traced subtrees, modules kept as Python, and why.

    Attributes:
        traced: One selection view over every part; names carry full module paths.
        parts: Traced subtree path -> its own trace (node names relative to it).
        python: Path of a module kept as Python -> the stand-in node for its output.
        reasons: Path of a module kept as Python -> why torch.fx could not trace it.
        concrete: Traced subtree path -> the defaulted arguments it was traced with.
    """

    traced: Traced
    parts: dict[str, Traced]
    python: dict[str, fx.Node]
    reasons: dict[str, str]
    concrete: dict[str, dict[str, Any]]


def _is_container(module: nn.Module) -> bool:
    """``ModuleList``/``ModuleDict`` and friends: never called, only iterated."""
    return getattr(type(module), "forward", None) is nn.Module.forward


def _defaults(module: nn.Module) -> dict[str, Any]:
    """Arguments of ``forward`` that have defaults: traced with the default value.

    A placeholder would make ``if mask is None`` take the not-None branch forever; the
    default is what a parent that omits the argument passes, and a call that passes
    something else runs the original Python instead (see :class:`PartialRunner`).
    """
    try:
        parameters = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return {}
    return {p.name: p.default for p in parameters
            if p.default is not inspect.Parameter.empty and p.kind is not p.KEYWORD_ONLY}


def first_line(error: BaseException) -> str:
    """The first sentence of an error message (tracer messages run on for a paragraph)."""
    line = str(error).split("\n", 1)[0]
    return line.split(". ", 1)[0][:160]


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path and name else path or name


def trace_partial(model: nn.Module, options: TraceOptions, training: bool, reason: str | None) -> PartialTrace:
    """Trace the largest traceable subtrees of ``model``, whose top level is not traceable.

    Args:
        model: The model; it is not modified.
        options: Leaf modules and autowrapped functions (``concrete_args`` apply to the top only).
        training: The mode of the top-level module.
        reason: Why the top level could not be traced (``None``: try it, and keep it whole if it traces).

    Raises:
        TraceError: when no submodule at all can be traced.
    """
    parts: dict[str, Traced] = {}
    reasons: dict[str, str] = {}
    concrete: dict[str, dict[str, Any]] = {}
    kept: list[str] = []
    wrapped = next((f"'{path}' is wrapped by {found[1]}" for path, module in model.named_modules()
                    if path and (found := instance_wrapper(module)) is not None and found[0] == "rebind"), None)
    if reason is None and wrapped is not None:  # traced whole, it would be a leaf: capture through it instead
        reason = wrapped
    if reason is None:
        try:
            parts[""] = trace(model, options, training)
            concrete[""] = {}
        except TraceError as e:
            reason = first_line(e.__cause__ or e)
    if reason is not None:
        reasons[""] = reason

    stateful = stateful_quantized()

    def visit(module: nn.Module, path: str) -> None:
        wrapper = instance_wrapper(module) if path else None
        if wrapper is not None and wrapper[0] != "transparent":  # its wrapper must run: never a traced part
            reasons[path] = f"wrapped by {wrapper[1]}" + ("" if wrapper[0] == "rebind" else ": runs as a leaf")
            kept.append(path)
            if wrapper[0] == "leaf":  # bound to the module itself: nothing inside can be rewritten
                return
        elif path and isinstance(module, stateful):  # traced alone, its forward would write proxies into its state
            reasons[path] = f"{type(module).__name__} writes its own state when it runs: runs as a leaf"
            kept.append(path)
            return
        elif path and not _is_container(module):
            defaults = _defaults(module)
            child_options = dataclasses.replace(options, concrete_args=defaults or None)
            try:
                parts[path] = trace(module, child_options)
                concrete[path] = defaults
                return
            except TraceError as e:
                reasons[path] = first_line(e.__cause__ or e)
                kept.append(path)
        for name, child in module.named_children():
            visit(child, _join(path, name))

    if "" not in parts:
        visit(model, "")
    if not parts:
        raise TraceError(
            f"torch.fx could not trace {type(model).__name__} nor any of its submodules: {reason}\n"
            "Hint: capture this model with the hook backend (fxstore.HookForwardModuleStorage)."
        )
    stand_ins = fx.Graph()
    python = {path: stand_ins.placeholder(f"python_{i}") for i, path in enumerate(kept)}
    names: dict[fx.Node, str] = {}
    module_calls: dict[str, list[tuple[fx.Node, ...]]] = {}
    for path, _ in model.named_modules():
        if path in python:
            names[python[path]] = path
            module_calls[path] = [(python[path],)]
        elif path in parts:
            part = parts[path]
            names.update({node: _join(path, name) for node, name in part.names.items()})
            if path:
                module_calls[path] = [_output_leaves(part.graph)]
            module_calls.update({_join(path, name): calls for name, calls in part.module_calls.items()})
    module_names = {id(m): name for name, m in model.named_modules()}
    view = Traced(stand_ins, model, names, module_calls, module_names, training)
    return PartialTrace(view, parts, python, reasons, concrete)


def _output_leaves(graph: fx.Graph) -> tuple[fx.Node, ...]:
    output = next(node for node in reversed(graph.nodes) if node.op == "output")
    return tuple(leaf for leaf in _pytree.tree_leaves(output.args[0]) if isinstance(leaf, fx.Node))


class PartialRunner:
    """Runs a partially traced model on a shadow tree, collecting features from every part.

    Args:
        model: The user's model (shared, never modified).
        plan: The result of :func:`trace_partial` for this mode.
        selected: Features to store (nodes of the plan's view).
        tapped: Gradients to tap (nodes of the plan's view).
        policy: The extractor's storage policy.
        training: The mode of the top-level module.
        edits: ``{node of the plan's view: (edit module, where it is)}``: a traced part calls the
            edit inside its rewritten graph, a module kept as Python on its output; stored
            features and taps read the edited value.

    Attributes:
        edits_on: Whether the edits apply in the current call (the self-check runs without them).
    """

    def __init__(self, model: nn.Module, plan: PartialTrace, selected: list[Selected], tapped: list[Selected],
                 policy: StoragePolicy, training: bool, edits: dict[fx.Node, tuple[nn.Module, str]] | None = None
                 ) -> None:
        self._policy = policy
        self.edits_on = True
        self._active: tuple[dict[str, torch.Tensor], dict[str, int]] | None = None
        self._warned: set[str] = set()
        owner = {id(part.graph): path for path, part in plan.parts.items()}
        owner.update({id(node): path for path, node in plan.python.items()})

        def path_of(node: fx.Node) -> str:
            return owner.get(id(node)) or owner[id(node.graph)]

        wanted: dict[str, tuple[list[Selected], list[Selected], dict[fx.Node, tuple[nn.Module, str]]]] = {}
        for s in selected:
            wanted.setdefault(path_of(s.node), ([], [], {}))[0].append(s)
        for s in tapped:
            wanted.setdefault(path_of(s.node), ([], [], {}))[1].append(s)
        for node, edit in (edits or {}).items():
            wanted.setdefault(path_of(node), ([], [], {}))[2][node] = edit

        root = plan.parts[""].root if "" in plan.parts else shadow_of(model, training)
        shadows: dict[str, nn.Module] = {"": root}
        needed = set(wanted) - {""}
        for path in list(needed):
            parts_of = path.split(".")
            needed.update(".".join(parts_of[:i]) for i in range(1, len(parts_of)))
        for path in sorted(needed, key=lambda p: p.count(".")):
            parent_path, _, name = path.rpartition(".")
            if path in plan.parts:
                shadow = plan.parts[path].root
            else:
                module = model.get_submodule(path)
                shadow = shadow_of(module, module.training)
            shadows[parent_path]._modules[name] = shadow
            shadows[path] = shadow
        for path, (features, taps, part_edits) in wanted.items():
            if path in plan.parts:
                self._rewrite_part(path, plan.parts[path], plan.concrete[path], features, taps, part_edits)
            else:
                self._wrap_python(path, shadows[path], features, taps, next(iter(part_edits.values()), None))
        self._root = root
        self.keys = tuple(s.key for s in selected)
        self.grad_keys = tuple(s.key + GRAD_SUFFIX for s in tapped)

    # -- building -----------------------------------------------------------------------

    def _rewrite_part(self, path: str, part: Traced, concrete: dict[str, Any], features: list[Selected],
                      taps: list[Selected], edits: dict[fx.Node, tuple[nn.Module, str]]) -> None:
        """Rewrite one traced subtree and make its shadow run the rewritten code."""
        sites = {}
        for i, (node, (edit, where)) in enumerate(edits.items()):
            part.root.add_module(f"_fx_edit_{i}", _EditSlot(edit, self))  # the shadow's own, not the model's
            sites[node] = (f"_fx_edit_{i}", where)
        _rewrite.capture(part.graph, part.root, [s.node for s in features], [s.node for s in taps],
                         dataclasses.replace(self._policy, keep_output=True), sites)
        code = type(_rewrite.code_module(part.graph)).forward
        shadow = part.root
        original = type(shadow).forward
        keys = [s.key for s in features]
        grad_keys = [s.key for s in taps]
        positions = _positions(shadow, concrete)

        def forward(*args: Any, **kwargs: Any) -> Any:
            if not _matches(concrete, positions, args, kwargs):
                if edits and self.edits_on:
                    raise EditError(
                        f"'{path}' was called with a non-default value for an argument it was traced with its "
                        "default; that call would run as plain Python, without its edits.\n"
                        "Hint: edit a module that is called with its traced arguments, or use the hook backend "
                        "(fxstore.HookForwardModuleStorage(..., edits=...))."
                    )
                self._warn_fallback(path)
                return original(shadow, *args, **kwargs)
            output, values, tickets = code(shadow, *args, **kwargs)
            self._record(path, keys, values, grad_keys, tickets)
            return output

        object.__setattr__(shadow, "forward", forward)

    def _wrap_python(self, path: str, shadow: nn.Module, features: list[Selected], taps: list[Selected],
                     edit: tuple[nn.Module, str] | None) -> None:
        """Make a module kept as Python report its output (and tap its gradient, and edit it).

        A wrapper on the module (another library's, rebound to the shadow or, for a leaf, bound to
        the user's module) runs around the call, as it would in the plain model.
        """
        wrapped = vars(shadow).get("forward")
        original = type(shadow).forward if wrapped is None else (lambda _shadow, *a, **k: wrapped(*a, **k))
        key = features[0].key if features else None
        grad_key = taps[0].key if taps else None
        policy = self._policy

        def forward(*args: Any, **kwargs: Any) -> Any:
            output = original(shadow, *args, **kwargs)
            if edit is not None and self.edits_on:
                output = edit[0](output, edit[1])
            leaves, spec = _pytree.tree_flatten(output)
            tensors = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
            values = [policy.apply(leaves[i]) for i in tensors]
            tickets: list[torch.Tensor] = []
            if grad_key is not None:
                for i in tensors:
                    leaves[i], ticket = _taps.tap(leaves[i], _taps.anchor())
                    tickets.append(ticket)
                output = _pytree.tree_unflatten(leaves, spec)
            self._record(path, _expand(key, len(values)), values if key is not None else [],
                         _expand(grad_key, len(tickets)), tickets)
            return output

        object.__setattr__(shadow, "forward", forward)

    # -- running --------------------------------------------------------------------------

    def __call__(self, args: tuple[Any, ...], kwargs: dict[str, Any], edits: bool = True
                 ) -> tuple[Any, dict[str, torch.Tensor]]:
        features: dict[str, torch.Tensor] = {}
        outer = (self._active, self.edits_on)  # a call made while another runs (nested) gets its state back
        self._active, self.edits_on = (features, {}), edits
        try:
            output = self._root(*args, **kwargs)
        finally:
            self._active, self.edits_on = outer
        return output, features

    def _record(self, path: str, keys: list[str], values: Any, grad_keys: list[str], tickets: Any) -> None:
        if self._active is None:
            return
        features, calls = self._active
        call = calls.get(path, 0)
        calls[path] = call + 1
        pairs = [(call_key(k, call), v) for k, v in zip(keys, values)]
        pairs += [(call_key(k, call) + GRAD_SUFFIX, t) for k, t in zip(grad_keys, tickets)]
        for key, value in pairs:
            if key in features:
                raise ConfigError(
                    f"two features of a partially traced model would be stored under the key '{key}' "
                    f"(call {call + 1} of '{path}').\nHint: give the layer another name with a dict {{layer: alias}}."
                )
            features[key] = value

    def _warn_fallback(self, path: str) -> None:
        if path not in self._warned:
            self._warned.add(path)
            warnings.warn(
                f"fxstore: '{path}' was called with a non-default value for an argument it was traced with "
                "its default; that call runs as plain Python and its features are missing.",
                stacklevel=4,
            )


class _EditSlot(nn.Module):
    """An edit as a traced part's graph calls it: the edit, or the value as it is while edits are off."""

    def __init__(self, edit: nn.Module, runner: PartialRunner) -> None:
        super().__init__()
        self.edit = edit
        object.__setattr__(self, "runner", runner)  # not a submodule

    def forward(self, value: Any, site: str = "") -> Any:
        return self.edit(value, site) if self.runner.edits_on else value


def _expand(key: str | None, count: int) -> list[str]:
    if key is None:
        return []
    return [key] if count == 1 else [output_key(key, i) for i in range(count)]


def _positions(module: nn.Module, concrete: dict[str, Any]) -> dict[str, int]:
    if not concrete:
        return {}
    names = list(inspect.signature(module.forward).parameters)
    return {name: names.index(name) for name in concrete}


def _matches(concrete: dict[str, Any], positions: dict[str, int], args: tuple[Any, ...],
             kwargs: dict[str, Any]) -> bool:
    """Whether a call passes the traced-in default for every defaulted argument."""
    for name, default in concrete.items():
        index = positions[name]
        if index < len(args):
            value = args[index]
        elif name in kwargs:
            value = kwargs[name]
        else:
            continue
        if value is default:
            continue
        if type(value) in (bool, int, float, str) and type(value) is type(default) and value == default:
            continue
        return False
    return True
