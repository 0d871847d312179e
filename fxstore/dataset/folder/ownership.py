"""Which files of an output folder fxstore wrote, and what a run may do with the folder.

fxstore only creates, replaces or deletes files it can prove it wrote there. A file is
fxstore's when a claim names it *and* the file is what the claim says:

* the claims are the run record ``.fxstore-run.json`` (written before any data file; it
  holds the run's identity and names exactly the files that identity writes, nothing else),
  ``manifest.json`` once the run finished (valid against its schema), its kept copy
  ``.fxstore-files.json`` in ``npy`` folders (the same document: it keeps the ``.npy`` files
  claimed when the manifest is lost), and, for the run being started, its own identity;
* a shard ``shard-NNNNN.safetensors`` is fxstore's when its header names shard ``NNNNN`` and
  the digest of a claimed identity (or the manifest lists it with exactly its size); an
  ``.npy`` file (final or ``.partial``) when a claim names it and its header says exactly
  the shape and dtype that claim's identity gives it; temporary and probe files when they
  are empty or hold what fxstore writes there;
* only regular files count: a symlink, FIFO or device at any of fxstore's names is foreign
  and never opened.

Everything else is *foreign*: a folder with foreign files is refused, naming them, and
``overwrite`` deletes nothing unless the whole folder is fxstore's.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from ...errors import OutputError
from .. import formats
from . import manifest as manifest_module
from .checksums import identity_digest
from .files import create_exclusive, cut, cut_list, plain_stat, read_json, read_small
from .lock import is_lock_file
from .names import (
    CLAIM,
    LOCK_FILE,
    MANIFEST,
    PROBE,
    PROGRESS,
    RUN_FILE,
    STAGING,
    STAGING_MARKER,
    is_temp,
    temp_base,
)
from .progress import read_markers, remove_markers
from .record import read_record

__all__ = ["Folder", "survey", "start_staging", "remove_staging"]

@dataclasses.dataclass
class Folder:
    """What an output folder holds: the manifest, the run record, fxstore's files and foreign ones."""

    out: Path
    manifest: dict[str, Any] | None
    record: dict[str, Any] | None
    ours: list[Path]
    foreign: list[str]
    expected: dict[str, Any] | None = None
    kept: dict[str, Any] | None = None
    """The manifest's kept copy (:data:`~.names.CLAIM`), valid against the manifest's schema."""

    @property
    def identity(self) -> dict[str, Any] | None:
        """The identity of the run the folder belongs to, if any."""
        for claim in (self.record, self.manifest, self.kept):
            if claim is not None:
                return claim["identity"]
        return None

    def refuse_foreign(self) -> None:
        """Raise if anything in the folder is not fxstore's.

        Raises:
            OutputError: naming the foreign files.
        """
        if self.foreign:
            listed = cut_list(self.foreign, 8, 120)
            raise OutputError(
                f"the output folder '{cut(self.out)}' holds files fxstore did not write ({listed}); "
                "fxstore does not overwrite, delete or resume among them.\n"
                "Hint: move those files away, or choose a new or empty folder."
            )

    def clean(self) -> None:
        """Delete every file of fxstore's in the folder (not the lock); refuse before deleting if any is foreign."""
        self.refuse_foreign()
        if (self.identity or self.expected) is not None:
            remove_markers(self.out)
        last = {MANIFEST: 1, CLAIM: 1, RUN_FILE: 2}  # the claims go last: a crash midway leaves no unclaimed file
        for path in sorted(self.ours, key=lambda p: last.get(p.name, 0)):
            if path.name == STAGING:
                remove_staging(path)
            elif path.name not in (LOCK_FILE, PROGRESS, STAGING_MARKER) and plain_stat(path) is not None:
                path.unlink()


def start_staging(staging: Path, identity: dict[str, Any]) -> None:
    """Create the staging folder with its marker first (so that any partial state of it is recognised)."""
    staging.mkdir(exist_ok=True)
    marker = staging / STAGING_MARKER
    if plain_stat(marker) is None:
        fd = create_exclusive(marker)  # refuses anything already at that name
        with open(fd, "wb") as f:
            f.write(f'{{"fxstore_staging": 1, "identity": "{identity_digest(identity)}"}}\n'.encode())


def remove_staging(staging: Path) -> None:
    """Delete the staging folder: everything fxstore's in it, then its marker (last), then the folder.

    Raises:
        OutputError: something foreign got in there (nothing is deleted).
    """
    inner = survey(staging)
    inner.refuse_foreign()
    inner.clean()
    remove_markers(staging)
    if plain_stat(staging / LOCK_FILE) is not None:
        (staging / LOCK_FILE).unlink()
    (staging / STAGING_MARKER).unlink(missing_ok=True)
    staging.rmdir()


