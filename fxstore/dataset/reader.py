"""Read an output folder back: check it against its manifest, then one lazy array per feature.

Every load checks the folder's structure against the manifest (schema, file sizes, the
shapes and dtypes in each file's header, the index, rows and run each safetensors shard's
header names, and the manifest's counts against its own run identity: cheap, no data read);
``verify=True`` also reads every byte and compares the checksums recorded when each file
was finished.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from ._checksum import ALGORITHM, digest_file, identity_digest
from ._outdir import OutputError
from ._shuffle import mapped
from ._sinks import check_file, header_record, npy_layout
from .manifest import consistency, read_manifest

__all__ = ["load_features", "verify_folder", "ShardedArray"]


def load_features(out: str | Path, verify: bool = False) -> dict[str, Any]:
    """Open the features written by :func:`~fxstore.extract_dataset`, without reading them.

    Args:
        out: The output folder.
        verify: Also read every data file and compare its checksum with the manifest
            (the structure -- file sizes, shapes and dtypes in the headers -- is always
            checked).

    Returns:
        ``{key: array}`` for every feature, plus ``"target"`` when targets were stored; row
        ``i`` belongs to sample ``i`` of the data. Every array, in both formats, is a lazy
        :class:`ShardedArray` that reads only the rows an index selects, with numpy's indexing
        (``np.asarray(a)`` or ``a[:]`` loads everything): values are numpy arrays, ``bfloat16``
        widened to ``float32``; ``a.torch(index)`` gives tensors of the stored dtype.

    Raises:
        OutputError: the folder holds no finished extraction, its manifest is not valid, or
            files do not match it (each bad file named).

    Example:
        >>> import tempfile, numpy as np, torch
        >>> from fxstore.dataset import extract_dataset
        >>> model, data, out = torch.nn.Linear(4, 2), torch.rand(3, 5, 4), tempfile.mkdtemp()
        >>> _ = extract_dataset(model, "linear", data, out, progress=False)
        >>> feats = load_features(out, verify=True)
        >>> feats["linear"].shape
        (15, 2)
        >>> np.array_equal(feats["linear"][5:10], model(data[1]).detach().numpy())
        True
    """
    manifest = read_manifest(out)
    root = Path(out)
    problems = verify_folder(root, manifest, checksums=verify)
    if problems:
        raise OutputError(
            f"'{out}' does not match its manifest: " + "; ".join(problems[:8])
            + ("; ..." if len(problems) > 8 else "") + ".\n"
            "Hint: run the same extraction again: it verifies the folder and recomputes what is damaged."
        )
    entries, fmt, n = _arrays(manifest), manifest["format"], manifest["num_samples"]
    shards = [(root / s["file"], s["count"]) for s in manifest["shards"]] if fmt == "safetensors" else []
    return {key: ShardedArray(shards or [(root / entry["file"], n)], key, tuple(entry["shape"]), entry["dtype"], fmt)
            for key, entry in entries.items()}


def verify_folder(out: str | Path, manifest: dict[str, Any], checksums: bool = True) -> list[str]:
    """Check the files of a finished folder against its (valid) manifest.

    Args:
        out: The output folder.
        manifest: Its manifest (:func:`~fxstore.dataset.manifest.read_manifest`).
        checksums: Read every byte and compare checksums (else sizes and headers only).

    Returns:
        One line per bad file (``"shard-00003.safetensors: checksum mismatch ..."``); empty
        when the folder is intact.

    Example:
        >>> import tempfile, torch
        >>> from fxstore.dataset import extract_dataset
        >>> out = tempfile.mkdtemp()
        >>> m = extract_dataset(torch.nn.Linear(4, 2), "linear", torch.rand(2, 3, 4), out, progress=False)
        >>> verify_folder(out, m)
        []
    """
    root, problems = Path(out), []
    arrays = _arrays(manifest)
    n = manifest["num_samples"]
    if manifest["format"] == "npy":
        for key, entry in arrays.items():
            name, path = entry["file"], root / entry["file"]
            problem = check_file(path, name, entry["bytes"], None)
            layout = npy_layout(path) if problem is None else None
            expected = ((n, *entry["shape"]), np.dtype(entry["dtype"]))
            if problem is None and (layout is None or layout[:2] != expected
                                    or layout[2] + n * _row_bytes(entry) != entry["bytes"]):
                problem = f"{name}: its header does not say {expected[0]} {expected[1]}"
            if problem is None and checksums:
                row = _row_bytes(entry)
                for shard in manifest["shards"]:
                    got = digest_file(path, layout[2] + shard["start"] * row, shard["count"] * row)
                    if got != shard[ALGORITHM][key]:
                        last = shard["start"] + shard["count"] - 1
                        problem = f"{name}: rows {shard['start']}-{last} fail their checksum"
                        break
            if problem is not None:
                problems.append(problem)
        return problems + consistency(manifest)
    digest = identity_digest(manifest["identity"])
    for k, shard in enumerate(manifest["shards"]):
        name, path = shard["file"], root / shard["file"]
        problem = check_file(path, name, shard["bytes"], shard[ALGORITHM] if checksums else None)
        if problem is None:
            problem = _check_header(path, name, arrays, shard["count"])
        if problem is None:
            problem = _check_record(path, name, k, shard, digest)
        if problem is not None:
            problems.append(problem)
    return problems + consistency(manifest)


def _check_record(path: Path, name: str, k: int, shard: dict[str, Any], digest: str) -> str | None:
    """Whether the shard's own header names its place: shard index, first row, count and run (no data read)."""
    record = header_record(path)
    if record is None:
        return f"{name}: its header names no fxstore shard"
    said = (record.get("shard"), record.get("start"), record.get("count"))
    if said != (k, shard["start"], shard["count"]):
        return f"{name}: its header says shard {said[0]} (rows from {said[1]}, {said[2]} of them), " \
               f"the manifest shard {k} (rows from {shard['start']}, {shard['count']})"
    if record.get("identity") not in (None, digest):  # None: written before shards named their run
        return f"{name}: its header names another run"
    return None


