"""The ``npy`` format: one ``.npy`` file per array (``numpy.load(..., mmap_mode="r")`` reads it).

Each file is created under a hidden ``.partial`` name with every block allocated up front
(``posix_fallocate``: a full disk is an error before the run, never a ``SIGBUS`` while writing
through the memory map), filled row by row, and given its final name at the end. Its header is
numpy's plus a comment naming the run's generation (``_npy_header``): written ``unfinished`` first,
the digest of the finished run's row ranges and inputs just before the rename; every reader checks it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from numpy.lib.format import open_memmap

from ...errors import ConfigError
from ..folder.checksums import ALGORITHM, digest_bytes, digest_file, identity_digest, is_digest
from ..folder.files import plain_stat
from ..folder.names import array_file, is_array_file, partial_base, partial_name, plain_name
from ._npy_header import npy_header, npy_layout, raw_run, rows_digest, run_tag, write_inputs
from .base import ArraySpec, Claims, Sink, arrays_of, check_file

__all__ = ["NpySink", "npy_layout"]


class NpySink(Sink):
    """One memory-mapped ``.npy`` file per array, preallocated, rows written in place."""

    name = "npy"
    sharded = False
    self_describing = False  # a .npy header names its run's generation (digests), not the manifest itself

    def __init__(self, out: Path, specs: list[ArraySpec], num_samples: int | None, identity: str | None = None) -> None:
        super().__init__(out, specs, num_samples, identity)
        if num_samples is None:
            raise ConfigError(
                "format='npy' needs the number of samples before the run, but the data does not say.\n"
                "Hint: pass a sized Dataset (or a DataLoader over one), or use format='safetensors'."
            )
        for s in specs:
            if s.dtype == torch.bfloat16:
                raise ConfigError(
                    f"'{s.key}' is bfloat16, which .npy files cannot hold.\n"
                    "Hint: use format='safetensors', or dtype='float16'/'float32'."
                )
        self.names = {s.key: array_file(s.key) for s in specs}
        if len(set(self.names.values())) != len(self.names):
            raise ConfigError(
                f"two arrays would share one file name: {sorted(self.names)}.\n"
                "Hint: give the layers distinct aliases with a dict {layer: alias}."
            )
        self._maps: dict[str, np.memmap] = {}
        self._run = identity if identity is not None else identity_digest({})  # what each file's header names

    @property
    def files(self) -> list[str]:
        return list(self.names.values())

    @staticmethod
    def record_files(identity: dict[str, Any]) -> list[str]:
        return [array_file(k) for k in arrays_of(identity)]

    @staticmethod
    def matches(name: str) -> bool:
        return is_array_file(name, partial=True)

    @staticmethod
    def validate_array(key: str, entry: dict[str, Any], files: set[str]) -> str | None:
        name = entry.get("file")
        if not (plain_name(name) and is_array_file(str(name))):
            return f"the file of {key!r} is {name!r}, not a .npy file name inside the folder"
        if name in files:
            return f"two arrays name the file {name!r}"
        files.add(name)
        size = entry.get("bytes")
        if not (isinstance(size, int) and not isinstance(size, bool) and size >= 0):
            return f"the size of {key!r} is {size!r}, not a count"
        if entry["dtype"] == "bfloat16":
            return f"{key!r} is bfloat16 in an npy folder"
        return None

    @staticmethod
    def validate_shard(k: int, shard: dict[str, Any], arrays: dict[str, Any]) -> str | None:
        sums = shard.get(ALGORITHM)
        if not (isinstance(sums, dict) and set(sums) == set(arrays) and all(is_digest(v) for v in sums.values())):
            return f"shard {k} has no checksum for every array"
        return None

    @classmethod
    def verify(cls, root: Path, manifest: dict[str, Any], checksums: bool) -> list[str]:
        problems = []
        for key, entry in arrays_of(manifest).items():
            name, path = entry["file"], root / entry["file"]
            problem = check_file(path, name, entry["bytes"], None)
            offset = 0
            if problem is None:
                try:
                    with open(os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC), "rb") as f:
                        problem, offset = _header_problem(f, name, entry, manifest)
                except OSError as e:  # removed or replaced since its lstat
                    problem = f"{name}: not readable ({e.strerror or e})"
            row = _row_bytes(entry)
            if problem is None and checksums:
                for shard in manifest["shards"]:
                    problem = _rows_problem(path, name, offset, row, shard["start"], shard["count"],
                                            shard[ALGORITHM][key])
                    if problem is not None:
                        break
            if problem is not None:
                problems.append(problem)
        return problems

    @staticmethod
    def sources(root: Path, manifest: dict[str, Any], key: str) -> list[tuple[Path, int]]:
        return [(root / arrays_of(manifest)[key]["file"], manifest["num_samples"])]

    @staticmethod
    def open_rows(path: Path, key: str) -> np.ndarray:
        return np.load(path, mmap_mode="r")

    @classmethod
    def check_open(cls, f: BinaryIO, name: str, manifest: dict[str, Any], k: int) -> str | None:
        """Why the open ``.npy`` file of array ``k`` (in :func:`arrays_of` order) is not what the manifest lists:
        its header's shape, dtype and data offset against the file's size, and the run and inputs it names
        (no data read)."""
        return _header_problem(f, name, list(arrays_of(manifest).values())[k], manifest)[0]

    @staticmethod
    def map_open(f: BinaryIO, key: str) -> np.ndarray:
        """The rows of an open ``.npy`` file (checked by :meth:`check_open`), memory-mapped read-only."""
        shape, dtype, offset = npy_layout(f) or ((0,), np.dtype(np.uint8), 0)
        if int(np.prod(shape, dtype=np.int64)) == 0:
            return np.zeros(shape, dtype=dtype)
        return np.memmap(f, dtype=dtype, mode="r", offset=offset, shape=shape)

    @staticmethod
    def data_files(manifest: dict[str, Any]) -> int:
        return len(arrays_of(manifest))

    @staticmethod
    def file_names(manifest: dict[str, Any]) -> list[str]:
        return [entry["file"] for entry in arrays_of(manifest).values()]

    @staticmethod
    def layouts(identity: dict[str, Any]) -> dict[str, tuple[tuple[int, ...], np.dtype, int]]:
        """``{file name: (shape, dtype, file size)}`` of every ``.npy`` file a run ``identity`` writes."""
        n = int(identity["num_samples"])
        found = {}
        for key, entry in arrays_of(identity).items():
            dtype = np.dtype(entry["dtype"])
            shape = (n, *(int(d) for d in entry["shape"]))
            head = len(npy_header(dtype, shape, identity_digest(identity)))
            found[array_file(key)] = (shape, dtype, head + dtype.itemsize * int(np.prod(shape, dtype=np.int64)))
        return found

    @classmethod
    def strangers(cls, root: Path, manifest: dict[str, Any]) -> list[str]:
        found, run = [], identity_digest(manifest["identity"])
        for key, entry in arrays_of(manifest).items():
            path = root / entry["file"]
            layout = npy_layout(path)
            expected = ((manifest["num_samples"], *entry["shape"]), np.dtype(entry["dtype"]))
            if (layout is not None and layout[:2] == expected and manifest["shards"]
                    and raw_run(path) != run  # a header naming the run: fxstore's file, its rows damaged
                    and not _rows_match(path, layout[2], entry, key, manifest)):
                found.append(entry["file"])
        return found

    @classmethod
    def recognise(cls, name: str, path: Path, claims: Claims) -> bool:
        """Whether ``path`` (``X.npy`` or ``.X.npy.partial``) is a file one of the claimed run identities
        of this format writes: a regular file whose ``.npy`` header says exactly that array's shape and dtype
        (a claim must name the file) -- or, when its header does not parse (it is damaged), a file of exactly
        the size that identity gives it whose first bytes still name that run (the header's comment), or a
        final file a finished claim records with exactly its size and whose rows match at least one recorded
        checksum."""
        base = partial_base(name) or name
        info = plain_stat(path)
        if info is None:
            return False
        layout = None
        for identity in (i for i in claims.identities if i["format"] == cls.name):
            try:
                expected = cls.layouts(identity).get(base)
            except (KeyError, TypeError, ValueError):
                continue
            if expected is not None:
                layout = npy_layout(path) if layout is None else layout
                if layout is not None and layout[:2] == expected[:2]:
                    return True
                if info.st_size == expected[2] and (raw_run(path) == identity_digest(identity) or (
                        base != name and _marked(path, base, expected, identity, claims.markers))):
                    return True  # fxstore's own file (a .partial too) whose header was damaged: recomputed
        return base == name and _recorded(name, path, info.st_size, claims.finished)

    def _partial(self, key: str) -> Path:
        return self.out / partial_name(self.names[key])

    def _size(self, s: ArraySpec) -> tuple[int, int]:
        """(header bytes, total bytes) of the file of ``s``."""
        offset = len(npy_header(_numpy_dtype(s.dtype), (self.num_samples, *s.shape), self._run))
        return offset, offset + int(self.num_samples) * s.row_bytes

    def _valid(self, s: ArraySpec, path: Path | None = None) -> bool:
        """Whether the file of ``s`` (its ``.partial`` unless ``path``) has its exact header and size."""
        path = self._partial(s.key) if path is None else path
        try:
            with open(os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC), "rb") as f:
                layout = npy_layout(f)
                return (layout is not None and layout[:2] == ((self.num_samples, *s.shape), _numpy_dtype(s.dtype))
                        and os.fstat(f.fileno()).st_size == self._size(s)[1]
                        and (run_tag(f, layout[2]) or ("",))[0] == self._run)
        except OSError:
            return False

    def check_shard(self, marker: dict[str, Any]) -> str | None:
        sums = marker.get(ALGORITHM)
        if not isinstance(sums, dict):
            return f"shard {marker['shard']}: its marker holds no checksums"
        for s in self.specs:
            name = self.names[s.key]
            if not self._valid(s):
                return f"{name}: missing, truncated or of another shape"
            problem = _rows_problem(self._partial(s.key), name, self._size(s)[0], s.row_bytes, marker["start"],
                                    marker["count"], sums.get(s.key))
            if problem is not None:
                return problem
        return None

    def adopt(self) -> None:
        for s in self.specs:
            partial, final = self._partial(s.key), self.out / self.names[s.key]
            if not partial.exists() and final.exists():  # a finish was interrupted after this rename, or a repair
                if self._valid(s, final):
                    os.replace(final, partial)
                else:  # fxstore's (its record says so) but its header is damaged: every row is computed again
                    final.unlink()

    def bytes_needed(self, done: set[int], shards: list[tuple[int, int]]) -> int:
        needed = 0
        for s in self.specs:
            size = self._size(s)[1]
            path = self._partial(s.key)
            allocated = path.stat().st_blocks * 512 if path.exists() and self._valid(s) else 0
            needed += max(size - allocated, 0)
        return needed

    def prepare(self) -> None:
        super().prepare()
        for s in self.specs:
            partial = self._partial(s.key)
            if not self._valid(s):
                partial.unlink(missing_ok=True)
                fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
                try:  # the header names the run; its inputs are written at the finish
                    os.write(fd, npy_header(_numpy_dtype(s.dtype), (self.num_samples, *s.shape), self._run))
                finally:
                    os.close(fd)
            fd = os.open(partial, os.O_RDWR)
            try:  # allocate every block now: writes through the map can then never hit a full disk
                os.posix_fallocate(fd, 0, self._size(s)[1])
            finally:
                os.close(fd)

    def open(self) -> None:
        self._maps = {s.key: open_memmap(self._partial(s.key), mode="r+") for s in self.specs}

    def write(self, shard: int, start: int, arrays: dict[str, torch.Tensor]) -> None:
        for key, array in self._maps.items():
            rows = arrays[key].numpy()
            if start + len(rows) > len(array):
                raise ConfigError(
                    f"the data yielded more than the {len(array)} samples it announced.\n"
                    "Hint: check len(data), or use format='safetensors' for data of unknown length."
                )
            array[start:start + len(rows)] = rows

    def finish(self, shard: int, start: int, count: int, inputs: str | None = None) -> None:
        sums = {}
        for key, array in self._maps.items():
            array.flush()
            sums[key] = digest_bytes(memoryview(np.ascontiguousarray(array[start:start + count])).cast("B"))
        self.write_marker(shard, start, count, sums, inputs)

    def close(self) -> None:
        for array in self._maps.values():
            array.flush()
        self._maps = {}

    def finalize(self, shards: dict[int, tuple[int, int]]) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
        markers = self.markers()
        entries = [self._entry(markers[k], start, count) for k, (start, count) in sorted(shards.items())]
        files, inputs = {}, rows_digest(entries)
        for s in self.specs:
            final = self.out / self.names[s.key]
            write_inputs(self._partial(s.key), _numpy_dtype(s.dtype), (self.num_samples, *s.shape), self._run, inputs)
            os.replace(self._partial(s.key), final)
            files[s.key] = {"file": self.names[s.key], "bytes": self._size(s)[1]}
        return files, entries


def _header_problem(f: BinaryIO, name: str, entry: dict[str, Any], manifest: dict[str, Any]) -> tuple[str | None, int]:
    """``(why the open .npy file of array ``entry`` is not what the manifest lists, its data offset)``: the header's
    shape, dtype and data offset against the file's size, then the generation its comment names (the run's
    identity digest and the digest of its row ranges and inputs) against the manifest's. No data is read."""
    n = manifest["num_samples"]
    layout = npy_layout(f)
    expected = ((n, *entry["shape"]), np.dtype(entry["dtype"]))
    if layout is None or layout[:2] != expected or layout[2] + n * _row_bytes(entry) != entry["bytes"]:
        return f"{name}: its header does not say {expected[0]} {expected[1]}", 0
    tag = run_tag(f, layout[2])
    if tag is None:
        return f"{name}: its header names no fxstore run (written by numpy, or by an earlier fxstore)", layout[2]
    if tag[0] != identity_digest(manifest["identity"]):
        return f"{name}: its header names another run", layout[2]
    if tag[1] != rows_digest(manifest["shards"]):
        return f"{name}: its header records other inputs than the manifest (a file of another run over other " \
               "data, or of an unfinished run)", layout[2]
    return None, layout[2]


