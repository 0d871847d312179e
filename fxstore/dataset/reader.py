"""Read an output folder back: check it against its manifest, then one lazy array per feature.

Every load checks the folder's structure against the manifest (schema, file sizes, the
shapes and dtypes in each file's header: cheap, no data read); ``verify=True`` also reads
every byte and compares the checksums recorded when each file was finished.
"""

from __future__ import annotations

import operator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from ._checksum import ALGORITHM, digest_file, identity_digest
from ._outdir import OutputError
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
        ``i`` belongs to sample ``i`` of the data. For ``npy`` folders the arrays are
        read-only ``numpy.memmap`` objects; for ``safetensors`` folders they are
        :class:`ShardedArray` objects that read only the shards an index touches
        (``np.asarray(a)`` or ``a[:]`` loads everything).

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
    entries = _arrays(manifest)
    if manifest["format"] == "npy":
        return {key: np.load(root / entry["file"], mmap_mode="r") for key, entry in entries.items()}
    shards = [(root / s["file"], s["count"]) for s in manifest["shards"]]
    return {key: ShardedArray(shards, key, tuple(entry["shape"]), entry["dtype"]) for key, entry in entries.items()}


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
