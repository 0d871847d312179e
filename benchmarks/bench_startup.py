"""Start-up time: a fresh Python process doing only ``import torch``, ``import fxstore``, or one command.

Each command is run ``--repeats`` times, interleaved (one run of each per round, so load on a
shared machine hits all of them alike); the table shows the median wall time of the whole
process and its difference from ``python -c "import torch"`` (the floor: fxstore needs torch).
``fxstore info DIR`` reads a small folder written once beforehand by ``fxstore extract``.

    python benchmarks/bench_startup.py --repeats 9
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _time(argv: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=9, help="runs per command (default: 9)")
    args = parser.parse_args(argv)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    py = sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "feats"
        subprocess.run([py, "-m", "fxstore", "extract", "resnet18", "--layers", "layer4", "--pool", "avg", "--data",
                        "fake:4", "--image-size", "32", "--batch-size", "2", "--out", str(folder), "-q"],
                       check=True, env=env)
        commands = {
            'python -c "import torch"': [py, "-c", "import torch"],
            'python -c "import fxstore"': [py, "-c", "import fxstore"],
            "python -m fxstore --help": [py, "-m", "fxstore", "--help"],
            "python -m fxstore info DIR": [py, "-m", "fxstore", "info", str(folder)],
        }
        times: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(args.repeats):
            for name, command in commands.items():
                times[name].append(_time(command, env))
    load = os.getloadavg()[0]
    floor = statistics.median(times['python -c "import torch"'])
    print(f"{args.repeats} interleaved runs each · load average {load:.2f} · {os.cpu_count()} CPUs · "
          f"Python {sys.version.split()[0]}\n")
    print("| Process | Median | − import torch | Spread (min–max) |\n|---|---:|---:|---|")
    for name, samples in times.items():
        median = statistics.median(samples)
        print(f"| `{name}` | {median:.2f} s | {median - floor:+.2f} s | {min(samples):.2f}–{max(samples):.2f} s |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
