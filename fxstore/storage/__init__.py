"""Storages: the friendly stateful API (fx-based) and the hook-based reference backend."""

from ._fx import BackwardModuleStorage, ForwardModuleStorage
from .hooks import HookBackwardModuleStorage, HookForwardModuleStorage

__all__ = ["ForwardModuleStorage", "BackwardModuleStorage", "HookForwardModuleStorage", "HookBackwardModuleStorage"]
