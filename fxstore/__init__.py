"""fxstore: capture layer outputs and gradients as real torch.fx graph outputs."""

from ._version import __version__ as __version__
from .capture import FeatureExtractor, FeatureKey, TraceReport, node_names, parse_key, trace_report
from .dataset import BatchLoader, ShardedArray, extract_dataset, load_features, read_manifest
from .errors import (
    ConfigError,
    FxStoreError,
    GradientNotReadyError,
    InvalidLayerError,
    LayerNotFoundError,
    OutputError,
    TraceError,
)
from .storage import BackwardModuleStorage, ForwardModuleStorage, HookBackwardModuleStorage, HookForwardModuleStorage

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
