"""Inspecting a model before extracting from it: its node names and how fxstore would capture it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from ..errors import TraceError
from ._program import TraceReport
from ._tracing import TraceOptions, modes_restored, trace
from .extractor import FeatureExtractor

__all__ = ["trace_report", "node_names"]


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
        >>> from fxstore import trace_report
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
        extractor.feature_keys  # noqa: B018 -- raises the ConfigError that says what is missing
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
