"""Read an output folder back: check it against its manifest, then one lazy array per feature.

Every load checks the folder's structure against the manifest (schema, file sizes, the
shapes and dtypes in each file's header, the index, rows, run and inputs each safetensors
shard's header names, and the manifest's counts against its own run identity: cheap, no data
read); ``verify=True`` also reads every byte and compares the checksums recorded when each file
was finished. The arrays then read through the folder's snapshot (``_snapshot``): each file is
checked again as it is opened, and a folder rewritten since the load is refused, never mixed in.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import formats
from ._snapshot import Snapshot, check_folder

__all__ = ["load_features", "verify_folder", "data_files", "ShardedArray"]


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
            files do not match it (each bad file named); when indexing, a file that changed since
            the load (the folder was rewritten or repaired: load it again).

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
    snapshot = Snapshot(out, verify=verify)
    fmt, manifest = snapshot.format, snapshot.manifest
    return {key: ShardedArray(fmt.sources(snapshot.out, manifest, key), key, tuple(entry["shape"]), entry["dtype"],
                              fmt.name, opener=functools.partial(snapshot.rows, key))
            for key, entry in formats.arrays_of(manifest).items()}


def verify_folder(out: str | Path, manifest: dict[str, Any], checksums: bool = True) -> list[str]:
    """Check the files of a finished folder against its (valid) manifest.

    Args:
        out: The output folder.
        manifest: Its manifest (:func:`~fxstore.read_manifest`).
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
    return check_folder(Path(out), manifest, checksums)


def data_files(manifest: dict[str, Any]) -> int:
    """How many data files a finished folder with this (valid) manifest holds (shards, or ``.npy`` files)."""
    return formats.get(manifest["format"]).data_files(manifest)


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
                 format: str = "safetensors", opener: Callable[[int], np.ndarray] | None = None) -> None:
        self._sources = sources
        self._key = key
        self._format = format
        self._opener = opener  # load_features: the folder's snapshot, which checks each file as it opens it
        self._open_rows = formats.get(format).open_rows
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
            self._maps[k] = (self._opener(k) if self._opener is not None
                             else self._open_rows(self._sources[k][0], self._key))
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
