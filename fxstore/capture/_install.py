"""Frontend choice, fallback and the self-check: which program an extractor runs in each mode.

:class:`Capture` holds an extractor's programs (one per training mode) and builds them with
:func:`._frontends.build`. Once per mode (at build time with example inputs, else on the first
call) it runs the plain model and the program and compares them (:mod:`._selfcheck`); a program
that fails moves ``frontend="auto"`` to the next frontend and raises ``TraceError`` for an
explicit one. The extractor (the *owner*: the program runs with it as ``self``) only asks.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, InvalidLayerError, TraceError
from . import _frontends
from ._calls import with_defaults
from ._frontends import FRONTENDS, Request
from ._program import Program, TraceReport
from ._registry import adapter_layers, adapter_state
from ._selection import Layers, canonical_specs, spec_label
from ._selfcheck import HookReference, Snapshot, check_features, compare, edit_calls, hooked_modules

__all__ = ["Capture", "Inputs", "example_inputs", "checked_specs"]

Inputs = tuple[tuple[Any, ...], dict[str, Any]]


def example_inputs(example: Any) -> Inputs | None:
    """``example`` as ``(args, kwargs)``: a tensor, a tuple of args, or ``(args, kwargs)``.

    Example:
        >>> example_inputs(((1,), {"mask": 2})), example_inputs((1, 2)), example_inputs(3)
        (((1,), {'mask': 2}), ((1, 2), {}), ((3,), {}))
    """
    if example is None:
        return None
    if isinstance(example, tuple) and len(example) == 2 and isinstance(example[1], dict) \
            and isinstance(example[0], tuple):
        return example[0], dict(example[1])
    if isinstance(example, tuple):
        return example, {}
    return (example,), {}


def checked_specs(model: Any, layers: Layers | None, grads: Layers | None, keep_output: bool,
                  frontend: str) -> tuple[list[tuple[Any, str | None]], list[tuple[Any, str | None]]]:
    """The canonical layer and gradient specs of an extractor, once its options make sense.

    Raises:
        ConfigError: an unknown frontend, or nothing to return.
        InvalidLayerError: ``model`` is not a module, or a layer is not a valid specification.
    """
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
    return specs, grad_specs


class _PlainModelFailed(Exception):
    """The plain model raised on the self-check's inputs (the cause): nothing to compare with."""


