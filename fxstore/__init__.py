"""fxstore: capture layer outputs and gradients as real torch.fx graph outputs.

The dataset names (:func:`extract_dataset`, :func:`load_features`, ...) are imported on
first use, so ``import fxstore`` costs little more than ``import torch``.
"""

from ._lazy import lazy_attributes
from .capture import FeatureExtractor, FeatureKey, TraceReport, node_names, parse_key, trace_report
from .errors import (
    ConfigError,
    FxStoreError,
    GradientNotReadyError,
    InvalidLayerError,
    LayerNotFoundError,
    TraceError,
)
from .storage import BackwardModuleStorage, ForwardModuleStorage, HookBackwardModuleStorage, HookForwardModuleStorage

__version__ = "0.1.0"

_LAZY = {name: ".dataset" for name in ("BatchLoader", "OutputError", "ShardedArray", "extract_dataset",
                                        "load_features", "read_manifest")}

__all__ = [
    "FeatureExtractor",
    "node_names",
    "trace_report",
    "TraceReport",
    "FeatureKey",
    "parse_key",
    "ForwardModuleStorage",
    "BackwardModuleStorage",
    "HookForwardModuleStorage",
    "HookBackwardModuleStorage",
    "extract_dataset",
    "load_features",
    "read_manifest",
    "ShardedArray",
    "BatchLoader",
    "FxStoreError",
    "LayerNotFoundError",
    "InvalidLayerError",
    "TraceError",
    "ConfigError",
    "GradientNotReadyError",
    "OutputError",
]

__getattr__, __dir__ = lazy_attributes(__name__, globals(), _LAZY, ("dataset", "cli", "coverage", "demo"))
