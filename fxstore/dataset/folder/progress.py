"""The progress markers of a run in progress: one small JSON file per finished shard in
``.fxstore-progress/``, read back and removed here (the formats write them, with their checksums).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .files import plain_stat, read_json
from .names import PROGRESS, TEMP_SUFFIX, is_marker

__all__ = ["read_markers", "remove_markers"]


def read_markers(progress: Path, accept: Callable[[str], bool] = is_marker,
                 follow_link: bool = True) -> dict[int, dict[str, Any]]:
    """Every readable marker in the folder ``progress`` whose name ``accept`` takes, by shard.

    A marker counts when it is a small regular file holding a JSON object whose ``shard`` is its
    name; anything else is skipped. With ``follow_link=False`` a link at ``progress`` gives nothing.
    """
    found: dict[int, dict[str, Any]] = {}
    if not progress.is_dir() or (not follow_link and progress.is_symlink()):
        return found
    for path in progress.iterdir():
        if accept(path.name):
            try:
                marker = read_json(path, limit=1 << 20)
            except (OSError, ValueError):  # a link, FIFO, device, not JSON (UnicodeDecodeError is a ValueError)
                continue
            if isinstance(marker, dict) and marker.get("shard") == int(path.name):
                found[int(path.name)] = marker
    return found


def remove_markers(out: Path) -> None:
    """Remove the progress markers of ``out`` and their folder (only files fxstore names as markers)."""
    folder = out / PROGRESS
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        if (is_marker(path.name) or path.name.endswith(TEMP_SUFFIX)) and plain_stat(path) is not None:
            path.unlink()
    with contextlib.suppress(OSError):
        folder.rmdir()
