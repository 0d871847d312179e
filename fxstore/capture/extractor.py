"""The extractor: a thin ``nn.Module`` shell around a captured program.

A frontend (:mod:`._frontends`) captures the model and returns a :class:`~._program.Program`
``(owner, args, kwargs) -> (output, features)``; the extractor picks the program of its
current mode, checks it once against the plain model (:mod:`._selfcheck`), and runs it.
Gradient taps are operators inside the program (:mod:`._taps`), so eager calls,
:meth:`FeatureExtractor.compile` and ``torch.compile(ex, fullgraph=True)`` run the same graph.
"""

from __future__ import annotations

import dataclasses
import itertools
import types
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import fx, nn

from ..errors import ConfigError, EditError, GradientNotReadyError, InvalidLayerError, LayerNotFoundError, TraceError
from . import _frontends, _taps
from ._calls import call_defaults, with_defaults
from ._edits import Edit
from ._frontends import FRONTENDS, Request
from ._keys import GRAD_SUFFIX, call_key, output_key
from ._policy import StoragePolicy
from ._program import GraphRun, Program, TraceReport
from ._selection import Layers, canonical_specs, spec_label
from ._selfcheck import Snapshot, compare
from ._tracing import TraceOptions, modes_restored, trace

__all__ = ["FeatureExtractor", "TraceReport", "node_names", "trace_report", "GRAD_SUFFIX"]

Inputs = tuple[tuple[Any, ...], dict[str, Any]]


def _example(example_inputs: Any) -> Inputs | None:
    """``example_inputs`` as ``(args, kwargs)``: a tensor, a tuple of args, or ``(args, kwargs)``."""
    if example_inputs is None:
        return None
    if isinstance(example_inputs, tuple) and len(example_inputs) == 2 and isinstance(example_inputs[1], dict) \
            and isinstance(example_inputs[0], tuple):
        return example_inputs[0], dict(example_inputs[1])
    if isinstance(example_inputs, tuple):
        return example_inputs, {}
    return (example_inputs,), {}


def _fresh(function: Any) -> Any:
    """A copy of ``function`` with its own code object (other callables are returned as they are).

    ``torch.compile`` keeps its compiled graphs (and its recompile limit) per code object;
    giving each extractor its own ``forward`` code makes every extractor its own program,
    however many there are in one process. The copy keeps the closure, so a subclass's
    ``forward`` that calls ``super().forward(...)`` still finds its class.
    """
    if not isinstance(function, types.FunctionType):
        return function
    code = function.__code__.replace()
    copy = types.FunctionType(code, function.__globals__, function.__name__, function.__defaults__,
                              function.__closure__)
    copy.__kwdefaults__ = function.__kwdefaults__
    copy.__dict__.update(function.__dict__)
    copy.__doc__, copy.__qualname__ = function.__doc__, function.__qualname__
    return copy


