"""Per-batch partial statistics (computed on the device, inside the graph for image rows) and their merge.

A batch of rows ``x [N, D]`` gives, in float64: the row count, the sum ``[D]``, the sum of outer
products ``x.T @ x [D, D]`` (one matmul), how many rows fire (``> 0``) per unit, and per unit the
``k`` largest values with their rows (a stable descending sort: ties go to the lower row). Sums
add; top-k lists merge by value, then by the lower key. The accumulators stay on the device;
only the final statistics leave it.

For image rows the packed partials are the extractor's ``transform``: the graph itself returns
them, so compile fuses the reduction with the model, and the dense rows never leave the graph::

    def forward(self, x):
        ...
        avgpool = self.avgpool(layer4)
        flatten = torch.flatten(avgpool, 1)
        detach = flatten.detach()
        partials = fxstore_stats_partials(detach)   # [count, D, sum, outer, fired, top values, top rows]
        return {'flatten': partials}
"""

from __future__ import annotations

import dataclasses

import torch

from ..errors import ConfigError

__all__ = ["Partials", "batch_partials", "pack", "unpack", "Accumulator", "PAD_KEY"]

PAD_KEY = torch.iinfo(torch.int64).max
"""The key of a top-k slot that holds no row (a batch with fewer rows than ``k``, or a masked token)."""


@dataclasses.dataclass
class Partials:
    """One batch's partial statistics (float64, on the batch's device); ``top_rows`` are batch-local rows."""

    count: torch.Tensor  # () float64
    total: torch.Tensor  # [D]
    outer: torch.Tensor | None  # [D, D]
    fired: torch.Tensor  # [D]
    top_values: torch.Tensor  # [k, D]
    top_rows: torch.Tensor  # [k, D] int64, -1 where empty


def batch_partials(x: torch.Tensor, keep: torch.Tensor | None, top_k: int, moments: bool) -> Partials:
    """The partial statistics of the rows ``x [N, D]`` (only the rows where ``keep [N]`` holds, if given)."""
    x = x.to(torch.float64)
    if keep is None:
        count = torch.full((), x.shape[0], dtype=torch.float64, device=x.device)
        kept, positive = x, x > 0
    else:
        column = keep[:, None]
        count = keep.sum().to(torch.float64)
        kept, positive = torch.where(column, x, 0.0), (x > 0) & column
    outer = kept.T @ kept if moments else None
    k = min(top_k, x.shape[0])
    if k:
        ranked = x if keep is None else torch.where(keep[:, None], x, float("-inf"))
        values, rows = torch.sort(ranked, dim=0, descending=True, stable=True)
        values, rows = values[:k], rows[:k]
        if keep is not None:
            rows = torch.where(keep[rows], rows, -1)
    else:  # no top-k asked: no sort
        values, rows = x[:0], torch.zeros(0, x.shape[1], dtype=torch.int64, device=x.device)
    if k < top_k:  # fewer rows than k: empty slots
        pad = top_k - k
        values = torch.cat([values, values.new_full((pad, x.shape[1]), float("-inf"))])
        rows = torch.cat([rows, rows.new_full((pad, x.shape[1]), -1)])
    return Partials(count, kept.sum(0), outer, positive.sum(0).to(torch.float64), values, rows)


def pack(x: torch.Tensor, top_k: int, moments: bool) -> torch.Tensor:
    """The partials of image rows ``[N, D]`` as one flat float64 tensor (what the graph returns).

    Raises:
        ConfigError: ``x`` is not one row per sample (``[N, D]``).
    """
    if x.dim() != 2:
        raise ConfigError(
            f"a selected layer gives {tuple(x.shape)} per batch, not one row per sample [N, D].\n"
            "Hint: pool feature maps with reduce='avg' (or 'max', 'flatten'), or select a [N, D] layer."
        )
    p = batch_partials(x, None, top_k, moments)
    head = torch.stack([p.count, torch.full_like(p.count, x.shape[1])])
    parts = [head, p.total] + ([p.outer.reshape(-1)] if p.outer is not None else [])
    parts += [p.fired, p.top_values.reshape(-1), p.top_rows.to(torch.float64).reshape(-1)]
    return torch.cat(parts)


def unpack(flat: torch.Tensor, top_k: int, moments: bool) -> Partials:
    """The :class:`Partials` of a tensor made by :func:`pack`."""
    d = int(flat[1])
    sizes = [1, 1, d] + ([d * d] if moments else []) + [d, top_k * d, top_k * d]
    pieces = list(torch.split(flat, sizes))
    count, _, total = pieces[:3]
    outer = pieces[3].reshape(d, d) if moments else None
    fired, values, rows = pieces[-3:]
    return Partials(count[0], total, outer, fired, values.reshape(top_k, d), rows.reshape(top_k, d).to(torch.int64))


class Accumulator:
    """The running statistics of one layer: float64 sums and the merged top-k lists, on one device.

    A top-k slot has a key (the global row: sample index for images, token row for text; ties
    go to the lower key), the sample it came from and, for tokens, its position.
    """

    def __init__(self, top_k: int, moments: bool) -> None:
        self.top_k, self.moments = top_k, moments
        self.count = 0
        self.tensors: dict[str, torch.Tensor] = {}

    def add(self, p: Partials, key: torch.Tensor, sample: torch.Tensor, position: torch.Tensor | None) -> None:
        """Merge one batch: ``key``/``sample``/``position`` map its batch-local rows (``[N]``) to global ones."""
        self.count += int(p.count)
        new = {"total": p.total, "fired": p.fired}
        if p.outer is not None:
            new["outer"] = p.outer
        if not self.tensors:
            self.tensors = {k: v.clone() for k, v in new.items()}
        else:
            for k, v in new.items():
                self.tensors[k] += v
        if self.top_k:
            empty = p.top_rows < 0
            rows = p.top_rows.clamp(min=0)
            top = {"top_values": p.top_values, "top_keys": torch.where(empty, PAD_KEY, key[rows]),
                   "top_samples": torch.where(empty, -1, sample[rows])}
            if position is not None:
                top["top_positions"] = torch.where(empty, -1, position[rows])
            self.merge_top(top)

    def merge_top(self, top: dict[str, torch.Tensor]) -> None:
        """Merge top-k lists ``{top_values, top_keys, top_samples[, top_positions]}`` into this one."""
        if "top_values" in self.tensors:
            top = {k: torch.cat([self.tensors[k], v]) for k, v in top.items()}
        by_key = torch.argsort(top["top_keys"], dim=0, stable=True)
        top = {k: v.gather(0, by_key) for k, v in top.items()}
        by_value = torch.argsort(top["top_values"], dim=0, descending=True, stable=True)[:self.top_k]
        self.tensors.update({k: v.gather(0, by_value) for k, v in top.items()})

    def merge(self, other: Accumulator) -> None:
        """Add another accumulator of the same layer (another rank's, or an earlier run's)."""
        if not other.tensors:
            return
        if not self.tensors:
            self.count, self.tensors = other.count, dict(other.tensors)
            return
        self.count += other.count
        for k in ("total", "fired", "outer"):
            if k in self.tensors:
                self.tensors[k] = self.tensors[k] + other.tensors[k].to(self.tensors[k].device)
        if self.top_k:
            self.merge_top({k: v.to(self.tensors[k].device) for k, v in other.tensors.items() if k.startswith("top_")})
