"""Capture: trace a model, select nodes, rewrite the graph, and wrap it as a :class:`FeatureExtractor`.

The names after the user-facing ones are capture's surface for fxstore's other subpackages
(storage, dataset, cli): layer specifications, the storage policy's parsers, tracing, model
identity and deployable artifacts. Nothing outside ``capture/`` imports its underscore modules.
"""

from ._artifact import read_metadata
from ._calls import fresh
from ._deploy import FORMATS as EXPORT_FORMATS
from ._deploy import DeployReport, export_extractor
from ._describe import CapturedNode, GraphDescription
from ._edit_pass import checked_edits
from ._edits import Ablate, Add, Apply, Edit, Replace, Scale
from ._fingerprint import BuildCache, build_cache, model_fingerprint, model_state
from ._inspect import node_names, trace_report
from ._keys import FeatureKey, parse_key
from ._policy import StoragePolicy, parse_device, parse_dtype
from ._program import TraceReport
from ._registry import adapter_layers, adapter_state
from ._selection import Layers, ModuleRef, canonical_specs, layer_pairs, spec_label
from ._sweep import patch_sweep
from ._taps import gradient_of
from ._tracing import TraceOptions, modes_restored, shadow_of, trace
from .extractor import FeatureExtractor

__all__ = ["FeatureExtractor", "TraceReport", "node_names", "trace_report", "FeatureKey", "parse_key",
           "gradient_of", "GraphDescription", "CapturedNode", "Edit", "Add", "Replace", "Ablate", "Scale", "Apply", "patch_sweep",
           # for fxstore's other subpackages
           "adapter_layers", "adapter_state", "checked_edits", "fresh", "EXPORT_FORMATS", "DeployReport", "export_extractor", "read_metadata", "model_fingerprint",
           "BuildCache", "build_cache", "model_state",
           "StoragePolicy", "parse_device", "parse_dtype", "Layers", "ModuleRef", "canonical_specs", "layer_pairs",
           "spec_label",
           "TraceOptions", "modes_restored", "shadow_of", "trace"]