def _rows_problem(path: Path, name: str, offset: int, row: int, start: int, count: int, expected: Any) -> str | None:
    """Why the rows ``start`` to ``start + count`` of a ``.npy`` file (data at ``offset``) fail their checksum."""
    if digest_file(path, offset + start * row, count * row) != expected:
        return f"{name}: rows {start}-{start + count - 1} fail their checksum"
    return None


def _rows_match(path: Path, offset: int, entry: dict[str, Any], key: str, manifest: dict[str, Any]) -> bool:
    """Whether the rows of at least one shard of ``key``'s file (data at ``offset``) match their checksum."""
    row = _row_bytes(entry)
    for shard in manifest["shards"]:
        try:
            if _rows_problem(path, entry["file"], offset, row, shard["start"], shard["count"],
                             shard[ALGORITHM][key]) is None:
                return True
        except OSError:
            return False
    return False


def _marked(path: Path, name: str, layout: tuple[tuple[int, ...], np.dtype, int], identity: dict[str, Any],
            markers: tuple[dict[str, Any], ...]) -> bool:
    """Whether the ``.partial`` file of ``name`` (of exactly the ``layout`` size the run ``identity`` gives it)
    holds the rows of at least one shard its run's progress ``markers`` record (its header is not read: it may
    be the damaged part)."""
    key = next((k for k in arrays_of(identity) if array_file(k) == name), None)
    shape, dtype, size = layout
    row = dtype.itemsize * int(np.prod(shape[1:], dtype=np.int64))
    for marker in markers:
        sums = marker.get(ALGORITHM)
        try:
            if isinstance(sums, dict) and is_digest(sums.get(key)) and _rows_problem(
                    path, name, size - shape[0] * row, row, marker["start"], marker["count"], sums[key]) is None:
                return True
        except (OSError, KeyError, TypeError, ValueError):
            continue
    return False


def _recorded(name: str, path: Path, size: int, finished: tuple[dict[str, Any], ...]) -> bool:
    """Whether a finished claim (manifest or kept copy) of this format records the file ``name`` with exactly
    ``size`` bytes and at least one shard of its rows matches the checksum recorded for it (its header is not
    read: it may be the damaged part)."""
    for manifest in finished:
        if manifest.get("format") != NpySink.name:
            continue
        for key, entry in arrays_of(manifest).items():
            if entry["file"] == name and entry["bytes"] == size:
                offset = size - manifest["num_samples"] * _row_bytes(entry)
                if offset > 0 and _rows_match(path, offset, entry, key, manifest):
                    return True
    return False


def _row_bytes(entry: dict[str, Any]) -> int:
    itemsize = torch.empty((), dtype=getattr(torch, entry["dtype"])).element_size()
    return itemsize * int(np.prod(entry["shape"], dtype=np.int64))


def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    return torch.empty(0, dtype=dtype).numpy().dtype
