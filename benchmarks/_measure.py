"""Run a case's contenders interleaved, verify each one, and turn the result into rows."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch

from ._config import Profile
from ._report import Row, row
from ._timing import Contender, Features, interleave
from ._verify import check

__all__ = ["Failed", "attempt", "compare", "Compiled", "compile_contender", "cold_cache"]


@dataclasses.dataclass
class Failed:
    """A contender that could not be built or run; reported as FAILED."""

    name: str
    reason: str


def attempt(name: str, build: Callable[[], Contender]) -> Contender | Failed:
    """``build()``, or a :class:`Failed` naming the exception."""
    try:
        return build()
    except Exception as e:  # a contender that cannot be built is a result, not a crash
        return Failed(name, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:160])


def compare(case: str, entries: Sequence[Contender | Failed], reference: Mapping[str, torch.Tensor],
            profile: Profile, device: torch.device, *, keys: Mapping[str, Sequence[str]] | None = None,
            rtol: float = 0.0, atol: float = 0.0, notes: Mapping[str, str] | None = None) -> list[Row]:
    """Time ``entries`` (the first is the baseline), then verify each against ``reference``.

    Args:
        case: The case label.
        entries: Contenders (or failures); the first is the plain model.
        reference: The independent reference values.
        profile: Repetitions and warm-up.
        device: Where the timing runs (CUDA events on CUDA).
        keys: Per contender name, the reference keys it must have captured.
        rtol: Relative tolerance of the verification (0: bit-identical).
        atol: Absolute tolerance of the verification.
        notes: Extra notes per contender name.
    """
    keys, notes = keys or {}, notes or {}
    contenders = [e for e in entries if isinstance(e, Contender)]
    working: list[Contender] = []
    verdicts: dict[str, str] = {}
    for c in contenders:  # a contender that raises when run is FAILED, and not timed
        try:
            got = c.run()
        except Exception as e:  # reported in the table
            verdicts[c.name] = f"FAILED: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:160]
            continue
        verdicts[c.name] = (c.verdict or "— (no capture)") if got is None else check(
            got, reference, keys.get(c.name), rtol, atol)
        working.append(c)
    stats = interleave(working, profile.reps, profile.warmup, device)
    for c in working if profile.reps > 1 else []:  # verify again after timing: catches drifting state
        if verdicts[c.name].startswith("FAILED"):
            continue
        got = c.run()
        if got is not None:
            verdicts[c.name] = check(got, reference, keys.get(c.name), rtol, atol)
    base = stats.get(contenders[0].name) if contenders else None
    rows = []
    for e in entries:
        if isinstance(e, Failed):
            rows.append(row(case, e.name, None, None, f"FAILED: {e.reason}"))
            continue
        note = "; ".join(n for n in (e.note, notes.get(e.name, "")) if n)
        rows.append(row(case, e.name, stats.get(e.name), base, verdicts[e.name], note))
    return rows


@contextlib.contextmanager
def cold_cache(enabled: bool) -> Iterator[None]:
    """A fresh, empty inductor cache (on disk and in memory) while compiling, if ``enabled``."""
    if not enabled:
        yield
        return
    from torch._inductor import utils

    fresh = getattr(utils, "fresh_cache", None) or getattr(utils, "fresh_inductor_cache", None)
    with fresh() if fresh is not None else contextlib.nullcontext():
        yield


@dataclasses.dataclass
class Compiled:
    """What compiling one contender cost: first-call time, graph breaks, graphs."""

    seconds: float
    graph_breaks: int
    graphs: int
    reasons: tuple[str, ...]
    cold: bool

    def note(self) -> str:
        text = (f"compile {self.seconds:.1f} s{'' if self.cold else ' (warm kernels)'}, "
                f"{self.graph_breaks} graph breaks, {self.graphs} graphs")
        if self.reasons:
            text += f" ({self.reasons[0][:80]})"
        return text


def _one_line(text: str) -> str:
    return " ".join(text.split()).replace("|", "/")


def compile_contender(name: str, setup: Callable[[], Callable[[], Features | None]], profile: Profile,
                      note: str = "", cold: bool = True) -> tuple[Contender | Failed, Compiled | None]:
    """Build a compiled contender; its setup and first call (the compilation) are timed apart.

    Graph breaks and graphs are read from ``torch._dynamo.utils.counters``, cleared before
    the setup. With ``cold`` (and ``profile.fresh_compile_cache``) every contender compiles
    against an empty inductor cache, so no contender profits from kernels another one
    compiled; otherwise kernels compiled earlier in the process are reused ("warm").
    """
    cold = cold and profile.fresh_compile_cache
    from torch._dynamo.utils import counters

    counters.clear()
    start = time.perf_counter()
    try:
        with cold_cache(cold):
            run = setup()
            run()
    except Exception as e:  # a contender that does not compile is FAILED
        return Failed(name, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:160]), None
    seconds = time.perf_counter() - start
    breaks = counters.get("graph_break", {})
    info = Compiled(seconds, int(sum(breaks.values())), int(counters.get("stats", {}).get("unique_graphs", 0)),
                    tuple(_one_line(str(r)) for r in breaks), cold)
    return Contender(name, run, note="; ".join(n for n in (info.note(), note) if n)), info
