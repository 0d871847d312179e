"""Trace a model with torch.fx, naming nodes exactly like torchvision.

Node names come from torchvision's own ``NodePathTracer``, so they are identical to
``torchvision.models.feature_extraction.get_graph_node_names`` by construction. On top of
it the tracer records the output node(s) of every module call, which is how a module
(or module name) is turned into the value it returns.

The user's model is never touched: tracing runs on a shallow *shadow* of the model
(fresh attribute dictionaries, shared submodules and tensors), so the tensor constants
that ``torch.fx`` attaches to the traced root land on the shadow.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
from collections.abc import Callable, Iterator, Sequence
from types import ModuleType
from typing import Any

import torch
from torch import fx, nn
from torch.utils import _pytree

from ..errors import TraceError
from ._registry import instance_wrapper, notrace_functions, notrace_modules, rebind

__all__ = ["TraceOptions", "Traced", "trace", "shadow_of", "modes_restored"]


@dataclasses.dataclass(frozen=True)
class TraceOptions:
    """How to trace: modules kept opaque, functions wrapped, arguments fixed."""

    leaf_modules: tuple[type[nn.Module], ...] = ()
    autowrap_functions: tuple[Callable[..., Any], ...] = ()
    autowrap_modules: tuple[ModuleType, ...] = ()
    concrete_args: dict[str, Any] | None = None

    @classmethod
    def build(
        cls,
        leaf_modules: Sequence[type[nn.Module]] | None = None,
        autowrap_functions: Sequence[Callable[..., Any]] | None = None,
        autowrap_modules: Sequence[ModuleType] | None = None,
        concrete_args: dict[str, Any] | None = None,
    ) -> TraceOptions:
        return cls(
            tuple(leaf_modules or ()),
            tuple(autowrap_functions or ()),
            tuple(autowrap_modules or ()),
            dict(concrete_args) if concrete_args is not None else None,
        )

    def tracer_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for the tracer, with torchvision's defaults and timm's registries added."""
        functions = self.autowrap_functions + tuple(f for f in notrace_functions() if f not in self.autowrap_functions)
        leaves = self.leaf_modules + tuple(m for m in notrace_modules() if m not in self.leaf_modules)
        kwargs: dict[str, Any] = {"autowrap_functions": functions}
        if leaves:
            kwargs["leaf_modules"] = list(leaves)
        if self.autowrap_modules:
            kwargs["autowrap_modules"] = tuple(self.autowrap_modules)
        from torchvision.models import feature_extraction  # imported on first trace, like _torchvision_fx

        return feature_extraction._set_default_tracer_kwargs(kwargs)


@dataclasses.dataclass
class Traced:
    """A traced graph plus the naming and module-call records fxstore selects from."""

    graph: fx.Graph
    root: nn.Module
    names: dict[fx.Node, str]
    module_calls: dict[str, list[tuple[fx.Node, ...]]]
    module_names: dict[int, str]
    training: bool

    @property
    def node_by_name(self) -> dict[str, fx.Node]:
        return {name: node for node, name in self.names.items()}


@functools.cache
def _torchvision_fx() -> ModuleType:
    """torchvision's feature extraction module, imported on first trace (it costs seconds at start-up)."""
    from torchvision.models import feature_extraction

    return feature_extraction


@functools.cache
def _tracer_class() -> type:
    """The tracer class, built on first use because its base lives in torchvision."""

    class _Tracer(_torchvision_fx().NodePathTracer):  # type: ignore[name-defined,misc]
        """NodePathTracer that also records every module call's output node(s)."""

        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.module_calls: dict[str, list[tuple[fx.Node, ...]]] = {}
            self.failed_module: str | None = None

        def call_module(self, m: nn.Module, forward: Callable[..., Any], args: Any, kwargs: Any) -> Any:
            try:
                out = super().call_module(m, forward, args, kwargs)
            except Exception:
                if self.failed_module is None:  # the innermost module is the one that failed
                    try:
                        self.failed_module = self.path_of_module(m) or "<model>"
                    except NameError:
                        self.failed_module = type(m).__name__
                raise
            nodes = tuple(leaf.node for leaf in _pytree.tree_leaves(out) if isinstance(leaf, fx.Proxy))
            if nodes:
                self.module_calls.setdefault(self.path_of_module(m), []).append(nodes)
            return out

        def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
            """Also a leaf: a module another library wraps (its wrapper must run at call time, on real values)."""
            found = instance_wrapper(m)
            if found is not None and found[0] != "transparent":
                return True
            return bool(super().is_leaf_module(m, module_qualified_name))

    _Tracer.__qualname__ = "_Tracer"  # pickled graphs name it as a module attribute (see __getattr__)
    globals()["_Tracer"] = _Tracer
    return _Tracer


