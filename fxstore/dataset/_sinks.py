"""Sinks: where batches of features go on disk, one shard at a time, and how a shard is proven done.

Two formats, both readable without fxstore:

* ``safetensors`` -- one file per shard, ``shard-00000.safetensors``, holding every array
  for that shard's rows (``safetensors.torch.load_file``), written in one atomic rename.
* ``npy`` -- one ``.npy`` file per array (``numpy.load(..., mmap_mode="r")``), created under
  a hidden ``.partial`` name with every block allocated up front (``posix_fallocate``: a
  full disk is an error before the run, never a ``SIGBUS`` while writing through the
  memory map), filled row by row, and given its final name at the end.

A shard is done when its marker ``.fxstore-progress/<shard>`` exists and the checksums it
records (of the shard file, or of the shard's rows in each ``.npy`` file) match the data:
a resume keeps the shards that verify and recomputes the others. Both formats write the
same bytes for the same features, however often the run was interrupted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.lib.format import open_memmap
from safetensors.torch import save as safetensors_bytes

from ..errors import ConfigError
from ._checksum import ALGORITHM, digest_bytes, digest_file
from ._outdir import PROGRESS, atomic_write, plain_stat, read_json

__all__ = ["ArraySpec", "Sink", "SafetensorsSink", "NpySink", "SINKS", "file_stem", "npy_layout"]


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


def file_stem(key: str) -> str:
    """A file-name-safe form of a feature key (``"layer1.0:grad"`` -> ``"layer1.0_grad"``)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", key)


_MARKER = re.compile(r"\d{5,}")


class Sink:
    """Base class: collects the rows of a shard, makes the shard durable, proves it done."""

    name = ""

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

    @staticmethod
    def owns(name: str, files: list[str]) -> bool:
        """Whether a folder entry ``name`` is a data file of this format, given the recorded ``files``."""
        raise NotImplementedError

    # -- progress markers ------------------------------------------------------------------

    def _marker(self, shard: int) -> Path:
        return self.out / PROGRESS / f"{shard:05d}"

    def markers(self) -> dict[int, dict[str, Any]]:
        """Every readable marker, by shard."""
        folder = self.out / PROGRESS
        found: dict[int, dict[str, Any]] = {}
        if not folder.is_dir():
            return found
        for path in folder.iterdir():
            if _MARKER.fullmatch(path.name):
                try:
                    marker = read_json(path, limit=1 << 20)
                except (OSError, ValueError):
                    marker = None
                if isinstance(marker, dict) and marker.get("shard") == int(path.name):
                    found[int(path.name)] = marker
        return found

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
                if _MARKER.fullmatch(path.name) and int(path.name) not in markers:
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
        folder = self.out / PROGRESS
        if not folder.is_dir():
            return
        for path in folder.iterdir():
            if (_MARKER.fullmatch(path.name) or path.name.endswith(".fxstore-tmp")) and plain_stat(path) is not None:
                path.unlink()
        with contextlib.suppress(OSError):
            folder.rmdir()

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


