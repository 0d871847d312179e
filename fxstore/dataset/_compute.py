"""Images (and any tensor data): the probe that fixes every array's shape, the batches' steps for the
one compute/write loop (``_loop``), and the digests of each shard's inputs.

Each batch goes to the device and through every extractor; its input bytes are hashed into
its shard's digest, recorded beside the shard so that a resume can prove the data unchanged.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch

from ..capture import FeatureExtractor
from ..errors import ConfigError, OutputError
from . import _distributed
from ._batches import Batch, Plan, batch_size_of, pick, refuse_text
from ._loop import Step, first_batch_errors, write_all
from .formats import ArraySpec, Sink

__all__ = ["TARGET", "probe", "compute", "inputs_digest"]

TARGET = "target"
"""Key of the stored targets."""


def to_device(x: Any, device: torch.device) -> Any:
    """A batch's tensors (alone or in a mapping) moved to ``device``; anything else as it is."""
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, Mapping):
        return {k: to_device(v, device) for k, v in x.items()}
    return x


def _forward(extractors: list[FeatureExtractor], x: Any, device: torch.device) -> dict[str, torch.Tensor]:
    x = to_device(x, device)
    features: dict[str, torch.Tensor] = {}
    for ex in extractors:
        _, f = ex(**x) if isinstance(x, Mapping) else ex(x)
        features.update(f)
    if device.type != "cpu":  # a user's extractor may keep features on the device
        features = {k: v.to("cpu", non_blocking=True) for k, v in features.items()}
    return features


def probe(extractors: list[FeatureExtractor], batch: Any, o: Any, device: torch.device) -> list[ArraySpec]:
    """Run the first (tiny) batch: the row shape and dtype of every array, checked."""
    x, y = pick(batch, o.input_key, o.target_key)
    refuse_text(x)  # e.g. (text, label) pairs
    n = batch_size_of(x)
    shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
    with first_batch_errors(f"the data's first batch (input {shape})",
                            "check the input field (input_key), the image size and the model."), torch.inference_mode():
        features = _forward(extractors, x, device)
    if y is not None and not isinstance(y, torch.Tensor):
        if o.target_key is not None:
            raise ConfigError(f"the target field holds {type(y).__name__}, not a tensor.\nHint: use target_key=False.")
        y = None
    if y is not None:
        if TARGET in features:
            raise ConfigError(
                f"a feature is named '{TARGET}', like the stored targets.\n"
                "Hint: rename the layer with a dict {layer: alias}, or pass target_key=False."
            )
        features[TARGET] = y
    specs = []
    for key, value in features.items():
        if value.dim() == 0 or value.shape[0] != n:
            raise ConfigError(
                f"'{key}' has shape {tuple(value.shape)}, which has no sample axis for a batch of {n}.\n"
                "Hint: select layers whose output is (batch, ...), e.g. tensors, not sizes or scalars."
            )
        specs.append(ArraySpec(key, tuple(value.shape[1:]), value.dtype))
    return specs


def compute(extractors: list[FeatureExtractor], plan: Plan, wanted: Callable[[int], bool], sink: Sink,
            device: torch.device, o: Any, ranks: _distributed.Ranks, check: dict[int, str] | None = None) -> None:
    """Compute and write the wanted shards; ``check``: kept shards of streamed data whose inputs, as they
    pass by, must match the recorded digests (they come first when the kept shards are a prefix)."""
    total = sum(c for k, (_, c) in plan.shards.items() if wanted(k)) if plan.indexed else None
    size_of = functools.partial(_size_of, o.input_key)
    stored_target = any(s.key == TARGET for s in sink.specs)
    skipped = _checker(sink.out, plan, dict(check or {}), o, stored_target) if check else None
    batches = plan.batches(wanted, o.batch_size, o.num_workers, o.collate_fn,
                           pin_memory=device.type == "cuda", size_of=size_of, skipped=skipped)
    write_all(_steps(extractors, batches, sink, device, o, stored_target), sink, plan.shards, device, o, ranks,
              total, "sample")


