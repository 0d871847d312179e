"""Rows, the markdown table, the machine header and the JSON file."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from tools.checkout import commit

from ._timing import Stats

__all__ = ["Row", "row", "machine", "commit", "markdown", "write_json", "read_json", "results_path", "RESULTS"]


@dataclasses.dataclass
class Row:
    """One line of the table: a contender in a case."""

    case: str
    contender: str
    median_s: float | None
    ratio: float | None
    lo_s: float | None
    hi_s: float | None
    verified: str
    notes: str = ""
    samples_s: tuple[float, ...] = ()
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


def row(case: str, contender: str, stats: Stats | None, base: Stats | None, verified: str, notes: str = "",
        **extra: Any) -> Row:
    """A row from timings; ``ratio`` is the median over the baseline's median."""
    if stats is None or not stats.samples:
        return Row(case, contender, None, None, None, None, verified, notes, (), extra)
    ratio = stats.median / base.median if base is not None and base.samples else None
    return Row(case, contender, stats.median, ratio, stats.lo, stats.hi, verified, notes, stats.samples, extra)


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        out = ""
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine(device: torch.device, threads: int, command: str) -> dict[str, Any]:
    """Date, machine, versions and command, for the table header and the JSON file."""
    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": threads,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
        "command": command,
        "commit": commit(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        import torchvision

        info["torchvision"] = torchvision.__version__
    except ImportError:
        pass
    return info


def _time(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if seconds >= 1.0:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds * 1e6:.3g} µs"


def _short(sha: str) -> str:
    return sha[:12] + ("+dirty" if sha.endswith("+dirty") else "")


def _cell(text: str) -> str:
    """``text`` for a markdown table cell: a ``|`` inside it (``max |Δ|``) is escaped."""
    return text.replace("|", "\\|")


def markdown(rows: Sequence[Row], info: dict[str, Any]) -> str:
    """The table, preceded by the machine header."""
    load = info.get("load_average")
    head = [
        f"Date: {info['date']} · CPU: {info['cpu']} ({info['cores']} cores, torch threads {info['torch_threads']}"
        + (f", load avg {load[0]:.1f}" if load else "") + ")"
        + (f" · GPU: {info['gpu']}" if "gpu" in info else "")
        + f" · torch {info['torch']}, torchvision {info.get('torchvision', '?')}, Python {info['python']}",
        f"Command: `{info['command']}` · commit {_short(info.get('commit', 'unknown'))}"
        + (f" · profile {info['profile']}" if info.get("profile") else ""),
        "",
        "| Case | Contender | Median | × plain | Spread (min–max) | Verified | Notes |",
        "|---|---|---:|---:|---|---|---|",
    ]
    lines = []
    last_case = None
    for r in rows:
        case = r.case if r.case != last_case else ""
        last_case = r.case
        ratio = f"{r.ratio:.3f}" if r.ratio is not None else "—"
        spread = f"{_time(r.lo_s)}–{_time(r.hi_s)}" if r.lo_s is not None else "—"
        verified = f"**{r.verified}**" if r.verified.startswith("FAILED") else r.verified
        cells = [_cell(c) for c in (case, r.contender, _time(r.median_s), ratio, spread, verified, r.notes)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(head + lines)


def write_json(path: str | Path, rows: Sequence[Row], info: dict[str, Any]) -> None:
    """Everything, including every sample, as JSON."""
    payload = {"machine": info, "rows": [dataclasses.asdict(r) for r in rows]}
    Path(path).write_text(json.dumps(payload, indent=2, default=str) + "\n")


RESULTS = Path(__file__).resolve().parent / "results"
"""Where recorded runs are kept (the figures of the README and of docs/benchmarks.md come from files here)."""


def results_path(info: dict[str, Any]) -> Path:
    """``benchmarks/results/<date>-<device>-<commit>.json`` for a run's machine header."""
    day = str(info["date"]).split(" ")[0]
    return RESULTS / f"{day}-{info['device']}-{_short(str(info.get('commit', 'unknown'))).replace('+', '-')}.json"


def read_json(path: str | Path) -> tuple[list[Row], dict[str, Any]]:
    """The rows and machine header of a file written by :func:`write_json`."""
    payload = json.loads(Path(path).read_text())
    rows = [Row(**{**r, "samples_s": tuple(r.get("samples_s", ()))}) for r in payload["rows"]]
    return rows, payload["machine"]