class SafetensorsSink(Sink):
    """One safetensors file per shard; arrays are keyed by feature key."""

    name = "safetensors"
    PATTERN = re.compile(r"shard-(\d{5,})\.safetensors")

    def __init__(self, out: Path, specs: list[ArraySpec], num_samples: int | None, identity: str | None = None) -> None:
        super().__init__(out, specs, num_samples, identity)
        self._parts: dict[int, list[dict[str, torch.Tensor]]] = {}

    @staticmethod
    def shard_file(shard: int) -> str:
        """File name of a shard."""
        return f"shard-{shard:05d}.safetensors"

    @staticmethod
    def owns(name: str, files: list[str]) -> bool:
        return SafetensorsSink.PATTERN.fullmatch(name) is not None

    def check_shard(self, marker: dict[str, Any]) -> str | None:
        name = self.shard_file(marker["shard"])
        return check_file(self.out / name, name, marker.get("bytes"), marker.get(ALGORITHM))

    def forget(self, shard: int) -> None:
        super().forget(shard)
        (self.out / self.shard_file(shard)).unlink(missing_ok=True)

    def bytes_needed(self, done: set[int], shards: list[tuple[int, int]]) -> int:
        row = sum(s.row_bytes for s in self.specs)
        header = 256 + 128 * len(self.specs)
        return sum(header + count * row for k, (_, count) in enumerate(shards) if k not in done)

    def write(self, shard: int, start: int, arrays: dict[str, torch.Tensor]) -> None:
        self._parts.setdefault(shard, []).append(arrays)

    def finish(self, shard: int, start: int, count: int, inputs: str | None = None) -> None:
        parts = self._parts.pop(shard)
        tensors = {s.key: torch.cat([p[s.key] for p in parts]).contiguous() for s in self.specs}
        # one metadata entry: safetensors writes a metadata map in hash order, which differs between processes
        record = {"shard": shard, "start": start, "count": count, "identity": self.identity, "inputs": inputs}
        data = safetensors_bytes(tensors, metadata={"fxstore": json.dumps(record)})
        atomic_write(self.out / self.shard_file(shard), data)
        self.write_marker(shard, start, count, digest_bytes(data), inputs, size=len(data))

    def finalize(self, shards: dict[int, tuple[int, int]]) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
        markers = self.markers()
        entries = [{"file": self.shard_file(k), **self._entry(markers[k], start, count)}
                   for k, (start, count) in sorted(shards.items())]
        return {}, entries

    @classmethod
    def recognise(cls, name: str, path: Path, digests: set[str], listed: dict[str, Any]) -> bool:
        """Whether ``path`` is a shard fxstore wrote: its header names this shard and one of the run
        identities ``digests``, or the manifest ``listed`` it with exactly its size (a damaged header)."""
        match = cls.PATTERN.fullmatch(name)
        info = plain_stat(path)
        if match is None or info is None:
            return False
        record = header_record(path)
        if record is not None and record.get("shard") == int(match.group(1)) and record.get("identity") in digests:
            return True
        return name in listed and listed[name] == info.st_size


