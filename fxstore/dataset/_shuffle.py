"""A seeded shuffle of every stored row, computed shard by shard in bounded memory.

Row ``i`` of the shuffled output is row ``permutation(i)`` of the unshuffled rows, where
``permutation`` is a keyed Feistel network on ``[0, n)`` (cycle-walking keeps it inside the
range): a bijection computed for any block of indices without building the whole
permutation, so memory stays one output shard whatever the dataset's size. Output shards are
independent (any rank, any order, resumable); each gathers its rows from memory-mapped
unshuffled shards.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ..errors import OutputError
from ._snapshot import Snapshot
from .formats import Sink, arrays_of

__all__ = ["permutation", "write_permuted"]

_ROUNDS = 6


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a well-mixed 64-bit hash, vectorised."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def permutation(indices: np.ndarray, n: int, seed: int) -> np.ndarray:
    """The images of ``indices`` under the seeded permutation of ``range(n)``.

    Example:
        >>> import numpy as np
        >>> from fxstore.dataset._shuffle import permutation
        >>> p = permutation(np.arange(10), 10, seed=0)
        >>> sorted(p.tolist()) == list(range(10)), bool((p != np.arange(10)).any())
        (True, True)
    """
    half = max(1, -(-max(n - 1, 1).bit_length() // 2))
    low = np.uint64((1 << half) - 1)
    base = (seed * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    keys = _mix(np.array([(base + r) & 0xFFFFFFFFFFFFFFFF for r in range(1, _ROUNDS + 1)], dtype=np.uint64))
    x = np.asarray(indices, dtype=np.uint64).copy()
    todo = np.ones(len(x), dtype=bool)
    while todo.any():  # cycle-walking: re-apply until inside [0, n); at most a few rounds (domain < 4n)
        y = x[todo]
        left, right = y >> np.uint64(half), y & low
        for key in keys:
            left, right = right, left ^ (_mix(right ^ key) & low)
        y = (left << np.uint64(half)) | right
        x[todo] = y
        todo[todo] = y >= np.uint64(n)
    return x.astype(np.int64)


def write_permuted(source: Path, source_manifest: dict[str, Any], sink: Sink, shards: dict[int, tuple[int, int]],
                   mine: list[int], seed: int, progress: bool) -> None:
    """Write the output shards ``mine`` of ``sink``: permuted rows of the finished folder ``source``."""
    snapshot = Snapshot(source)  # the staging folder, checked and pinned as every reader does
    entries = snapshot.manifest["shards"]
    if [(s["start"], s["count"]) for s in entries] != [(s["start"], s["count"]) for s in source_manifest["shards"]]:
        raise OutputError(f"'{source}' changed before its rows were shuffled (another run?).\n"
                          "Hint: run the same command again: it resumes.")
    starts = np.cumsum([0] + [s["count"] for s in entries])
    n = int(starts[-1])
    maps: dict[tuple[int, str], np.ndarray] = {}
    bf16 = {key for key, entry in arrays_of(snapshot.manifest).items() if entry["dtype"] == "bfloat16"}
    total = sum(shards[k][1] for k in mine)
    with tqdm(total=total, unit="tok", unit_scale=True, dynamic_ncols=True, desc="fxstore shuffle",
              disable=not progress) as bar:
        for k in mine:
            start, count = shards[k]
            rows = permutation(np.arange(start, start + count), n, seed)
            owner = np.searchsorted(starts, rows, side="right") - 1
            arrays = {}
            for spec in sink.specs:
                gathered = None
                for shard in np.unique(owner):
                    which = owner == shard
                    if (shard, spec.key) not in maps:
                        maps[shard, spec.key] = snapshot.rows(spec.key, int(shard))
                    part = maps[shard, spec.key][rows[which] - starts[shard]]
                    if gathered is None:
                        gathered = np.empty((count, *part.shape[1:]), dtype=part.dtype)
                    gathered[which] = part
                tensor = torch.from_numpy(gathered)
                arrays[spec.key] = tensor.view(torch.bfloat16) if spec.key in bf16 else tensor
            sink.write(k, start, arrays)
            sink.finish(k, start, count)
            bar.update(count)
