"""The end of a statistics run: ranks' accumulators merged (torchrun), then the float64 statistics."""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.distributed as dist

from ..dataset.batches import Ranks
from ..errors import ConfigError
from ._partials import PAD_KEY, Accumulator
from ._result import FeatureStatistics

__all__ = ["merge_ranks", "finalize"]


def merge_ranks(accumulators: dict[str, Accumulator], ranks: Ranks, top_k: int,
                moments: bool) -> dict[str, Accumulator]:
    """Every rank's accumulators merged, on every rank: sums all-reduced in float64, top-k lists gathered.

    Rank ``r``'s top-k lists are merged in rank order, and merging orders by value then key, so the
    result does not depend on which rank computed which shard; sums differ from one process only
    by float64 rounding.
    """
    if ranks.world == 1:
        return accumulators
    shapes = [None] * ranks.world  # {layer: (D, whether top-k lists carry positions)} of every rank
    dist.all_gather_object(shapes, {k: (int(a.tensors["total"].shape[0]), "top_positions" in a.tensors)
                                    for k, a in accumulators.items() if a.tensors})
    known: dict[str, tuple[int, bool]] = {}
    for rank_shapes in shapes:
        known.update(rank_shapes or {})
    if not known:
        raise ConfigError("no rank computed any batch.\nHint: check that the data is not empty.")
    device = next((a.tensors["total"].device for a in accumulators.values() if a.tensors), torch.device("cpu"))
    wire = device if dist.get_backend() == "nccl" else torch.device("cpu")  # the group's tensors' device
    merged = {}
    for key in known:  # in the first rank's order
        acc = accumulators.get(key)
        if acc is None or not acc.tensors:  # this rank had no shard: it adds nothing
            acc = _empty(*known[key], top_k, moments, device)
        count = torch.tensor([acc.count], dtype=torch.int64, device=wire)
        dist.all_reduce(count)
        out = Accumulator(top_k, moments)
        out.count = int(count)
        for name in ("total", "fired", "outer"):
            if name in acc.tensors:
                value = acc.tensors[name].to(wire).clone()
                dist.all_reduce(value)
                out.tensors[name] = value.to(device)
        if top_k:
            for rank_top in _gathered({k: v for k, v in acc.tensors.items() if k.startswith("top_")}, ranks, wire):
                out.merge_top({k: v.to(device) for k, v in rank_top.items()})
        merged[key] = out
    return merged


def _empty(d: int, positions: bool, top_k: int, moments: bool, device: torch.device) -> Accumulator:
    """An accumulator that adds nothing (a rank that had no shard to compute)."""
    acc = Accumulator(top_k, moments)
    zeros = functools.partial(torch.zeros, dtype=torch.float64, device=device)
    acc.tensors = {"total": zeros(d), "fired": zeros(d), **({"outer": zeros(d, d)} if moments else {})}
    if top_k:
        empty = functools.partial(torch.full, (top_k, d), device=device)
        acc.tensors.update(top_values=empty(float("-inf"), dtype=torch.float64),
                           top_keys=empty(PAD_KEY, dtype=torch.int64), top_samples=empty(-1, dtype=torch.int64))
        if positions:
            acc.tensors["top_positions"] = empty(-1, dtype=torch.int64)
    return acc


def _gathered(top: dict[str, torch.Tensor], ranks: Ranks, wire: torch.device) -> list[dict[str, torch.Tensor]]:
    names = sorted(top)
    per_rank: list[dict[str, torch.Tensor]] = [{} for _ in range(ranks.world)]
    for name in names:
        value = top[name].to(wire).contiguous()
        parts = [torch.empty_like(value) for _ in range(ranks.world)]
        dist.all_gather(parts, value)
        for r, part in enumerate(parts):
            per_rank[r][name] = part
    return per_rank


def finalize(key: str, acc: Accumulator, identity: dict[str, Any], positions: bool) -> FeatureStatistics:
    """The statistics of one layer from its accumulator (moved to the host)."""
    t = {k: v.to("cpu") for k, v in acc.tensors.items()}
    n = acc.count
    mean = t["total"] / n
    cov = None
    if "outer" in t:
        if n > 1:  # in place: a [D, D] float64 temporary costs more than the arithmetic
            cov = t["outer"].clone().addr_(mean, mean, alpha=-n).div_(n - 1)
            cov = cov.add_(cov.T.contiguous()).mul_(0.5)  # exactly symmetric, like numpy.cov
        else:
            cov = torch.full_like(t["outer"], torch.nan)
    k = min(acc.top_k, n)
    d = mean.shape[0]
    empty_values, empty_index = torch.zeros(d, 0, dtype=torch.float64), torch.zeros(d, 0, dtype=torch.int64)
    top_values = t["top_values"][:k].T.contiguous() if acc.top_k else empty_values
    top_indices = t["top_samples"][:k].T.contiguous() if acc.top_k else empty_index
    top_positions = None
    if positions:
        top_positions = t["top_positions"][:k].T.contiguous() if acc.top_k else empty_index.clone()
    return FeatureStatistics(key, n, mean, cov, t["fired"].round().to(torch.int64), top_values, top_indices,
                             top_positions, identity)