class NpySink(Sink):
    """One memory-mapped ``.npy`` file per array, preallocated, rows written in place."""

    name = "npy"

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
        self.names = {s.key: file_stem(s.key) + ".npy" for s in specs}
        if len(set(self.names.values())) != len(self.names):
            raise ConfigError(
                f"two arrays would share one file name: {sorted(self.names)}.\n"
                "Hint: give the layers distinct aliases with a dict {layer: alias}."
            )
        self._maps: dict[str, np.memmap] = {}

    @property
    def files(self) -> list[str]:
        return list(self.names.values())

    @staticmethod
    def owns(name: str, files: list[str]) -> bool:
        return name in files or (name.startswith(".") and name.endswith(".partial") and name[1:-8] in files)

    @staticmethod
    def layouts(identity: dict[str, Any]) -> dict[str, tuple[tuple[int, ...], np.dtype, int]]:
        """``{file name: (shape, dtype, file size)}`` of every ``.npy`` file a run ``identity`` writes."""
        n = int(identity["num_samples"])
        arrays = dict(identity["features"])
        if identity.get("target") is not None:
            arrays["target"] = identity["target"]
        found = {}
        for key, entry in arrays.items():
            dtype = np.dtype(entry["dtype"])
            shape = (n, *(int(d) for d in entry["shape"]))
            size = _header_bytes(dtype, shape) + dtype.itemsize * int(np.prod(shape, dtype=np.int64))
            found[file_stem(key) + ".npy"] = (shape, dtype, size)
        return found

    @classmethod
    def recognise(cls, name: str, path: Path, identities: list[dict[str, Any]]) -> bool:
        """Whether ``path`` (``X.npy`` or ``.X.npy.partial``) is a file one of the run ``identities`` writes:
        a regular file whose ``.npy`` header says exactly that array's shape and dtype."""
        base = name[1:-len(".partial")] if name.startswith(".") and name.endswith(".partial") else name
        if plain_stat(path) is None:
            return False
        layout = None
        for identity in identities:
            try:
                expected = cls.layouts(identity).get(base)
            except (KeyError, TypeError, ValueError):
                continue
            if expected is not None:
                layout = npy_layout(path) if layout is None else layout
                if layout is not None and layout[:2] == expected[:2]:
                    return True
        return False

    def _partial(self, key: str) -> Path:
        return self.out / f".{self.names[key]}.partial"

    def _size(self, s: ArraySpec) -> tuple[int, int]:
        """(header bytes, total bytes) of the file of ``s``."""
        offset = _header_bytes(_numpy_dtype(s.dtype), (self.num_samples, *s.shape))
        return offset, offset + int(self.num_samples) * s.row_bytes

    def _valid(self, s: ArraySpec) -> bool:
        path = self._partial(s.key)
        layout = npy_layout(path)
        return (layout is not None and layout[:2] == ((self.num_samples, *s.shape), _numpy_dtype(s.dtype))
                and path.stat().st_size == self._size(s)[1])

    def check_shard(self, marker: dict[str, Any]) -> str | None:
        sums = marker.get(ALGORITHM)
        if not isinstance(sums, dict):
            return f"shard {marker['shard']}: its marker holds no checksums"
        for s in self.specs:
            name = self.names[s.key]
            if not self._valid(s):
                return f"{name}: missing, truncated or of another shape"
            offset = self._size(s)[0] + marker["start"] * s.row_bytes
            got = digest_file(self._partial(s.key), offset, marker["count"] * s.row_bytes)
            if got != sums.get(s.key):
                return f"{name}: rows {marker['start']}-{marker['start'] + marker['count'] - 1} fail their checksum"
        return None

    def adopt(self) -> None:
        for s in self.specs:
            partial, final = self._partial(s.key), self.out / self.names[s.key]
            if not partial.exists() and final.exists():  # a finish was interrupted after this rename
                os.replace(final, partial)

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
                array = open_memmap(partial, mode="w+", dtype=_numpy_dtype(s.dtype),
                                    shape=(self.num_samples, *s.shape))
                del array
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
        files = {}
        for s in self.specs:
            final = self.out / self.names[s.key]
            os.replace(self._partial(s.key), final)
            files[s.key] = {"file": self.names[s.key], "bytes": self._size(s)[1]}
        return files, entries


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


def npy_layout(path: Path) -> tuple[tuple[int, ...], np.dtype, int] | None:
    """``(shape, dtype, data offset)`` from a ``.npy`` header, or ``None`` if it is not one."""
    try:
        with open(os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC), "rb") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(f)
            return (tuple(shape), dtype, f.tell()) if not fortran else None
    except (OSError, ValueError, SyntaxError):
        return None


def header_record(path: Path) -> dict[str, Any] | None:
    """The fxstore record in a safetensors file's header (``{"shard", "start", "count", "identity"}``), read
    without following links or reading the data; ``None`` if the file has none."""
    if plain_stat(path) is None:  # a link, FIFO or device is never opened
        return None
    try:
        with open(os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC), "rb") as f:
            head = f.read(8)
            size = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
            if not 0 < size <= _HEADER_LIMIT:
                return None
            header = json.loads(f.read(size))
        record = json.loads(header["__metadata__"]["fxstore"])
    except (OSError, ValueError, KeyError, TypeError, RecursionError, struct.error):
        return None
    return record if isinstance(record, dict) else None


_HEADER_LIMIT = 100 << 20  # safetensors' own limit on a header


def _header_bytes(dtype: np.dtype, shape: tuple[int, ...]) -> int:
    import io

    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": np.lib.format.dtype_to_descr(dtype),
                                                  "fortran_order": False, "shape": shape})
    return len(buffer.getvalue())


def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    return torch.empty(0, dtype=dtype).numpy().dtype


SINKS: dict[str, type[Sink]] = {"safetensors": SafetensorsSink, "npy": NpySink}
"""Output formats by name."""
