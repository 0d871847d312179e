"""Output formats: one object per format that writes, recognises, verifies and reads its own files.

Nothing outside this package branches on a format's name: code that needs a format asks
:func:`get` for its object (a :class:`Sink` subclass) and calls it.
"""

from __future__ import annotations

from typing import Any

from .base import ArraySpec, Claims, Sink, arrays_of
from .npy import NpySink
from .safetensors import SafetensorsSink, mapped

__all__ = ["ArraySpec", "Claims", "Sink", "SafetensorsSink", "NpySink", "FORMATS", "NAMES", "get", "arrays_of",
           "mapped", "listed", "recognise"]

FORMATS: dict[str, type[Sink]] = {"safetensors": SafetensorsSink, "npy": NpySink}
"""Output formats by name."""

NAMES: list[str] = sorted(FORMATS)
"""The names of the output formats."""


def get(name: str) -> type[Sink]:
    """The format object named ``name`` (a key of :data:`FORMATS`; callers check the name first)."""
    return FORMATS[name]


def listed(manifest: dict[str, Any] | None, markers: list[dict[str, Any]]) -> dict[str, Any]:
    """``{file name: size}`` of every data file a folder's manifest or run markers list, whatever the format."""
    found: dict[str, Any] = {}
    for fmt in FORMATS.values():
        for name, size in fmt.listed(manifest, markers).items():
            found.setdefault(name, size)
    return found


def recognise(name: str, path: Any, claims: Claims) -> bool:
    """Whether the folder entry ``name`` is a data file of some format that the ``claims`` prove fxstore's."""
    for fmt in FORMATS.values():
        if fmt.matches(name):
            return fmt.recognise(name, path, claims)
    return False
