"""fxstore: capture layer outputs and gradients as real torch.fx graph outputs.

The dataset names (:func:`extract_dataset`, :func:`load_features`, ...) are imported on
first use, so ``import fxstore`` costs little more than ``import torch``.
"""

from ._lazy import lazy_attributes
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
from .draw import plot_features, plot_patching
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
from .generation import Generation, steering_vectors
from .storage import BackwardModuleStorage, ForwardModuleStorage, HookBackwardModuleStorage, HookForwardModuleStorage

_LAZY = {name: ".dataset" for name in ("BatchLoader", "ShardedArray", "extract_dataset", "load_features",
                                        "read_manifest")}
_LAZY.update({name: ".stats" for name in ("feature_statistics", "FeatureStatistics", "frechet_distance")})

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
    "feature_statistics",
    "FeatureStatistics",
    "frechet_distance",
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
    "plot_patching",
    "plot_features",
    "steering_vectors",
    "OutputError",
    "Generation",
]

__getattr__, __dir__ = lazy_attributes(__name__, globals(), _LAZY, ("dataset", "stats", "cli"))
