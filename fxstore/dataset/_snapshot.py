"""The one read path of a finished output folder: every reader (``load_features``, ``ShardedArray``,
``BatchLoader``) opens it through a :class:`Snapshot`.

A snapshot checks the folder once, as ``load_features`` always did (the manifest against its schema
and its own run identity, every data file's size and header: shard index, rows, run and inputs),
and pins what it checked: the manifest it read and the identity of every data file (device, inode,
size, modification time). Every later open of a data file checks it again, cheaply and without
hashing data: the name must still be a regular file (``lstat`` before opening, so a FIFO is never
opened), the very file that was checked, and its own header must still name its place in the
pinned manifest. A folder rewritten after the snapshot (``overwrite=True``, a repair, a copied-in
shard) is refused with an :class:`~fxstore.errors.OutputError` naming the file that changed; files
already open keep giving the run they belong to. A reader never mixes two runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from ..errors import OutputError
from . import formats
from .folder.files import NotPlainFile, cut, cut_list, file_key, open_plain, plain_stat, read_json
from .folder.manifest import consistency, read_manifest
from .folder.names import CLAIM, MANIFEST

__all__ = ["Snapshot", "check_folder"]

_REPAIR = "Hint: run the same extraction again: it verifies the folder and recomputes what is damaged."


def check_folder(root: Path, manifest: dict[str, Any], checksums: bool) -> list[str]:
    """One line per data file of a finished folder that does not match its (valid) manifest, then the manifest's
    disagreements with its own run identity (``checksums``: also read every byte, and check that a kept copy of
    the manifest, in formats that keep one, is the manifest)."""
    fmt = formats.get(manifest["format"])
    problems = fmt.verify(root, manifest, checksums) + consistency(manifest)
    if checksums and not fmt.self_describing:
        problems += _kept_copy(root, manifest)
    return [cut(p, 300) for p in problems]


def _kept_copy(root: Path, manifest: dict[str, Any]) -> list[str]:
    """Whether the kept copy (``.fxstore-files.json``) is still the manifest: without it, losing ``manifest.json``
    would leave the ``.npy`` files unclaimed."""
    try:
        kept = read_json(root / CLAIM)
    except FileNotFoundError:
        return [f"{CLAIM}: missing (the copy of {MANIFEST} that keeps the .npy files claimed if it is lost)"]
    except (OSError, ValueError):
        return [f"{CLAIM}: not readable JSON (the copy of {MANIFEST} that keeps the .npy files claimed)"]
    same = kept == json.loads(json.dumps(manifest))  # as JSON: a manifest in memory may hold tuples
    return [] if same else [f"{CLAIM}: differs from {MANIFEST} (it must be its copy)"]


class Snapshot:
    """A finished output folder, checked once and pinned: the manifest read, the identity of every data file.

    Args:
        out: The output folder.
        verify: Also read every data file and compare its checksums (else sizes and headers only).

    Raises:
        OutputError: no finished extraction, a manifest that is not valid, files that do not match it
            (each named), or a folder that changed while it was checked.
    """

    def __init__(self, out: str | Path, verify: bool = False) -> None:
        self.out = Path(out)
        before = self._pins([MANIFEST])  # a run that rewrites the folder replaces the manifest file too
        self.manifest = read_manifest(out)
        self.format = formats.get(self.manifest["format"])
        self.names = self.format.file_names(self.manifest)
        pins = self._pins([MANIFEST, *self.names])
        try:
            problems = check_folder(self.out, self.manifest, checksums=verify)
        except OSError as e:  # a file removed or cut short while it was read
            raise self._racing() from e
        if problems:
            raise OutputError(f"'{cut(out)}' does not match its manifest: {cut_list(problems)}.\n{_REPAIR}")
        if self._pins([MANIFEST, *self.names]) != pins or pins[MANIFEST] != before[MANIFEST]:
            raise self._racing()
        self.pins = pins
        self._arrays = list(formats.arrays_of(self.manifest))

    def _pins(self, names: list[str]) -> dict[str, tuple[int, int, int, int] | None]:
        found = {}
        for name in names:
            info = plain_stat(self.out / name)
            found[name] = None if info is None else file_key(info)
        return found

    def _racing(self) -> OutputError:
        return OutputError(f"'{cut(self.out)}' changed while it was being checked (a run or repair is writing it?).\n"
                           "Hint: wait for that run to finish, then open the folder again.")

    def _changed(self, name: str, now: str) -> OutputError:
        return OutputError(
            f"'{cut(self.out)}' changed since it was opened: {cut(name)} is {now} now (rewritten by another run, "
            "overwrite=True or a repair); a reader reads only the run it opened, never a mix.\n"
            "Hint: open the folder again (load_features(out) or BatchLoader(out, ...)) to read what it holds now."
        )

    def open(self, k: int) -> BinaryIO:
        """Open data file ``k`` (of :meth:`Sink.file_names`) after checking it is the file pinned and that its
        header still names its place in the manifest.

        Raises:
            OutputError: the file is gone, not a regular file, another file, or its header disagrees.
        """
        name = self.names[k]
        try:
            fd, info = open_plain(self.out / name)
        except FileNotFoundError:
            raise self._changed(name, "gone") from None
        except NotPlainFile:
            raise self._changed(name, "not a plain file (a folder, link, FIFO or device: never opened)") from None
        except OSError as e:
            raise OutputError(f"cannot read {cut(name)} of '{cut(self.out)}': {e.strerror or e}.\n"
                              "Hint: check the folder's permissions and disk.") from e
        f = open(fd, "rb")  # noqa: SIM115 - returned open
        try:
            if file_key(info) != self.pins[name]:
                raise self._changed(name, "another file")
            problem = self.format.check_open(f, name, self.manifest, k)
            if problem is not None:
                raise OutputError(f"'{cut(self.out)}' does not match its manifest: {cut(problem)}.\n{_REPAIR}")
        except BaseException:
            f.close()
            raise
        return f

    def _read_error(self, k: int, e: Exception) -> OutputError:
        return OutputError(f"cannot read {cut(self.names[k])} of '{cut(self.out)}': {type(e).__name__}: "
                           f"{cut(e)}.\n{_REPAIR}")

    def file_of(self, key: str, source: int) -> int:
        """The data file that holds source ``source`` (a row block of :meth:`Sink.sources`) of array ``key``."""
        return source if self.format.sharded else self._arrays.index(key)

    def rows(self, key: str, source: int) -> np.ndarray:
        """The rows of ``key`` in source ``source``, memory-mapped from the checked file."""
        k = self.file_of(key, source)
        with self.open(k) as f:
            try:
                return self.format.map_open(f, key)
            except (OSError, ValueError, KeyError, TypeError, OverflowError) as e:
                raise self._read_error(k, e) from e

    def read(self, k: int) -> dict[str, torch.Tensor]:
        """Every array of shard file ``k``, read into memory from the checked file (sharded formats)."""
        with self.open(k) as f:
            try:
                return self.format.read_open(f)
            except Exception as e:  # noqa: BLE001 - safetensors' own error on bytes changed in place
                raise self._read_error(k, e) from e