class FeatureExtractor(nn.Module):
    """A model whose call returns ``(output, features)``, captured as real graph outputs.

    The model is traced with torch.fx (node names identical to torchvision's
    ``get_graph_node_names``) and rewritten so the selected nodes become extra outputs.
    The result compiles with ``torch.compile(fullgraph=True)`` (each extractor is its own
    program, for any number of extractors), runs only what the selected features need when
    ``keep_output=False``, protects stored values from later in-place ops, and can tap
    gradients of layer outputs inside the graph (compile those with :meth:`compile`).

    The extractor shares submodules and parameters with ``model`` (like torchvision's
    extractor) and never modifies it; its ``state_dict`` keys equal the model's. The
    graph that runs is the one for the extractor's current mode (``train()``/``eval()``).
    On the first call it checks once that the captured program reproduces the plain
    model's output (``verify=False`` skips that).

    Args:
        model: The model to capture from.
        layers: What to store: module objects, module names (that module's output, every
            call), fx node names (``"add_3"``), glob patterns over node names
            (``"layer*.*.relu"``), module types (``nn.Conv2d``), predicates
            ``(name) -> bool`` or ``(name, node) -> bool``; a dict ``{layer: alias}``
            renames outputs.
        grads: Layers (same forms) whose output gradients are tapped inside the graph. After
            ``loss.backward()``, :meth:`gradients` returns them (and :meth:`attributions`
            activation × gradient); each call's features hold a ticket for them under
            ``key + ":grad"``.
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
            detection models). A frontend whose program fails the self-check is skipped.
            :attr:`trace_report` says which one was used and why.
        example_inputs: Inputs ``args`` or ``(args, kwargs)``: the export frontend exports
            with them (once, with dynamic batch and sequence dimensions) and the self-check
            runs at build time. Without them both happen on the first call.
        verify: Check once (first call, or build time with ``example_inputs``) that the
            captured program reproduces the plain model's output; a mismatch moves
            ``frontend="auto"`` to the next frontend and raises ``TraceError`` for an explicit one.
            (With edits the check runs the captured graph without them.)
        edits: ``{layer: edit}`` (layers in the same forms as ``layers``): each edit
            (``fxstore.Add``, ``Replace``, ``Ablate``, ``Scale``, ``Apply``) replaces that node's
            value for everything downstream, stored features included, inside the graph. Its
            tensors are buffers of the extractor (:attr:`edits`; ``edit.update(...)`` changes them
            without recompiling) and may require grad.

    Raises:
        LayerNotFoundError: a layer matches nothing (the message suggests close names).
        InvalidLayerError: a layer is not a valid specification.
        TraceError: the model cannot be captured (the message names the module).
        ConfigError: an option is invalid.
        EditError: an edit that is not an edit, two edits on one node, or an edit that nothing
            returned depends on.

    Example:
        >>> import torch, torchvision, fxstore
        >>> model = torchvision.models.resnet18().eval()
        >>> ex = fxstore.FeatureExtractor(model, ["layer1", model.layer4])
        >>> x = torch.rand(1, 3, 64, 64)
        >>> out, feats = ex(x)
        >>> torch.equal(out, model(x)), {k: tuple(v.shape) for k, v in feats.items()}
        (True, {'layer1': (1, 64, 16, 16), 'layer4': (1, 512, 2, 2)})
        >>> ex.trace_report.verified
        'exact'
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
        verify: bool = True,
        edits: Mapping[Any, Edit] | None = None,
    ) -> None:
        super().__init__()
        if frontend not in FRONTENDS:
            raise ConfigError(
                f"frontend={frontend!r} is not a frontend.\nHint: use one of {', '.join(map(repr, FRONTENDS))}."
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
        if grad_specs and not specs and not keep_output:
            raise ConfigError(
                "grads= with keep_output=False and no layers: nothing is returned that a loss could be "
                "computed from, so no gradient can ever reach the taps.\n"
                "Hint: keep the output (keep_output=True), or also store the layers the loss is computed from."
            )
        policy = StoragePolicy.build(keep_output=keep_output, detach=detach, transform=transform, dtype=dtype,
                                     device=device, non_blocking=non_blocking)
        self._mirror(model)
        object.__setattr__(self, "_fx_model", model)  # not a submodule: keeps state_dict keys equal
        edit_specs = self._add_edits(model, edits)
        self._fx_request = Request(model, specs, grad_specs, policy,
                                   TraceOptions.build(leaf_modules, autowrap_functions, autowrap_modules,
                                                      concrete_args),
                                   frontend, self._register_constant, edits=edit_specs)
        self._fx_programs: dict[bool, Program] = {}
        self._fx_call_defaults, self._fx_notes = call_defaults(model)
        example = _example(example_inputs)
        self._fx_example = None if example is None else (example[0], with_defaults(self._fx_call_defaults, example[1]))
        self._fx_verify = bool(verify)
        self._fx_failures: dict[bool, dict[str, str]] = {}  # mode -> frontend -> why it failed
        self._bind_forward()
        self.training = model.training  # set directly: never toggle the shared submodules here
        self._install(self.training, strict=True)

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

    def _add_edits(self, model: nn.Module, edits: Mapping[Any, Edit] | None) -> list[tuple[Any, str]]:
        """Make each edit a child ``_fx_edit_<i>`` (its tensors become buffers); ``[(spec, child name)]``."""
        self._fx_edits: dict[str, Edit] = {}
        if edits is None:
            return []
        if not isinstance(edits, Mapping):
            raise EditError(
                f"edits={edits!r} is not a mapping.\nHint: pass edits={{layer: fxstore.Add(vector), ...}}."
            )
        out = []
        for i, (spec, edit) in enumerate(edits.items()):
            if not isinstance(edit, Edit):
                raise EditError(
                    f"the edit for layer {spec!r} is a {type(edit).__name__}, not an fxstore edit.\n"
                    "Hint: use fxstore.Add, Replace, Ablate, Scale or Apply."
                )
            canonical = canonical_specs([spec], model)[0][0]
            label = spec_label(canonical)
            if label in self._fx_edits:
                raise EditError(f"two edits for the layer '{label}'.\nHint: combine them into one fxstore.Apply.")
            name = f"_fx_edit_{i}"
            self.add_module(name, edit)
            self._fx_edits[label] = edit
            out.append((canonical, name))
        return out

    @property
    def edits(self) -> dict[str, Edit]:
        """Each edit by the layer it edits (``edit.update(...)`` changes its values in place).

        Example:
            >>> import torch, torchvision, fxstore
            >>> m = torchvision.models.resnet18().eval()
            >>> ex = fxstore.FeatureExtractor(m, edits={m.layer1: fxstore.Scale(0.0)})
            >>> list(ex.edits)
            ['layer1']
            >>> _ = ex.edits["layer1"].update(factor=1.0)  # the plain model again, same program
            >>> x = torch.rand(1, 3, 32, 32)
            >>> torch.equal(ex(x)[0], m(x))
            True
        """
        return dict(self._fx_edits)

    def _check_free(self, name: str, model: nn.Module) -> None:
        if hasattr(self, name) or name.startswith("_fx_"):
            raise ConfigError(
                f"{type(model).__name__} has an attribute '{name}' that clashes with FeatureExtractor's own.\n"
                "Hint: wrap the model in a small nn.Module, or use the hook backend."
            )

    def _register_constant(self, name: str, value: torch.Tensor) -> None:
        if name not in self._buffers:
            self.register_buffer(name, value, persistent=False)

    def _bind_forward(self) -> None:
        """Give this extractor its own ``forward`` (and compiled-call) code: see :func:`_fresh`.

        The copy is of ``type(self).forward``: a subclass's own ``forward`` runs (and reaches
        this class's through ``super().forward``).
        """
        forward = type(self).forward
        if isinstance(forward, types.FunctionType):  # else (a descriptor of the subclass's) the class's applies
            self.__dict__["forward"] = types.MethodType(_fresh(forward), self)
        self.__dict__["_fx_run_compiled"] = types.MethodType(_fresh(FeatureExtractor._run_program), self)

    def _install(self, training: bool, strict: bool, inputs: Inputs | None = None) -> Program | None:
        """Build the program for ``training`` (``None`` while it waits for example inputs) and check it."""
        inputs = inputs if inputs is not None else self._fx_example
        failures = self._fx_failures.setdefault(training, {})
        program = _frontends.build(self._fx_request, training, strict, inputs, failures)
        if program is None:
            return None
        if not strict:
            self._warn_missing(training, program)
        self._fx_programs[training] = program
        if not self._fx_verify:
            program.report = dataclasses.replace(program.report, verified="skipped: verify=False")
        elif self._fx_example is not None and inputs is self._fx_example:
            program, _ = self._checked(program, inputs, training, real=False)
        return program

    def _warn_missing(self, training: bool, program: Program) -> None:
        reference = self._fx_programs.get(not training)
        if reference is None:
            return
        missing = (set(reference.keys) - set(program.keys)) | (set(reference.grad_keys) - set(program.grad_keys))
        if missing:
            mode = "train" if training else "eval"
            warnings.warn(
                f"fxstore: {sorted(missing)} are not produced in {mode} mode (the {mode} graph differs); "
                "they are missing from the features in that mode.",
                stacklevel=4,
            )

    # -- the self-check -------------------------------------------------------------------

    def _checked(self, program: Program, inputs: Inputs, training: bool, real: bool) -> tuple[Program, Any]:
        """Check ``program`` against the plain model on ``inputs``; on a mismatch, move on.

        With ``real=True`` the program's own run is the call's result (returned, so the
        first call costs one extra forward of the plain model); otherwise every trial
        run is undone. Returns the program that passed and the call's result, if run.
        """
        if not self._fx_verify:
            return program, None
        args, kwargs = inputs
        while True:
            state = Snapshot(self._fx_model, inputs)
            try:
                expected = self._plain_output(inputs, training)
            except Exception as e:  # the plain model fails on these inputs: nothing to compare with
                program.report = dataclasses.replace(
                    program.report, verified=f"skipped: the plain model raised {type(e).__name__}")
                return program, None
            finally:
                state.restore()
            kept = real and program.reference is None  # the trial run is the call itself
            result = program.run(self, args, kwargs) if kept else None
            if kept:
                actual = result[0]
            else:
                with torch.no_grad():
                    actual = (program.reference(self, args, kwargs) if program.reference is not None
                              else program.run(self, args, kwargs)[0])
            ok, verdict = compare(expected, actual)
            if not (kept and ok):
                state.restore()
            if ok:
                program.report = dataclasses.replace(program.report, verified=verdict)
                program.reference = None
                return program, result
            program = self._next_frontend(program, inputs, training, verdict)

    def _plain_output(self, inputs: Inputs, training: bool) -> Any:
        """The plain model's output, its top-level flag in ``training`` (the children are shared and set)."""
        model, mode = self._fx_model, self._fx_model.training
        model.training = training
        try:
            with torch.no_grad():
                return model(*inputs[0], **inputs[1])
        finally:
            model.training = mode

    def _next_frontend(self, program: Program, inputs: Inputs, training: bool, verdict: str) -> Program:
        """After a failed self-check: the next frontend's program (``"auto"``), else ``TraceError``."""
        frontend = program.report.frontend
        failures = self._fx_failures.setdefault(training, {})
        failures[frontend] = f"self-check: {verdict}"
        if self._fx_request.frontend != "auto":
            raise TraceError(
                f"the {frontend} frontend captured {type(self._fx_model).__name__} wrongly: its {verdict}.\n"
                "Hint: use frontend='auto' to fall back to the next frontend, or report the model; "
                "verify=False skips this check."
            )
        strict = all(other == training for other in self._fx_programs)
        rebuilt = _frontends.build(self._fx_request, training, strict, inputs, failures)
        if rebuilt is None:  # unreachable: with inputs every frontend decides
            raise TraceError("fxstore could not pick a frontend.\nHint: pass frontend='partial'.")
        rebuilt.report = dataclasses.replace(rebuilt.report, reasons=dict(failures))
        self._fx_programs[training] = rebuilt
        return rebuilt

    # -- nn.Module ------------------------------------------------------------------------

    def train(self, mode: bool = True) -> FeatureExtractor:
        """Switch mode like ``nn.Module.train``; the graph of that mode runs from now on."""
        super().train(mode)
        if mode not in self._fx_programs:
            self._install(mode, strict=not self._fx_programs)
        return self

    def forward(self, *args: Any, **kwargs: Any) -> tuple[Any, dict[str, torch.Tensor]]:
        """Run the model; return ``(output, features)`` (``output`` is ``None`` if not kept).

        A subclass may override it and call ``super().forward(*args, **kwargs)``, as with any
        ``nn.Module``.

        Example:
            >>> import torch, torchvision, fxstore
            >>> class Features(fxstore.FeatureExtractor):
            ...     def forward(self, x):
            ...         return super().forward(x)[1]   # only the features
            >>> model = torchvision.models.resnet18()
            >>> list(Features(model, ["layer1"], keep_output=False)(torch.rand(1, 3, 32, 32)))
            ['layer1']
        """
        kwargs = with_defaults(self._fx_call_defaults, kwargs)
        program = self._fx_programs.get(self.training)
        compiling = torch.compiler.is_compiling()
        if program is None or (not compiling and program.report.verified == "not yet"):
            program, result = self._first_call(program, args, kwargs)
            if result is not None:
                return result
        compiled = None if compiling else self.__dict__.get("_fx_compiled")
        if compiled is not None:
            return compiled(args, kwargs)
        return program.run(self, args, kwargs)

    def _run_program(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, dict[str, torch.Tensor]]:
        """What :meth:`compile` compiles: the current mode's program."""
        return self._fx_programs[self.training].run(self, args, kwargs)

    def _first_call(self, program: Program | None, args: tuple[Any, ...], kwargs: dict[str, Any]
                    ) -> tuple[Program, Any]:
        """Build the program that waited for inputs, and run the self-check with this call."""
        inputs = (tuple(args), dict(kwargs))
        if program is None:
            if torch.compiler.is_compiling():
                raise ConfigError(
                    f"{type(self._fx_model).__name__} needs example inputs to pick its frontend, and the first "
                    "call is inside torch.compile.\nHint: pass example_inputs=... to FeatureExtractor, or call it "
                    "once eagerly."
                )
            program = self._install(self.training, strict=not self._fx_programs, inputs=inputs)
            if program is None:  # unreachable: with inputs every frontend decides
                raise ConfigError("fxstore could not pick a frontend.\nHint: pass frontend='partial'.")
        return self._checked(program, inputs, self.training, real=self.__dict__.get("_fx_compiled") is None)

    def compile(self, **torch_compile_kwargs: Any) -> FeatureExtractor:  # type: ignore[override]
        """Compile the captured program with ``torch.compile`` (``fullgraph=True`` by default).

        Calls stay ``ex(x)``; the first call still runs the self-check eagerly. Equivalent to
        ``torch.compile(ex, fullgraph=True)`` for fx and export programs (gradient taps included),
        and the way to compile a partially traced model's traced parts without a ``fullgraph``
        error (the default ``fullgraph`` is ``False`` there).

        Args:
            **torch_compile_kwargs: Passed to ``torch.compile`` (``backend``, ``mode``,
                ``dynamic``, ``fullgraph``, ``options``).

        Returns:
            The extractor itself, so ``c = ex.compile(); c(x)`` works.

        Example:
            >>> import torch, torchvision, fxstore
            >>> ex = fxstore.FeatureExtractor(torchvision.models.resnet18().eval(), grads=["layer4"])
            >>> ex.compile(backend="eager") is ex
            True
            >>> for batch in (1, 2, 3):
            ...     out, feats = ex(torch.rand(batch, 3, 32, 32))
            ...     out.sum().backward()
            >>> tuple(ex.gradients(feats)["layer4"].shape)
            (3, 512, 1, 1)
        """
        programs = list(self._fx_programs.values())
        torch_compile_kwargs.setdefault("fullgraph", all(p.fullgraph for p in programs) if programs else True)
        self.__dict__["_fx_compiled"] = torch.compile(self.__dict__["_fx_run_compiled"], **torch_compile_kwargs)
        return self

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        for name in ("forward", "_fx_run_compiled", "_fx_compiled"):
            state.pop(name, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._bind_forward()

    # -- introspection -----------------------------------------------------------------

    def _program(self) -> Program:
        program = self._fx_programs.get(self.training)
        if program is None:
            raise ConfigError(
                f"the program of {type(self._fx_model).__name__} is built on the first call (its frontend needs "
                "example inputs).\nHint: call the extractor once, or pass example_inputs=... when building it."
            )
        return program

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
        if program is None:
            return None
        return dataclasses.replace(program.report, notes=self._fx_notes) if self._fx_notes else program.report

    @property
    def graph(self) -> fx.Graph | None:
        """The rewritten graph that runs in the current mode (``None`` for the partial frontend).

        Example:
            >>> import torchvision, fxstore
            >>> ex = fxstore.FeatureExtractor(torchvision.models.resnet18(), ["layer1"], keep_output=False)
            >>> any(node.target == "layer4.0.conv1" for node in ex.graph.nodes)   # cut after layer1
            False
        """
        return self._program().graph

    @property
    def code(self) -> str | None:
        """The Python code generated for the current mode's graph (``None`` for the partial frontend).

        Example:
            >>> import torchvision, fxstore
            >>> print(fxstore.FeatureExtractor(torchvision.models.vgg11(), ["features.1"], keep_output=False).code.strip())
            def forward(self, x : torch.Tensor):
                features_0 = getattr(self.features, "0")(x);  x = None
                features_1 = getattr(self.features, "1")(features_0);  features_0 = None
                return (None, (features_1,), ())
        """
        program = self._program()
        if isinstance(program.run, GraphRun):
            return program.run.code.code
        if program.graph is not None:
            return program.graph.python_code("self").src
        return None

    @property
    def exports(self) -> int:
        """How many times the export frontend has run ``torch.export`` in the current mode (0 for
        the other frontends): one export serves every input shape its guards admit.

        Example:
            >>> import torchvision, fxstore
            >>> fxstore.FeatureExtractor(torchvision.models.resnet18(), ["layer1"]).exports
            0
        """
        return int(getattr(self._program().run, "exports", 0))

    @property
    def feature_keys(self) -> tuple[str, ...]:
        """Keys of the stored features in the current mode, in order."""
        return self._program().keys

    def keys_for(self, layer: Any) -> tuple[str, ...]:
        """Feature keys a layer (module object, name or alias) was stored under.

        Example:
            >>> import torchvision, fxstore
            >>> m = torchvision.models.resnet18()
            >>> fxstore.FeatureExtractor(m, [m.relu, "layer1"]).keys_for(m.relu)
            ('relu',)
        """
        program = self._program()
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
        program = self._program()
        labels = program.grad_labels if grads else program.labels
        suffix = GRAD_SUFFIX if grads else ""
        out: dict[str, list[Any]] = {}
        for label, keys in labels.items():
            values = out.setdefault(label, [])
            for run in itertools.count():
                found = [v for k in keys for v in _values(features, call_key(k, run), suffix)]
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
        for key, ticket in features.items():
            if not key.endswith(GRAD_SUFFIX):
                continue
            name = key[: -len(GRAD_SUFFIX)]
            grad = _taps.gradient_of(ticket)
            if grad is None:
                raise GradientNotReadyError(
                    f"no gradient for '{name}' yet.\n"
                    "Hint: call backward() on a loss computed from this call's output or features first."
                )
            grads[name] = grad
        return grads

    def attributions(self, features: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Activation × gradient of every tapped layer, read after ``backward()``.

        The first-order attribution of Captum's ``LayerGradientXActivation`` and of
        attribution patching: ``value * d(loss)/d(value)``, elementwise, without autograd
        history. The activation is the stored feature of the same layer, so select the
        tapped layers in ``layers=`` too (as in the example).

        Args:
            features: The features dict returned by the call.

        Returns:
            ``{key: activation * gradient}`` for each tapped layer.

        Raises:
            GradientNotReadyError: if backward has not reached a tapped layer yet.
            ConfigError: a tapped layer is not stored, or stored through a ``transform``.

        Example:
            >>> import torch, torchvision, fxstore
            >>> m = torchvision.models.resnet18()
            >>> ex = fxstore.FeatureExtractor(m, ["layer3"], grads=["layer3"])
            >>> out, feats = ex(torch.rand(1, 3, 64, 64))
            >>> out[:, 0].sum().backward()
            >>> attr = ex.attributions(feats)["layer3"]
            >>> torch.equal(attr, feats["layer3"].detach() * ex.gradients(feats)["layer3"])
            True
        """
        if self._fx_request.policy.transform is not None:
            raise ConfigError(
                "attributions need the layers' own values, and this extractor stores them through transform=.\n"
                "Hint: build the extractor without transform= (or use gradients() and your own activations)."
            )
        result: dict[str, torch.Tensor] = {}
        for name, grad in self.gradients(features).items():
            if name not in features:
                raise ConfigError(
                    f"attributions need the activation of the tapped layer '{name}', which is not stored.\n"
                    "Hint: select it in layers= as well as in grads=."
                )
            with torch.no_grad():
                result[name] = features[name].detach().to(grad.device, grad.dtype) * grad
        return result

    def export(self, path: Any, example_inputs: Any, format: str = "exported", *, dynamic: bool = True,
               verify: bool = True) -> Any:
        """Write this extractor as a deployable artifact whose outputs are the features.

        ``"exported"`` is a ``torch.export`` archive (``torch.export.load(path).module()``), ``"aoti"``
        an AOTInductor package (``torch._inductor.aoti_load_package(path)``), ``"onnx"`` an ONNX
        file with outputs named after the feature keys (and ``output`` when kept). A call returns
        the features dict, or ``(output, features)`` when the output is kept. The batch axis (and
        the sequence axis of token ids, the image size where the model allows it) is dynamic; the
        ranges, feature shapes and dtypes are stored in the artifact (see ``fxstore info FILE``).
        Each edit's tensors (and its ``enabled`` switch) are inputs of the artifact after the
        model's, named ``edit_<layer>_<field>`` and listed under the metadata's ``edits``.

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
        program = self._fx_programs.get(self.training)
        if program is None:
            return "features=<built on the first call>"
        return f"features={list(program.keys)}, grads={[k[:-len(GRAD_SUFFIX)] for k in program.grad_keys]}"


def _values(features: Mapping[str, Any], key: str, suffix: str) -> list[Any]:
    """The value stored under ``key``, or the values of its outputs ``key:0``, ``key:1``, ... ."""
    if key + suffix in features:
        return [features[key + suffix]]
    parts = []
    for i in itertools.count():
        name = output_key(key, i) + suffix
        if name not in features:
            return parts
        parts.append(features[name])
    return parts


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
    with modes_restored(model):
        if train is not None:
            model.train(train)
        extractor = FeatureExtractor(model, None, keep_output=True, frontend=frontend,
                                     example_inputs=example_inputs, **trace_options)
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
    with modes_restored(model):
        model.train(train)
        return list(trace(model, options, train).names.values())
