"""The format object every output format is: it writes a run's shards, proves each one done, recognises
its own files in a folder, validates and verifies what a manifest says of them, and reads them back.

A shard is done when its marker ``.fxstore-progress/<shard>`` exists and the checksums it
records (of the shard file, or of the shard's rows in each ``.npy`` file) match the data:
a resume keeps the shards that verify and recomputes the others. Every format writes the
same bytes for the same features, however often the run was interrupted.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from ..folder.checksums import ALGORITHM, digest_file
from ..folder.files import atomic_write, plain_stat
from ..folder.names import PROGRESS, is_marker, marker_name
from ..folder.progress import read_markers, remove_markers

__all__ = ["ArraySpec", "Sink", "Claims", "check_file", "arrays_of"]


@dataclasses.dataclass(frozen=True)
class ArraySpec:
    """One stored array: its key, the shape of one row, and its dtype."""

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def row_bytes(self) -> int:
        """Bytes of one row."""
        return torch.empty((), dtype=self.dtype).element_size() * int(np.prod(self.shape, dtype=np.int64))


@dataclasses.dataclass(frozen=True)
class Claims:
    """What a folder's claims say of its data files (see ``folder.ownership``).

    Attributes:
        digests: The identity digests a shard's header may name (claimed runs, the run starting).
        listed: ``{file name: size}`` the manifest or the run's markers list.
        identities: The run identities a record or manifest claims.
        finished: The valid manifest and kept copy, if any.
    """

    digests: set[str]
    listed: dict[str, Any]
    identities: list[dict[str, Any]]
    finished: tuple[dict[str, Any], ...] = ()
    """The finished claims (the manifest, its kept copy): their sizes and checksums recognise a damaged file."""
    markers: tuple[dict[str, Any], ...] = ()
    """The progress markers of the run a record claims (rows and checksums): they recognise a damaged
    ``.partial`` file of an unfinished run."""


def arrays_of(record: dict[str, Any]) -> dict[str, Any]:
    """``{key: entry}`` of every stored array of a manifest or run identity (the features, then the target)."""
    arrays = dict(record["features"])
    if record.get("target") is not None:
        arrays["target"] = record["target"]
    return arrays


class Sink:
    """Base class: collects the rows of a shard, makes the shard durable, proves it done."""

    name = ""
    sharded = False
    """Whether every shard is a file of its own (what :class:`~fxstore.BatchLoader` reads)."""
    self_describing = True
    """Whether each data file names its run in its own header; if not, a finished folder keeps a
    copy of its manifest (``folder.names.CLAIM``) so that losing ``manifest.json`` loses no file."""

    def __init__(self, out: Path, specs: list[ArraySpec], num_samples: int | None, identity: str | None = None) -> None:
        self.out = out
        self.specs = specs
        self.num_samples = num_samples
        self.identity = identity  # the digest of the run identity, written into each shard's header

    # -- files this format writes ---------------------------------------------------------

    @property
    def files(self) -> list[str]:
        """The data files named in the run record before any is written (besides shard files)."""
        return []

    # -- what the format object knows of its files (class methods: no run needed) ------------

    @staticmethod
    def record_files(identity: dict[str, Any]) -> list[str]:
        """The data files a run of ``identity`` names in its record before writing them."""
        return []

    @staticmethod
    def matches(name: str) -> bool:
        """Whether a folder entry ``name`` has the form of one of this format's data files."""
        raise NotImplementedError

    @classmethod
    def recognise(cls, name: str, path: Path, claims: Claims) -> bool:
        """Whether ``path`` (a name :meth:`matches`) is a data file the ``claims`` prove fxstore wrote."""
        raise NotImplementedError

    @classmethod
    def listed(cls, manifest: dict[str, Any] | None, markers: list[dict[str, Any]]) -> dict[str, Any]:
        """``{file name: size}`` of the files a manifest of this format or a run's markers list."""
        return {}

    @staticmethod
    def validate_array(key: str, entry: dict[str, Any], files: set[str]) -> str | None:
        """Why a manifest's array entry is malformed for this format (``files``: names seen so far)."""
        return None

    @staticmethod
    def validate_shard(k: int, shard: dict[str, Any], arrays: dict[str, Any]) -> str | None:
        """Why a manifest's shard entry ``k`` is malformed for this format."""
        raise NotImplementedError

    @classmethod
    def verify(cls, root: Path, manifest: dict[str, Any], checksums: bool) -> list[str]:
        """One line per data file of a finished folder that does not match its (valid) manifest."""
        raise NotImplementedError

    @staticmethod
    def sources(root: Path, manifest: dict[str, Any], key: str) -> list[tuple[Path, int]]:
        """``[(file, rows)]`` that hold the array ``key`` of a finished folder, in row order."""
        raise NotImplementedError

    @staticmethod
    def open_rows(path: Path, key: str) -> np.ndarray:
        """The rows of ``key`` in one source file, memory-mapped (bfloat16 as its uint16 bits)."""
        raise NotImplementedError

    @staticmethod
    def read_shard(path: Path) -> dict[str, torch.Tensor]:
        """Every array of one shard file, read into memory (formats with :attr:`sharded` only)."""
        raise NotImplementedError

    @staticmethod
    def data_files(manifest: dict[str, Any]) -> int:
        """How many data files a finished folder of this format holds."""
        raise NotImplementedError

    @staticmethod
    def file_names(manifest: dict[str, Any]) -> list[str]:
        """The data files of a finished folder, in order (shards by index; ``.npy`` files in array order)."""
        raise NotImplementedError

    @classmethod
    def check_open(cls, f: BinaryIO, name: str, manifest: dict[str, Any], k: int) -> str | None:
        """Why the open data file ``k`` of :meth:`file_names` is not what the (valid) manifest lists, from its
        header alone (``None``: it is)."""
        raise NotImplementedError

    @staticmethod
    def map_open(f: BinaryIO, key: str) -> np.ndarray:
        """The rows of ``key`` in an open source file (checked by :meth:`check_open`), memory-mapped."""
        raise NotImplementedError

    @staticmethod
    def read_open(f: BinaryIO) -> dict[str, torch.Tensor]:
        """Every array of an open shard file, read into memory (formats with :attr:`sharded` only)."""
        raise NotImplementedError

    # -- progress markers ------------------------------------------------------------------

    def _marker(self, shard: int) -> Path:
        return self.out / PROGRESS / marker_name(shard)

    def markers(self) -> dict[int, dict[str, Any]]:
        """Every readable marker, by shard."""
        return read_markers(self.out / PROGRESS)

    def write_marker(self, shard: int, start: int, count: int, checksum: Any, inputs: str | None = None,
                     size: int | None = None) -> None:
        """Record ``shard`` as done, with its checksum(s), file size and the digest of its inputs."""
        marker: dict[str, Any] = {"shard": shard, "start": start, "count": count}
        if size is not None:
            marker["bytes"] = size
        marker[ALGORITHM] = checksum
        if inputs is not None:
            marker["inputs"] = inputs
        atomic_write(self._marker(shard), json.dumps(marker).encode())

    def verified_shards(self) -> tuple[set[int], list[str]]:
        """The shards whose markers verify against the data; bad ones are forgotten (and their files removed).

        Returns:
            ``(done shards, one line per shard that failed)``.
        """
        done, bad = set(), []
        markers = self.markers()
        folder = self.out / PROGRESS
        if folder.is_dir():
            for path in folder.iterdir():
                if is_marker(path.name) and int(path.name) not in markers:
                    bad.append(f"shard {int(path.name)}: unreadable marker")
                    self.forget(int(path.name))
        for shard, marker in sorted(markers.items()):
            try:
                problem = self.check_shard(marker)
            except (OSError, KeyError, TypeError, ValueError) as e:  # a marker or file that does not fit
                problem = f"shard {shard}: {type(e).__name__}: {e}"
            if problem is None:
                done.add(shard)
            else:
                bad.append(problem)
                self.forget(shard)
        return done, bad

    def check_shard(self, marker: dict[str, Any]) -> str | None:
        """Why the data of a marked shard does not match its marker (``None``: it matches)."""
        raise NotImplementedError

    @classmethod
    def strangers(cls, root: Path, manifest: dict[str, Any]) -> list[str]:
        """The data files of a finished folder that have the form its manifest gives them but fail *every*
        checksum it records for them: not damaged files of this run but someone else's, never overwritten
        without ``overwrite=True`` (files that name their run in their header have none)."""
        return []

    def forget(self, shard: int) -> None:
        """Drop a shard that failed verification, so that it is computed again."""
        self._marker(shard).unlink(missing_ok=True)

    def restore(self, shards: list[dict[str, Any]]) -> None:
        """Turn a finished folder's manifest ``shards`` back into markers (to repair it)."""
        (self.out / PROGRESS).mkdir(exist_ok=True)
        for k, s in enumerate(shards):
            self.write_marker(k, s["start"], s["count"], s[ALGORITHM], s.get("inputs"), s.get("bytes"))

    def remove_progress(self) -> None:
        """Remove the markers and their folder (only files fxstore names as markers)."""
        remove_markers(self.out)

    # -- the run ---------------------------------------------------------------------------

    def adopt(self) -> None:
        """Take back files an interrupted finish already renamed (rank 0, before verifying)."""

    def bytes_needed(self, done: set[int], shards: list[tuple[int, int]]) -> int:
        """Disk space still to allocate for the shards ``(start, count)`` not in ``done``."""
        raise NotImplementedError

    def prepare(self) -> None:
        """Create what all ranks write into (rank 0, before the others open it)."""
        (self.out / PROGRESS).mkdir(exist_ok=True)

    def open(self) -> None:
        """Get ready to write (every rank)."""

    def write(self, shard: int, start: int, arrays: dict[str, torch.Tensor]) -> None:
        """Take the rows ``start, start + 1, ...`` of ``shard``."""
        raise NotImplementedError

    def finish(self, shard: int, start: int, count: int, inputs: str | None = None) -> None:
        """Make ``shard`` (rows ``start`` to ``start + count``) durable, then mark it done.

        ``inputs`` is the digest of the shard's input bytes (recorded to detect changed data on resume).
        """
        raise NotImplementedError

    def close(self) -> None:
        """Release files (every rank)."""

    def finalize(self, shards: dict[int, tuple[int, int]]) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
        """Rank 0, after all ranks: final file names; return ``({key: file entry}, shard entries)``."""
        raise NotImplementedError

    def _entry(self, marker: dict[str, Any], start: int, count: int) -> dict[str, Any]:
        entry: dict[str, Any] = {"start": start, "count": count}
        if "bytes" in marker:
            entry["bytes"] = marker["bytes"]
        entry[ALGORITHM] = marker[ALGORITHM]
        if "inputs" in marker:
            entry["inputs"] = marker["inputs"]
        return entry


def check_file(path: Path, name: str, size: Any, checksum: Any) -> str | None:
    """Why a data file does not match its recorded size and checksum (``None``: it matches)."""
    info = plain_stat(path)
    if info is None:
        return f"{name}: missing" if not os.path.lexists(path) else f"{name}: not a plain file"
    actual = info.st_size
    if size is not None and actual != size:
        return f"{name}: {actual} bytes, {size} recorded (truncated or extended)"
    if checksum is not None and digest_file(path) != checksum:
        return f"{name}: checksum mismatch (the file was changed or damaged)"
    return None



