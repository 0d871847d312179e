"""Turn user layer specifications into graph nodes and output keys.

A layer can be a module object, a qualified module name (that module's output, every
call), any fx node name, a glob pattern over node names, a module type, or a predicate.
A mapping ``{spec: alias}`` renames the outputs.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from torch import fx, nn

from ..errors import ConfigError, InvalidLayerError, LayerNotFoundError
from ._keys import output_key, repeat_key
from ._registry import instance_wrapper
from ._tracing import Traced

__all__ = ["LayerSpec", "Layers", "ModuleRef", "Selected", "layer_pairs", "canonical_specs", "resolve", "spec_label"]

LayerSpec = str | nn.Module | type | Callable[..., bool]
Layers = LayerSpec | Iterable[LayerSpec] | Mapping[Any, str]

_GLOB_CHARS = frozenset("*?[")
_LIST_HINT = "list the selectable names with fxstore.node_names(model)"


@dataclasses.dataclass(frozen=True)
class ModuleRef:
    """A module of the model, by qualified name (what a module object becomes)."""

    name: str


@dataclasses.dataclass(frozen=True)
class Selected:
    """One output: its key, the node it reads, and the label (alias or spec) it came from."""

    key: str
    node: fx.Node
    label: str
    source: str  # the spec's own label (differs from ``label`` when aliased)


def spec_label(spec: Any) -> str:
    """A readable, stable label for a canonical spec (used as the storage lookup key)."""
    if isinstance(spec, ModuleRef):
        return spec.name
    if isinstance(spec, str):
        return spec
    if isinstance(spec, type):
        return spec.__name__
    return getattr(spec, "__name__", repr(spec))


def layer_pairs(layers: Layers | None) -> list[tuple[Any, str | None]]:
    """``layers`` in any accepted form as ``[(spec, alias)]``, the specs as given (the one normaliser).

    Example:
        >>> layer_pairs("layer1"), layer_pairs({"layer1": "a"}), layer_pairs(["x", "y"])
        ([('layer1', None)], [('layer1', 'a')], [('x', None), ('y', None)])

    Raises:
        InvalidLayerError: for a value that is not a layer specification.
    """
    if layers is None:
        return []
    if isinstance(layers, Mapping):
        return list(layers.items())
    if isinstance(layers, (str, nn.Module, type)) or (callable(layers) and not isinstance(layers, Iterable)):
        return [(layers, None)]
    if isinstance(layers, Iterable):
        return [(spec, None) for spec in layers]
    raise InvalidLayerError(
        f"layers={layers!r} is not a layer specification.\n"
        "Hint: pass a list of module objects, names, patterns, module types or predicates, "
        "or a dict {layer: alias}."
    )


def canonical_specs(layers: Layers | None, model: nn.Module) -> list[tuple[Any, str | None]]:
    """Normalise ``layers`` into ``[(spec, alias)]`` with module objects turned into names.

    Raises:
        InvalidLayerError: for a value that is not a layer specification.
        LayerNotFoundError: for a module object that is not part of ``model``.
    """
    pairs = layer_pairs(layers)
    names = {id(m): name for name, m in model.named_modules()}
    out: list[tuple[Any, str | None]] = []
    for spec, alias in pairs:
        if alias is not None and not isinstance(alias, str):
            raise InvalidLayerError(f"alias {alias!r} for layer {spec!r} is not a string.\nHint: use {{layer: 'name'}}.")
        out.append((_canonical(spec, names, model), alias))
    return out


def _canonical(spec: Any, names: dict[int, str], model: nn.Module) -> Any:
    if isinstance(spec, nn.Module):
        name = names.get(id(spec))
        if name is None:
            raise LayerNotFoundError(
                f"module {_short(spec)} is not part of {type(model).__name__}.\n"
                "Hint: pass a module taken from the same model object (model.named_modules()), "
                f"or its name; {_LIST_HINT}."
            )
        return ModuleRef(name)
    if isinstance(spec, str):
        return spec
    if isinstance(spec, type):
        if not issubclass(spec, nn.Module):
            raise InvalidLayerError(f"layer type {spec.__name__} is not an nn.Module subclass.\nHint: pass e.g. torch.nn.Conv2d.")
        return spec
    if callable(spec):
        return spec
    raise InvalidLayerError(
        f"layer {spec!r} of type {type(spec).__name__} is not a layer specification.\n"
        "Hint: use a module object, a name, a glob pattern, a module type or a predicate."
    )


def resolve(traced: Traced, specs: list[tuple[Any, str | None]], *, strict: bool = True) -> list[Selected]:
    """Resolve canonical specs against a traced graph, in spec order then call order.

    Args:
        traced: The traced model.
        specs: Output of :func:`canonical_specs`.
        strict: Raise when a spec matches nothing (otherwise it is skipped).

    Raises:
        LayerNotFoundError: naming the spec, with close matches and how to list nodes.
        ConfigError: when two different nodes would be stored under the same key.
    """
    selected: list[Selected] = []
    by_key: dict[str, fx.Node] = {}
    node_by_name = traced.node_by_name
    for spec, alias in specs:
        label = spec_label(spec)
        matches = _match(traced, spec, node_by_name)
        if not matches:
            if strict:
                raise _not_found(traced, spec, node_by_name)
            continue
        for i, (key, node) in enumerate(matches):
            if alias is not None:
                key = repeat_key(alias, i)
            if key in by_key:
                if by_key[key] is not node:
                    raise ConfigError(
                        f"two layers would be stored under the key '{key}'.\n"
                        "Hint: give one of them another name with a dict {layer: alias}."
                    )
                continue
            by_key[key] = node
            selected.append(Selected(key, node, alias or label, label))
    return selected


def _match(traced: Traced, spec: Any, node_by_name: dict[str, fx.Node]) -> list[tuple[str, fx.Node]]:
    if isinstance(spec, ModuleRef):
        return _module_outputs(traced, spec.name)
    if isinstance(spec, str):
        if spec in traced.module_calls:
            return _module_outputs(traced, spec)
        if spec in node_by_name:
            return [(spec, node_by_name[spec])]
        if _GLOB_CHARS & set(spec):
            return [(name, node) for name, node in node_by_name.items() if fnmatch.fnmatchcase(name, spec)]
        return []
    if isinstance(spec, type):
        out: list[tuple[str, fx.Node]] = []
        for name, module in traced.root.named_modules():
            if isinstance(module, spec) and name in traced.module_calls:
                out.extend(_module_outputs(traced, name))
        return out
    return _predicate_matches(spec, traced)


def _module_outputs(traced: Traced, name: str) -> list[tuple[str, fx.Node]]:
    out: list[tuple[str, fx.Node]] = []
    for call, nodes in enumerate(traced.module_calls.get(name, [])):
        base = repeat_key(name, call)
        if len(nodes) == 1:
            out.append((base, nodes[0]))
        else:
            out.extend((output_key(base, i), node) for i, node in enumerate(nodes))
    return out


def _predicate_matches(predicate: Callable[..., bool], traced: Traced) -> list[tuple[str, fx.Node]]:
    if _required_args(predicate) == 1:
        return [(name, node) for node, name in traced.names.items() if predicate(name)]
    return [(name, node) for node, name in traced.names.items() if predicate(name, node)]


def _required_args(fn: Callable[..., Any]) -> int:
    """How many positional arguments ``fn`` needs (2 when it cannot be told or takes ``*args``)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return 2
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return 2
    return sum(p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)


