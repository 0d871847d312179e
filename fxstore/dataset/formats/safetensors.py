"""The ``safetensors`` format: one file per shard, ``shard-00000.safetensors``, holding every array
for that shard's rows (``safetensors.torch.load_file`` reads it), written in one atomic rename.

Each shard's header names its place (shard index, first row, count) and the digest of its
run's identity, so a shard is recognised as fxstore's from its own bytes.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from ..folder.checksums import ALGORITHM, digest_bytes, identity_digest, is_digest
from ..folder.files import atomic_write, cut, open_plain, plain_stat
from ..folder.names import SHARD_PATTERN, shard_file
from .base import ArraySpec, Claims, Sink, arrays_of, check_file

__all__ = ["SafetensorsSink", "header_record", "mapped"]


class SafetensorsSink(Sink):
    """One safetensors file per shard; arrays are keyed by feature key."""

    name = "safetensors"
    sharded = True
    PATTERN = SHARD_PATTERN

    def __init__(self, out: Path, specs: list[ArraySpec], num_samples: int | None, identity: str | None = None) -> None:
        super().__init__(out, specs, num_samples, identity)
        self._parts: dict[int, list[dict[str, torch.Tensor]]] = {}

    @staticmethod
    def shard_file(shard: int) -> str:
        """File name of a shard."""
        return shard_file(shard)

    @staticmethod
    def matches(name: str) -> bool:
        return SHARD_PATTERN.fullmatch(name) is not None

    @classmethod
    def listed(cls, manifest: dict[str, Any] | None, markers: list[dict[str, Any]]) -> dict[str, Any]:
        found = {}
        if manifest is not None and manifest["format"] == cls.name:
            found = {s["file"]: s["bytes"] for s in manifest["shards"]}
        for marker in markers:  # a run's markers name its shards and sizes
            found.setdefault(shard_file(marker["shard"]), marker.get("bytes"))
        return found

    @staticmethod
    def validate_shard(k: int, shard: dict[str, Any], arrays: dict[str, Any]) -> str | None:
        name = shard.get("file")
        if name != shard_file(k):
            return f"shard {k} names the file {name!r}, not {shard_file(k)!r}"
        size = shard.get("bytes")
        if not (isinstance(size, int) and not isinstance(size, bool) and size >= 0):
            return f"the size of shard {k} is {size!r}, not a count"
        if not is_digest(shard.get(ALGORITHM)):
            return f"shard {k} has no checksum"
        return None

    @classmethod
    def verify(cls, root: Path, manifest: dict[str, Any], checksums: bool) -> list[str]:
        problems = []
        for k, shard in enumerate(manifest["shards"]):
            name, path = shard["file"], root / shard["file"]
            problem = check_file(path, name, shard["bytes"], shard[ALGORITHM] if checksums else None)
            if problem is None:
                try:
                    fd, _ = open_plain(path)  # lstat first, O_NONBLOCK: a FIFO swapped in is never waited on
                except OSError as e:
                    problem = f"{name}: cannot be opened ({e.strerror or type(e).__name__})"
                else:
                    with open(fd, "rb") as f:
                        problem = cls.check_open(f, name, manifest, k)
            if problem is not None:
                problems.append(problem)
        return problems

    @classmethod
    def check_open(cls, f: BinaryIO, name: str, manifest: dict[str, Any], k: int) -> str | None:
        """Why the open shard ``k`` is not the one the manifest lists: its header's index, rows, run and
        inputs, and its arrays' shapes, dtypes and places in the file (no data read)."""
        shard = manifest["shards"][k]
        try:
            header = _header(f)
            data = os.fstat(f.fileno()).st_size - f.tell()  # the bytes after the header
        except (OSError, ValueError, KeyError, TypeError, RecursionError, struct.error):
            return f"{name}: not a readable safetensors file"
        for key, entry in arrays_of(manifest).items():
            expected = [shard["count"], *entry["shape"]]
            if key not in header:
                return f"{name}: holds no array {cut(key)!r}"
            problem = _check_array(header[key], expected, entry["dtype"], data)
            if problem is not None:
                return f"{name}: {cut(key)!r} {problem}, the manifest says {expected} {entry['dtype']}"
        return _check_record(_record_of(header), name, k, shard, identity_digest(manifest["identity"]))

    @staticmethod
    def map_open(f: BinaryIO, key: str) -> np.ndarray:
        """The rows of ``key`` in an open shard file, memory-mapped (bfloat16 as its uint16 bits)."""
        return mapped(f)[key][0]

    @staticmethod
    def read_open(f: BinaryIO) -> dict[str, torch.Tensor]:
        """Every array of an open shard file, as tensors over a private (copy-on-write) memory map of it, as
        ``safetensors.torch.load_file`` gives them: pages are read when used, from the file that was opened."""
        tensors = {}
        for key, (array, kind) in mapped(f, mode="c").items():
            tensor = torch.from_numpy(array)
            tensors[key] = tensor.view(torch.bfloat16) if kind == "BF16" else tensor
        return tensors

    @staticmethod
    def sources(root: Path, manifest: dict[str, Any], key: str) -> list[tuple[Path, int]]:
        return [(root / s["file"], s["count"]) for s in manifest["shards"]]

    @staticmethod
    def open_rows(path: Path, key: str) -> np.ndarray:
        return mapped(path)[key][0]

    @staticmethod
    def read_shard(path: Path) -> dict[str, torch.Tensor]:
        """Every array of one shard file, read into memory."""
        return load_file(path)

    @staticmethod
    def data_files(manifest: dict[str, Any]) -> int:
        return len(manifest["shards"])

    @staticmethod
    def file_names(manifest: dict[str, Any]) -> list[str]:
        return [s["file"] for s in manifest["shards"]]

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
    def recognise(cls, name: str, path: Path, claims: Claims) -> bool:
        """Whether ``path`` is a shard fxstore wrote: its header names this shard and one of the claimed
        run identities' digests, or the claims list it with exactly its size (a damaged header)."""
        digests, listed = claims.digests, claims.listed
        match = SHARD_PATTERN.fullmatch(name)
        info = plain_stat(path)
        if match is None or info is None:
            return False
        record = header_record(path)
        if record is not None and record.get("shard") == int(match.group(1)) and record.get("identity") in digests:
            return True
        return name in listed and listed[name] == info.st_size


