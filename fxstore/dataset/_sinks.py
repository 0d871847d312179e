"""Sinks: where batches of features go on disk, one shard at a time.

Two formats, both readable without fxstore:

* ``safetensors`` -- one file per shard, ``shard-00000.safetensors``, holding every array
  for that shard's rows (``safetensors.torch.load_file``). A shard is written in one atomic
  rename when it is complete, so "the file exists" means "the shard is done".
* ``npy`` -- one ``.npy`` file per array (``numpy.load(..., mmap_mode="r")``), preallocated
  with ``numpy.lib.format.open_memmap`` under a hidden name and filled row by row; a marker
  file records each flushed shard, and the arrays get their final names at the end.

Both write the same bytes for the same features, however often the run was interrupted.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from numpy.lib.format import open_memmap
from safetensors.torch import save as safetensors_bytes

from ..errors import ConfigError
from ._outdir import atomic_write

__all__ = ["ArraySpec", "Sink", "SafetensorsSink", "NpySink", "SINKS", "file_stem"]


@dataclasses.dataclass(frozen=True)
class ArraySpec:
    """One stored array: its key, the shape of one row, and its dtype."""

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype


def file_stem(key: str) -> str:
    """A file-name-safe form of a feature key (``"layer1.0:grad"`` -> ``"layer1.0_grad"``)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", key)


class Sink:
    """Base class: collects the rows of a shard and makes the shard durable when it is complete."""

    name = ""

    def __init__(self, out: Path, specs: list[ArraySpec], num_samples: int | None) -> None:
        self.out = out
        self.specs = specs
        self.num_samples = num_samples

    def done_shards(self) -> set[int]:
        """Shards already durable in the folder (from an earlier, interrupted run)."""
        raise NotImplementedError

    def prepare(self) -> None:
        """Create what all ranks write into (rank 0, before the others open it)."""

    def open(self) -> None:
        """Get ready to write (every rank)."""

    def write(self, shard: int, start: int, arrays: dict[str, torch.Tensor]) -> None:
        """Take the rows ``start, start + 1, ...`` of ``shard``."""
        raise NotImplementedError

    def finish(self, shard: int, start: int, count: int) -> None:
        """Make ``shard`` (rows ``start`` to ``start + count``) durable."""
        raise NotImplementedError

    def close(self) -> None:
        """Release files (every rank)."""

    def finalize(self) -> dict[str, str]:
        """Give the files their final names (rank 0, after all ranks closed); return ``{key: file}``."""
        return {}


class SafetensorsSink(Sink):
    """One safetensors file per shard; arrays are keyed by feature key."""

    name = "safetensors"
    _PATTERN = re.compile(r"shard-(\d{5,})\.safetensors")

    def __init__(self, out: Path, specs: list[ArraySpec], num_samples: int | None) -> None:
        super().__init__(out, specs, num_samples)
        self._parts: dict[int, list[dict[str, torch.Tensor]]] = {}

    @staticmethod
    def shard_file(shard: int) -> str:
        """File name of a shard."""
        return f"shard-{shard:05d}.safetensors"

    def done_shards(self) -> set[int]:
        if not self.out.is_dir():
            return set()
        return {int(m.group(1)) for p in self.out.iterdir() if (m := self._PATTERN.fullmatch(p.name))}

    def write(self, shard: int, start: int, arrays: dict[str, torch.Tensor]) -> None:
        self._parts.setdefault(shard, []).append(arrays)

    def finish(self, shard: int, start: int, count: int) -> None:
        parts = self._parts.pop(shard)
        tensors = {s.key: torch.cat([p[s.key] for p in parts]).contiguous() for s in self.specs}
        # one metadata entry: safetensors writes a metadata map in hash order, which differs between processes
        metadata = {"fxstore": json.dumps({"shard": shard, "start": start, "count": count})}
        atomic_write(self.out / self.shard_file(shard), safetensors_bytes(tensors, metadata=metadata))


class NpySink(Sink):
    """One memory-mapped ``.npy`` file per array, rows written in place."""

    name = "npy"
    PROGRESS = ".fxstore-progress"

    def __init__(self, out: Path, specs: list[ArraySpec], num_samples: int | None) -> None:
        super().__init__(out, specs, num_samples)
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
        self.files = {s.key: file_stem(s.key) + ".npy" for s in specs}
        if len(set(self.files.values())) != len(self.files):
            raise ConfigError(
                f"two arrays would share one file name: {sorted(self.files)}.\n"
                "Hint: give the layers distinct aliases with a dict {layer: alias}."
            )
        self._maps: dict[str, np.memmap] = {}

    def _partial(self, key: str) -> Path:
        return self.out / f".{self.files[key]}.partial"

    def done_shards(self) -> set[int]:
        progress = self.out / self.PROGRESS
        if not progress.is_dir():
            return set()
        return {int(p.name) for p in progress.iterdir() if p.name.isdigit()}

    def prepare(self) -> None:
        (self.out / self.PROGRESS).mkdir(exist_ok=True)
        for s in self.specs:
            partial, final = self._partial(s.key), self.out / self.files[s.key]
            if not partial.exists() and final.exists():  # finalize was interrupted after this rename
                os.replace(final, partial)
            if partial.exists():
                continue
            array = open_memmap(partial, mode="w+", dtype=_numpy_dtype(s.dtype), shape=(self.num_samples, *s.shape))
            array.flush()
            del array

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

    def finish(self, shard: int, start: int, count: int) -> None:
        for array in self._maps.values():
            array.flush()
        atomic_write(self.out / self.PROGRESS / f"{shard:05d}", b"")

    def close(self) -> None:
        for array in self._maps.values():
            array.flush()
        self._maps = {}

    def finalize(self) -> dict[str, str]:
        for s in self.specs:
            partial = self._partial(s.key)
            if partial.exists():
                os.replace(partial, self.out / self.files[s.key])
        shutil.rmtree(self.out / self.PROGRESS, ignore_errors=True)
        return dict(self.files)


def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    return torch.empty(0, dtype=dtype).numpy().dtype


SINKS: dict[str, type[Sink]] = {"safetensors": SafetensorsSink, "npy": NpySink}
"""Output formats by name."""
