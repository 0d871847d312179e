"""Every name fxstore gives a file or folder inside an output folder, in one place.

The protocol files (lock, run record, progress markers, probe, manifest and its kept copy, staging folder) and
the data files of both formats (``shard-NNNNN.safetensors``, ``<key>.npy`` and its hidden
``.partial`` form) are named here and nowhere else.
"""

from __future__ import annotations

import re
from pathlib import Path

__all__ = ["TEMP_SUFFIX", "STAGING", "RUN_FILE", "PROGRESS", "PROBE", "STAGING_MARKER", "LOCK_FILE", "MANIFEST", "CLAIM",
           "temp_path", "is_temp", "marker_name", "is_marker", "shard_file", "SHARD_PATTERN", "file_stem",
           "array_file", "ARRAY_SUFFIX", "is_array_file", "partial_name", "partial_base", "plain_name", "temp_base"]

TEMP_SUFFIX = ".fxstore-tmp"
"""Suffix of the hidden temporary file every file is written under before its rename."""
STAGING = ".fxstore-unshuffled.partial"
"""The hidden folder inside ``out`` that holds a shuffled text run's unshuffled rows (itself an fxstore folder)."""
RUN_FILE = ".fxstore-run.json"
"""The run record: written before any data file, it names the run and the files it writes."""
PROGRESS = ".fxstore-progress"
"""Folder of per-shard markers (with checksums) of a run in progress."""
PROBE = ".fxstore-probe"
"""The empty file written and removed to prove the folder writable."""
STAGING_MARKER = ".fxstore-staging"
"""Written first into :data:`STAGING` and removed last: the staging folder is fxstore's in any partial state."""
LOCK_FILE = ".fxstore-lock"
"""The lock file rank 0 holds for the whole run."""
MANIFEST = "manifest.json"
"""Written last: its presence means the folder is complete."""
CLAIM = ".fxstore-files.json"
"""Kept beside the manifest in folders whose data files cannot name their run (``.npy``): a copy of
the manifest, written just before it, that keeps those files fxstore's if ``manifest.json`` is lost."""

_MARKER = re.compile(r"\d{5,}")
SHARD_PATTERN = re.compile(r"shard-(\d{5,})\.safetensors")
"""A safetensors shard's file name; group 1 is the shard index."""
_PARTIAL = ".partial"


def temp_path(path: Path) -> Path:
    """The hidden temporary name ``path`` is written under before the rename."""
    return path.with_name(f".{path.name}{TEMP_SUFFIX}")


def is_temp(name: str) -> bool:
    """Whether ``name`` has the form of a temporary file (``.X.fxstore-tmp``)."""
    return name.startswith(".") and name.endswith(TEMP_SUFFIX)


def temp_base(name: str) -> str:
    """The name a temporary file ``name`` is renamed to."""
    return name[1:-len(TEMP_SUFFIX)]


def marker_name(shard: int) -> str:
    """File name (inside :data:`PROGRESS`) of the marker of ``shard``."""
    return f"{shard:05d}"


def is_marker(name: str) -> bool:
    """Whether ``name`` has the form of a progress marker."""
    return _MARKER.fullmatch(name) is not None


def shard_file(shard: int) -> str:
    """File name of a safetensors shard.

    Example:
        >>> shard_file(3)
        'shard-00003.safetensors'
    """
    return f"shard-{shard:05d}.safetensors"


def file_stem(key: str) -> str:
    """A file-name-safe form of a feature key (``"layer1.0:grad"`` -> ``"layer1.0_grad"``).

    Example:
        >>> file_stem("layer1.0:grad")
        'layer1.0_grad'
    """
    return re.sub(r"[^A-Za-z0-9._-]", "_", key)


ARRAY_SUFFIX = ".npy"
"""The suffix of an ``npy`` folder's array files."""


def array_file(key: str) -> str:
    """The ``.npy`` file of one stored array."""
    return file_stem(key) + ARRAY_SUFFIX


def is_array_file(name: str, partial: bool = False) -> bool:
    """Whether ``name`` has the form of an array file (``X.npy``; with ``partial``, also ``.X.npy.partial``)."""
    return name.endswith(ARRAY_SUFFIX) or (partial and name.endswith(ARRAY_SUFFIX + _PARTIAL))


def partial_name(name: str) -> str:
    """The hidden name a ``.npy`` file has until the run finishes (``.X.npy.partial``)."""
    return f".{name}{_PARTIAL}"


def partial_base(name: str) -> str | None:
    """``X`` for a hidden partial name ``.X.partial``, else ``None``."""
    return name[1:-len(_PARTIAL)] if name.startswith(".") and name.endswith(_PARTIAL) else None


def plain_name(name: object) -> bool:
    """Whether ``name`` names a file directly inside the folder (no path, no parent, no NUL).

    Example:
        >>> plain_name("a.npy"), plain_name("../a.npy")
        (True, False)
    """
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
            and "\0" not in name)
