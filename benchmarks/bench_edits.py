"""Edits on a GPT-2-small-sized random model: steering cost, the patching grid, recompiles.

1. Steering: ``fxstore.Add`` at block 6 (``transformer.h.6``), eager and compiled (inductor),
   as a ratio of medians to the plain model in the same interleaved run; contenders: a forward
   hook on the HF model (registered before compiling), nnsight (eager) and TransformerLens
   ``run_with_hooks`` (eager, when installed; a ``HookedTransformer`` of the same size).
2. The patching grid (every block x 16 positions, logit difference): wall time of
   ``fxstore.patch_sweep`` against a forward-hook loop (one forward per cell), nnsight
   (one trace per cell), each checked against the hook loop, and TransformerLens'
   ``patching.get_act_patch_resid_pre`` (when installed; its own model of the same size).
3. A steering vector changed in place over 20 calls of the inductor-compiled extractor:
   dynamo's graph count before and after (target: no new graph).

    python -m benchmarks.bench_edits --save      # 12 layers x 768, batch 2 x 32 tokens; recorded in results/
    python -m benchmarks.bench_edits --quick     # a tiny model, few repeats (smoke run)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

import fxstore

from ._models import gpt2, hook_patch_grid
from ._report import RESULTS, machine
from ._timing import Contender, interleave, timed


def _nnsight() -> Any:
    try:
        import nnsight
    except ImportError:
        return None
    return nnsight


def steering(model: torch.nn.Module, ids: torch.Tensor, block: int, reps: int, compiled: bool) -> dict[str, float]:
    """Median seconds per call of each contender (eager or inductor-compiled)."""
    site = f"transformer.h.{block}"
    vector = torch.randn(model.config.n_embd, generator=torch.Generator().manual_seed(1))
    ex = fxstore.FeatureExtractor(model, edits={site: fxstore.Add(vector.clone())},
                                  example_inputs=((ids,), {"use_cache": False}))
    hooked = copy.deepcopy(model)
    hooked.get_submodule(site).register_forward_hook(lambda m, i, o: (o[0] + vector, *o[1:]) if isinstance(o, tuple)
                                                     else o + vector)
    plain: Callable[..., Any] = model
    run_ex: Callable[..., Any] = ex
    run_hooked: Callable[..., Any] = hooked
    if compiled:
        plain, run_ex, run_hooked = (torch.compile(m, fullgraph=True) for m in (model, ex, hooked))
    with torch.inference_mode():
        expected = run_hooked(ids, use_cache=False).logits
        got = run_ex(ids, use_cache=False)[0].logits
    print(f"  check ({'inductor' if compiled else 'eager'}): fxstore vs hook max |diff| "
          f"{(got - expected).abs().max().item():.2e}", flush=True)
    contenders = [
        Contender("plain", lambda: plain(ids, use_cache=False) and None),
        Contender("fxstore Add", lambda: run_ex(ids, use_cache=False) and None),
        Contender("forward hook", lambda: run_hooked(ids, use_cache=False) and None),
    ]
    nnsight = _nnsight()
    if nnsight is not None and not compiled:
        traced = nnsight.NNsight(copy.deepcopy(model))

        def nnsight_run() -> None:
            with traced.trace(ids, use_cache=False):
                traced.transformer.h[block].output[:] = traced.transformer.h[block].output + vector
        contenders.append(Contender("nnsight", nnsight_run))
    lens = _transformer_lens(model) if not compiled else None
    if lens is not None:
        hook_name = f"blocks.{block}.hook_resid_post"

        def lens_run() -> None:
            lens.run_with_hooks(ids, fwd_hooks=[(hook_name, lambda t, hook: t + vector)])

        contenders.append(Contender("TransformerLens run_with_hooks", lens_run))
    with torch.inference_mode():
        stats = interleave(contenders, reps=reps, warmup=2, device=ids.device)
    return {name: s.median for name, s in stats.items()}


def _transformer_lens(model: torch.nn.Module) -> Any:
    try:
        from transformer_lens import HookedTransformer, HookedTransformerConfig
    except ImportError:
        print("  TransformerLens: not installed (pip install -e '.[bench]'), left out", flush=True)
        return None
    c = model.config
    cfg = HookedTransformerConfig(n_layers=c.n_layer, d_model=c.n_embd, n_heads=c.n_head, d_head=c.n_embd // c.n_head,
                                  d_mlp=4 * c.n_embd, n_ctx=c.n_positions, d_vocab=c.vocab_size, act_fn="gelu_new")
    return HookedTransformer(cfg).eval()


def grid(model: torch.nn.Module, tokens: int, batch_size: int) -> dict[str, float]:
    """Wall seconds of one full patching grid per contender."""
    g = torch.Generator().manual_seed(2)
    clean = torch.randint(0, model.config.vocab_size, (1, tokens), generator=g)
    corrupted = torch.randint(0, model.config.vocab_size, (1, tokens), generator=g)
    layers = [f"transformer.h.{i}" for i in range(model.config.n_layer)]
    positions = list(range(tokens))

    def metric(out: Any) -> torch.Tensor:
        return out.logits[:, -1, 3] - out.logits[:, -1, 7]

    times: dict[str, float] = {}
    ours, times["fxstore patch_sweep"] = timed(lambda: fxstore.patch_sweep(
        model, clean, corrupted, layers, metric, positions=positions, batch_size=batch_size))
    loop, times["hook loop"] = timed(lambda: hook_patch_grid(model, clean, corrupted, layers, positions, metric,
                                                             use_cache=False))
    print(f"  check: patch_sweep vs hook loop max |diff| {(ours - loop).abs().max().item():.2e}", flush=True)

    nnsight = _nnsight()
    if nnsight is not None:
        traced = nnsight.NNsight(copy.deepcopy(model))
        start = time.perf_counter()
        with torch.no_grad():
            values = []
            for i in range(len(layers)):
                with traced.trace(clean, use_cache=False):
                    value = traced.transformer.h[i].output.save()
                values.append(value)
            theirs = torch.empty(len(layers), tokens)
            for i in range(len(layers)):
                for p in positions:
                    patch_value = values[i][:, p]
                    with traced.trace(corrupted, use_cache=False):
                        traced.transformer.h[i].output[:, p] = patch_value
                        logits = traced.lm_head.output.save()
                    theirs[i, p] = logits[0, -1, 3] - logits[0, -1, 7]
        times["nnsight"] = time.perf_counter() - start
        print(f"  check: nnsight vs hook loop max |diff| {(theirs - loop).abs().max().item():.2e}", flush=True)

    lens = _transformer_lens(model)
    if lens is not None:  # its own model of the same size and random weights: timed, its values not compared
        from transformer_lens import patching

        start = time.perf_counter()
        with torch.no_grad():
            _, cache = lens.run_with_cache(clean)
            tl = patching.get_act_patch_resid_pre(lens, corrupted, cache,
                                                  lambda logits: logits[0, -1, 3] - logits[0, -1, 7])
        times["TransformerLens get_act_patch_resid_pre"] = time.perf_counter() - start
        print(f"  TransformerLens grid: shape {tuple(tl.shape)} (a same-size model of its own: values not compared)",
              flush=True)
    return times


def recompiles(model: torch.nn.Module, ids: torch.Tensor, block: int, calls: int) -> tuple[int, int]:
    """Dynamo's graph count after the first compiled call and after ``calls`` new vectors."""
    add = fxstore.Add(torch.zeros(model.config.n_embd))
    ex = fxstore.FeatureExtractor(model, edits={f"transformer.h.{block}": add},
                                  example_inputs=((ids,), {"use_cache": False}))
    compiled = torch.compile(ex, fullgraph=True)
    counters = torch._dynamo.utils.counters["stats"]
    before = counters["unique_graphs"]
    with torch.inference_mode():
        compiled(ids, use_cache=False)
        first = counters["unique_graphs"] - before
        for i in range(calls):
            add.update(vector=torch.randn(model.config.n_embd, generator=torch.Generator().manual_seed(10 + i)),
                       scale=float(i % 2))
            compiled(ids, use_cache=False)
    return first, counters["unique_graphs"] - before


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_edits", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--save", action="store_true", help="record the result in benchmarks/results")
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--no-compile", action="store_true", help="leave out the inductor cases")
    args = parser.parse_args(argv)
    layers, width, heads, batch, tokens, block = (12, 768, 12, 2, 32, 6) if not args.quick else (2, 64, 2, 2, 8, 1)
    reps = args.reps if not args.quick else 3
    model = gpt2(layers, width, heads)
    ids = torch.randint(0, model.config.vocab_size, (batch, tokens), generator=torch.Generator().manual_seed(0))
    command = "python -m benchmarks.bench_edits" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    info = machine(torch.device("cpu"), torch.get_num_threads(), command)
    result: dict[str, Any] = {"model": f"GPT2LMHeadModel {layers}x{width} (random)", "batch": [batch, tokens],
                              "block": block, "reps": reps, "steering_median_s": {}}
    print(f"# bench_edits: GPT-2 {layers}x{width}, batch {batch}x{tokens}, {reps} reps, torch {torch.__version__}, "
          f"{info['cpu']}, {torch.get_num_threads()} threads, load {info['load_average'][0]:.1f}", flush=True)
    print(f"\n## Steering (Add at block {block}): median per call, ratio to the plain model", flush=True)
    cases = [False] if args.no_compile else [False, True]
    for compiled in cases:
        medians = steering(model, ids, block, reps, compiled)
        result["steering_median_s"]["inductor" if compiled else "eager"] = medians
        base = medians["plain"]
        for name, median in medians.items():
            print(f"  {'inductor' if compiled else 'eager':8s} {name:32s} {median * 1e3:8.2f} ms  {median / base:5.3f}x",
                  flush=True)
    print(f"\n## Patching grid ({layers} blocks x {min(16, tokens)} positions): wall time", flush=True)
    times = grid(model, min(16, tokens), batch_size=32)
    result["grid_wall_s"] = times
    for name, seconds in times.items():
        print(f"  {name:32s} {seconds:8.2f} s  {seconds / times['fxstore patch_sweep']:5.2f}x fxstore", flush=True)
    if not args.no_compile:
        first, total = recompiles(model, ids, block, 20)
        result["recompiles"] = {"graphs_after_first_call": first, "graphs_after_20_vectors": total}
        print(f"\n## 20 changing vectors (inductor): graphs after the first call {first}, after 20 more calls {total} "
              f"({total - first} recompiles)", flush=True)
    result["load_average_at_end"] = os.getloadavg()
    print(f"\nload at the end: {os.getloadavg()[0]:.1f}", flush=True)
    if args.save:
        path = RESULTS / f"edits-cpu-{info['date'].split(' ')[0]}-{info['commit'][:12]}.json"
        path.write_text(json.dumps({"machine": info, "result": result}, indent=2) + "\n")
        print(f"saved {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
