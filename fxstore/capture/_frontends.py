"""The three frontends behind one interface: ``build_<frontend>(request, training, ...) -> Program``.

- ``fx``: symbolic tracing (torchvision node names); the program is one generated ``forward``.
- ``export``: ``torch.export`` (ATen graph named by module path); Hugging Face models, RAFT.
- ``partial``: untraceable modules stay Python, their traceable children are rewritten.

:func:`build` picks the first frontend that captures the model, as ``frontend="auto"`` asks.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import fx, nn
from torch.utils import _pytree

from ..errors import TraceError
from . import _edit_pass, _export, _partial, _reinplace, _rewrite
from ._describe import Snapshot
from ._keys import grad_key
from ._policy import StoragePolicy
from ._program import GraphRun, Program, TraceReport
from ._selection import resolve
from ._selfcheck import module_sites
from ._tracing import TraceOptions, trace

__all__ = ["FRONTENDS", "Request", "build", "build_fx", "build_export", "build_partial", "first_line"]

FRONTENDS = ("auto", "fx", "export", "partial")

Inputs = tuple[tuple[Any, ...], dict[str, Any]]
first_line = _partial.first_line


@dataclasses.dataclass
class Request:
    """What to capture: the model, the selections, the storage policy and the tracing options.

    Attributes:
        model: The user's model (never modified).
        specs: Canonical layer specs to store.
        grad_specs: Canonical layer specs whose gradients are tapped.
        policy: The storage policy.
        trace_options: fx tracing controls.
        frontend: ``"auto"`` or one frontend's name.
        register: ``register(name, tensor)`` makes a tensor the graph reads an attribute of the
            program's owner (fx's tensor constants, export's lifted constants).
        constants: Tensor constants found by earlier fx traces (names stay stable across modes).
        edits: ``(canonical spec, edit module name)`` per edit; the modules are the owner's children.
        edit_modules: Edit module name -> the module (the partial frontend's Python parts call it).
    """

    model: nn.Module
    specs: list[tuple[Any, str | None]]
    grad_specs: list[tuple[Any, str | None]]
    policy: StoragePolicy
    trace_options: TraceOptions
    frontend: str
    register: Callable[[str, torch.Tensor], None]
    constants: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    edits: list[_edit_pass.EditSpec] = dataclasses.field(default_factory=list)
    edit_modules: dict[str, nn.Module] = dataclasses.field(default_factory=dict)


def build(request: Request, training: bool, strict: bool, inputs: Inputs | None,
          failures: dict[str, str]) -> Program | None:
    """The program from the first frontend (in ``fx, export, partial`` order) that captures the model.

    Frontends already in ``failures`` are skipped (a failed self-check puts them there).
    Returns ``None`` when the next frontend to try needs example inputs that are not there yet.

    Raises:
        TraceError: the requested frontend failed, or (``"auto"``) every frontend failed.
    """
    frontend = request.frontend
    if frontend in ("auto", "fx") and "fx" not in failures:
        try:
            return build_fx(request, training, strict)
        except TraceError as e:
            if frontend == "fx":
                raise
            failures["fx"] = first_line(e)
    if frontend in ("auto", "export") and "export" not in failures:
        if inputs is None:
            return None
        try:
            return build_export(request, training, strict, inputs, failures)
        except TraceError as e:
            if frontend == "export":
                raise
            failures["export"] = first_line(e)
    if frontend not in ("auto", "partial") or "partial" in failures:
        tried = "".join(f"\n  {name}: {why}" for name, why in failures.items())
        hint = ("try frontend='auto' (it falls back to the other frontends), or capture" if frontend != "auto"
                else "if a reason above names your inputs or call, change them; otherwise capture")
        raise TraceError(
            f"fxstore could not capture {type(request.model).__name__} with frontend={frontend!r}:{tried}\n"
            f"Hint: {hint} this model with the hook backend (fxstore.HookForwardModuleStorage)."
        )
    try:
        return build_partial(request, training, strict, failures)
    except TraceError as e:
        tried = "".join(f"\n  {name}: {why}" for name, why in failures.items())
        raise TraceError(
            f"fxstore could not capture {type(request.model).__name__} with any frontend:{tried}"
            f"\n  partial: {first_line(e)}\n"
            "Hint: capture this model with the hook backend (fxstore.HookForwardModuleStorage)."
        ) from e


def build_fx(request: Request, training: bool, strict: bool) -> Program:
    """Symbolic tracing: one generated ``forward`` returning ``(output, features, tickets)``."""
    traced = trace(request.model, request.trace_options, training, request.constants)
    for name, value in vars(traced.root).items():
        if name.startswith("_tensor_constant") and isinstance(value, torch.Tensor):
            request.constants[name] = value
            request.register(name, value)
    selected = resolve(traced, request.specs, strict=strict)
    tapped = resolve(traced, request.grad_specs, strict=strict)
    sites = _edit_pass.edit_sites(traced, request.edits)
    reference = None
    if not request.policy.keep_output or sites:  # the self-check needs the plain output: keep the trace as it was
        reference = _ReferenceRun(_rewrite.code_module(_copy_graph(traced.graph)))
    graph = traced.graph
    snapshot = Snapshot("fx", request.model, [(traced, "")], selected, tapped, _edit_types(request, sites))
    _rewrite.capture(graph, traced.root, [s.node for s in selected], [s.node for s in tapped], request.policy,
                     sites)
    description = snapshot.describe([graph])  # before reinplacing, which may replace nodes
    _reinplace.reinplace(graph, traced.root)
    keys = tuple(s.key for s in selected)
    grad_keys = tuple(grad_key(s.key) for s in tapped)
    run = GraphRun(_rewrite.code_module(graph), keys, grad_keys, request.policy.keep_output)
    report = TraceReport("fx", tuple(traced.names.values()), {}, {}, tuple(traced.module_calls))
    return Program.from_selection(run, selected, tapped, report, graph=graph, reference=reference,
                                   description=description, sites=module_sites(traced, selected))


def build_export(request: Request, training: bool, strict: bool, inputs: Inputs,
                 failures: dict[str, str]) -> Program:
    """``torch.export``: ATen graphs named by module path, run through an :class:`ExportRunner`."""
    first: dict[str, Any] = {}  # what the first export selected (the keys and labels of the program)

    def rewrite(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        exported = _export.export(request.model, args, kwargs, training)
        for name, value in exported.constants.items():
            request.register(name, value)
        traced = exported.traced
        selected = resolve(traced, request.specs, strict=strict)
        tapped = resolve(traced, request.grad_specs, strict=strict)
        sites = _edit_pass.edit_sites(traced, request.edits)
        if not first:  # the self-check's reference is the graph before the rewrite, as in build_fx
            reference = None if request.policy.keep_output and not sites else _ExportReference(
                _rewrite.code_module(_copy_graph(traced.graph)), exported.out_spec)
            first.update(selected=selected, tapped=tapped, reference=reference, sites=module_sites(traced, selected),
                         snapshot=Snapshot("export", request.model, [(traced, "")], selected, tapped,
                                           _edit_types(request, sites)))
        _rewrite.capture(traced.graph, traced.root, [s.node for s in selected], [s.node for s in tapped],
                         request.policy, sites)
        code = type(_rewrite.code_module(traced.graph)).forward
        return exported, tuple(s.key for s in selected), tuple(grad_key(s.key) for s in tapped), code

    runner = _export.ExportRunner(rewrite, request.policy.keep_output)
    exported = runner.prepare(*inputs)[0]
    report = TraceReport("export", tuple(exported.traced.names.values()), dict(failures), {},
                         tuple(exported.traced.module_calls))
    return Program.from_selection(runner, first["selected"], first["tapped"], report,
                                   graph=exported.traced.graph, reference=first["reference"], sites=first["sites"],
                                   description=first.pop("snapshot").describe([exported.traced.graph]))


def build_partial(request: Request, training: bool, strict: bool, failures: dict[str, str]) -> Program:
    """Partial tracing: modules fx cannot trace run as Python around rewritten traceable children."""
    plan = _partial.trace_partial(request.model, request.trace_options, training, failures.get("fx"))
    selected = resolve(plan.traced, request.specs, strict=strict)
    tapped = resolve(plan.traced, request.grad_specs, strict=strict)
    sites = _edit_pass.edit_sites(plan.traced, request.edits)
    edits = {node: (request.edit_modules[target], where) for node, (target, where) in sites.items()}
    snapshot = Snapshot("partial", request.model, [(part, path) for path, part in plan.parts.items()], selected, tapped,
                        _edit_types(request, sites), plan.python)
    runner = _partial.PartialRunner(request.model, plan, selected, tapped, request.policy, training, edits)
    report = TraceReport("partial", tuple(plan.traced.names.values()), dict(failures), dict(plan.reasons),
                         tuple(plan.traced.module_calls))
    run = _PartialRun(runner, request.policy.keep_output)
    reference = None if request.policy.keep_output and not sites else _PartialRun(runner, True).output
    return Program.from_selection(run, selected, tapped, report, fullgraph=False, reference=reference,
                                   sites=module_sites(plan.traced, selected),
                                   description=snapshot.describe(python_modules=plan.reasons))


def _edit_types(request: Request, sites: dict[fx.Node, tuple[str, str]]) -> dict[fx.Node, str]:
    """``{edited node: the edit's type name}``."""
    return {node: type(request.edit_modules[target]).__name__ for node, (target, _) in sites.items()}


class _ReferenceRun:
    """The traced graph before the rewrite: the model's output, for the self-check."""

    def __init__(self, code: fx.GraphModule) -> None:
        self.code = code

    def __call__(self, owner: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return type(self.code).forward(owner, *args, **kwargs)


class _ExportReference:
    """The first exported graph before the rewrite: the model's output, for the self-check."""

    def __init__(self, code: fx.GraphModule, out_spec: Any) -> None:
        self.code = code
        self.out_spec = out_spec

    def __call__(self, owner: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        leaves = _pytree.tree_leaves((tuple(args), dict(kwargs)))
        return _pytree.tree_unflatten(list(type(self.code).forward(owner, *leaves)), self.out_spec)


class _PartialRun:
    def __init__(self, runner: _partial.PartialRunner, keep_output: bool) -> None:
        self.runner = runner
        self.keep_output = keep_output

    def __call__(self, owner: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        output, features = self.runner(args, kwargs)
        return (output if self.keep_output else None), features

    def output(self, owner: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The model's own output (edits off): the self-check's reference."""
        return self.runner(args, kwargs, edits=False)[0]


def _copy_graph(graph: fx.Graph) -> fx.Graph:
    """An independent copy of ``graph`` (the rewrite changes the original in place)."""
    new = fx.Graph(owning_module=graph.owning_module, tracer_cls=graph._tracer_cls)
    out = new.graph_copy(graph, {})
    new.output(out)
    new._codegen = copy.copy(graph._codegen)
    return new
