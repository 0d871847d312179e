"""``python -m benchmarks``: run the cases and print the markdown table.

Examples:
    python -m benchmarks                       # the full CPU suite
    python -m benchmarks --device cuda --json out.json
    python -m benchmarks --quick               # one iteration on tiny models (the smoke test)
    python -m benchmarks --cases eager,compile --threads 1
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
import traceback

import torch

from ._cases import CASES
from ._config import profile_for
from ._report import Row, machine, markdown, results_path, write_json

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the models run (default: cpu)")
    p.add_argument("--quick", action="store_true", help="one iteration on tiny models, no inductor (smoke run)")
    p.add_argument("--cases", default=",".join(CASES),
                   help=f"comma-separated cases to run (default: all): {', '.join(CASES)}")
    p.add_argument("--json", metavar="PATH", help="also write every row and sample as JSON")
    p.add_argument("--save", action="store_true",
                   help="also write the JSON to benchmarks/results/<date>-<device>-<commit>.json (what the tables "
                        "of docs/benchmarks.md and the README are made from: python -m benchmarks.readme_table FILE)")
    p.add_argument("--reps", type=int, help="timed repetitions per contender (default: the profile's)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice; 1 with --quick)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the selected cases; print the table; return the exit status."""
    args = _parser().parse_args(argv)
    names = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in names if c not in CASES]
    if unknown:
        print(f"unknown case(s) {unknown}; choose from {list(CASES)}", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is available", file=sys.stderr)
        return 2
    profile = profile_for(args.device, args.quick)
    if args.threads or profile.threads:
        torch.set_num_threads(args.threads or profile.threads)
    if args.reps:
        import dataclasses

        profile = dataclasses.replace(profile, reps=args.reps)
    device = torch.device(args.device)
    command = "python -m benchmarks " + shlex.join(argv if argv is not None else sys.argv[1:])
    info = machine(device, torch.get_num_threads(), command.strip())
    rows: list[Row] = []
    for name in names:
        start = time.perf_counter()
        torch._dynamo.reset()  # each case compiles from a clean slate (no dynamic shapes carried over)
        try:
            rows += CASES[name](profile, device)
        except Exception as e:  # one broken case must not hide the others
            traceback.print_exc()
            rows.append(Row(name, "(case)", None, None, None, None, f"FAILED: {type(e).__name__}: {e}"[:160]))
        print(f"[{name}: {time.perf_counter() - start:.0f} s]", file=sys.stderr, flush=True)
    info["profile"] = profile.name
    print(markdown(rows, info))
    if args.json:
        write_json(args.json, rows, info)
    if args.save:
        path = results_path(info)
        write_json(path, rows, info)
        print(f"saved {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
