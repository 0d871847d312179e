"""Lazy attributes for a package (PEP 562): a public name is imported on first use.

``import fxstore`` stays cheap: the dataset machinery (safetensors, tqdm, numpy I/O) is
imported the first time one of its names is read, not at start-up. ``from fxstore import
extract_dataset``, ``fxstore.extract_dataset`` and ``dir(fxstore)`` work as if the names had
been imported eagerly.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_attributes"]


def lazy_attributes(
    package: str, namespace: dict[str, Any], names: Mapping[str, str], submodules: tuple[str, ...] = ()
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package`` that import ``names`` on first use.

    Args:
        package: The package's ``__name__``.
        namespace: The package's ``globals()``; an imported value is cached there, so the
            next lookup does not come back here.
        names: Public name -> module (relative to ``package``, e.g. ``".dataset"``) that defines it.
        submodules: Subpackages reachable as attributes (``fxstore.dataset``) before anyone imported them.

    Example:
        >>> get, _ = lazy_attributes("json", {}, {"loads_": ".decoder"})
        >>> get("nothing")
        Traceback (most recent call last):
        ...
        AttributeError: module 'json' has no attribute 'nothing'
    """

    def __getattr__(name: str) -> Any:
        if name in names:
            value = getattr(importlib.import_module(names[name], package), name)
        elif name in submodules:
            value = importlib.import_module(f".{name}", package)
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(names) | set(submodules))

    return __getattr__, __dir__
