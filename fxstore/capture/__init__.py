"""Capture: trace a model, select nodes, rewrite the graph, and wrap it as a :class:`FeatureExtractor`."""

from .extractor import FeatureExtractor, TraceReport, node_names, trace_report

__all__ = ["FeatureExtractor", "TraceReport", "node_names", "trace_report"]
