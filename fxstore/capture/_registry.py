"""Third-party registries of modules and functions that torch.fx must not trace through.

timm keeps its own lists (``timm.layers.get_notrace_modules()`` /
``get_notrace_functions()``), each entry registered next to the layer that needs it with
the reason in a comment. fxstore merges them into every trace when timm has already been
imported, which is always the case for a timm model; importing timm just to find out would
cost every torchvision user a second of start-up.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from torch import nn

__all__ = ["notrace_modules", "notrace_functions"]


def _timm_layers() -> Any | None:
    if "timm" not in sys.modules:
        return None
    try:
        import timm.layers as layers
    except ImportError:  # a broken or partial timm install: trace without its registries
        return None
    return layers if hasattr(layers, "get_notrace_modules") else None


def notrace_modules() -> tuple[type[nn.Module], ...]:
    """Module types registered as not traceable by installed, imported libraries (timm).

    Example:
        >>> import timm, fxstore.capture._registry as r
        >>> set(r.notrace_modules()) == set(timm.layers.get_notrace_modules())
        True
    """
    layers = _timm_layers()
    return tuple(layers.get_notrace_modules()) if layers is not None else ()


def notrace_functions() -> tuple[Callable[..., Any], ...]:
    """Functions registered to be recorded as single calls (timm's ``register_notrace_function``)."""
    layers = _timm_layers()
    return tuple(f for f in layers.get_notrace_functions() if callable(f)) if layers is not None else ()