def _steps(extractors: list[FeatureExtractor], batches: Iterable[Batch], sink: Sink, device: torch.device, o: Any,
           stored_target: bool) -> Iterator[Step]:
    """Each batch through the extractors, with the digest of its inputs fed to its shard's hasher."""
    hashers: dict[int, Any] = {}
    for batch in batches:
        hasher = hashers.setdefault(batch.shard, hashlib.sha256())
        if batch.last:
            del hashers[batch.shard]
        feed: Callable[[], None] | None = functools.partial(_hash_inputs, hasher, batch.data, o, stored_target)
        if device.type == "cpu":  # the model may write into its CPU inputs: hash them before it runs
            feed()
            feed = None  # on a device the model gets a copy: the writer thread hashes, overlapping the forward
        arrays, n = _arrays(extractors, batch, sink.specs, device, o)
        yield Step(batch.shard, batch.start, batch.last, arrays, n, feed, hasher if batch.last else None)


def _size_of(input_key: int | str | None, raw: Any) -> int:
    return batch_size_of(pick(raw, input_key, False)[0])


def _arrays(extractors: list[FeatureExtractor], batch: Batch, specs: list[ArraySpec], device: torch.device,
            o: Any) -> tuple[dict[str, torch.Tensor], int]:
    x, y = pick(batch.data, o.input_key, o.target_key)
    arrays = _forward(extractors, x, device)
    if any(s.key == TARGET for s in specs):
        arrays[TARGET] = y.cpu()
    n = batch_size_of(x)
    for s in specs:
        value = arrays.get(s.key)
        if value is None or tuple(value.shape) != (n, *s.shape) or value.dtype != s.dtype:
            got = None if value is None else (tuple(value.shape), value.dtype)
            raise ConfigError(
                f"'{s.key}' changed between batches: expected {(n, *s.shape)} {s.dtype}, got {got} "
                f"(batch at sample {batch.start}).\n"
                "Hint: every sample must give features of one shape; resize inputs to one size."
            )
    return arrays, n


def _checker(out: Any, plan: Plan, check: dict[int, str], o: Any, stored_target: bool) -> Callable[[Batch], None]:
    hashers: dict[int, Any] = {}

    def skipped(batch: Batch) -> None:
        if batch.shard not in check:
            return
        hasher = hashers.setdefault(batch.shard, hashlib.sha256())
        _hash_inputs(hasher, batch.data, o, stored_target)
        if batch.last and f"sha256:{hasher.hexdigest()}" != check.pop(batch.shard):
            start, count = plan.shards[batch.shard]
            raise changed_inputs(out, batch.shard, start, count)

    return skipped


def changed_inputs(out: Any, shard: int, start: int, count: int) -> OutputError:
    """The refusal of data that is not the data a kept shard was written from."""
    return OutputError(
        f"the data is not the data '{out}' was written from: the inputs of shard {shard} "
        f"(samples {start}-{start + count - 1}) differ from those recorded when it was written.\n"
        "Hint: pass the same data to resume or reuse this folder, or write to a new folder "
        "(or overwrite=True to start over)."
    )


def inputs_digest(plan: Plan, shard: int, o: Any, stored_target: bool) -> str:
    """The digest of one shard's input bytes (and targets, when stored), read again from the data."""
    hasher = hashlib.sha256()
    size_of = functools.partial(_size_of, o.input_key)
    for batch in plan.batches(shard.__eq__, o.batch_size, 0, o.collate_fn, pin_memory=False, size_of=size_of):
        _hash_inputs(hasher, batch.data, o, stored_target)
    return f"sha256:{hasher.hexdigest()}"


def _hash_inputs(hasher: Any, raw: Any, o: Any, stored_target: bool) -> None:
    x, y = pick(raw, o.input_key, o.target_key)
    _hash_value(hasher, x)
    if stored_target:
        _hash_value(hasher, y)


def _hash_value(hasher: Any, value: Any) -> None:
    """Feed the dtype, shape and bytes of every tensor in ``value`` (tensors, dicts, lists) to ``hasher``."""
    if isinstance(value, torch.Tensor):
        t = value.detach().to("cpu").contiguous().reshape(-1)
        hasher.update(f"T{t.dtype}{tuple(value.shape)}|".encode())
        if t.numel():
            hasher.update(t.view(torch.uint8).numpy())
    elif isinstance(value, Mapping):
        for key in sorted(value, key=str):
            hasher.update(f"K{key!s}|".encode())
            _hash_value(hasher, value[key])
    elif isinstance(value, (list, tuple)):
        hasher.update(f"L{len(value)}|".encode())
        for item in value:
            _hash_value(hasher, item)
    else:
        hasher.update(f"V{value!r}|".encode())
