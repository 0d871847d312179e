"""Token sequences into shards of rows, and shards into padded model batches.

Rows are tokens. Shard boundaries depend only on the sequences (a shard ends at the first
sequence end at or past ``shard_size`` rows), so every shard is computed from the same
batches however many processes run and however often the run was resumed. A batch holds
``rows`` sequences of one shard, padded on the tokenizer's side to a length rounded up to a
multiple of ``pad_to`` (a few shapes in all, so a graph exported per shape is exported a few
times, not once per batch); a shard's short last batch is filled up with copies of its first
sequence. Padding positions and filler rows are masked out and never stored.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np
import torch

from ._text_tokens import Sequences

__all__ = ["TextBatch", "TextPlan", "make_text_plan"]


@dataclasses.dataclass
class TextBatch:
    """One model batch: its shard, first stored row, model inputs, and which positions are stored."""

    shard: int
    start: int  # first stored row of this batch (global row index)
    last: bool  # closes the shard
    inputs: dict[str, torch.Tensor]  # input_ids, attention_mask, position_ids: (rows, length)
    keep: torch.Tensor  # (rows, length) bool: real tokens that become rows
    sequence: torch.Tensor  # (rows,) int64 sequence index of each batch row
    count: int  # stored rows


@dataclasses.dataclass
class TextPlan:
    """Shards of token rows over ``sequences``."""

    sequences: Sequences
    stored: np.ndarray  # (tokens,) bool: which tokens become rows
    shard_size: int
    shards: dict[int, tuple[int, int]]  # shard -> (first row, row count)
    shard_sequences: dict[int, tuple[int, int]]  # shard -> (first sequence, end sequence)
    rows: int
    pad_to: int
    pad_id: int
    left: bool
    first_rows: dict[str, torch.Tensor] | None = None  # the probe's rows of shard 0's first batch

    @property
    def num_rows(self) -> int:
        """Stored rows (tokens) in all."""
        return sum(count for _, count in self.shards.values())

    def take_probe_rows(self, batch: TextBatch) -> dict[str, torch.Tensor] | None:
        """The probe's rows if ``batch`` is the one the probe ran (the first), once."""
        if self.first_rows is None or int(batch.sequence[0]) != 0:
            return None
        rows, self.first_rows = self.first_rows, None
        return rows

    def batches(self, shard: int) -> Iterator[TextBatch]:
        """The batches of ``shard``, in order."""
        lo, hi = self.shard_sequences[shard]
        start = self.shards[shard][0]
        longest = int(self.sequences.lengths.max())
        for first in range(lo, hi, self.rows):
            members = list(range(first, min(first + self.rows, hi)))
            batch = self._batch(shard, start, members, hi, longest)
            start += batch.count
            yield batch

    def _batch(self, shard: int, start: int, members: list[int], end: int, longest: int) -> TextBatch:
        seqs = self.sequences
        length = max(len(seqs[i]) for i in members)
        length = min(-(-length // self.pad_to) * self.pad_to, longest)
        n = len(members)
        ids = np.full((self.rows, length), self.pad_id, dtype=np.int64)
        mask = np.zeros((self.rows, length), dtype=np.int64)
        keep = np.zeros((self.rows, length), dtype=bool)
        for r, i in enumerate(members + [members[0]] * (self.rows - n)):
            tokens = seqs[i]
            cols = slice(length - len(tokens), length) if self.left else slice(0, len(tokens))
            ids[r, cols] = tokens
            mask[r, cols] = 1
            if r < n:
                keep[r, cols] = self.stored[seqs.offsets[i]:seqs.offsets[i + 1]]
        positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
        inputs = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask),
                  "position_ids": torch.from_numpy(positions)}
        sequence = torch.tensor(members + [members[0]] * (self.rows - n), dtype=torch.int64)
        return TextBatch(shard, start, members[-1] == end - 1, inputs, torch.from_numpy(keep), sequence,
                         int(keep.sum()))


def make_text_plan(sequences: Sequences, stored: np.ndarray, shard_size: int, batch_size: int, pad_to: int,
                   pad_id: int, left: bool) -> TextPlan:
    """Cut ``sequences`` into shards of about ``shard_size`` stored rows (whole sequences each)."""
    per_sequence = np.add.reduceat(stored.astype(np.int64), sequences.offsets[:-1]) if len(stored) else np.zeros(0)
    per_sequence[sequences.lengths == 0] = 0
    shards: dict[int, tuple[int, int]] = {}
    shard_sequences: dict[int, tuple[int, int]] = {}
    first_seq, first_row, rows = 0, 0, 0
    for i, count in enumerate(per_sequence.tolist()):
        rows += count
        if rows - first_row >= shard_size or i == len(per_sequence) - 1:
            k = len(shards)
            shards[k] = (first_row, rows - first_row)
            shard_sequences[k] = (first_seq, i + 1)
            first_seq, first_row = i + 1, rows
    return TextPlan(sequences, stored, shard_size, shards, shard_sequences, min(batch_size, len(sequences)),
                    pad_to, pad_id, left)