def _wrapped_ancestor(root: nn.Module, name: str) -> tuple[str, tuple[str, str]] | None:
    """The outermost module above ``name`` that another library's wrapper makes a leaf (for torch.fx,
    or for every frontend), and ``(kind, what)`` of the wrapper (see ``_registry.instance_wrapper``)."""
    parts = name.split(".")
    for i in range(1, len(parts)):
        path = ".".join(parts[:i])
        try:
            module = root.get_submodule(path)
        except AttributeError:
            return None
        found = instance_wrapper(module)
        if found is not None and found[0] != "transparent":
            return path, found
    return None


def _not_found(traced: Traced, spec: Any, node_by_name: dict[str, fx.Node]) -> LayerNotFoundError:
    mode = "train" if traced.training else "eval"
    model = type(traced.root).__name__
    if isinstance(spec, (ModuleRef, str)) and traced.root is not None:
        name = spec.name if isinstance(spec, ModuleRef) else spec
        if name == "":
            return LayerNotFoundError(
                f"the model itself ('' or the {model} object) is not one of its layers: its output is the "
                "extractor's own output.\nHint: read it from `output, features = ex(x)` (keep_output=True, the "
                f"default), or select the layer that computes it; {_LIST_HINT}."
            )
        wrapped = _wrapped_ancestor(traced.root, name)
        if wrapped is not None:
            outer, (kind, why) = wrapped
            hint = (f"select '{outer}' itself, or capture inside it with the hook backend "
                    "(fxstore.HookForwardModuleStorage)" if kind == "leaf" else
                    "use frontend='partial', which runs the wrapper around what it captures inside")
            return LayerNotFoundError(
                f"layer '{name}' is inside '{outer}', which is wrapped by {why}: "
                + (f"fxstore runs '{outer}' as a leaf (its wrapper runs as in the plain model), so nothing inside "
                   "it can be captured" if kind == "leaf" else f"torch.fx keeps '{outer}' a leaf")
                + f".\nHint: {hint}."
            )
        if name in dict(traced.root.named_modules()):
            return LayerNotFoundError(
                f"module '{name}' is part of {model} but is not called in {mode} mode.\n"
                f"Hint: switch the model to the other mode, or pick another layer; {_LIST_HINT}."
            )
    if isinstance(spec, str):
        candidates = list(node_by_name) + [n for n in traced.module_calls if n not in node_by_name]
        close = difflib.get_close_matches(spec, candidates, n=5, cutoff=0.6)
        kind = "pattern" if _GLOB_CHARS & set(spec) else "layer"
        suggestion = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        return LayerNotFoundError(
            f"{kind} '{spec}' matches no node or module of {model} ({mode} mode).{suggestion}\n"
            f"Hint: {_LIST_HINT}."
        )
    if isinstance(spec, type):
        return LayerNotFoundError(
            f"no {spec.__name__} module is called by {model} ({mode} mode).\n"
            f"Hint: check the module type, or {_LIST_HINT}."
        )
    return LayerNotFoundError(
        f"predicate {spec_label(spec)} selected no node of {model} ({mode} mode).\n"
        f"Hint: a predicate receives (name) or (name, node); {_LIST_HINT}."
    )


def _short(module: nn.Module) -> str:
    text = repr(module).splitlines()[0]
    return text if len(text) < 80 else text[:77] + "..."