class Capture:
    """An extractor's programs, per training mode, and how they were chosen.

    Args:
        request: What to capture.
        example: Example inputs as the extractor takes them (see :func:`example_inputs`), or ``None``.
        verify: Run the self-check.
        call_defaults: Keyword defaults of the model's calls, applied to the example's keywords.

    Attributes:
        programs: Training mode -> the program that runs in it (per adapter state, see :meth:`_sync`).
        failures: Training mode -> frontend -> why it failed (a failed self-check included).
    """

    def __init__(self, request: Request, example: Any, verify: bool, call_defaults: Any) -> None:
        self.request = request
        inputs = example_inputs(example)
        self.example = None if inputs is None else (inputs[0], with_defaults(call_defaults, inputs[1]))
        self.call_defaults = call_defaults
        self.verify = bool(verify)
        self._adapters = adapter_layers(request.model)
        self._state = adapter_state(self._adapters)
        self._programs: dict[bool, Program] = {}
        self._failures: dict[bool, dict[str, str]] = {}
        self._by_state = {self._state: (self._programs, self._failures)}

    @property
    def programs(self) -> dict[bool, Program]:
        """Training mode -> program, for the model's current adapter state (PEFT's enabled adapters)."""
        self._sync()
        return self._programs

    @property
    def failures(self) -> dict[bool, dict[str, str]]:
        self._sync()
        return self._failures

    def _sync(self) -> None:
        """Switch to the programs of the adapter state the model is in now (built on its first call).

        A graph captures the adapters as they were (``with model.disable_adapter():`` flips a Python
        flag that no graph sees), so each state has programs of its own.
        """
        if not self._adapters:
            return
        state = adapter_state(self._adapters)
        if state != self._state:
            self._state = state
            self._programs, self._failures = self._by_state.setdefault(state, ({}, {}))

    @property
    def model(self) -> nn.Module:
        """The model captured from."""
        return self.request.model

    def program(self, training: bool) -> Program:
        """The program of ``training`` mode.

        Raises:
            ConfigError: it waits for the first call (its frontend needs example inputs).
        """
        program = self.programs.get(training)
        if program is None:
            name = type(self.model).__name__
            why = self.failures.get(training, {}).get("fx", "it cannot be traced symbolically")
            raise ConfigError(
                f"torch.fx cannot trace {name} ({why}), and the next frontend, torch.export, needs example "
                "inputs: its program is built on the first call.\n"
                "Hint: pass example_inputs=(x,), call the extractor once, or use frontend='partial'."
            )
        return program

    def report(self, training: bool, notes: tuple[str, ...] = ()) -> TraceReport | None:
        """How ``training`` mode's program was captured, ``notes`` added (``None`` while it waits)."""
        program = self.programs.get(training)
        if program is None:
            return None
        return dataclasses.replace(program.report, notes=tuple(notes) + program.report.notes) if notes \
            else program.report

    def install(self, owner: nn.Module, training: bool, strict: bool, inputs: Inputs | None = None) -> Program | None:
        """Build the program for ``training`` (``None`` while it waits for example inputs) and check it."""
        inputs = inputs if inputs is not None else self.example
        failures = self.failures.setdefault(training, {})
        program = _frontends.build(self.request, training, strict, inputs, failures)
        if program is None or self._adapters:  # adapters: each new adapter state is built before dynamo traces
            vars(owner)["_initialize_hook"] = True  # torch.compile(owner) builds it before tracing: see _build_first
            vars(owner)["_infer_parameters"] = self._build_first
        if program is None:
            return None
        if not strict:
            self._warn_missing(training, program)
        self.programs[training] = program
        if not self.verify:
            program.report = dataclasses.replace(program.report, verified="skipped: verify=False")
        elif self.example is not None and inputs is self.example:
            program, _ = self.checked(owner, program, inputs, training, real=False)
        return program

    def _build_first(self, owner: nn.Module, args: Any, kwargs: Any) -> None:
        """Build (and check) the program that waits for inputs from a compiled call's real inputs, eagerly.

        ``torch.compile(owner)`` calls this before tracing while ``owner`` has ``_initialize_hook``
        (the protocol of torch's lazy modules, which infer their shapes from the first inputs the
        same way), so the first compiled call finds the program built, and an fxstore error is
        raised as itself rather than inside dynamo's trace. A model with PEFT adapters keeps the
        hook: each compiled call first builds the program of the adapter state the model is in now
        (``disable_adapter()``, ``set_adapter``, merging), and dynamo's guards on the adapters' flags
        pick the graph of that state.
        """
        if not self._adapters:
            vars(owner).pop("_initialize_hook", None)
            vars(owner).pop("_infer_parameters", None)
        if self.programs.get(owner.training) is None:
            self.first_call(owner, None, tuple(args), with_defaults(self.call_defaults, dict(kwargs)), real=False)

    def _warn_missing(self, training: bool, program: Program) -> None:
        reference = self.programs.get(not training)
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

    def first_call(self, owner: nn.Module, program: Program | None, args: tuple[Any, ...], kwargs: dict[str, Any],
                   real: bool) -> tuple[Program, Any]:
        """Build the program that waited for inputs, and run the self-check with this call."""
        inputs = (tuple(args), dict(kwargs))
        training = owner.training
        if program is None:
            if torch.compiler.is_compiling():
                raise ConfigError(
                    f"{type(self.model).__name__} needs example inputs to pick its frontend, and the first "
                    "call is inside torch.compile.\nHint: pass example_inputs=... to FeatureExtractor, or call it "
                    "once eagerly."
                )
            program = self.install(owner, training, strict=not self.programs, inputs=inputs)
            if program is None:  # unreachable: with inputs every frontend decides
                raise ConfigError("fxstore could not pick a frontend.\nHint: pass frontend='partial'.")
        return self.checked(owner, program, inputs, training, real=real)

    def checked(self, owner: nn.Module, program: Program, inputs: Inputs, training: bool,
                real: bool) -> tuple[Program, Any]:
        """Check ``program`` against the plain model on ``inputs``; on a mismatch, move on.

        The plain model runs with forward hooks on the same model object: the program's output,
        every stored feature that is a module's output and (with edits) the edited output must
        match, and every edit must run (:mod:`._selfcheck`). With ``real=True`` the program's own
        run is the call's result (returned); otherwise every trial run is undone. Returns the
        program that passed and the call's result, if run.
        """
        if not self.verify:
            return program, None
        while True:
            try:
                ok, verdict, checked, result = self._trial(owner, program, inputs, training, real)
            except _PlainModelFailed as e:
                program.report = dataclasses.replace(
                    program.report, verified=f"skipped: the plain model raised {type(e.__cause__).__name__}")
                return program, None
            if ok:
                program.report = dataclasses.replace(program.report, verified=verdict, checked=checked)
                program.reference = None
                return program, result
            program = self._next_frontend(program, inputs, training, verdict)

    def _trial(self, owner: nn.Module, program: Program, inputs: Inputs, training: bool,
               real: bool) -> tuple[bool, str, str, Any]:
        """One self-check of ``program``: ``(ok, verdict, what was checked, the call's result or None)``."""
        args, kwargs = inputs
        request = self.request
        edits = {target: request.edit_modules[target] for _, target in request.edits}
        hooked = {target: hooked_modules(self.model, spec, program.report.modules) for spec, target in request.edits}
        by_path = {path: edits[target] for target, paths in hooked.items() for path in paths or ()}
        sites = [site.module for site in program.sites.values()]
        state = Snapshot(self.model, inputs)
        plain = HookReference(self.model, sites, {})
        try:
            with plain.active():
                expected = self._plain_output(inputs, training)
            edited = None
            if edits and all(paths is not None for paths in hooked.values()):
                edited = HookReference(self.model, sites, by_path)
                state.restore()
                with edited.active():
                    expected_edited = self._plain_output(inputs, training)
        except Exception as e:  # the plain model fails on these inputs: nothing to compare with
            raise _PlainModelFailed() from e
        finally:
            state.restore()
        verdicts = []
        if program.reference is not None:
            with torch.no_grad():
                verdicts.append(compare(expected, program.reference(owner, args, kwargs)))
            state.restore()  # the program's own run below starts where the plain model's did
        with edit_calls(edits) as counts:
            if real:
                result = program.run(owner, args, kwargs)
            else:
                with torch.no_grad():
                    result = program.run(owner, args, kwargs)
        verdicts += [(False, f"the edit on '{spec_label(spec)}' was not applied (it never ran)")
                     for spec, target in request.edits if counts[target] == 0]
        reference = edited if edits else plain  # None: an edit on a node no hook sees, values not comparable
        ok, verdict, compared = check_features(program.keys, result[1], program.sites, reference, request.policy)
        verdicts.append((ok, verdict))
        if program.reference is None:
            verdicts.append(compare(expected, result[0]))
        elif edited is not None and request.policy.keep_output:
            verdicts.append(compare(expected_edited, result[0], "edited output",
                                    "the model with the edits applied by forward hooks"))
        failed = [v for ok, v in verdicts if not ok]
        if failed or not real:
            state.restore()
        if failed:
            return False, failed[0], "", None
        close = [v for _, v in verdicts if v != "exact"]
        checked = ["output", f"{compared} of {len(program.keys)} features against forward hooks on the model"]
        if edits:
            checked.append(f"{len(edits)} edit(s) ran" + (", their effect against forward hooks" if edited else
                                                          " (an edit on a node no hook sees: effect not compared)"))
        return True, close[0] if close else "exact", "; ".join(checked), result if real else None

    def _plain_output(self, inputs: Inputs, training: bool) -> Any:
        """The plain model's output, its top-level flag in ``training`` (the children are shared and set)."""
        model, mode = self.model, self.model.training
        model.training = training
        try:
            with torch.no_grad():
                return model(*inputs[0], **inputs[1])
        finally:
            model.training = mode

    def _next_frontend(self, program: Program, inputs: Inputs, training: bool, verdict: str) -> Program:
        """After a failed self-check: the next frontend's program (``"auto"``), else ``TraceError``."""
        frontend = program.report.frontend
        failures = self.failures.setdefault(training, {})
        failures[frontend] = f"self-check: {verdict}"
        if self.request.frontend != "auto":
            raise TraceError(
                f"the {frontend} frontend captured {type(self.model).__name__} wrongly: its {verdict}.\n"
                "Hint: use frontend='auto' to fall back to the next frontend, or report the model; "
                "verify=False skips this check."
            )
        strict = all(other == training for other in self.programs)
        rebuilt = _frontends.build(self.request, training, strict, inputs, failures)
        if rebuilt is None:  # unreachable: with inputs every frontend decides
            raise TraceError("fxstore could not pick a frontend.\nHint: pass frontend='partial'.")
        rebuilt.report = dataclasses.replace(rebuilt.report, reasons=dict(failures))
        self.programs[training] = rebuilt
        return rebuilt
