"""fxstore: capture layer outputs and gradients as real torch.fx graph outputs."""

from ._version import __version__ as __version__
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
from .dataset import BatchLoader, ShardedArray, extract_dataset, load_features, read_manifest
from .errors import (
    ConfigError,
    EditError,
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
