"""Stream shuffled training batches from a finished output folder (SAE and probe training)."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from ..errors import ConfigError
from ._snapshot import Snapshot

__all__ = ["BatchLoader"]


class BatchLoader(IterableDataset):
    """Batches of rows from a finished safetensors folder, shuffled in bounded memory.

    Each epoch visits every row once: the shards in a seeded random order, read
    ``buffer_shards`` at a time, their rows mixed and cut into batches (rows left over carry
    into the next buffer). Memory stays about ``buffer_shards`` shards. A folder written with
    ``shuffle=SEED`` is shuffled across the whole dataset already; ``shuffle=False`` then
    reads it in order at full speed.

    It is an ``IterableDataset``: inside ``DataLoader(loader, batch_size=None, num_workers=W)``
    every worker reads its own share of the epoch's shards (and under ``torch.distributed``,
    every rank its share first), so together they still visit every row once. Each worker then
    carries its own leftover rows, so up to one smaller batch per worker and rank ends an epoch
    (``len(loader)`` counts the batches of one process reading all shards).

    Args:
        out: The output folder (safetensors format).
        batch_size: Rows per batch.
        keys: The arrays to yield (default: all, e.g. the layers and ``token_id``,
            ``sequence``, ``position``).
        shuffle: Shuffle shards and rows (seeded by ``seed`` and the epoch).
        seed: Seed of the shuffle.
        buffer_shards: Shards mixed together.
        drop_last: Drop the last, smaller batch of an epoch.

    Every shard is checked as ``load_features`` checks it when the loader is made (sizes, headers,
    the manifest against its run identity), and again each time it is read (the very file that was
    checked, its header naming its place, run and inputs): a folder rewritten or damaged meanwhile
    is refused with an ``OutputError`` naming the shard when it is reached; every row yielded before
    is the run's own (never a mix of two runs).

    Raises:
        OutputError: the folder holds no finished extraction, or a shard does not match its manifest
            (when made, or when a shard is read).
        ConfigError: an unknown key, an ``npy`` folder, or bad sizes.

    Example:
        >>> import tempfile, torch
        >>> from fxstore.dataset import extract_dataset
        >>> from fxstore.dataset.loader import BatchLoader
        >>> out = tempfile.mkdtemp()
        >>> _ = extract_dataset(torch.nn.Linear(4, 2), "linear", torch.rand(5, 4, 4), out, progress=False,
        ...                     shard_size=4)
        >>> loader = BatchLoader(out, batch_size=8, seed=0)
        >>> [tuple(b["linear"].shape) for b in loader], len(loader)
        ([(8, 2), (8, 2), (4, 2)], 3)
    """

    def __init__(self, out: str | os.PathLike[str], batch_size: int, *, keys: Sequence[str] | None = None,
                 shuffle: bool = True, seed: int = 0, buffer_shards: int = 4, drop_last: bool = False) -> None:
        snapshot = Snapshot(out)  # the checks of every load, then each shard checked again as it is read
        manifest, fmt = snapshot.manifest, snapshot.format
        if not fmt.sharded:
            raise ConfigError(f"'{out}' is in format {manifest['format']!r}; BatchLoader reads safetensors shards.\n"
                              "Hint: extract with format='safetensors', or index load_features(out) directly.")
        for name, value in (("batch_size", batch_size), ("buffer_shards", buffer_shards)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name}={value!r} must be a positive integer.\nHint: e.g. {name}=4096.")
        known = list(manifest["features"]) + (["target"] if manifest.get("target") else [])
        unknown = [k for k in keys or () if k not in known]
        if unknown:
            raise ConfigError(f"'{out}' has no array {unknown[0]!r}; it has {known}.\nHint: pick keys from those.")
        self.keys = list(keys) if keys else known
        self.files = [path for path, _ in fmt.sources(Path(out), manifest, known[0])]
        self._read = snapshot.read
        self.num_rows = int(manifest["num_samples"])
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.buffer_shards, self.drop_last = buffer_shards, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Use the shuffle of ``epoch`` for the next iteration (as ``DistributedSampler`` does)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_rows // self.batch_size if self.drop_last else -(-self.num_rows // self.batch_size)

    def _share(self) -> tuple[int, int]:
        """``(index, count)`` of this reader among every rank's workers."""
        rank, world = 0, 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        worker = get_worker_info()
        workers, wid = (1, 0) if worker is None else (worker.num_workers, worker.id)
        return rank * workers + wid, world * workers

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(len(self.files)) if self.shuffle else np.arange(len(self.files))
        index, count = self._share()
        if count > 1:  # the same shard order everywhere (same seed), each reader its slice; rows mixed per reader
            order = order[index::count]
            rng = np.random.default_rng([self.seed, self.epoch, index])
        carry: dict[str, torch.Tensor] | None = None
        for lo in range(0, len(order), self.buffer_shards):
            parts = [self._read(int(i)) for i in order[lo:lo + self.buffer_shards]]
            buffer = {k: torch.cat(([carry[k]] if carry else []) + [p[k] for p in parts]) for k in self.keys}
            n = len(buffer[self.keys[0]])
            if self.shuffle:
                index = torch.from_numpy(rng.permutation(n))
                buffer = {k: v[index] for k, v in buffer.items()}
            full = n - n % self.batch_size
            for start in range(0, full, self.batch_size):
                yield {k: v[start:start + self.batch_size] for k, v in buffer.items()}
            carry = {k: v[full:] for k, v in buffer.items()}
        if carry and len(carry[self.keys[0]]) and not self.drop_last:
            yield carry

    def __repr__(self) -> str:
        return (f"BatchLoader({len(self.files)} shards, {self.num_rows} rows, batch_size={self.batch_size}, "
                f"shuffle={self.shuffle}, keys={self.keys})")