def header_record(path: Path) -> dict[str, Any] | None:
    """The fxstore record in a safetensors file's header (``{"shard", "start", "count", "identity", "inputs"}``),
    read without following links or reading the data; ``None`` if the file has none."""
    if plain_stat(path) is None:  # a link, FIFO or device is never opened
        return None
    try:
        with open(os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC), "rb") as f:
            return _record_of(_header(f))
    except (OSError, ValueError, KeyError, TypeError, RecursionError, struct.error):
        return None


def _header(f: BinaryIO) -> dict[str, Any]:
    """The JSON header of an open safetensors file (at most safetensors' own limit).

    Raises:
        ValueError: not a safetensors header.
    """
    f.seek(0)
    head = f.read(8)
    size = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
    if not 0 < size <= _HEADER_LIMIT:
        raise ValueError("not a safetensors header")
    header = json.loads(f.read(size))
    if not isinstance(header, dict):
        raise ValueError("not a safetensors header")
    return header


def _record_of(header: dict[str, Any]) -> dict[str, Any] | None:
    try:
        record = json.loads(header["__metadata__"]["fxstore"])
    except (ValueError, KeyError, TypeError, RecursionError):
        return None
    return record if isinstance(record, dict) else None


_HEADER_LIMIT = 100 << 20  # safetensors' own limit on a header


def _check_record(record: dict[str, Any] | None, name: str, k: int, shard: dict[str, Any],
                  digest: str) -> str | None:
    """Whether a shard's own header record names its place: shard index, first row, count, run and inputs."""
    if record is None:
        return f"{name}: its header names no fxstore shard"
    said = (record.get("shard"), record.get("start"), record.get("count"))
    if said != (k, shard["start"], shard["count"]):
        return f"{name}: its header says shard {cut(said[0])} (rows from {cut(said[1])}, {cut(said[2])} of them), " \
               f"the manifest shard {k} (rows from {shard['start']}, {shard['count']})"
    if record.get("identity") not in (None, digest):  # None: written before shards named their run
        return f"{name}: its header names another run"
    if "inputs" in record and record["inputs"] != shard.get("inputs"):  # no key: written before inputs were
        return f"{name}: its header records other inputs than the manifest (a shard of another run over other data)"
    return None


def _check_array(info: Any, shape: list[int], dtype: str, data: int) -> str | None:
    """Why a header's entry of one array is not ``shape`` ``dtype`` stored within the ``data`` bytes of the file."""
    if not isinstance(info, dict) or _ST_DTYPES.get(info.get("dtype")) is None:
        return "is not a tensor entry"
    said = (info.get("shape"), _ST_DTYPES[info["dtype"]])
    if said != (shape, dtype):
        return f"is {cut(said[0])} {info['dtype']}"
    offsets = info.get("data_offsets")
    size = np.dtype(_NUMPY[info["dtype"]]).itemsize * int(np.prod(shape, dtype=np.int64))
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
            and 0 <= offsets[0] <= offsets[1] <= data and offsets[1] - offsets[0] == size):
        return f"has data offsets {cut(offsets)} that do not hold it"
    return None


_ST_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64", "I8": "int8", "U8": "uint8",
              "I16": "int16", "I32": "int32", "I64": "int64", "BOOL": "bool", "U16": "uint16", "U32": "uint32",
              "U64": "uint64", "C64": "complex64"}


_NUMPY = {"BF16": np.uint16, "F16": np.float16, "F32": np.float32, "F64": np.float64,
          "I32": np.int32, "I64": np.int64, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
          "U16": np.uint16, "U32": np.uint32, "U64": np.uint64, "C64": np.complex64}


def mapped(source: Path | BinaryIO, mode: str = "r") -> dict[str, tuple[np.ndarray, str]]:
    """Every tensor of a safetensors file (a path or an open file) as a memory map (bfloat16 as uint16 bits),
    read-only (``mode="r"``) or private copy-on-write (``"c"``)."""
    if not hasattr(source, "read"):
        with open(source, "rb") as f:
            return mapped(f, mode)
    header = _header(source)
    size = source.tell() - 8
    arrays = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        dtype = np.dtype(_NUMPY[info["dtype"]])
        count = (end - begin) // dtype.itemsize
        data = np.memmap(source, dtype=dtype, mode=mode, offset=8 + size + begin, shape=(count,)) if count else \
            np.zeros(0, dtype=dtype)
        arrays[key] = (data.reshape(info["shape"]), info["dtype"])
    return arrays