def _staging_digest(path: Path) -> str | None:
    try:
        marker = read_json(path / STAGING_MARKER, limit=4096)
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return marker.get("identity") if isinstance(marker, dict) and marker.get("fxstore_staging") == 1 else None


def survey(out: Path, expected: dict[str, Any] | None = None) -> Folder:
    """Sort the entries of ``out`` into fxstore's and foreign ones (nothing is changed, no link followed).

    Args:
        out: The folder.
        expected: The identity of the run about to write there: its own shards (found by the
            identity digest in their headers) are fxstore's even without a manifest or record.
    """
    folder = Folder(out, None, None, [], [], expected)
    if not out.is_dir():
        return folder
    entries = {p.name: p for p in out.iterdir()}
    staged = _staging_digest(out) if out.name == STAGING else None
    if RUN_FILE in entries:
        folder.record, why = read_record(entries[RUN_FILE])
        if why is not None:
            folder.foreign.append(f"{RUN_FILE} ({why})")

    def manifest_at(name: str, what: str) -> dict[str, Any] | None:
        if name not in entries:
            return None
        manifest, why = manifest_module.parse(entries[name])
        if why is not None:
            folder.foreign.append(f"{name} (not {what}: {why})")
        return manifest if why is None else None

    folder.manifest = manifest_at(MANIFEST, "an fxstore manifest")
    folder.kept = manifest_at(CLAIM, "a copy of an fxstore manifest")
    claimed = [c["identity"] for c in (folder.record, folder.manifest, folder.kept) if c is not None]
    identities = [*claimed, *([expected] if expected is not None else [])]
    digests = {identity_digest(i) for i in identities} | ({staged} if staged else set())
    running = (folder.record is not None or staged) and PROGRESS in entries  # a run's markers name its shards
    markers = list(read_markers(entries[PROGRESS], str.isdigit, follow_link=False).values()) if running else []
    claims = formats.Claims(digests, formats.listed(folder.manifest or folder.kept, markers), claimed,
                            tuple(c for c in (folder.manifest, folder.kept) if c is not None), tuple(markers))

    def data_file(name: str, path: Path) -> bool:
        return formats.recognise(name, path, claims)

    def temporary(name: str, path: Path) -> bool:
        base = temp_base(name)
        info = plain_stat(path)
        if info is None:
            return False
        if base == RUN_FILE:
            return info.st_size == 0 or _starts(path, b'{\n  "fxstore_run"')
        if folder.record is None:  # every other temporary file is written while a run record exists
            return False
        if base in (MANIFEST, CLAIM):
            return info.st_size == 0 or _starts(path, b'{\n  "fxstore_manifest"')
        return info.st_size == 0 or data_file(base, path)

    def ours(name: str, path: Path) -> bool:
        if name == PROBE:
            info = plain_stat(path)
            return info is not None and info.st_size == 0
        if name == RUN_FILE:
            return folder.record is not None
        if name == MANIFEST:
            return folder.manifest is not None
        if name == CLAIM:
            return folder.kept is not None
        if name == LOCK_FILE:
            return is_lock_file(path)
        if name == STAGING_MARKER:
            return staged is not None
        if is_temp(name):
            return temporary(name, path)
        return data_file(name, path)

    for name, path in sorted(entries.items()):
        if name in (RUN_FILE, MANIFEST, CLAIM) and any(f.startswith(name + " (") for f in folder.foreign):
            continue
        real_dir = path.is_dir() and not path.is_symlink()
        if name == PROGRESS and real_dir and (identities or staged):
            strays = [p.name for p in path.iterdir()
                      if plain_stat(p) is None
                      or not (p.name.isdigit() or is_temp(p.name))]
            folder.foreign.extend(f"{PROGRESS}/{s}" for s in strays)
            folder.ours.append(path)
        elif name == STAGING and real_dir and folder.record is not None and _staging_digest(path) is not None:
            inner = survey(path)
            folder.foreign.extend(f"{STAGING}/{f}" for f in inner.foreign)
            folder.ours.append(path)  # a shuffled text run's unshuffled rows, an fxstore folder of its own
        elif not real_dir and ours(name, path):
            folder.ours.append(path)
        else:
            folder.foreign.append(name + ("/" if real_dir else ""))
    return folder


def _starts(path: Path, prefix: bytes) -> bool:
    try:
        return read_small(path).startswith(prefix)
    except OSError:
        return False
