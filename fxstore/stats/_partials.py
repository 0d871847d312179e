"""The per-batch reduction (in place, into float64 accumulators on the device) and the merge of top-k lists.

A batch of rows ``x [N, D]`` (only the rows where ``keep [N]`` holds, for tokens) is added in place
to its layer's float64 sums: the row sum ``[D]``, how many rows fire (``> 0``) per unit, and the sum
of outer products with one ``addmm_`` (``outer += x.T @ x``: no ``[D, D]`` temporary per batch).
Per unit, the batch's ``k`` largest values and their rows come back (a stable descending sort: ties
go to the lower row); the lists merge by value, then by the lower key. The accumulators stay on
the device; only the final statistics leave it.

:func:`accumulate` runs right after the extractor's graph, in the same step: the run compiles the
extractor and the reduction as one function (``compile=``), with the accumulators and the padding
mask as inputs, so the dense rows never leave the compiled graph.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError

__all__ = ["accumulate", "image_rows", "token_rows", "Accumulator", "PAD_KEY", "SUMS"]

PAD_KEY = torch.iinfo(torch.int64).max
"""The key of a top-k slot that holds no row (a batch with fewer rows than ``k``, or a masked token)."""

SUMS = ("total", "fired", "outer")
"""The accumulators a batch is added to in place (``outer`` only with moments)."""


def accumulate(sums: dict[str, torch.Tensor], x: torch.Tensor, keep: torch.Tensor | None, top_k: int,
               moments: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Add the rows ``x [N, D]`` (those where ``keep [N]`` holds, if given) to ``sums`` in place.

    ``sums`` holds ``total [D]``, ``fired [D]`` and, with ``moments``, ``outer [D, D]`` (float64);
    an empty ``sums`` is filled with zeros first. Returns the batch's top-k: values ``[top_k, D]``
    (``-inf`` in empty slots) and batch-local rows ``[top_k, D]`` (``-1`` in empty slots).
    """
    x = x.to(torch.float64)
    kept = x if keep is None else torch.where(keep[:, None], x, 0.0)
    if not sums:  # the first batch of a run: the accumulators, on the rows' device
        d = x.shape[1]
        sums["total"], sums["fired"] = x.new_zeros(d), x.new_zeros(d)
        if moments:
            sums["outer"] = x.new_zeros(d, d)
    sums["total"].add_(kept.sum(0))
    sums["fired"].add_((kept > 0).sum(0))  # a masked row is 0 here: it does not fire
    if moments:
        sums["outer"].addmm_(kept.T, kept)
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
    return values, rows


def image_rows(key: str, x: torch.Tensor) -> torch.Tensor:
    """An image layer's feature as rows ``[N, D]``.

    Raises:
        ConfigError: ``x`` is not one row per sample.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ConfigError(
            f"layer '{key}' gives {got} per batch, not one row per sample [N, D].\n"
            "Hint: pool feature maps with reduce='avg' (or 'max', 'flatten'), or select a [N, D] layer."
        )
    return x


def token_rows(key: str, value: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """A language model layer's feature ``[B, T, D]`` as rows ``[B * T, D]``.

    Raises:
        ConfigError: the feature is not one vector per token.
    """
    if not isinstance(value, torch.Tensor) or value.dim() != 3 or tuple(value.shape[:2]) != tuple(shape):
        got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ConfigError(
            f"layer '{key}' gives {got}, not one vector per token ({tuple(shape)} + (D,)).\n"
            "Hint: select layers whose output is (batch, sequence, D): blocks, attention or MLP outputs.")
    return value.reshape(shape[0] * shape[1], value.shape[2])


class Accumulator:
    """The running statistics of one layer: float64 sums and the merged top-k lists, on one device.

    ``tensors`` holds the sums (:data:`SUMS`, added to in place by :func:`accumulate`) and the
    top-k lists. A top-k slot has a key (the global row: sample index for images, token row for
    text; ties go to the lower key), the sample it came from and, for tokens, its position.
    """

    def __init__(self, top_k: int, moments: bool) -> None:
        self.top_k, self.moments = top_k, moments
        self.count = 0
        self.tensors: dict[str, torch.Tensor] = {}

    def sums(self) -> dict[str, torch.Tensor]:
        """The sums :func:`accumulate` adds to (the same tensors; empty before the first batch)."""
        return {k: self.tensors[k] for k in SUMS if k in self.tensors}

    def add(self, count: int, sums: dict[str, torch.Tensor], top: tuple[torch.Tensor, torch.Tensor],
            key: torch.Tensor, sample: torch.Tensor, position: torch.Tensor | None) -> None:
        """Record one batch of ``count`` rows whose sums are in ``sums`` (already added to by
        :func:`accumulate`) and merge its top-k ``(values, batch-local rows)``: ``key``/``sample``/
        ``position`` map its batch-local rows (``[N]``) to global ones."""
        self.count += count
        self.tensors.update(sums)
        if self.top_k:
            values, batch_rows = top
            empty = batch_rows < 0
            rows = batch_rows.clamp(min=0)
            new = {"top_values": values, "top_keys": torch.where(empty, PAD_KEY, key[rows]),
                   "top_samples": torch.where(empty, -1, sample[rows])}
            if position is not None:
                new["top_positions"] = torch.where(empty, -1, position[rows])
            self.merge_top(new)

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
        for k in SUMS:
            if k in self.tensors:
                self.tensors[k] = self.tensors[k] + other.tensors[k].to(self.tensors[k].device)
        if self.top_k:
            self.merge_top({k: v.to(self.tensors[k].device) for k, v in other.tensors.items() if k.startswith("top_")})
