"""fxstore: capture layer outputs and gradients as real torch.fx graph outputs."""

from ._outdir import OutputError
from .dataset import extract_dataset
from .errors import (
    ConfigError,
    FxStoreError,
    GradientNotReadyError,
    InvalidLayerError,
    LayerNotFoundError,
    TraceError,
)
from .extractor import FeatureExtractor, TraceReport, node_names, trace_report
from .hooks import HookBackwardModuleStorage, HookForwardModuleStorage
from .manifest import read_manifest
from .reader import ShardedArray, load_features
from .storage import BackwardModuleStorage, ForwardModuleStorage

__version__ = "0.1.0"

__all__ = [
    "FeatureExtractor",
    "node_names",
    "trace_report",
    "TraceReport",
    "ForwardModuleStorage",
    "BackwardModuleStorage",
    "HookForwardModuleStorage",
    "HookBackwardModuleStorage",
    "extract_dataset",
    "load_features",
    "read_manifest",
    "ShardedArray",
    "FxStoreError",
    "LayerNotFoundError",
    "InvalidLayerError",
    "TraceError",
    "ConfigError",
    "GradientNotReadyError",
    "OutputError",
]
