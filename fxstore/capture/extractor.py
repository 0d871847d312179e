"""The pure extractor: a model rewritten so that a call returns ``(output, features)``."""

from __future__ import annotations

import dataclasses
import itertools
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import fx, nn

from ..errors import ConfigError, GradientNotReadyError, InvalidLayerError, LayerNotFoundError, TraceError
from . import _export, _partial, _rewrite
from ._selection import Layers, Selected, canonical_specs, resolve, spec_label
from ._tracing import TraceOptions, trace

__all__ = ["FeatureExtractor", "TraceReport", "node_names", "trace_report", "GRAD_SUFFIX"]

GRAD_SUFFIX = ":grad"
"""Suffix of the feature keys that hold gradient probes (``"layer1:grad"``)."""

_FRONTENDS = ("auto", "fx", "export", "partial")


_first_line = _partial.first_line


def _example(example_inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """``example_inputs`` as ``(args, kwargs)``: a tensor, a tuple of args, or ``(args, kwargs)``."""
    if example_inputs is None:
        return None
    if isinstance(example_inputs, tuple) and len(example_inputs) == 2 and isinstance(example_inputs[1], dict) \
            and isinstance(example_inputs[0], tuple):
        return example_inputs[0], dict(example_inputs[1])
    if isinstance(example_inputs, tuple):
        return example_inputs, {}
    return (example_inputs,), {}


@dataclasses.dataclass
class _Program:
    """One rewritten model (per training mode): what runs, plus what its outputs mean.

    The fx frontend runs ``code`` with the extractor as ``self``; the export and partial
    frontends run ``runner(extractor, args, kwargs) -> (output, features)`` instead.
    """

    code: fx.GraphModule | None  # holds the generated ``forward``; its attributes are placeholders
    keys: tuple[str, ...]
    grad_keys: tuple[str, ...]
    labels: dict[str, tuple[str, ...]]  # label (alias or spec) -> feature keys
    grad_labels: dict[str, tuple[str, ...]]  # label -> tapped keys (without the suffix)
    sources: dict[str, str] = dataclasses.field(default_factory=dict)  # spec label -> label where aliased
    report: TraceReport = dataclasses.field(default_factory=lambda: TraceReport("fx", (), {}, {}, ()))
    runner: Callable[[nn.Module, tuple[Any, ...], dict[str, Any]], tuple[Any, dict[str, Any]]] | None = None


@dataclasses.dataclass(frozen=True)
class TraceReport:
    """How a model was captured: the frontend used and why the ones before it failed.

    Attributes:
        frontend: ``"fx"`` (symbolic tracing), ``"export"`` (``torch.export``, ATen-level) or
            ``"partial"`` (untraceable modules kept as Python, their children traced).
        names: Every selectable node name, in graph order.
        reasons: Frontend tried first -> why it could not capture the model.
        python_modules: For ``"partial"``: module kept as Python -> why fx could not trace it.
        modules: Module paths whose output can be selected, in graph order.
    """

    frontend: str
    names: tuple[str, ...]
    reasons: dict[str, str]
    python_modules: dict[str, str]
    modules: tuple[str, ...] = ()

    def __str__(self) -> str:
        lines = [f"frontend: {self.frontend} ({len(self.names)} nodes)"]
        lines += [f"  {name} failed: {why}" for name, why in self.reasons.items()]
        if self.python_modules:
            lines.append(f"  kept as Python ({len(self.python_modules)} modules):")
            lines += [f"    {path or '<model>'}: {why}" for path, why in self.python_modules.items()]
        return "\n".join(lines)


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
        frontend: How to capture the graph: ``"auto"`` (default) tries ``"fx"`` (symbolic
            tracing, torchvision node names), then ``"export"`` (``torch.export``, ATen-level
            graph named by module path; Hugging Face transformers), then ``"partial"``
            (untraceable modules stay Python, their traceable children are rewritten;
            detection models). :attr:`trace_report` says which one was used and why.
        example_inputs: Inputs ``args`` or ``(args, kwargs)`` to export with. Without them the
            export frontend exports on the first call (and again for every new input
            signature); give them to build everything up front, e.g. before ``torch.compile``.

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
        frontend: str = "auto",
        example_inputs: Any = None,
    ) -> None:
        super().__init__()
        if frontend not in _FRONTENDS:
            raise ConfigError(
                f"frontend={frontend!r} is not a frontend.\nHint: use one of {', '.join(map(repr, _FRONTENDS))}."
            )
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
        self._fx_frontend = frontend
        self._fx_example = _example(example_inputs)
        self._fx_failures: dict[bool, dict[str, str]] = {}  # mode -> frontend -> why it failed
        if grad_specs:
            _allow_probes_under_compile()
        self.training = model.training  # set directly: never toggle the shared submodules here
        program = self._build(self.training, strict=True, inputs=self._fx_example)
        if program is not None:
            self._fx_programs[self.training] = program

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

    def _build(self, training: bool, strict: bool, inputs: tuple[tuple[Any, ...], dict[str, Any]] | None = None
               ) -> _Program | None:
        """The program for ``training`` from the first frontend that captures the model.

        Returns ``None`` when the choice needs example inputs that are not there yet.
        """
        frontend = self._fx_frontend
        failures = self._fx_failures.setdefault(training, {})
        if frontend in ("auto", "fx") and "fx" not in failures:
            try:
                return self._build_fx(training, strict)
            except TraceError as e:
                if frontend == "fx":
                    raise
                failures["fx"] = _first_line(e)
        if frontend in ("auto", "export") and "export" not in failures:
            if inputs is None:
                return None
            try:
                return self._build_export(training, strict, inputs)
            except TraceError as e:
                if frontend == "export":
                    raise
                failures["export"] = _first_line(e)
        try:
            return self._build_partial(training, strict, failures)
        except TraceError as e:
            tried = "".join(f"\n  {name}: {why}" for name, why in failures.items())
            raise TraceError(
                f"fxstore could not capture {type(self._fx_model).__name__} with any frontend:{tried}"
                f"\n  partial: {_first_line(e)}\n"
                "Hint: capture this model with the hook backend (fxstore.HookForwardModuleStorage)."
            ) from e

    def _build_fx(self, training: bool, strict: bool) -> _Program:
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
        _rewrite.capture(graph, traced.root, [s.node for s in selected], [s.node for s in tapped], self._fx_policy)
        return _Program(
            code=_code_module(graph),
            keys=tuple(s.key for s in selected),
            grad_keys=tuple(s.key + GRAD_SUFFIX for s in tapped),
            labels=_by_label(selected),
            grad_labels=_by_label(tapped),
            sources=_sources(selected, tapped),
            report=TraceReport("fx", tuple(traced.names.values()), {}, {}, tuple(traced.module_calls)),
        )

    def _build_export(self, training: bool, strict: bool, inputs: tuple[tuple[Any, ...], dict[str, Any]]) -> _Program:
        def build(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            exported = _export.export(self._fx_model, args, kwargs, training)
            for name, value in exported.constants.items():
                self.register_buffer(name, value, persistent=False)
            traced = exported.traced
            selected = resolve(traced, self._fx_specs, strict=strict)
            tapped = resolve(traced, self._fx_grad_specs, strict=strict)
            _rewrite.capture(traced.graph, traced.root, [s.node for s in selected], [s.node for s in tapped],
                             self._fx_policy)
            code = type(_code_module(traced.graph)).forward
            built = (exported, tuple(s.key for s in selected), tuple(s.key + GRAD_SUFFIX for s in tapped), code)
            labels[id(built)] = (selected, tapped)
            return built

        labels: dict[int, tuple[list[Selected], list[Selected]]] = {}
        runner = _export.ExportRunner(build, self._fx_policy["keep_output"])
        exported, keys, grad_keys, _ = first = runner.prepare(*inputs)
        selected, tapped = labels[id(first)]
        return _Program(
            code=None, keys=keys, grad_keys=grad_keys, labels=_by_label(selected), grad_labels=_by_label(tapped),
            report=TraceReport("export", tuple(exported.traced.names.values()),
                               dict(self._fx_failures.get(training, {})), {}, tuple(exported.traced.module_calls)),
            runner=runner,
            sources=_sources(selected, tapped),
        )

    def _build_partial(self, training: bool, strict: bool, failures: dict[str, str]) -> _Program:
        plan = _partial.trace_partial(self._fx_model, self._fx_trace, training, failures.get("fx"))
        selected = resolve(plan.traced, self._fx_specs, strict=strict)
        tapped = resolve(plan.traced, self._fx_grad_specs, strict=strict)
        runner = _partial.PartialRunner(self._fx_model, plan, selected, tapped, self._fx_policy, training)
        keep = self._fx_policy["keep_output"]

        def run(_owner: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
            output, features = runner(args, kwargs)
            return (output if keep else None), features

        return _Program(
            code=None, keys=runner.keys, grad_keys=runner.grad_keys,
            labels=_by_label(selected), grad_labels=_by_label(tapped),
            report=TraceReport("partial", tuple(plan.traced.names.values()), dict(failures), dict(plan.reasons),
                               tuple(plan.traced.module_calls)),
            runner=run,
            sources=_sources(selected, tapped),
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
            program = self._build(mode, strict=not self._fx_programs, inputs=self._fx_example)
            if program is not None:
                self._fx_programs[mode] = program
        return self

    def forward(self, *args: Any, **kwargs: Any) -> tuple[Any, dict[str, torch.Tensor]]:
        """Run the model; return ``(output, features)`` (``output`` is ``None`` if not kept)."""
        program = self._fx_programs.get(self.training)
        if program is None:
            program = self._pending(args, kwargs)
        if program.runner is not None:
            return program.runner(self, args, kwargs)
        output, features, probes = type(program.code).forward(self, *args, **kwargs)
        result = dict(zip(program.keys, features))
        if probes:
            result.update(zip(program.grad_keys, probes))
        return output, result

    def _pending(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Program:
        """Build the program that needed example inputs, from this first call's inputs."""
        if torch.compiler.is_compiling():
            raise ConfigError(
                f"{type(self._fx_model).__name__} needs example inputs to pick its frontend, and the first call "
                "is inside torch.compile.\nHint: pass example_inputs=... to FeatureExtractor, or call it once eagerly."
            )
        strict = not self._fx_programs
        program = self._build(self.training, strict=strict, inputs=(tuple(args), dict(kwargs)))
        if program is None:  # unreachable: with inputs every frontend decides
            raise ConfigError("fxstore could not pick a frontend.\nHint: pass frontend='partial'.")
        self._fx_programs[self.training] = program
        return program

    # -- introspection -----------------------------------------------------------------

    @property
    def trace_report(self) -> TraceReport | None:
        """How the model was captured in the current mode (``None`` until the first call when the
        frontend choice waits for example inputs).

        Example:
            >>> import torchvision, fxstore
            >>> fxstore.FeatureExtractor(torchvision.models.resnet18(), ["layer1"]).trace_report.frontend
            'fx'
        """
        program = self._fx_programs.get(self.training)
        return program.report if program is not None else None

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

    def _labelled(self, features: Mapping[str, Any], grads: bool = False) -> dict[str, list[Any]]:
        """``{label: [value, ...]}`` in call order, repeated runs of partially traced parts included."""
        program = self._fx_programs[self.training]
        labels = program.grad_labels if grads else program.labels
        suffix = GRAD_SUFFIX if grads else ""
        out: dict[str, list[Any]] = {}
        for label, keys in labels.items():
            values = out.setdefault(label, [])
            for run in itertools.count():
                found = [v for k in keys for v in _values(features, _partial.call_key(k, run), suffix)]
                if not found:
                    break
                values += found
        return out

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

    def export(self, path: Any, example_inputs: Any, format: str = "exported", *, dynamic: bool = True,
               verify: bool = True) -> Any:
        """Write this extractor as a deployable artifact whose outputs are the features.

        ``"exported"`` is a ``torch.export`` archive (``torch.export.load(path).module()``), ``"aoti"``
        an AOTInductor package (``torch._inductor.aoti_load_package(path)``), ``"onnx"`` an ONNX
        file with outputs named after the feature keys (and ``output`` when kept). A call returns
        the features dict, or ``(output, features)`` when the output is kept. The batch axis (and
        the sequence axis of token ids, the image size where the model allows it) is dynamic; the
        ranges, feature shapes and dtypes are stored in the artifact (see ``fxstore info FILE``).

        Args:
            path: The file to write.
            example_inputs: Inputs to export with: a tensor, a tuple of inputs, or ``(args, kwargs)``.
            format: ``"exported"``, ``"aoti"`` or ``"onnx"``.
            dynamic: Make batch (and sequence, image size) axes dynamic; ``False`` fixes every shape.
            verify: Run the artifact on ``example_inputs`` and compare it with this extractor.

        Returns:
            A ``DeployReport`` (``path``, ``format``, ``metadata``, ``max_diff``).

        Raises:
            ConfigError: an unknown format, gradient taps, or an extractor in train mode.
            TraceError: the model cannot be exported, or the artifact disagrees with the extractor.

        Example:
            >>> import tempfile, torch, fxstore
            >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 1))
            >>> ex = fxstore.FeatureExtractor(model.eval(), ["1"], keep_output=False)
            >>> path = tempfile.mkdtemp() + "/feats.pt2"
            >>> report = ex.export(path, torch.rand(2, 3, 8, 8), format="exported")
            >>> report.metadata["features"]["1"]["shape"], report.max_diff
            (['batch', 4, 'height - 2', 'width - 2'], 0.0)
            >>> tuple(torch.export.load(path).module()(torch.rand(5, 3, 10, 12))["1"].shape)
            (5, 4, 8, 10)
        """
        from ._deploy import export_extractor

        return export_extractor(self, path, example_inputs, format, dynamic=dynamic, verify=verify)

    def extra_repr(self) -> str:
        program = self._fx_programs[self.training]
        return f"features={list(program.keys)}, grads={[k[:-len(GRAD_SUFFIX)] for k in program.grad_keys]}"


def _values(features: Mapping[str, Any], key: str, suffix: str) -> list[Any]:
    """The value stored under ``key``, or the values of its outputs ``key:0``, ``key:1``, ... ."""
    if key + suffix in features:
        return [features[key + suffix]]
    parts = []
    for i in itertools.count():
        name = f"{key}:{i}{suffix}"
        if name not in features:
            return parts
        parts.append(features[name])
    return parts


def _sources(selected: list[Selected], tapped: list[Selected]) -> dict[str, str]:
    return {s.source: s.label for s in selected + tapped if s.source != s.label}


def _by_label(selected: list[Selected]) -> dict[str, tuple[str, ...]]:
    labels: dict[str, tuple[str, ...]] = {}
    for s in selected:
        labels[s.label] = labels.get(s.label, ()) + (s.key,)
    return labels


_code_module = _rewrite.code_module


_PROBES_ALLOWED = False


def _allow_probes_under_compile() -> None:
    """Let torch.compile trace the in-graph ``nn.Parameter`` probes of gradient taps.

    Dynamo graph-breaks on ``nn.Parameter(...)`` by default; its documented escape hatch
    lifts the new parameter to a graph input instead, which is exactly what a gradient
    probe needs. Probes need static shapes, so automatic dynamic shapes are turned off too
    (a new batch size recompiles). fxstore does this only when an extractor taps gradients.
    """
    global _PROBES_ALLOWED
    if _PROBES_ALLOWED:
        return
    import torch._dynamo.config as dynamo_config

    dynamo_config.graph_break_on_nn_param_ctor = False
    # A probe is a graph input shaped like the probed value, and dynamo can only create it for
    # a static shape: recompile per new input shape instead of switching to dynamic shapes.
    dynamo_config.automatic_dynamic_shapes = False
    _PROBES_ALLOWED = True


def trace_report(
    model: nn.Module,
    *,
    example_inputs: Any = None,
    frontend: str = "auto",
    train: bool | None = None,
    **trace_options: Any,
) -> TraceReport:
    """How fxstore captures ``model``: the frontend, every node name, and why others failed.

    Args:
        model: The model; it is not modified (its modes are restored).
        example_inputs: Inputs to export with (``args`` or ``(args, kwargs)``); needed when
            symbolic tracing fails and ``frontend`` is ``"auto"`` or ``"export"``.
        frontend: ``"auto"``, ``"fx"``, ``"export"`` or ``"partial"`` (see :class:`FeatureExtractor`).
        train: Capture in train (``True``) or eval (``False``) mode; default: the current mode.
        **trace_options: ``leaf_modules``, ``autowrap_functions``, ``autowrap_modules``, ``concrete_args``.

    Raises:
        ConfigError: when the choice needs ``example_inputs`` and none were given.
        TraceError: when no frontend can capture the model (naming each frontend's reason).

    Example:
        >>> import torchvision
        >>> from fxstore.capture.extractor import trace_report  # also fxstore.trace_report
        >>> model = torchvision.models.detection.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None)
        >>> report = trace_report(model, frontend="partial")
        >>> report.frontend, report.python_modules["head"]
        ('partial', 'Proxy object cannot be iterated')
        >>> "backbone.features.0.0" in report.names  # the traced backbone, named with its path
        True
    """
    modes = {m: m.training for m in model.modules()}
    try:
        if train is not None:
            model.train(train)
        extractor = FeatureExtractor(model, None, keep_output=True, frontend=frontend,
                                     example_inputs=example_inputs, **trace_options)
    finally:
        for module, mode in modes.items():
            module.training = mode
    report = extractor.trace_report
    if report is None:
        raise ConfigError(
            f"torch.fx cannot trace {type(model).__name__} ({extractor._fx_failures[extractor.training]['fx']}), "
            "and the next frontend, torch.export, needs example inputs.\n"
            "Hint: pass example_inputs=(x,), or frontend='partial'."
        )
    return report


def node_names(
    model: nn.Module,
    *,
    train: bool | None = None,
    leaf_modules: list[type[nn.Module]] | None = None,
    autowrap_functions: list[Callable[..., Any]] | None = None,
    autowrap_modules: list[Any] | None = None,
    concrete_args: dict[str, Any] | None = None,
    frontend: str = "auto",
    example_inputs: Any = None,
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
        frontend: ``"auto"``, ``"fx"``, ``"export"`` or ``"partial"``; when fx cannot trace the
            model the names come from the frontend the extractor would use
            (see :func:`trace_report`, which also says which one).
        example_inputs: Inputs for the export frontend (``args`` or ``(args, kwargs)``).

    Returns:
        Node names; for a model fx traces, identical to
        ``torchvision.models.feature_extraction.get_graph_node_names``.

    Example:
        >>> import torchvision, fxstore
        >>> names = fxstore.node_names(torchvision.models.resnet18())
        >>> names[:4], "layer1.0.add" in names
        (['x', 'conv1', 'bn1', 'relu'], True)
    """
    if frontend != "fx":
        kwargs = dict(leaf_modules=leaf_modules, autowrap_functions=autowrap_functions,
                      autowrap_modules=autowrap_modules, concrete_args=concrete_args)
        if frontend == "auto":
            try:
                return node_names(model, train=train, frontend="fx", **kwargs)
            except TraceError:
                pass
        report = trace_report(model, example_inputs=example_inputs, frontend=frontend, train=train, **kwargs)
        return list(report.names)
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