def _arrays(manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    entries = dict(manifest["features"])
    if manifest.get("target") is not None:
        entries["target"] = manifest["target"]
    return entries


def _row_bytes(entry: dict[str, Any]) -> int:
    itemsize = torch.empty((), dtype=getattr(torch, entry["dtype"])).element_size()
    return itemsize * int(np.prod(entry["shape"], dtype=np.int64))


def _check_header(path: Path, name: str, arrays: dict[str, dict[str, Any]], count: int) -> str | None:
    try:
        with safe_open(path, framework="pt") as f:
            for key, entry in arrays.items():
                if key not in f.keys():
                    return f"{name}: holds no array {key!r}"
                shape = f.get_slice(key).get_shape()
                dtype = str(f.get_slice(key).get_dtype())
                if list(shape) != [count, *entry["shape"]] or _ST_DTYPES.get(dtype) != entry["dtype"]:
                    return f"{name}: {key!r} is {shape} {dtype}, the manifest says {[count, *entry['shape']]} " \
                           f"{entry['dtype']}"
    except Exception as e:  # noqa: BLE001 - safetensors' own error on a damaged header
        return f"{name}: not a readable safetensors file ({type(e).__name__})"
    return None


_ST_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64", "I8": "int8", "U8": "uint8",
              "I16": "int16", "I32": "int32", "I64": "int64", "BOOL": "bool", "U16": "uint16", "U32": "uint32",
              "U64": "uint64", "C64": "complex64"}


