"""fxstore: capture layer outputs and gradients as real torch.fx graph outputs."""

from .capture import (
    Ablate,
    Add,
    Apply,
    Edit,
    FeatureExtractor,
    FeatureKey,
    Replace,
    Scale,
    TraceReport,
    node_names,
    parse_key,
    patch_sweep,
    trace_report,
)
from .dataset import BatchLoader, OutputError, ShardedArray, extract_dataset, load_features, read_manifest
from .errors import (
    ConfigError,
    EditError,
    FxStoreError,
    GradientNotReadyError,
    InvalidLayerError,
    LayerNotFoundError,
    TraceError,
)
from .storage import BackwardModuleStorage, ForwardModuleStorage, HookBackwardModuleStorage, HookForwardModuleStorage

__version__ = "0.1.0"

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
    "EditError",
    "Edit",
    "Add",
    "Replace",
    "Ablate",
    "Scale",
    "Apply",
    "patch_sweep",
    "OutputError",
]
