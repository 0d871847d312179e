"""From user data to numbered batches: which field is the input, where shards begin.

Sample ``i`` of the data is row ``i`` of the output. Rows are grouped into shards of
``shard_size`` samples, the unit of writing, resuming and of sharing work between ranks.

* A map-style ``Dataset`` (``__getitem__`` + ``__len__``) is read by fxstore's own
  ``DataLoader`` over exactly the samples of the shards a rank still has to write;
  batches never cross a shard boundary, so every shard is computed from the same batches
  however many processes run and however often the run was resumed.
* Any other iterable of batches (a ``DataLoader``, a generator) is read in order; a shard
  ends at the first batch boundary at or past ``shard_size`` samples. Every rank reads
  every batch and computes only those of its own shards.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from ..errors import ConfigError

__all__ = ["Batch", "Plan", "pick", "make_plan"]

_INPUT_KEYS = ("input", "inputs", "image", "images", "pixel_values", "x")
_TARGET_KEYS = ("target", "targets", "label", "labels", "y")


@dataclasses.dataclass
class Batch:
    """One batch to compute: its shard, its first row, the raw batch, and whether it closes the shard."""

    shard: int
    start: int
    data: Any
    last: bool


def pick(batch: Any, input_key: int | str | None, target_key: int | str | bool | None) -> tuple[Any, Any]:
    """Split a raw batch into ``(model input, target or None)``.

    Defaults: a tensor is the input; a tuple/list is ``(input, target, ...)``; a dict's
    input is the first of ``input, inputs, image, images, pixel_values, x`` and its target
    the first of ``target, targets, label, labels, y``. ``target_key=False`` stores none.

    Raises:
        ConfigError: the field is missing, naming the fields the batch has.
    """
    refuse_text(batch)
    if isinstance(batch, torch.Tensor):
        if input_key is not None:
            raise ConfigError(
                f"input_key={input_key!r} was given but the batches are plain tensors.\n"
                "Hint: leave input_key unset for tensor batches."
            )
        return batch, None
    if isinstance(batch, Mapping):
        fields = list(batch)
        if input_key is None and not set(_INPUT_KEYS) & set(fields):
            for value in batch.values():
                refuse_text(value)
        x = _field(batch, input_key, _INPUT_KEYS, fields, "input")
        y = None if target_key is False else _field(batch, target_key, _TARGET_KEYS, fields, "target",
                                                     required=target_key is not None)
        return x, y
    if isinstance(batch, Sequence) and not isinstance(batch, str) and len(batch) > 0:
        fields = list(range(len(batch)))
        x = _field(batch, 0 if input_key is None else input_key, (), fields, "input")
        default_target = (1,) if len(batch) > 1 else ()
        y = None if target_key is False else _field(batch, target_key, default_target, fields, "target",
                                                     required=target_key is not None)
        return x, y
    raise ConfigError(
        f"cannot find the model input in a batch of type {type(batch).__name__}.\n"
        "Hint: yield tensors, (input, target) tuples or dicts of tensors."
    )


def refuse_text(value: Any) -> None:
    """Refuse text (a string, or a list of strings) as a model input: it needs a tokenizer.

    Raises:
        ConfigError: ``value`` is text.
    """
    if isinstance(value, str) or (isinstance(value, (list, tuple)) and value
                                  and all(isinstance(v, str) for v in value)):
        first = value if isinstance(value, str) else value[0]
        raise ConfigError(
            f"the data holds text ({first[:40]!r}...), and no tokenizer was given.\n"
            "Hint: pass tokenizer=AutoTokenizer.from_pretrained(...) to store one row per token."
        )


def _field(batch: Any, key: Any, defaults: Sequence[Any], fields: list[Any], what: str,
           required: bool = True) -> Any:
    for candidate in [key] if key is not None else defaults:
        if candidate in fields:
            return batch[candidate]
    if not required:
        return None
    wanted = repr(key) if key is not None else "among " + ", ".join(map(repr, defaults))
    raise ConfigError(
        f"the batches have no {what} field {wanted}; their fields are {fields}.\n"
        f"Hint: name the {what} field with {what}_key=..."
    )


def batch_size_of(x: Any) -> int:
    """Number of samples in a model input (first axis of its first tensor)."""
    leaves = [x] if isinstance(x, torch.Tensor) else list(x.values()) if isinstance(x, Mapping) else list(x)
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0:
            return int(leaf.shape[0])
    raise ConfigError(
        f"the model input ({type(x).__name__}) has no tensor with a batch axis.\n"
        "Hint: batches must hold tensors whose first axis is the sample axis."
    )


def is_map_dataset(data: Any) -> bool:
    """Whether fxstore can read ``data`` by index (a sized map-style dataset, not a loader)."""
    return (isinstance(data, Dataset) and not isinstance(data, torch.utils.data.IterableDataset)
            and hasattr(data, "__len__"))


def known_length(data: Any) -> int | None:
    """The number of samples ``data`` yields, when it can be known without reading it."""
    if is_map_dataset(data):
        return len(data)
    if isinstance(data, DataLoader) and data.batch_size is not None and is_map_dataset(data.dataset):
        n = len(data.sampler)
        return n - n % data.batch_size if data.drop_last else n
    return None


@dataclasses.dataclass
class Plan:
    """How the data is cut into shards, and the batches one rank computes."""

    num_samples: int | None
    shard_size: int
    indexed: bool
    shards: dict[int, tuple[int, int]]  # shard -> (start, count); complete once iteration ended
    _data: Any
    _first: Any = None

    def all_shards(self) -> list[int] | None:
        """Every shard id, when known before reading (map-style data)."""
        if self.num_samples is None or not self.indexed:
            return None
        return list(range(-(-self.num_samples // self.shard_size)))

    def batches(self, wanted: Callable[[int], bool], batch_size: int, num_workers: int,
                collate_fn: Callable[[list[Any]], Any] | None, pin_memory: bool,
                size_of: Callable[[Any], int], skipped: Callable[[Batch], None] | None = None) -> Iterator[Batch]:
        """The batches of the wanted shards, in order; streamed data hands every other batch to ``skipped``."""
        if self.indexed:
            return self._indexed(wanted, batch_size, num_workers, collate_fn, pin_memory)
        return self._streamed(wanted, size_of, skipped)

    def _indexed(self, wanted: Callable[[int], bool], batch_size: int, num_workers: int,
                 collate_fn: Callable[[list[Any]], Any] | None, pin_memory: bool) -> Iterator[Batch]:
        meta: list[tuple[int, int, bool]] = []
        index_batches: list[list[int]] = []
        for shard in self.all_shards() or []:
            start, count = self.shards[shard]
            if not wanted(shard):
                continue
            for lo in range(start, start + count, batch_size):
                hi = min(lo + batch_size, start + count)
                index_batches.append(list(range(lo, hi)))
                meta.append((shard, lo, hi == start + count))
        if not index_batches:
            return
        loader = DataLoader(self._data, batch_sampler=index_batches, num_workers=num_workers,
                            collate_fn=collate_fn, pin_memory=pin_memory)
        for (shard, start, last), batch in zip(meta, loader, strict=True):
            yield Batch(shard, start, batch, last)

    def _streamed(self, wanted: Callable[[int], bool], size_of: Callable[[Any], int],
                  skipped: Callable[[Batch], None] | None = None) -> Iterator[Batch]:
        source: Iterable[Any] = self._data
        if self._first is not None:
            source = itertools.chain([self._first], self._data)
        shard, start, shard_start = 0, 0, 0
        previous: tuple[Any, int] | None = None
        for batch in itertools.chain(source, [_END]):
            if previous is not None:
                raw, n = previous
                end = start + n
                last = batch is _END or end - shard_start >= self.shard_size
                self.shards[shard] = (shard_start, end - shard_start)
                if wanted(shard):
                    yield Batch(shard, start, raw, last)
                elif skipped is not None:
                    skipped(Batch(shard, start, raw, last))
                start = end
                if last:
                    shard, shard_start = shard + 1, end
            if batch is _END:
                break
            previous = (batch, size_of(batch))
        self.num_samples = start


_END = object()


def make_plan(data: Any, shard_size: int, collate_fn: Callable[[list[Any]], Any] | None) -> tuple[Plan, Any]:
    """Cut ``data`` into shards; also return a small first batch to probe the model with.

    Raises:
        ConfigError: empty data, or data that is neither a dataset nor an iterable.
    """
    if is_map_dataset(data):
        n = len(data)
        if n == 0:
            raise ConfigError("the dataset is empty.\nHint: pass a dataset with at least one sample.")
        shards = {k: (k * shard_size, min(shard_size, n - k * shard_size)) for k in range(-(-n // shard_size))}
        probe = (collate_fn or default_collate)([data[i] for i in range(min(2, n))])
        return Plan(n, shard_size, True, shards, data), probe
    if not isinstance(data, Iterable):
        raise ConfigError(
            f"data of type {type(data).__name__} is neither a Dataset nor an iterable of batches.\n"
            "Hint: pass a torch Dataset, a DataLoader or any iterable of batches."
        )
    iterator = iter(data)
    try:
        first = next(iterator)
    except StopIteration:
        raise ConfigError("the data yielded no batch.\nHint: pass data with at least one batch.") from None
    if iterator is data:  # a one-shot iterator: keep the batch we took
        return Plan(None, shard_size, False, {}, iterator, first), first
    return Plan(known_length(data), shard_size, False, {}, data), first
