"""A repeated ``fxstore.patch_sweep`` against its batched-forward floor and nnsight's per-cell trace loop.

The patching grid of a language-model workflow runs once per prompt pair of a dataset, on one
model: the case is the *repeated* call (the first call, which builds and exports the two
extractors, is timed once and reported apart). Per model size, a random GPT-2, 6 blocks x 16
positions (96 cells, logit difference), ``batch_size=16``:

- ``fxstore patch_sweep (repeated)``: the call on a model it has seen;
- ``batched-forward floor``: the plain model on the same work, one clean forward ``[1, 16]`` and
  six forwards of the corrupted input repeated ``[16, 16]`` (what the sweep cannot go below);
- ``nnsight per-cell traces``: one trace saving the six blocks' outputs, then one trace per cell
  patching one position (nnsight's documented patching loop);
- ``hook loop``: a forward hook per cell on the plain model (the reference every grid is checked against).

Medians of interleaved repetitions; ratios to the floor in the same run.

    python -m benchmarks.bench_sweep --save      # 6 x 256 and 12 x 512 GPT-2, 16 tokens; recorded in results/
    python -m benchmarks.bench_sweep --quick     # a tiny model, few repeats (smoke run)
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
from collections.abc import Callable
from typing import Any

import torch

import fxstore

from ._models import gpt2, hook_patch_grid
from ._report import RESULTS, machine
from ._timing import Contender, interleave, timed


def metric(out: Any) -> torch.Tensor:
    return out.logits[:, -1, 3] - out.logits[:, -1, 7]


def hook_loop(model: torch.nn.Module, clean: torch.Tensor, corrupted: torch.Tensor, sites: list[str],
              positions: list[int]) -> torch.Tensor:
    """One forward per cell, a forward hook copying the clean value of one position."""
    return hook_patch_grid(model, clean, corrupted, sites, positions, metric)


def _nnsight_loop(model: torch.nn.Module, blocks: list[int], positions: list[int]) -> Callable[..., torch.Tensor] | None:
    try:
        import nnsight
    except ImportError:
        print("  nnsight: not installed, left out", flush=True)
        return None
    traced = nnsight.NNsight(copy.deepcopy(model))  # nnsight rewires the modules it wraps: its own copy

    def run(clean: torch.Tensor, corrupted: torch.Tensor) -> torch.Tensor:
        grid = torch.empty(len(blocks), len(positions))
        with torch.no_grad():
            saved = []
            with traced.trace(clean):
                for b in blocks:
                    saved.append(traced.transformer.h[b].output.save())
            for i, b in enumerate(blocks):
                for j, p in enumerate(positions):
                    value = saved[i][:, p]
                    with traced.trace(corrupted):
                        traced.transformer.h[b].output[:, p] = value
                        logits = traced.lm_head.output.save()
                    grid[i, j] = logits[0, -1, 3] - logits[0, -1, 7]
        return grid

    return run


def _none(_: Any) -> None:
    return None


def case(layers: int, width: int, heads: int, blocks: list[int], tokens: int, batch: int, reps: int,
         others: bool = True) -> dict[str, Any]:
    """Medians (s) of each contender, the first call's time and each grid's max |diff| to the hook loop."""
    model = gpt2(layers, width, heads, positions=64)
    g = torch.Generator().manual_seed(2)
    clean = torch.randint(0, model.config.vocab_size, (1, tokens), generator=g)
    corrupted = torch.randint(0, model.config.vocab_size, (1, tokens), generator=g)
    sites = [f"transformer.h.{b}" for b in blocks]
    positions = list(range(tokens))
    reference = hook_loop(model, clean, corrupted, sites, positions)

    grid, first = timed(lambda: fxstore.patch_sweep(model, clean, corrupted, sites, metric, positions=positions,
                                                    batch_size=batch))
    checks = {"fxstore patch_sweep": float((grid - reference).abs().max())}
    rows = corrupted.expand(batch, tokens).contiguous()
    forwards = math.ceil(len(sites) * len(positions) / batch)

    def floor() -> None:
        with torch.no_grad():
            model(clean)
            for _ in range(forwards):
                metric(model(rows))

    def sweep() -> None:
        fxstore.patch_sweep(model, clean, corrupted, sites, metric, positions=positions, batch_size=batch)

    contenders = [Contender("fxstore patch_sweep (repeated)", sweep), Contender("batched-forward floor", floor)]
    nnsight = _nnsight_loop(model, blocks, positions) if others else None
    if nnsight is not None:
        checks["nnsight"] = float((nnsight(clean, corrupted) - reference).abs().max())
        contenders.append(Contender("nnsight per-cell traces", lambda: _none(nnsight(clean, corrupted))))
    if others:
        contenders.append(Contender("hook loop", lambda: _none(hook_loop(model, clean, corrupted, sites, positions))))
    stats = interleave(contenders, reps=reps, warmup=1, device=torch.device("cpu"))
    return {"model": f"GPT2LMHeadModel {layers}x{width} (random)", "blocks": blocks, "tokens": tokens,
            "batch_size": batch, "cells": len(sites) * len(positions), "floor_forwards": [1, forwards],
            "first_call_s": first, "median_s": {n: s.median for n, s in stats.items()},
            "range_s": {n: [s.lo, s.hi] for n, s in stats.items()}, "max_abs_diff_to_hook_loop": checks}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_sweep", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny model, few repeats")
    parser.add_argument("--save", action="store_true", help="record the result in benchmarks/results")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--floor-only", action="store_true",
                        help="time patch_sweep against the floor only (no nnsight, no hook loop)")
    parser.add_argument("--sizes", default="6x256,12x512", help="model sizes, layers x width (of 6x256, 12x512)")
    parser.add_argument("--tag", default="", help="a word added to the result's file name (e.g. 'before')")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    known = {"6x256": (6, 256, 4, [0, 1, 2, 3, 4, 5]), "12x512": (12, 512, 8, [0, 2, 4, 6, 8, 10])}
    sizes = [known[size] for size in args.sizes.split(",")]
    tokens, batch, reps = 16, 16, args.reps
    if args.quick:
        sizes, tokens, batch, reps = [(2, 32, 2, [0, 1])], 4, 4, 2
    command = "python -m benchmarks.bench_sweep" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    info = machine(torch.device("cpu"), torch.get_num_threads(), command)
    print(f"# bench_sweep: torch {torch.__version__}, {info['cpu']}, {torch.get_num_threads()} threads, "
          f"load {info['load_average'][0]:.1f} (a shared machine: other processes ran during the run)", flush=True)
    results: list[dict[str, Any]] = []
    tag = f"-{args.tag}" if args.tag else ""
    path = RESULTS / f"sweep-cpu-{info['date'].split(' ')[0]}-{info['commit'][:12]}{tag}.json"
    for layers, width, heads, blocks in sizes:
        print(f"\n## GPT-2 {layers}x{width}, {len(blocks)} blocks x {tokens} positions, batch {batch}, {reps} reps",
              flush=True)
        result = case(layers, width, heads, blocks, tokens, batch, reps, others=not args.floor_only)
        result["load_average_after"] = os.getloadavg()
        results.append(result)
        floor = result["median_s"]["batched-forward floor"]
        print(f"  first patch_sweep call (builds):  {result['first_call_s']:8.3f} s", flush=True)
        for name, median in result["median_s"].items():
            print(f"  {name:32s} {median:8.3f} s  {median / floor:6.2f}x floor", flush=True)
        print(f"  max |diff| to the hook loop: {result['max_abs_diff_to_hook_loop']}", flush=True)
        if args.save:  # after every size: a long run interrupted keeps what it measured
            path.write_text(json.dumps({"machine": info, "tag": args.tag, "result": results}, indent=2) + "\n")
            print(f"saved {path}", file=sys.stderr)
    print(f"\nload at the end: {os.getloadavg()[0]:.1f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
