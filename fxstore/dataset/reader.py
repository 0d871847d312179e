"""Read an output folder back: one lazy array per feature, rows in sample order."""

from __future__ import annotations

import operator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from .manifest import read_manifest

__all__ = ["load_features", "ShardedArray"]


def load_features(out: str | Path) -> dict[str, Any]:
    """Open the features written by :func:`~fxstore.extract_dataset`, without reading them.

    Args:
        out: The output folder.

    Returns:
        ``{key: array}`` for every feature, plus ``"target"`` when targets were stored; row
        ``i`` belongs to sample ``i`` of the data. For ``npy`` folders the arrays are
        read-only ``numpy.memmap`` objects; for ``safetensors`` folders they are
        :class:`ShardedArray` objects that read only the shards an index touches
        (``np.asarray(a)`` or ``a[:]`` loads everything).

    Raises:
        OutputError: the folder holds no finished extraction.

    Example:
        >>> import tempfile, numpy as np, torch
        >>> from fxstore.dataset import extract_dataset
        >>> model, data, out = torch.nn.Linear(4, 2), torch.rand(3, 5, 4), tempfile.mkdtemp()
        >>> _ = extract_dataset(model, "linear", data, out, progress=False)
        >>> feats = load_features(out)
        >>> feats["linear"].shape
        (15, 2)
        >>> np.array_equal(feats["linear"][5:10], model(data[1]).detach().numpy())
        True
    """
    manifest = read_manifest(out)
    root = Path(out)
    entries = dict(manifest["features"])
    if manifest.get("target") is not None:
        entries["target"] = manifest["target"]
    if manifest["format"] == "npy":
        return {key: np.load(root / entry["file"], mmap_mode="r") for key, entry in entries.items()}
    shards = [(root / s["file"], s["count"]) for s in manifest["shards"]]
    return {key: ShardedArray(shards, key, tuple(entry["shape"]), entry["dtype"]) for key, entry in entries.items()}


class ShardedArray:
    """A read-only array stored as consecutive row blocks in safetensors shards.

    Indexing with an integer, a slice or a tuple starting with one reads only the shards
    that hold the selected rows. Values are numpy arrays, except for ``bfloat16``
    features, which numpy cannot represent: those come back as torch tensors.
    """

    def __init__(self, shards: list[tuple[Path, int]], key: str, row_shape: tuple[int, ...], dtype: str) -> None:
        self._shards = shards
        self._key = key
        self._starts = np.cumsum([0] + [count for _, count in shards])
        self.shape: tuple[int, ...] = (int(self._starts[-1]), *row_shape)
        self._torch = dtype == "bfloat16"
        self.dtype: Any = getattr(torch, dtype) if self._torch else np.dtype(dtype)

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"ShardedArray(key={self._key!r}, shape={self.shape}, dtype={self.dtype}, shards={len(self._shards)})"

    def _rows(self, shard: int, lo: int, hi: int) -> Any:
        path = self._shards[shard][0]
        with safe_open(path, framework="pt" if self._torch else "numpy") as f:
            return f.get_slice(self._key)[lo:hi]

    def _read(self, lo: int, hi: int) -> Any:
        parts = []
        first = int(np.searchsorted(self._starts, lo, side="right")) - 1
        for shard in range(max(first, 0), len(self._shards)):
            start, end = int(self._starts[shard]), int(self._starts[shard + 1])
            if start >= hi:
                break
            if end > lo:
                parts.append(self._rows(shard, max(lo, start) - start, min(hi, end) - start))
        if self._torch:
            return torch.cat(parts) if parts else torch.empty((0, *self.shape[1:]), dtype=self.dtype)
        return np.concatenate(parts) if parts else np.empty((0, *self.shape[1:]), dtype=self.dtype)

    def __getitem__(self, index: Any) -> Any:
        rest: tuple[Any, ...] = ()
        if isinstance(index, tuple):
            index, rest = (index[0], index[1:]) if index else (slice(None), ())
        if isinstance(index, slice):
            rows = range(*index.indices(len(self)))
            if not rows:
                block = self._read(0, 0)
            else:
                lo, hi = min(rows), max(rows) + 1
                block = self._read(lo, hi)
                if rows.step != 1:
                    offsets = [r - lo for r in rows]
                    block = block[torch.as_tensor(offsets)] if self._torch else block[offsets]
            return block[(slice(None), *rest)] if rest else block
        i = operator.index(index)
        if not -len(self) <= i < len(self):
            raise IndexError(f"row {i} is out of range for {len(self)} rows")
        i %= len(self)
        row = self._read(i, i + 1)[0]
        return row[rest] if rest else row

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        values = self[:]
        values = values.numpy() if isinstance(values, torch.Tensor) else values
        return values if dtype is None else values.astype(dtype)
