"""The output folder: atomic writes, early checks (writable, free space), error translation.

Every file fxstore writes into an output folder goes through :func:`atomic_write` (a hidden
temporary file in the same folder, ``fsync``, then ``os.replace``), so a killed process
leaves either the old file or the complete new one, never a torn file.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import FxStoreError

__all__ = ["OutputError", "atomic_write", "atomic_write_json", "check_writable", "check_free_space", "os_errors"]

TEMP_SUFFIX = ".fxstore-tmp"
STAGING = ".fxstore-unshuffled.partial"
"""The hidden folder inside ``out`` that holds a shuffled text run's unshuffled rows (itself an fxstore folder)."""
RUN_FILE = ".fxstore-run.json"
"""The run record: written before any data file, it names the run and the files it writes."""
PROGRESS = ".fxstore-progress"
"""Folder of per-shard markers (with checksums) of a run in progress."""
PROBE = ".fxstore-probe"


class OutputError(FxStoreError):
    """The output folder cannot hold the result: unwritable, full, or holding another run."""


def temp_path(path: Path) -> Path:
    """The hidden temporary name ``path`` is written under before the rename."""
    return path.with_name(f".{path.name}{TEMP_SUFFIX}")


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers only ever see the complete file."""
    tmp = temp_path(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON (keys in insertion order, number lists on one line) atomically."""
    text = _NUMBER_LIST.sub(lambda m: "[" + " ".join(m.group(1).split()) + "]", json.dumps(obj, indent=2))
    atomic_write(path, (text + "\n").encode())


_NUMBER_LIST = re.compile(r"\[\n\s*((?:-?[\d.eE+]+,?\s*)+)\]")  # a raw newline never occurs inside a JSON string


def check_writable(out: Path) -> None:
    """Create ``out`` if needed and prove a file can be written there.

    Raises:
        OutputError: naming the folder and the operating system's reason.
    """
    with os_errors(out):
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / PROBE, b"")
        (out / PROBE).unlink()


def check_free_space(out: Path, needed: int) -> None:
    """Refuse to start when ``out`` has less free space than ``needed`` bytes.

    Raises:
        OutputError: with the needed and available sizes.
    """
    if needed <= 0:
        return
    free = shutil.disk_usage(out).free
    if needed > free:
        raise OutputError(
            f"the output folder '{out}' needs about {_size(needed)} but its disk has {_size(free)} free.\n"
            "Hint: free space, write elsewhere (--out), store fewer layers, pool them (--pool avg) "
            "or use a smaller dtype (--dtype float16)."
        )


@contextlib.contextmanager
def os_errors(out: Path) -> Iterator[None]:
    """Turn ``OSError`` (permission denied, disk full, ...) into an :class:`OutputError`."""
    try:
        yield
    except OSError as e:
        hint = ("free space on that disk or write elsewhere" if e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
                else "choose a folder you can write to")
        reason = e.strerror or str(e)
        where = e.filename or out
        raise OutputError(
            f"cannot write the output folder '{out}': {reason} ({where}).\n"
            f"Hint: {hint}; run the same command again to resume after the last complete shard."
        ) from e


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"
