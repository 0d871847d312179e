"""``feature_statistics``: one pass over a dataset that keeps only per-layer accumulators.

The data is read exactly as :func:`~fxstore.extract_dataset` reads it (``fxstore.dataset.batches``:
the same shards and batches, the same token batches, the same ranks and model placement). Each batch
runs the step of :mod:`._step` (the extractor, then the in-place float64 reduction of
:mod:`._partials`); the accumulators stay on the device; ranks merge them at the end.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from ..capture import model_fingerprint
from ..dataset.batches import (
    Ranks,
    batch_size_of,
    hash_inputs,
    join,
    make_plan,
    model_inputs,
    pick,
    shard_digest,
    token_plan,
)
from ..dataset.batches import to_device as batch_to_device
from ..dataset.run import placed
from ..errors import OutputError
from ._checkpoint import Checkpoint, to_device
from ._merge import finalize, merge_ranks
from ._options import Options, check, layer_labels
from ._partials import Accumulator
from ._result import FeatureStatistics
from ._step import image_step, token_step

__all__ = ["run_statistics"]


def run_statistics(model: nn.Module, layers: Any, data: Any, o: Options) -> dict[str, FeatureStatistics]:
    """Run :func:`~fxstore.feature_statistics` with checked options ``o``."""
    check(model, layers, o)
    ranks = join()
    try:
        with placed(model, o.device, ranks) as device:
            if o.text is not None:
                return _text(model, layers, data, device, ranks, o)
            return _images(model, layers, data, device, ranks, o)
    finally:
        ranks.close()


def _images(model: nn.Module, layers: Any, data: Any, device: torch.device, ranks: Ranks,
            o: Options) -> dict[str, FeatureStatistics]:
    plan, first = make_plan(data, o.shard_size, o.collate_fn)
    x0, _ = pick(first, o.input_key, False)
    step = image_step(model, layers, o)
    data_identity = {"name": o.data_name or type(data).__name__, "num_samples": plan.num_samples,
                     "first_batch": _digest(x0)}
    identity = _identity(model, layers, data_identity, o)
    state = Checkpoint(o.checkpoint, identity, ranks, o.top_k, o.moments)
    to_device(state.accumulators, device)
    accumulators = state.accumulators
    shards = plan.all_shards()
    mine = None if shards is None else [k for k in shards if k % ranks.world == ranks.rank]
    total = None if mine is None else sum(plan.shards[k][1] for k in mine if k not in state.done)

    def wanted(k: int) -> bool:
        return k % ranks.world == ranks.rank and k not in state.done

    _check_kept_inputs(plan, state, o)
    hashers: dict[int, Any] = {}
    size_of = functools.partial(_size_of, o.input_key)
    batches = plan.batches(wanted, o.batch_size, o.num_workers, o.collate_fn, pin_memory=device.type == "cuda",
                           size_of=size_of)
    with _bar(total, "sample", o, ranks) as bar, torch.inference_mode():
        for batch in batches:
            if o.checkpoint is not None:  # the digest a resume checks the kept shards against
                hash_inputs(hashers.setdefault(batch.shard, hashlib.sha256()), batch.data, o.input_key)
            x, _ = pick(batch.data, o.input_key, False)
            x = batch_to_device(x, device)
            count = batch_size_of(x)
            sums = {key: acc.sums() for key, acc in accumulators.items()}
            tops = step(x, sums=sums)
            rows = torch.arange(batch.start, batch.start + count, device=device)
            for key, top in tops.items():
                accumulators.setdefault(key, Accumulator(o.top_k, o.moments)).add(
                    count, sums[key], top, rows, rows, None)
            if batch.last:
                hasher = hashers.pop(batch.shard, None)
                state.save(batch.shard, accumulators, None if hasher is None else f"sha256:{hasher.hexdigest()}")
            bar.update(count)
    return _result(accumulators, identity, ranks, device, o, positions=False)


def _check_kept_inputs(plan: Any, state: Checkpoint, o: Options) -> None:
    """Read the inputs of the first and last kept shard again: a resume never mixes in other data (map-style data).

    Raises:
        OutputError: the inputs differ from those the checkpoint's shard was computed from.
    """
    if not plan.indexed or not state.inputs:
        return
    for k in sorted({min(state.inputs), max(state.inputs)}):
        if shard_digest(plan, k, input_key=o.input_key, batch_size=o.batch_size,
                        collate_fn=o.collate_fn) != state.inputs[k]:
            start, count = plan.shards[k]
            raise OutputError(
                f"the data is not the data the checkpoint '{state.path}' was computed from: the inputs of shard {k} "
                f"(samples {start}-{start + count - 1}) differ.\n"
                "Hint: pass the same data to resume, or another checkpoint= path to start over.")


def _text(model: nn.Module, layers: Any, data: Any, device: torch.device, ranks: Ranks,
          o: Options) -> dict[str, FeatureStatistics]:
    plan, text_identity = token_plan(model, data, o.tokenizer, o.text, batch_size=o.batch_size,
                                     shard_size=o.shard_size)
    step = token_step(model, layers, o)
    ex = step.extractors[0]
    data_identity = {"name": o.data_name or type(data).__name__, "num_samples": plan.num_rows, "text": text_identity}
    identity = _identity(ex.wrapped_model, layers, data_identity, o)
    state = Checkpoint(o.checkpoint, identity, ranks, o.top_k, o.moments)
    to_device(state.accumulators, device)
    accumulators = state.accumulators
    mine = [k for k in sorted(plan.shards) if k % ranks.world == ranks.rank and k not in state.done]
    total = sum(plan.shards[k][1] for k in mine)
    with _bar(total, "tok", o, ranks) as bar, torch.inference_mode():
        for shard in mine:
            for batch in plan.batches(shard):
                keep = batch.keep.to(device, non_blocking=True)
                sums = {key: acc.sums() for key, acc in accumulators.items()}
                tops = step(model_inputs(ex, batch, device), keep, sums=sums)
                count = int(batch.keep.sum())  # on the host: no wait for the device
                flat = keep.reshape(-1)
                rows = batch.start + torch.cumsum(flat, 0) - 1
                sample = batch.sequence.to(device)[:, None].expand(batch.keep.shape).reshape(-1)
                position = batch.inputs["position_ids"].to(device).reshape(-1)
                for key, top in tops.items():
                    accumulators.setdefault(key, Accumulator(o.top_k, o.moments)).add(
                        count, sums[key], top, rows, sample, position)
                bar.update(batch.count)
            state.save(shard, accumulators)
    return _result(accumulators, identity, ranks, device, o, positions=True)


def _result(accumulators: dict[str, Accumulator], identity: dict[str, Any], ranks: Ranks, device: torch.device,
            o: Options, positions: bool) -> dict[str, FeatureStatistics]:
    merged = merge_ranks(accumulators, ranks, o.top_k, o.moments)
    return {key: finalize(key, acc, identity, positions) for key, acc in merged.items()}


def _identity(model: nn.Module, layers: Any, data: dict[str, Any], o: Options) -> dict[str, Any]:
    return {
        "model": {"name": o.model_name or type(model).__name__, "fingerprint": model_fingerprint(model)},
        "data": data,
        "layers": layer_labels(layers),
        "options": o.recorded(),
    }


def _bar(total: int | None, unit: str, o: Options, ranks: Ranks) -> tqdm:
    return tqdm(total=total, unit=unit, unit_scale=unit == "tok", dynamic_ncols=True,
                desc="fxstore stats" + (f" rank 0/{ranks.world}" if ranks.world > 1 else ""),
                disable=not (o.progress and ranks.main))


def _size_of(input_key: int | str | None, raw: Any) -> int:
    return batch_size_of(pick(raw, input_key, False)[0])



def _digest(x: Any) -> str:
    """A digest of the first batch's inputs: a resume with other data is refused."""
    hasher = hashlib.sha256()
    for t in _leaves(x):
        t = t.detach().to("cpu").contiguous().reshape(-1)
        hasher.update(f"{t.dtype}{t.numel()}|".encode())
        if t.numel():
            hasher.update(t.view(torch.uint8).numpy())
    return f"sha256:{hasher.hexdigest()}"


def _leaves(x: Any) -> Iterator[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, Mapping):
        for k in sorted(x, key=str):
            yield from _leaves(x[k])
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _leaves(v)
