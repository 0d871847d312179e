"""The one compute/write loop, for images and text alike.

Each step's rows are computed on this thread (features leave the graph already reduced, cast
and, on CUDA, copied to pinned host memory without blocking) and handed to the
:class:`~fxstore.dataset._writer.BackgroundWriter`, which waits for the copy's event and gives
the rows to the sink while the next batch computes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from tqdm import tqdm

from ..errors import ConfigError, FxStoreError
from . import _distributed
from ._writer import BackgroundWriter
from .folder.files import os_errors
from .formats import Sink

__all__ = ["Step", "write_all", "first_batch_errors"]


@dataclasses.dataclass
class Step:
    """One computed batch on its way to the sink.

    Attributes:
        shard: The shard the rows belong to.
        start: The first row of the batch.
        last: Whether the batch ends its shard (then the shard is made durable and marked done).
        arrays: ``{key: rows}`` (host tensors, possibly still being copied).
        count: Rows (or samples) the progress bar counts for this batch.
        feed: Run first in the writer thread (hashes the batch's inputs while the device computes).
        hasher: For a last batch, the digest of its shard's inputs (``None``: not recorded).
    """

    shard: int
    start: int
    last: bool
    arrays: dict[str, torch.Tensor]
    count: int
    feed: Callable[[], None] | None = None
    hasher: Any = None


@contextlib.contextmanager
def first_batch_errors(what: str, hint: str) -> Iterator[None]:
    """The model's own error on the first batch as one :class:`ConfigError` line (fxstore's errors pass as they are)."""
    try:
        yield
    except FxStoreError:
        raise
    except Exception as e:  # the model's own error on this input
        reason = str(e).splitlines()[0] if str(e) else ""
        raise ConfigError(f"the model fails on {what}: {type(e).__name__}: {reason}\nHint: {hint}") from e


def write_all(steps: Iterable[Step], sink: Sink, shards: dict[int, tuple[int, int]], device: torch.device, o: Any,
              ranks: _distributed.Ranks, total: int | None, unit: str) -> None:
    """Compute every step (under ``torch.inference_mode``) and write it in the background.

    Args:
        steps: The batches of this rank's shards, computed as the loop asks for them.
        sink: The format object the rows go to.
        shards: ``{shard: (first row, rows)}`` of the plan.
        device: The device the model runs on (CUDA: copies are awaited by event, writes overlap).
        o: The options of :func:`~fxstore.extract_dataset` (``format``, ``overlap``, ``progress``).
        ranks: The processes of the run (only rank 0 shows progress).
        total: What the progress bar counts to (``None``: unknown).
        unit: The progress bar's unit (``"sample"``, ``"tok"``).
    """
    bar = tqdm(total=total, unit=unit, unit_scale=unit == "tok", dynamic_ncols=True,
               desc=f"fxstore {o.format}" + (f" rank 0/{ranks.world}" if ranks.world > 1 else ""),
               disable=not (o.progress and ranks.main))
    sink.open()
    try:
        overlap = device.type == "cuda" if o.overlap is None else o.overlap
        with bar, BackgroundWriter(overlap) as writer, torch.inference_mode():
            for step in steps:
                event = None
                if device.type == "cuda":
                    event = torch.cuda.Event()
                    event.record()
                shard_start, count = shards[step.shard]
                writer.submit(functools.partial(_write, sink, step, event, shard_start, count))
                bar.update(step.count)
    finally:
        with os_errors(sink.out):
            sink.close()


def _write(sink: Sink, step: Step, event: Any, shard_start: int, count: int) -> None:
    if step.feed is not None:
        step.feed()  # the batch's input bytes into its shard's digest (writer thread, while the device computes)
    if event is not None:
        event.synchronize()  # the non-blocking device->host copies of this batch are done
    with os_errors(sink.out):
        sink.write(step.shard, step.start, step.arrays)
        if step.last:
            inputs = None if step.hasher is None else f"sha256:{step.hasher.hexdigest()}"
            sink.finish(step.shard, shard_start, count, inputs)