def __getattr__(name: str) -> Any:
    """``_Tracer`` on first use: unpickling a graph looks its tracer class up here."""
    if name == "_Tracer":
        return _tracer_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@contextlib.contextmanager
def modes_restored(model: nn.Module) -> Iterator[None]:
    """Run a block that may switch ``model``'s train/eval modes, then give every module its own back.

    (``model.train(flag)`` would reset them all to one flag; the user's mix of modes survives this.)
    """
    modes = {m: m.training for m in model.modules()}
    try:
        yield
    finally:
        for module, mode in modes.items():
            module.training = mode


def shadow_of(model: nn.Module, training: bool, extra: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """A shallow copy of ``model`` with its own attribute dictionaries.

    Submodules, parameters and buffers are shared; anything set on the shadow (such as
    the tensor constants fx creates while tracing) stays off the user's model. A known
    instance-level wrapper of another library (accelerate's hook, nnsight's controller) is
    rebound to the shadow (:func:`._registry.rebind`): bound to ``model``, it would run ``model``.
    """
    shadow = copy.copy(model)
    for attr in ("_modules", "_parameters", "_buffers"):
        object.__setattr__(shadow, attr, dict(getattr(model, attr)))
    rebind(shadow, model)
    object.__setattr__(shadow, "training", training)
    for name, value in (extra or {}).items():
        object.__setattr__(shadow, name, value)
    return shadow


def trace(model: nn.Module, options: TraceOptions, training: bool | None = None,
          constants: dict[str, torch.Tensor] | None = None) -> Traced:
    """Trace ``model`` (its current submodule modes) and record node names and module calls.

    Args:
        model: The model to trace; it is not modified.
        options: Leaf modules, autowrapped functions and concrete arguments.
        training: The mode the top-level module is traced in (default: ``model.training``).
        constants: Tensor constants from an earlier trace, so names stay consistent.

    Raises:
        TraceError: naming the module that failed, with the tracer's reason.
    """
    training = model.training if training is None else training
    shadow = shadow_of(model, training, constants)
    tracer = _tracer_class()(**options.tracer_kwargs())
    try:
        graph = tracer.trace(shadow, concrete_args=options.concrete_args)
    except Exception as e:  # the tracer raises anything the model's code raises
        _forget_cached_proxies(model)
        where = tracer.failed_module or "<model>"
        kind = type(model.get_submodule(where)).__name__ if where != "<model>" and _has(model, where) else type(model).__name__
        if where == "<model>":  # the root itself: making it a leaf would leave nothing to select
            hint = ("the model's own forward cannot be traced symbolically: use frontend='auto' or 'export' "
                    "(with example_inputs=...), wrap the failing function with autowrap_functions=[...], or "
                    "capture this model with the hook backend (fxstore.HookForwardModuleStorage).")
        else:
            hint = (f"keep it opaque with leaf_modules=[{kind}], wrap the failing function with "
                    "autowrap_functions=[...], fix arguments with concrete_args={...}, or capture this "
                    "model with the hook backend (fxstore.HookForwardModuleStorage).")
        raise TraceError(
            f"torch.fx could not trace module '{where}' ({kind}) of {type(model).__name__}: "
            f"{type(e).__name__}: {e}\nHint: {hint}"
        ) from e
    _forget_cached_proxies(model)
    module_names = {id(m): name for name, m in model.named_modules()}
    return Traced(graph, shadow, dict(tracer.node_to_qualname), tracer.module_calls, module_names, training)


def _forget_cached_proxies(model: nn.Module) -> None:
    """Remove the proxies a model's code cached on its (shared) submodules while being traced.

    Some models memoise tensors in a dict on the module (timm's LeViT caches attention
    biases per device); traced, that cache keeps a proxy of a finished graph, and the next
    trace would reuse it. Dropping those entries keeps the user's model as it was.
    """
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, dict) and any(isinstance(v, fx.Proxy) for v in value.values()):
                for key in [k for k, v in value.items() if isinstance(v, fx.Proxy)]:
                    del value[key]


def _has(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True