class ShardedArray:
    """A read-only, lazy array of one stored feature, the same class for safetensors and npy folders.

    Nothing is read until it is indexed, and an index reads only the rows it selects (from
    memory-mapped shards or ``.npy`` files). Indexing follows numpy: integers, slices (any
    step), lists and integer arrays, boolean masks over the rows, ``...`` and ``None``, on the
    row axis and on the others.

    **One dtype rule**: ``a[index]`` (and ``np.asarray(a)``) gives numpy arrays, of the stored
    dtype -- except ``bfloat16``, which numpy cannot hold: it comes back widened to ``float32``
    (exactly: every bfloat16 value is a float32 value). ``a.torch(index)`` gives torch tensors of
    the stored dtype, ``bfloat16`` included; ``a.numpy(index)`` is ``a[index]``.

    Attributes:
        shape: ``(rows, *row shape)``.
        dtype: The numpy dtype indexing returns (``float32`` for ``bfloat16`` features).
        stored_dtype: The dtype on disk, as the manifest names it (``"bfloat16"``, ``"float16"``, ...).
    """

    def __init__(self, sources: list[tuple[Path, int]], key: str, row_shape: tuple[int, ...], dtype: str,
                 format: str = "safetensors") -> None:
        self._sources = sources
        self._key = key
        self._format = format
        self._starts = np.cumsum([0] + [count for _, count in sources])
        self._maps: dict[int, np.ndarray] = {}
        self.shape: tuple[int, ...] = (int(self._starts[-1]), *row_shape)
        self.stored_dtype = dtype
        self._bf16 = dtype == "bfloat16"
        self._raw = np.dtype(np.uint16) if self._bf16 else np.dtype(dtype)
        self.dtype: np.dtype = np.dtype(np.float32) if self._bf16 else self._raw

    # -- numpy's array attributes --------------------------------------------------------

    @property
    def ndim(self) -> int:
        """Number of axes."""
        return len(self.shape)

    @property
    def size(self) -> int:
        """Number of elements."""
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        """Bytes the array takes on disk (and in memory once read, in the stored dtype)."""
        return self.size * self._raw.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return (f"ShardedArray(key={self._key!r}, shape={self.shape}, dtype={self.stored_dtype}, "
                f"{self._format}, files={len(self._sources)})")

    # -- reading ---------------------------------------------------------------------------

    def _map(self, k: int) -> np.ndarray:
        """The rows of source ``k``, memory-mapped (bfloat16 as its uint16 bits)."""
        if k not in self._maps:
            path = self._sources[k][0]
            if self._format == "npy":
                self._maps[k] = np.load(path, mmap_mode="r")
            else:
                self._maps[k] = mapped(path)[self._key][0]
        return self._maps[k]

    def _span(self, lo: int, hi: int) -> np.ndarray:
        """Rows ``lo`` to ``hi`` (stored bits), read from the sources that hold them."""
        parts = []
        first = max(int(np.searchsorted(self._starts, lo, side="right")) - 1, 0)
        for k in range(first, len(self._sources)):
            start, end = int(self._starts[k]), int(self._starts[k + 1])
            if start >= hi:
                break
            if end > lo:
                parts.append(np.asarray(self._map(k)[max(lo, start) - start:min(hi, end) - start]))
        return np.concatenate(parts) if parts else np.empty((0, *self.shape[1:]), dtype=self._raw)

    def _rows(self, rows: np.ndarray) -> np.ndarray:
        """The rows ``rows`` (sorted, unique) gathered shard by shard."""
        out = np.empty((len(rows), *self.shape[1:]), dtype=self._raw)
        owner = np.searchsorted(self._starts, rows, side="right") - 1
        for k in np.unique(owner):
            which = owner == k
            out[which] = self._map(int(k))[rows[which] - int(self._starts[k])]
        return out

    def _take(self, index: Any) -> np.ndarray:
        """``self[index]`` in the stored bits, following numpy's indexing rules."""
        n = len(self)
        parts = index if isinstance(index, tuple) else (index,)
        if not parts:
            parts = (slice(None),)
        first, rest = parts[0], parts[1:]
        if first is Ellipsis or first is None:
            return self._span(0, n)[parts]
        if isinstance(first, slice):
            start, stop, step = first.indices(n)
            rows = range(start, stop, step)
            if not rows:
                block = self._span(0, 0)
            elif step == 1:
                block = self._span(start, stop)
            else:
                lo = min(rows[0], rows[-1])
                block = self._span(lo, max(rows[0], rows[-1]) + 1)[np.asarray(rows) - lo]
            return block[(slice(None), *rest)]
        if isinstance(first, (int, np.integer)) and not isinstance(first, (bool, np.bool_)):
            i = int(first)
            if not -n <= i < n:
                raise IndexError(f"index {i} is out of bounds for axis 0 with size {n}")
            row = self._span(i % n, i % n + 1)[0]
            return row[rest] if rest else row
        wanted = np.asarray(first.numpy() if isinstance(first, torch.Tensor) else first)
        if wanted.dtype == bool:
            if wanted.shape != (n,):
                raise IndexError(f"a boolean index over the rows must have shape ({n},), not {wanted.shape}")
            wanted = np.flatnonzero(wanted)
        elif wanted.size == 0:
            wanted = wanted.astype(np.int64)
        if not np.issubdtype(wanted.dtype, np.integer):
            raise IndexError("only integers, slices, ..., None, integer arrays and boolean masks are valid indices; "
                             f"got {type(first).__name__} of {wanted.dtype}")
        if wanted.size and (wanted.min() < -n or wanted.max() >= n):
            raise IndexError(f"an index is out of bounds for axis 0 with size {n}")
        wanted = np.where(wanted < 0, wanted + n, wanted)
        unique = np.unique(wanted)
        return self._rows(unique)[(np.searchsorted(unique, wanted), *rest)]

    def __getitem__(self, index: Any) -> np.ndarray:
        return self.numpy(index)

    def numpy(self, index: Any = slice(None)) -> np.ndarray:
        """``self[index]`` as a numpy array (``bfloat16`` widened to ``float32``)."""
        raw = np.asarray(self._take(index))
        if self._bf16:
            return (raw.astype(np.uint32) << 16).view(np.float32)
        return raw

    def torch(self, index: Any = slice(None)) -> torch.Tensor:
        """``self[index]`` as a torch tensor of the stored dtype (``bfloat16`` kept)."""
        raw = np.ascontiguousarray(self._take(index))
        if self._bf16:
            return torch.from_numpy(raw.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(raw.copy() if not raw.flags.writeable else raw)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        values = self.numpy()
        return values if dtype is None else values.astype(dtype)
