"""Which files of an output folder fxstore wrote, and what a run may do with the folder.

fxstore only creates, replaces or deletes files it can prove it wrote there. The proof is
the run record ``.fxstore-run.json``, written before any data file: it holds the run's
identity and names the files the run writes. Once the run finishes, ``manifest.json``
(valid against its schema) takes over that role. Everything else in the folder is
*foreign*: a folder with foreign files is refused, naming them, and ``overwrite`` deletes
nothing unless the whole folder is fxstore's.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

from . import manifest as manifest_module
from ._lock import LOCK_FILE, is_lock_file
from ._outdir import PROBE, PROGRESS, RUN_FILE, STAGING, TEMP_SUFFIX, OutputError, atomic_write_json
from ._sinks import SINKS

__all__ = ["Folder", "survey", "write_run_record"]

RUN_VERSION = 1


@dataclasses.dataclass
class Folder:
    """What an output folder holds: the manifest, the run record, fxstore's files and foreign ones."""

    out: Path
    manifest: dict[str, Any] | None
    record: dict[str, Any] | None
    ours: list[Path]
    foreign: list[str]

    @property
    def identity(self) -> dict[str, Any] | None:
        """The identity of the run the folder belongs to, if any."""
        if self.record is not None:
            return self.record["identity"]
        return self.manifest["identity"] if self.manifest is not None else None

    def refuse_foreign(self) -> None:
        """Raise if anything in the folder is not fxstore's.

        Raises:
            OutputError: naming the foreign files.
        """
        if self.foreign:
            listed = "; ".join(self.foreign[:8]) + ("; ..." if len(self.foreign) > 8 else "")
            raise OutputError(
                f"the output folder '{self.out}' holds files fxstore did not write ({listed}); "
                "fxstore does not overwrite, delete or resume among them.\n"
                "Hint: move those files away, or choose a new or empty folder."
            )

    def clean(self) -> None:
        """Delete every file of fxstore's in the folder (not the lock); refuse before deleting if any is foreign."""
        self.refuse_foreign()
        sink = _sink_of(self)
        if sink is not None:
            sink.remove_progress()
        last = {MANIFEST: 1, RUN_FILE: 2}  # the claims go last: a crash midway leaves no unclaimed file
        for path in sorted(self.ours, key=lambda p: last.get(p.name, 0)):
            if path.name == STAGING:
                survey(path).clean()  # refuses (deleting nothing) if anything foreign got in there
                shutil.rmtree(path)
            elif path.name not in (LOCK_FILE, PROGRESS) and path.exists():
                path.unlink()


def _sink_of(folder: Folder) -> Any:
    identity = folder.identity
    if identity is None:
        return None
    return SINKS[identity["format"]](folder.out, [], 0)


def write_run_record(out: Path, identity: dict[str, Any], files: list[str]) -> None:
    """Record a run before it writes any data file (rank 0)."""
    atomic_write_json(out / RUN_FILE, {"fxstore_run": RUN_VERSION, "identity": identity, "files": files})


def _read_record(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None, "not readable JSON"
    if (not isinstance(record, dict) or record.get("fxstore_run") != RUN_VERSION
            or not isinstance(record.get("identity"), dict) or record["identity"].get("format") not in SINKS
            or not isinstance(record.get("files"), list)
            or not all(manifest_module.plain_name(f) for f in record["files"])):
        return None, "not an fxstore run record"
    return record, None


def _is_clean_fxstore_folder(path: Path) -> bool:
    inner = survey(path)
    return not inner.foreign and (inner.record is not None or inner.manifest is not None)


def survey(out: Path) -> Folder:
    """Sort the entries of ``out`` into fxstore's and foreign ones (nothing is changed)."""
    folder = Folder(out, None, None, [], [])
    if not out.is_dir():
        return folder
    entries = {p.name: p for p in out.iterdir()}
    if RUN_FILE in entries:
        folder.record, why = _read_record(entries[RUN_FILE])
        if why is not None:
            folder.foreign.append(f"{RUN_FILE} ({why})")
    if MANIFEST in entries:
        manifest, why = manifest_module.parse(entries[MANIFEST])
        if why is None:
            folder.manifest = manifest
        else:
            folder.foreign.append(f"{MANIFEST} (not an fxstore manifest: {why})")
    claims: list[tuple[Any, list[str]]] = []
    if folder.record is not None:
        claims.append((SINKS[folder.record["identity"]["format"]], folder.record["files"]))
    if folder.manifest is not None:
        m = folder.manifest
        arrays = [*m["features"].values(), *([m["target"]] if m.get("target") else [])]
        claims.append((SINKS[m["format"]], [a["file"] for a in arrays if "file" in a]))

    def ours(name: str) -> bool:
        if name == PROBE:
            return True
        if name == RUN_FILE:
            return folder.record is not None
        if name == MANIFEST:
            return folder.manifest is not None
        if name == LOCK_FILE:
            return is_lock_file(entries[name])
        if name.startswith(".") and name.endswith(TEMP_SUFFIX):
            base = name[1:-len(TEMP_SUFFIX)]
            return base in (RUN_FILE, MANIFEST, PROBE) or any(sink.owns(base, files) for sink, files in claims)
        return any(sink.owns(name, files) for sink, files in claims)

    for name, path in sorted(entries.items()):
        if name in (RUN_FILE, MANIFEST) and any(f.startswith(name + " (") for f in folder.foreign):
            continue
        if name == PROGRESS and claims and path.is_dir() and not path.is_symlink():
            strays = [p.name for p in path.iterdir()
                      if not (p.name.isdigit() or (p.name.startswith(".") and p.name.endswith(TEMP_SUFFIX)))]
            folder.foreign.extend(f"{PROGRESS}/{s}" for s in strays)
            folder.ours.append(path)
        elif not path.is_symlink() and path.is_file() and ours(name):
            folder.ours.append(path)
        elif name == STAGING and folder.record is not None and path.is_dir() and not path.is_symlink() \
                and _is_clean_fxstore_folder(path):
            folder.ours.append(path)  # a shuffled text run's unshuffled rows, an fxstore folder of its own
        else:
            folder.foreign.append(name + ("/" if path.is_dir() else ""))
    return folder


MANIFEST = manifest_module.MANIFEST
