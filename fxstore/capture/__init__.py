"""Capture: trace a model, select nodes, rewrite the graph, and wrap it as a :class:`FeatureExtractor`."""

from ._edits import Ablate, Add, Apply, Edit, Replace, Scale
from ._keys import FeatureKey, parse_key
from ._sweep import patch_sweep
from ._taps import gradient_of
from .extractor import FeatureExtractor, TraceReport, node_names, trace_report

__all__ = ["FeatureExtractor", "TraceReport", "node_names", "trace_report", "FeatureKey", "parse_key",
           "gradient_of", "Edit", "Add", "Replace", "Ablate", "Scale", "Apply", "patch_sweep"]

