"""fxstore: capture layer outputs and gradients as real torch.fx graph outputs."""

from .errors import (
    ConfigError,
    FxStoreError,
    GradientNotReadyError,
    InvalidLayerError,
    LayerNotFoundError,
    TraceError,
)
from .extractor import FeatureExtractor, node_names
from .hooks import HookBackwardModuleStorage, HookForwardModuleStorage
from .storage import BackwardModuleStorage, ForwardModuleStorage

__version__ = "0.1.0"

__all__ = [
    "FeatureExtractor",
    "node_names",
    "ForwardModuleStorage",
    "BackwardModuleStorage",
    "HookForwardModuleStorage",
    "HookBackwardModuleStorage",
    "FxStoreError",
    "LayerNotFoundError",
    "InvalidLayerError",
    "TraceError",
    "ConfigError",
    "GradientNotReadyError",
]
