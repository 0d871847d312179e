"""The end of a statistics run: ranks' accumulators merged (torchrun), then the float64 statistics."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from ..dataset.batches import Ranks
from ..errors import ConfigError
from ._partials import Accumulator
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
    keys = ranks.from_main(sorted(accumulators))
    merged = {}
    for key in keys:
        acc = accumulators.get(key)
        if acc is None or not acc.tensors:
            raise ConfigError(f"rank {ranks.rank} computed no batch of layer '{key}'.\n"
                              "Hint: use fewer processes than shards (shard_size= smaller, or more data).")
        device = acc.tensors["total"].device
        count = torch.tensor([acc.count], dtype=torch.int64)
        dist.all_reduce(count)
        out = Accumulator(top_k, moments)
        out.count = int(count)
        for name in ("total", "fired", "outer"):
            if name in acc.tensors:
                value = acc.tensors[name].to("cpu").clone()
                dist.all_reduce(value)
                out.tensors[name] = value.to(device)
        if top_k:
            for rank_top in _gathered({k: v for k, v in acc.tensors.items() if k.startswith("top_")}, ranks):
                out.merge_top({k: v.to(device) for k, v in rank_top.items()})
        merged[key] = out
    return merged


def _gathered(top: dict[str, torch.Tensor], ranks: Ranks) -> list[dict[str, torch.Tensor]]:
    names = sorted(top)
    per_rank: list[dict[str, torch.Tensor]] = [{} for _ in range(ranks.world)]
    for name in names:
        value = top[name].to("cpu").contiguous()
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
        cov = (t["outer"] - n * torch.outer(mean, mean)) / (n - 1) if n > 1 else torch.full_like(t["outer"], torch.nan)
        cov = (cov + cov.T) / 2  # exactly symmetric, like numpy.cov
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
