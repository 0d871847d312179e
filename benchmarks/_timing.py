"""Interleaved timing: every contender runs once per repetition, in a rotating order.

Interleaving spreads machine noise (other processes, frequency changes) evenly over the
contenders; the median of the repetitions is reported. On CUDA a call is timed with
CUDA events between two synchronisations, on CPU with ``time.perf_counter``.
"""

from __future__ import annotations

import dataclasses
import gc
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

__all__ = ["Contender", "Stats", "clock_for", "interleave", "timed"]

Features = Mapping[str, torch.Tensor]


@dataclasses.dataclass
class Contender:
    """One way of doing the case's work.

    Attributes:
        name: Shown in the table.
        run: The timed call; returns the captured values (``{key: tensor}``) used for
            verification, or ``None`` for the plain model (nothing captured).
        every: Take part in every ``every``-th repetition only (very slow contenders).
        note: Shown in the table's notes column.
        verdict: The verification of a contender whose ``run`` returns nothing (checked
            by its builder instead).
    """

    name: str
    run: Callable[[], Features | None]
    every: int = 1
    note: str = ""
    verdict: str = ""


@dataclasses.dataclass(frozen=True)
class Stats:
    """Timings of one contender, in seconds."""

    samples: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def lo(self) -> float:
        return min(self.samples)

    @property
    def hi(self) -> float:
        return max(self.samples)


def clock_for(device: torch.device) -> Callable[[Callable[[], Any]], float]:
    """A function that runs a callable once and returns its duration in seconds."""
    if device.type == "cuda":

        def cuda_clock(fn: Callable[[], Any]) -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            return start.elapsed_time(end) / 1e3

        return cuda_clock

    def cpu_clock(fn: Callable[[], Any]) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    return cpu_clock


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """``fn()``'s result and its wall time in seconds (one call: a first call, a whole grid)."""
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def interleave(contenders: Sequence[Contender], reps: int, warmup: int, device: torch.device,
               after_rep: Callable[[dict[str, Stats]], None] | None = None) -> dict[str, Stats]:
    """Time every contender ``reps`` times, round-robin, after ``warmup`` untimed calls each.

    Repetition ``i`` starts at contender ``i % n``, so no contender always runs right
    after the same neighbour. ``after_rep`` receives the statistics so far after every
    repetition (a long run saves them as it goes).
    """
    clock = clock_for(device)
    for contender in contenders:
        for _ in range(warmup if contender.every == 1 else min(warmup, 1)):
            contender.run()
    samples: dict[str, list[float]] = {c.name: [] for c in contenders}
    n = len(contenders)
    for rep in range(reps):
        gc.collect()
        for contender in [*contenders[rep % n:], *contenders[: rep % n]]:
            if rep % contender.every == 0:
                samples[contender.name].append(clock(contender.run))
        if after_rep is not None:
            after_rep({name: Stats(tuple(values)) for name, values in samples.items() if values})
    return {name: Stats(tuple(values)) for name, values in samples.items()}
