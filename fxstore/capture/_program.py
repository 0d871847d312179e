"""What every frontend returns: a program ``(owner, args, kwargs) -> (output, features)``.

A :class:`Program` is one captured, rewritten model for one training mode. The extractor
runs it without knowing which frontend made it; the keys, labels and report say what its
outputs mean and how it was captured.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Mapping
from typing import Any

from torch import fx, nn

from ._describe import GraphDescription
from ._keys import GRAD_SUFFIX, call_key, grad_key, output_key
from ._selection import Selected

__all__ = ["Program", "TraceReport", "Run", "GraphRun", "labels_of"]

Run = Callable[[nn.Module, tuple[Any, ...], dict[str, Any]], tuple[Any, dict[str, Any]]]
"""``run(owner, args, kwargs) -> (output, features)``; gradient taps put their tickets among the features."""


@dataclasses.dataclass(frozen=True)
class TraceReport:
    """How a model was captured: the frontend used and why the ones before it failed.

    Attributes:
        frontend: ``"fx"`` (symbolic tracing), ``"export"`` (``torch.export``, ATen-level) or
            ``"partial"`` (untraceable modules kept as Python, their children traced).
        names: Every selectable node name, in graph order.
        reasons: Frontend tried first -> why it could not capture the model (a failed
            self-check included: ``"self-check: output differs from the plain model ..."``).
        python_modules: For ``"partial"``: module kept as Python -> why fx could not trace it.
        modules: Module paths whose output can be selected, in graph order.
        verified: The self-check's verdict: ``"exact"``, ``"close (max |Δ| ...)"``, ``"not yet"``
            (before the first call) or ``"skipped: <why>"``.
        checked: What the self-check compared (the output, how many features against forward
            hooks on the model, each edit's effect).
        notes: What fxstore did so the model could be captured as called (e.g. ``use_cache=False``
            for a Hugging Face model that would return a cache object).
    """

    frontend: str
    names: tuple[str, ...]
    reasons: dict[str, str]
    python_modules: dict[str, str]
    modules: tuple[str, ...] = ()
    verified: str = "not yet"
    checked: str = ""
    notes: tuple[str, ...] = ()

    def __str__(self) -> str:
        lines = [f"frontend: {self.frontend} ({len(self.names)} nodes), self-check: {self.verified}"]
        if self.checked:
            lines.append(f"  checked: {self.checked}")
        lines += [f"  {name} failed: {why}" for name, why in self.reasons.items()]
        lines += [f"  note: {note}" for note in self.notes]
        if self.python_modules:
            lines.append(f"  kept as Python ({len(self.python_modules)} modules):")
            lines += [f"    {path or '<model>'}: {why}" for path, why in self.python_modules.items()]
        return "\n".join(lines)


class GraphRun:
    """Runs a rewritten graph's generated code with the extractor as ``self``.

    Picklable (the code lives in a ``GraphModule`` whose attributes are placeholders).
    """

    def __init__(self, code: fx.GraphModule, keys: tuple[str, ...], grad_keys: tuple[str, ...],
                 keep_output: bool) -> None:
        self.code = code
        self.keys = keys
        self.grad_keys = grad_keys
        self.keep_output = keep_output

    def __call__(self, owner: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        output, features, made = type(self.code).forward(owner, *args, **kwargs)
        result = dict(zip(self.keys, features))
        result.update(zip(self.grad_keys, made))
        return output, result


@dataclasses.dataclass
class Program:
    """One captured model (per training mode) and what its outputs mean.

    Attributes:
        run: ``(owner, args, kwargs) -> (output, features)``.
        keys: Feature keys, in order.
        grad_keys: Keys of the gradient taps' tickets (``key + ":grad"``).
        labels: Label (alias or spec) -> feature keys.
        grad_labels: Label -> tapped keys (without the suffix).
        sources: Spec label -> label, where a layer was aliased.
        report: How the model was captured.
        graph: The rewritten graph that runs (``None`` for the partial frontend).
        reference: Runs the capture *before* the rewrite, returning the model's output, for the
            self-check when the program itself does not return it (``keep_output=False``).
        fullgraph: Whether the whole program is one graph (``torch.compile(fullgraph=True)``).
        description: The traced graph and what the capture did to it (stored, tapped, edited, pruned).
        sites: Feature key -> the module output it is (``_selfcheck.Site``), for the self-check's hooks.
    """

    run: Run
    keys: tuple[str, ...]
    grad_keys: tuple[str, ...]
    labels: dict[str, tuple[str, ...]]
    grad_labels: dict[str, tuple[str, ...]]
    sources: dict[str, str]
    report: TraceReport
    graph: fx.Graph | None = None
    reference: Callable[[nn.Module, tuple[Any, ...], dict[str, Any]], Any] | None = None
    fullgraph: bool = True
    description: GraphDescription | None = None
    sites: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_selection(cls, run: Run, selected: list[Selected], tapped: list[Selected], report: TraceReport,
                       **extra: Any) -> Program:
        """A program whose keys, labels and sources come from the selected and tapped nodes."""
        return cls(
            run=run,
            keys=tuple(s.key for s in selected),
            grad_keys=tuple(grad_key(s.key) for s in tapped),
            labels=labels_of(selected),
            grad_labels=labels_of(tapped),
            sources={s.source: s.label for s in selected + tapped if s.source != s.label},
            report=report,
            **extra,
        )

    @property
    def code(self) -> str | None:
        """The Python code generated for the graph that runs (``None`` for the partial frontend)."""
        if isinstance(self.run, GraphRun):
            return self.run.code.code
        if self.graph is not None:
            return self.graph.python_code("self").src
        return None

    def keys_of(self, label: str) -> tuple[str, ...] | None:
        """The feature keys stored for a label, spec label or key (``None`` if not selected)."""
        label = self.sources.get(label, label)
        if label in self.labels:
            return self.labels[label]
        return (label,) if label in self.keys else None

    def by_label(self, features: Mapping[str, Any], grads: bool = False) -> dict[str, list[Any]]:
        """``{label: [value, ...]}`` in call order, repeated runs of partially traced parts included."""
        labels = self.grad_labels if grads else self.labels
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


def labels_of(selected: list[Selected]) -> dict[str, tuple[str, ...]]:
    """Label -> the keys stored under it, in order."""
    labels: dict[str, tuple[str, ...]] = {}
    for s in selected:
        labels[s.label] = labels.get(s.label, ()) + (s.key,)
    return labels
