"""The pure extractor: a model rewritten so that a call returns ``(output, features)``."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import fx, nn

from . import _rewrite
from ._alias import AliasAnalysis
from ._selection import Layers, Selected, canonical_specs, resolve, spec_label
from ._tracing import TraceOptions, trace
from .errors import ConfigError, GradientNotReadyError, InvalidLayerError, LayerNotFoundError

__all__ = ["FeatureExtractor", "node_names", "GRAD_SUFFIX"]

GRAD_SUFFIX = ":grad"
"""Suffix of the feature keys that hold gradient probes (``"layer1:grad"``)."""


@dataclasses.dataclass
class _Program:
    """One rewritten graph (per training mode): generated code plus what its outputs mean."""

    code: fx.GraphModule  # holds the generated ``forward``; its attributes are placeholders
    keys: tuple[str, ...]
    grad_keys: tuple[str, ...]
    labels: dict[str, tuple[str, ...]]  # label (alias or spec) -> feature keys
    grad_labels: dict[str, tuple[str, ...]]  # label -> tapped keys (without the suffix)
    sources: dict[str, str]  # spec label -> label, where an alias renamed it


def _dtype(value: torch.dtype | str | None) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    resolved = getattr(torch, str(value), None)
    if not isinstance(resolved, torch.dtype):
        raise ConfigError(f"dtype={value!r} is not a torch dtype.\nHint: use e.g. torch.bfloat16 or 'bfloat16'.")
    return resolved


def _device(value: torch.device | str | None) -> torch.device | None:
    if value is None or isinstance(value, torch.device):
        return value
    try:
        return torch.device(value)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"device={value!r} is not a device: {e}.\nHint: use e.g. 'cpu' or 'cuda:0'.") from e


class FeatureExtractor(nn.Module):
    """A model whose call returns ``(output, features)``, captured as real graph outputs.

    The model is traced with torch.fx (node names identical to torchvision's
    ``get_graph_node_names``) and rewritten so the selected nodes become extra outputs.
    The result compiles with ``torch.compile(fullgraph=True)``, runs only what the
    selected features need when ``keep_output=False``, protects stored values from later
    in-place ops, and can tap gradients of layer outputs inside the graph.

    The extractor shares submodules and parameters with ``model`` (like torchvision's
    extractor) and never modifies it; its ``state_dict`` keys equal the model's. The
    graph that runs is the one for the extractor's current mode (``train()``/``eval()``).

    Args:
        model: The model to capture from.
        layers: What to store: module objects, module names (that module's output, every
            call), fx node names (``"add_3"``), glob patterns over node names
            (``"layer*.*.relu"``), module types (``nn.Conv2d``), predicates
            ``(name) -> bool`` or ``(name, node) -> bool``; a dict ``{layer: alias}``
            renames outputs.
        grads: Layers (same forms) whose output gradients are tapped. After
            ``loss.backward()``, :meth:`gradients` returns them; the probes sit in the
            features under ``key + ":grad"``.
        keep_output: Return the model's output; ``False`` returns ``None`` instead and cuts
            the graph to what the features need.
        detach: Store features without their autograd history.
        transform: A traceable function applied to every stored feature inside the graph
            (e.g. global average pooling).
        dtype: Store features in this dtype (cast inside the graph).
        device: Store features on this device (copied inside the graph).
        non_blocking: Copy to ``device`` without waiting; synchronise before reading.
        leaf_modules: Module types not traced through.
        autowrap_functions: Functions recorded as single calls instead of traced.
        autowrap_modules: Python modules whose functions are all autowrapped.
        concrete_args: Arguments fixed at trace time (see ``torch.fx.symbolic_trace``).

    Raises:
        LayerNotFoundError: a layer matches nothing (the message suggests close names).
        InvalidLayerError: a layer is not a valid specification.
        TraceError: the model cannot be traced (the message names the module).
        ConfigError: an option is invalid.

    Example:
        >>> import torch, torchvision, fxstore
        >>> model = torchvision.models.resnet18().eval()
        >>> ex = fxstore.FeatureExtractor(model, ["layer1", model.layer4])
        >>> x = torch.rand(1, 3, 64, 64)
        >>> out, feats = ex(x)
        >>> torch.equal(out, model(x)), {k: tuple(v.shape) for k, v in feats.items()}
        (True, {'layer1': (1, 64, 16, 16), 'layer4': (1, 512, 2, 2)})
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Layers | None = None,
        *,
        grads: Layers | None = None,
        keep_output: bool = True,
        detach: bool = False,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
        non_blocking: bool = False,
        leaf_modules: list[type[nn.Module]] | None = None,
        autowrap_functions: list[Callable[..., Any]] | None = None,
        autowrap_modules: list[Any] | None = None,
        concrete_args: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise InvalidLayerError(
                f"model must be a torch.nn.Module, got {type(model).__name__}.\nHint: pass the model object itself."
            )
        specs = canonical_specs(layers, model)
        grad_specs = canonical_specs(grads, model)
        if not specs and not grad_specs and not keep_output:
            raise ConfigError(
                "nothing to return: no layers, no grads and keep_output=False.\n"
                "Hint: select at least one layer, or keep the output."
            )
        self._mirror(model)
        object.__setattr__(self, "_fx_model", model)  # not a submodule: keeps state_dict keys equal
        self._fx_specs = specs
        self._fx_grad_specs = grad_specs
        self._fx_trace = TraceOptions.build(leaf_modules, autowrap_functions, autowrap_modules, concrete_args)
        self._fx_policy = {
            "keep_output": bool(keep_output),
            "detach": bool(detach),
            "transform": transform,
            "dtype": _dtype(dtype),
            "device": _device(device),
            "non_blocking": bool(non_blocking),
        }
        self._fx_constants: dict[str, torch.Tensor] = {}
        self._fx_programs: dict[bool, _Program] = {}
        if grad_specs:
            _allow_probes_under_compile()
        self.training = model.training  # set directly: never toggle the shared submodules here
        self._fx_programs[self.training] = self._build(self.training, strict=True)

    # -- construction -------------------------------------------------------------------

    def _mirror(self, model: nn.Module) -> None:
        """Register the model's own children, parameters and buffers (shared objects)."""
        for name, child in model._modules.items():
            self._check_free(name, model)
            self.add_module(name, child)
        for name, param in model._parameters.items():
            self._check_free(name, model)
            self.register_parameter(name, param)
        for name, buf in model._buffers.items():
            self._check_free(name, model)
            self.register_buffer(name, buf, persistent=name not in model._non_persistent_buffers_set)

    def _check_free(self, name: str, model: nn.Module) -> None:
        if hasattr(self, name) or name.startswith("_fx_"):
            raise ConfigError(
                f"{type(model).__name__} has an attribute '{name}' that clashes with FeatureExtractor's own.\n"
                "Hint: wrap the model in a small nn.Module, or use the hook backend."
            )

    def _build(self, training: bool, strict: bool) -> _Program:
        traced = trace(self._fx_model, self._fx_trace, training, self._fx_constants)
        for name, value in vars(traced.root).items():
            if name.startswith("_tensor_constant") and isinstance(value, torch.Tensor):
                self._fx_constants[name] = value
                if name not in self._buffers:
                    self.register_buffer(name, value, persistent=False)
        selected = resolve(traced, self._fx_specs, strict=strict)
        tapped = resolve(traced, self._fx_grad_specs, strict=strict)
        if not strict:
            self._warn_missing(traced.training, selected, tapped)
        graph = traced.graph
        probes = _rewrite.add_grad_taps(graph, [s.node for s in tapped])
        analysis = AliasAnalysis(graph, traced.root)
        policy = self._fx_policy
        stored = _rewrite.store_features(
            graph, [s.node for s in selected], analysis,
            detach=policy["detach"], transform=policy["transform"], dtype=policy["dtype"],
            device=policy["device"], non_blocking=policy["non_blocking"],
        )
        _rewrite.set_outputs(graph, [stored[s.node] for s in selected], [probes[s.node] for s in tapped],
                             policy["keep_output"])
        _rewrite.prune(graph, AliasAnalysis(graph, traced.root))
        graph.lint()
        return _Program(
            code=_code_module(graph),
            keys=tuple(s.key for s in selected),
            grad_keys=tuple(s.key + GRAD_SUFFIX for s in tapped),
            labels=_by_label(selected),
            grad_labels=_by_label(tapped),
            sources={s.source: s.label for s in selected + tapped if s.source != s.label},
        )

    def _warn_missing(self, training: bool, selected: list[Selected], tapped: list[Selected]) -> None:
        reference = self._fx_programs.get(not training)
        if reference is None:
            return
        missing = (set(reference.keys) - {s.key for s in selected}) | (
            set(reference.grad_keys) - {s.key + GRAD_SUFFIX for s in tapped})
        if missing:
            mode = "train" if training else "eval"
            warnings.warn(
                f"fxstore: {sorted(missing)} are not produced in {mode} mode (the {mode} graph differs); "
                "they are missing from the features in that mode.",
                stacklevel=3,
            )

    # -- nn.Module ------------------------------------------------------------------------

    def train(self, mode: bool = True) -> FeatureExtractor:
        """Switch mode like ``nn.Module.train``; the graph of that mode runs from now on."""
        super().train(mode)
        if mode not in self._fx_programs:
            self._fx_programs[mode] = self._build(mode, strict=False)
        return self

    def forward(self, *args: Any, **kwargs: Any) -> tuple[Any, dict[str, torch.Tensor]]:
        """Run the model; return ``(output, features)`` (``output`` is ``None`` if not kept)."""
        program = self._fx_programs[self.training]
        output, features, probes = type(program.code).forward(self, *args, **kwargs)
        result = dict(zip(program.keys, features))
        if probes:
            result.update(zip(program.grad_keys, probes))
        return output, result

    # -- introspection -----------------------------------------------------------------

    @property
    def feature_keys(self) -> tuple[str, ...]:
        """Keys of the stored features in the current mode, in order."""
        return self._fx_programs[self.training].keys

    def keys_for(self, layer: Any) -> tuple[str, ...]:
        """Feature keys a layer (module object, name or alias) was stored under.

        Example:
            >>> import torchvision, fxstore
            >>> m = torchvision.models.resnet18()
            >>> fxstore.FeatureExtractor(m, [m.relu, "layer1"]).keys_for(m.relu)
            ('relu',)
        """
        program = self._fx_programs[self.training]
        if isinstance(layer, nn.Module):
            names = [n for n, m in self._fx_model.named_modules() if m is layer]
            layer = names[0] if names else layer
        label = layer if isinstance(layer, str) else spec_label(layer)
        label = program.sources.get(label, label)
        if label in program.labels:
            return program.labels[label]
        if label in program.keys:
            return (label,)
        raise LayerNotFoundError(
            f"layer {layer!r} was not selected by this extractor (keys: {list(program.keys)}).\n"
            "Hint: read features by key, module object or the name you selected it with."
        )

    @staticmethod
    def gradients(features: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Gradients of the tapped layers, read after ``backward()``.

        Args:
            features: The features dict returned by the call.

        Returns:
            ``{key: d(loss)/d(layer output)}`` for each tapped layer.

        Raises:
            GradientNotReadyError: if backward has not reached a tapped layer yet.

        Example:
            >>> import torch, torchvision, fxstore
            >>> m = torchvision.models.resnet18()
            >>> ex = fxstore.FeatureExtractor(m, grads=["layer4"])
            >>> out, feats = ex(torch.rand(1, 3, 64, 64))
            >>> out.sum().backward()
            >>> tuple(ex.gradients(feats)["layer4"].shape)
            (1, 512, 2, 2)
        """
        grads: dict[str, torch.Tensor] = {}
        for key, probe in features.items():
            if not key.endswith(GRAD_SUFFIX):
                continue
            name = key[: -len(GRAD_SUFFIX)]
            if probe.grad is None:
                raise GradientNotReadyError(
                    f"no gradient for '{name}' yet.\n"
                    "Hint: call backward() on a loss computed from this call's output or features first."
                )
            grads[name] = probe.grad
        return grads

    def extra_repr(self) -> str:
        program = self._fx_programs[self.training]
        return f"features={list(program.keys)}, grads={[k[:-len(GRAD_SUFFIX)] for k in program.grad_keys]}"


def _by_label(selected: list[Selected]) -> dict[str, tuple[str, ...]]:
    labels: dict[str, tuple[str, ...]] = {}
    for s in selected:
        labels[s.label] = labels.get(s.label, ()) + (s.key,)
    return labels


def _code_module(graph: fx.Graph) -> fx.GraphModule:
    """A GraphModule used only to generate (and pickle) the code of ``graph``.

    Its attributes are empty placeholders: the code runs with the extractor as ``self``,
    so every module and tensor is looked up on the live extractor.
    """
    targets: dict[str, Any] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            targets[node.target] = nn.Module()
        elif node.op == "get_attr":
            targets[node.target] = torch.empty(0)
    return fx.GraphModule(targets, graph, "FxStoreProgram")


_PROBES_ALLOWED = False


def _allow_probes_under_compile() -> None:
    """Let torch.compile trace the in-graph ``nn.Parameter`` probes of gradient taps.

    Dynamo graph-breaks on ``nn.Parameter(...)`` by default; its documented escape hatch
    lifts the new parameter to a graph input instead, which is exactly what a gradient
    probe needs. fxstore turns it on only when an extractor taps gradients.
    """
    global _PROBES_ALLOWED
    if _PROBES_ALLOWED:
        return
    import torch._dynamo.config as dynamo_config

    dynamo_config.graph_break_on_nn_param_ctor = False
    _PROBES_ALLOWED = True


def node_names(
    model: nn.Module,
    *,
    train: bool | None = None,
    leaf_modules: list[type[nn.Module]] | None = None,
    autowrap_functions: list[Callable[..., Any]] | None = None,
    autowrap_modules: list[Any] | None = None,
    concrete_args: dict[str, Any] | None = None,
) -> list[str]:
    """Every selectable node of ``model``, in execution order, named like torchvision.

    Args:
        model: The model to list.
        train: Trace in train (``True``) or eval (``False``) mode; default: the model's
            current mode. The model's modes are restored afterwards.
        leaf_modules: Module types not traced through.
        autowrap_functions: Functions recorded as single calls.
        autowrap_modules: Python modules whose functions are autowrapped.
        concrete_args: Arguments fixed at trace time.

    Returns:
        Node names, identical to ``torchvision.models.feature_extraction.get_graph_node_names``.

    Example:
        >>> import torchvision, fxstore
        >>> names = fxstore.node_names(torchvision.models.resnet18())
        >>> names[:4], "layer1.0.add" in names
        (['x', 'conv1', 'bn1', 'relu'], True)
    """
    options = TraceOptions.build(leaf_modules, autowrap_functions, autowrap_modules, concrete_args)
    if train is None or train == model.training and all(m.training == model.training for m in model.modules()):
        return list(trace(model, options, train).names.values())
    modes = {m: m.training for m in model.modules()}
    try:
        model.train(train)
        return list(trace(model, options, train).names.values())
    finally:
        for module, mode in modes.items():
            module.training = mode
