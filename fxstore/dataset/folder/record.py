"""The run record ``.fxstore-run.json``: written before any data file, it holds the run's identity and
names exactly the data files that identity writes (the format object says which), nothing else.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import formats
from .files import atomic_write_json, read_json
from .names import RUN_FILE

__all__ = ["RUN_VERSION", "write_run_record", "read_record", "record_files"]

RUN_VERSION = 1


def write_run_record(out: Path, identity: dict[str, Any], files: list[str]) -> None:
    """Record a run before it writes any data file (rank 0)."""
    atomic_write_json(out / RUN_FILE, {"fxstore_run": RUN_VERSION, "identity": identity, "files": files})


def record_files(identity: dict[str, Any]) -> list[str]:
    """The data files a run names in its record before writing them (``.npy``: one per array)."""
    return formats.get(identity["format"]).record_files(identity)


def read_record(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """``(record, None)``, or ``(None, why it is not an fxstore run record)``."""
    try:
        record = read_json(path)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return None, f"not readable JSON: {e}" if isinstance(e, OSError) and e.args else "not readable JSON"
    try:
        valid = (isinstance(record, dict) and record.get("fxstore_run") == RUN_VERSION
                 and isinstance(record.get("identity"), dict) and record["identity"].get("format") in formats.FORMATS
                 and isinstance(record["identity"].get("features"), dict)
                 and isinstance(record.get("files"), list)
                 and sorted(record["files"]) == sorted(record_files(record["identity"])))
    except (AttributeError, TypeError):
        valid = False
    if not valid:
        return None, "not an fxstore run record: it must name exactly the files its run writes"
    return record, None
