"""The extractor: a thin ``nn.Module`` shell around a captured program.

:class:`~._install.Capture` builds and checks the program of each mode (frontend choice, self-check,
fallback); the extractor holds the model's shared parameters and the edits' buffers, and runs the
program of its current mode, eagerly or under ``torch.compile`` (gradient taps included).
"""

from __future__ import annotations

import types
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import fx, nn

from .._workflows import WorkflowMethods
from ..errors import ConfigError
from ._calls import call_defaults, fresh, with_defaults
from ._deploy import export_extractor
from ._edit_pass import checked_edits
from ._edits import Edit
from ._frontends import Request
from ._install import Capture, checked_specs
from ._keys import grad_source
from ._policy import StoragePolicy
from ._program import Program, TraceReport
from ._reading import Readout
from ._selection import Layers
from ._tracing import TraceOptions

__all__ = ["FeatureExtractor", "TraceReport"]


class FeatureExtractor(WorkflowMethods, Readout, nn.Module):
    """A model whose call returns ``(output, features)``, captured as real graph outputs.

    The model is traced with torch.fx (node names identical to torchvision's
    ``get_graph_node_names``) and rewritten so the selected nodes become extra outputs.
    The result compiles with ``torch.compile(fullgraph=True)`` (each extractor is its own
    program, for any number of extractors), runs only what the selected features need when
    ``keep_output=False``, protects stored values from later in-place ops, and can tap
    gradients of layer outputs inside the graph (compile those with :meth:`compile`).

    The extractor shares submodules and parameters with ``model`` (like torchvision's
    extractor) and never modifies it (:attr:`wrapped_model`); its ``state_dict`` keys equal the model's. The
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
        specs, grad_specs = checked_specs(model, layers, grads, keep_output, frontend)
        policy = StoragePolicy.build(keep_output=keep_output, detach=detach, transform=transform, dtype=dtype,
                                     device=device, non_blocking=non_blocking)
        self._mirror(model)
        self._fx_edits: dict[str, Edit] = {}
        edit_specs, edit_modules = [], {}
        for i, (label, spec, edit) in enumerate(checked_edits(edits, model)):
            self.add_module(f"_fx_edit_{i}", edit)  # its tensors become the extractor's buffers
            self._fx_edits[label], edit_modules[f"_fx_edit_{i}"] = edit, edit
            edit_specs.append((spec, f"_fx_edit_{i}"))
        options = TraceOptions.build(leaf_modules, autowrap_functions, autowrap_modules, concrete_args)
        request = Request(model, specs, grad_specs, policy, options, frontend, self._register_constant,
                          edits=edit_specs, edit_modules=edit_modules)
        self._fx_call_defaults, self._fx_notes = call_defaults(model)
        self._fx_capture = Capture(request, example_inputs, verify, self._fx_call_defaults)
        self._bind_forward()
        self.training = model.training  # set directly: never toggle the shared submodules here
        self._fx_capture.install(self, self.training, strict=True)

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

    def _register_constant(self, name: str, value: torch.Tensor) -> None:
        if name not in self._buffers:
            self.register_buffer(name, value, persistent=False)

    def _bind_forward(self) -> None:
        """Own ``forward`` and compiled-call code (:func:`._calls.fresh`), of ``type(self).forward``:
        a subclass's own ``forward`` runs (and reaches this class's through ``super().forward``)."""
        forward = type(self).forward
        if isinstance(forward, types.FunctionType):  # else (a descriptor of the subclass's) the class's applies
            self.__dict__["forward"] = types.MethodType(fresh(forward), self)
        self.__dict__["_fx_run_compiled"] = types.MethodType(fresh(self._run_program.__func__), self)

    @property
    def wrapped_model(self) -> nn.Module:
        """The model this extractor captures from (shared, never modified).

        Not called ``model``: many models have a child of that name (Hugging Face's
        ``LlamaForCausalLM.model``), which the extractor mirrors as its own.

        Example:
            >>> import torchvision, fxstore
            >>> m = torchvision.models.resnet18()
            >>> fxstore.FeatureExtractor(m, ["layer1"]).wrapped_model is m
            True
        """
        return self._fx_capture.model

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

    # -- nn.Module ------------------------------------------------------------------------

    def train(self, mode: bool = True) -> FeatureExtractor:
        """Switch mode like ``nn.Module.train``; the graph of that mode runs from now on."""
        super().train(mode)
        if mode not in self._fx_capture.programs:
            self._fx_capture.install(self, mode, strict=not self._fx_capture.programs)
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
        program = self._fx_capture.programs.get(self.training)
        compiling = torch.compiler.is_compiling()
        if program is None or (not compiling and program.report.verified == "not yet"):
            real = self.__dict__.get("_fx_compiled") is None  # the check's own run is this call's result
            program, result = self._fx_capture.first_call(self, program, args, kwargs, real=real)
            if result is not None:
                return result
        compiled = None if compiling else self.__dict__.get("_fx_compiled")
        if compiled is not None:
            return compiled(args, kwargs)
        return program.run(self, args, kwargs)

    def _run_program(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, dict[str, torch.Tensor]]:
        """What :meth:`compile` compiles: the current mode's program."""
        return self._fx_capture.programs[self.training].run(self, args, kwargs)

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
        torch_compile_kwargs.setdefault("fullgraph", all(p.fullgraph for p in self._fx_capture.programs.values()))
        self.__dict__["_fx_compile_options"] = dict(torch_compile_kwargs)  # generation compiles with them too
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

    @property
    def trace_report(self) -> TraceReport | None:
        """How the model was captured in the current mode (``None`` until the first call when the
        frontend choice waits for example inputs).

        Example:
            >>> import torchvision, fxstore
            >>> fxstore.FeatureExtractor(torchvision.models.resnet18(), ["layer1"]).trace_report.frontend
            'fx'
        """
        return self._fx_capture.report(self.training, self._fx_notes)

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
        return self._program().code

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

    def _program(self) -> Program:
        return self._fx_capture.program(self.training)

    def _policy(self) -> StoragePolicy:
        return self._fx_capture.request.policy

    def export(self, path: Any, example_inputs: Any, format: str = "exported", *, dynamic: bool = True,
               verify: bool = True) -> Any:
        """Write this extractor as a deployable artifact whose outputs are the features.

        ``"exported"``: a ``torch.export`` archive (``torch.export.load(path).module()``); ``"aoti"``:
        an AOTInductor package; ``"onnx"``: outputs named after the feature keys (and ``output``).
        A call returns the features (``(output, features)`` when the output is kept). Batch, sequence
        and (where the model allows) image axes are dynamic; ranges, shapes and dtypes are in the
        artifact's metadata (``fxstore info FILE``). Edits' tensors are inputs after the model's.

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
        return export_extractor(self, path, example_inputs, format, dynamic=dynamic, verify=verify)

    def extra_repr(self) -> str:
        program = self._fx_capture.programs.get(self.training)
        if program is None:
            return "features=<built on the first call>"
        return f"features={list(program.keys)}, grads={[grad_source(k) for k in program.grad_keys]}"
