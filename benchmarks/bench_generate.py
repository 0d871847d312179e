"""Generation while steering: fxstore's ``ex.generate`` against Hugging Face ``generate`` and the hook tools.

A random GPT-2-small-sized model (12 x 768), batch 4, prompt 32 tokens, 64 new tokens (``min_new_tokens``
keeps every row going), greedy, a steering vector added at block 6 on every position. Rows, timed as
medians of interleaved repetitions, ratios to Hugging Face's plain eager ``generate`` in the same run:

- HF eager (dynamic cache), plain; HF eager with a steering forward hook;
- HF static cache + ``torch.compile`` (inductor), plain: Hugging Face's documented fast path (it
  compiles the decode step; the prompt runs eagerly);
- nnsight ``generate`` steering every step (``tracer.iter[:]``);
- TransformerLens ``generate`` with a steering hook (its own random model of this size): transformer-lens
  is not in fxstore's environment, so it runs from its own venv (``--tl-python PATH``, ``_tl_generate.py`` in a
  subprocess, after the interleaved rows; the row records the versions used), else it is skipped with why;
- fxstore eager steered; fxstore compiled (inductor) steered; fxstore compiled steered with 2 stored layers;
- the compile time of each compiled row (its first call minus its median call);
- dynamo's graph count over 20 changes of vector, scale, switch and positions on the compiled extractor
  (same shapes: what new values cost).

Every row's first call is its warm-up; every steered row's tokens are checked against the hooked HF
model's. ``--save`` writes the JSON after every phase and every repetition (``"phase"`` says how far it
got), so a stopped run keeps what it measured.

    python -m benchmarks.bench_generate --save --tl-python /work/tlvenv/bin/python   # recorded in results/
    python -m benchmarks.bench_generate --quick    # a tiny model, few repeats (smoke run)

The TransformerLens venv: ``python3 -m venv /work/tlvenv && /work/tlvenv/bin/pip install "transformer-lens<4"``
(``HookedTransformer`` is gone in 4.x; measured: 3.9.0 installs with torch 2.14.1 and transformers 5.25 and generates).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers

import fxstore

from ._models import gpt2
from ._report import RESULTS, machine
from ._timing import Contender, interleave, timed

BLOCK = 6


def _hooked(model: torch.nn.Module, site: str, add: torch.Tensor) -> torch.nn.Module:
    hooked = copy.deepcopy(model)
    hooked.get_submodule(site).register_forward_hook(
        lambda m, i, o: (o[0] + add, *o[1:]) if isinstance(o, tuple) else o + add)
    return hooked


def _nnsight_runner(model: torch.nn.Module, block: int, add: torch.Tensor, ids: torch.Tensor,
                    kwargs: dict[str, Any]) -> Callable[[], torch.Tensor] | str:
    try:
        import nnsight
        import tokenizers
    except ImportError as e:
        return f"not installed ({e.name})"
    # nnsight's LanguageModel wants a tokenizer; a random model has none, so a word-level one over the ids
    vocab = {f"t{i}": i for i in range(model.config.vocab_size)}
    core = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="t0"))
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=core, pad_token="t0")
    lm = nnsight.LanguageModel(copy.deepcopy(model), tokenizer=tokenizer)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    steps = kwargs["max_new_tokens"]

    def run() -> torch.Tensor:
        with lm.generate(inputs, **kwargs) as tracer:
            for _ in tracer.iter[:steps]:
                lm.transformer.h[block].output[:] = lm.transformer.h[block].output + add
            result = tracer.result.save()
        return result

    return run


def transformer_lens_row(python: str | None, sizes: dict[str, int], reps: int, threads: int) -> dict[str, Any] | str:
    """TransformerLens' steered ``generate`` timed by ``_tl_generate.py`` under ``python`` (its own venv), or why not.

    The row runs in a subprocess, after the interleaved rows, ``reps`` times in a row (not interleaved with them).
    """
    if python is None and importlib.util.find_spec("transformer_lens") is not None:
        python = sys.executable  # installed here (the bench extra): the same script, this interpreter
    if python is None:
        return ("not run: transformer-lens is not installed here; pass --tl-python PATH, the interpreter of a venv "
                "with transformer-lens<4 (see the module docstring)")
    script = Path(__file__).with_name("_tl_generate.py")
    argv = [python, str(script), *(f"--{k}={v}" for k, v in sizes.items()), f"--reps={reps}", f"--threads={threads}"]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=1800, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"failed to run {python}: {type(e).__name__}: {e}"
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        return f"failed under {python} (exit {done.returncode}): {last}"
    return dict(json.loads(done.stdout.strip().splitlines()[-1]), python=python)


def recompiles(ex: Any, ids: torch.Tensor, kwargs: dict[str, Any], site: str, width: int) -> dict[str, int]:
    """Dynamo's graph count over 20 calls, each after a change of vector, scale, switch or positions.

    The calls keep the shapes the extractor was compiled for (``ids`` and a cache of the same length):
    what is counted is what new values cost, not a new shape.
    """
    counters = torch._dynamo.utils.counters["stats"]
    before = counters["unique_graphs"]
    edit = ex.edits[site]
    for i in range(20):
        kind = i % 4
        if kind == 0:
            edit.update(vector=torch.randn(width, generator=torch.Generator().manual_seed(i)))
        elif kind == 1:
            edit.update(scale=float(i))
        elif kind == 2:
            edit.update(enabled=bool(i % 8 != 2))
        positions = ["all", "prompt", "generated", [1, ids.shape[1] + 2]][(i // 4) % 4] if kind == 3 else None
        ex.generate(ids, edit_positions=positions, **kwargs)
    return {"changes": 20, "new_graphs": counters["unique_graphs"] - before}


def _same_cache(prompt: int, new: int, wanted: int) -> int:
    """At most ``wanted`` (at least 2: a decode step) new tokens whose static cache has ``prompt + new``'s length.

    fxstore rounds a compiled generation's cache up to a multiple of 64 tokens.
    """
    capacity = -(-(prompt + new) // 64) * 64
    return min(new, max(2, wanted, capacity - 64 + 1 - prompt))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_generate", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny model, few repeats (smoke run)")
    parser.add_argument("--save", action="store_true", help="record the result in benchmarks/results (written after "
                        "every phase and repetition: a stopped run keeps what it measured)")
    parser.add_argument("--reps", type=int, default=5, help="interleaved repetitions (default: 5)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tl-python", metavar="PATH", help="interpreter of a venv with transformer-lens<4 "
                        "for the TransformerLens row (default: this one if it has transformer-lens, else skipped)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    layers, width, heads, batch, prompt, new = (12, 768, 12, 4, 32, 64) if not args.quick else (2, 64, 2, 2, 8, 6)
    block = BLOCK if not args.quick else 1
    reps = args.reps if not args.quick else 2
    site = f"transformer.h.{block}"
    model = gpt2(layers, width, heads, positions=256)
    ids = torch.randint(1, model.config.vocab_size, (batch, prompt), generator=torch.Generator().manual_seed(0))
    add = 4.0 * torch.randn(width, generator=torch.Generator().manual_seed(1))
    kwargs = {"max_new_tokens": new, "min_new_tokens": new, "do_sample": False, "pad_token_id": 0}
    command = "python -m benchmarks.bench_generate" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    info = machine(torch.device("cpu"), torch.get_num_threads(), command)
    print(f"# bench_generate: GPT-2 {layers}x{width}, batch {batch}, prompt {prompt}, {new} new tokens, greedy, "
          f"{reps} reps, torch {torch.__version__}, transformers {transformers.__version__}, {info['cpu']}, "
          f"{torch.get_num_threads()} threads, load {info['load_average'][0]:.1f}", flush=True)
    result: dict[str, Any] = {
        "model": f"GPT2LMHeadModel {layers}x{width} (random)", "batch": batch, "prompt": prompt, "new_tokens": new,
        "reps": reps, "phase": "building", "first_call_s": {}, "compile_s": {}, "tokens_equal_hooked_hf": {},
        "skipped": {}, "median_s": {}, "range_s": {}, "x_hf_eager": {}, "x_hf_static_compile": {},
    }
    path = RESULTS / f"generate-cpu-{info['date'].split(' ')[0]}-{info['commit'][:12]}{'-quick' if args.quick else ''}.json"

    def save(phase: str) -> None:
        result["phase"], result["load_average_now"] = phase, os.getloadavg()
        if args.save:
            path.write_text(json.dumps({"machine": info, "result": result}, indent=2) + "\n")

    save("building")
    hooked = _hooked(model, site, add)
    compiled_hf = copy.deepcopy(model)
    compile_config = transformers.CompileConfig(fullgraph=True, mode="default")
    compile_config._compile_all_devices = True  # Hugging Face's own switch to compile on a CPU
    static = dict(kwargs, cache_implementation="static", compile_config=compile_config)
    eager_ex = fxstore.FeatureExtractor(model, edits={site: fxstore.Add(add.clone())})
    compiled_ex = fxstore.FeatureExtractor(model, edits={site: fxstore.Add(add.clone())}).compile()
    stored_ex = fxstore.FeatureExtractor(model, [f"transformer.h.{layers // 4}", f"transformer.h.{3 * layers // 4}"],
                                         edits={site: fxstore.Add(add.clone())}).compile()
    runs: dict[str, Callable[[], Any]] = {
        "HF eager, plain": lambda: model.generate(ids, **kwargs),
        "HF eager, steering hook": lambda: hooked.generate(ids, **kwargs),
        "HF static cache + compile, plain": lambda: compiled_hf.generate(ids, **static),
        "fxstore eager, steered": lambda: eager_ex.generate(ids, **kwargs).sequences,
        "fxstore compiled, steered": lambda: compiled_ex.generate(ids, **kwargs).sequences,
        "fxstore compiled, steered + 2 stored layers": lambda: stored_ex.generate(ids, **kwargs).sequences,
    }
    nnsight_run = _nnsight_runner(model, block, add, ids, kwargs)
    if isinstance(nnsight_run, str):
        result["skipped"]["nnsight generate, steering every step"] = nnsight_run
    else:
        runs["nnsight generate, steering every step"] = nnsight_run
    print("first call of every row (the compiled rows compile), each steered row checked against the hooked HF "
          "model...", flush=True)
    with torch.no_grad():
        outputs = {}
        for name, run in runs.items():  # the first call is every row's warm-up
            outputs[name], result["first_call_s"][name] = timed(run)
            print(f"  {name}: {result['first_call_s'][name]:.1f} s", flush=True)
            save("first calls")
    reference = outputs["HF eager, steering hook"]
    result["tokens_equal_hooked_hf"] = {n: bool(torch.equal(o, reference)) for n, o in outputs.items() if "steer" in n}

    def after_rep(so_far: dict[str, Any]) -> None:
        result["median_s"] = {n: s.median for n, s in so_far.items()}
        result["range_s"] = {n: [s.lo, s.hi] for n, s in so_far.items()}
        result["compile_s"] = {n: result["first_call_s"][n] - s.median for n, s in so_far.items() if "compile" in n}
        print(f"  repetition {len(next(iter(so_far.values())).samples)}/{reps} done", flush=True)
        save("timing")

    print(f"timing: {reps} interleaved repetitions", flush=True)
    stats = interleave([Contender(name, lambda run=run: (run(), None)[1]) for name, run in runs.items()], reps, 0,
                       torch.device("cpu"), after_rep)
    base = stats["HF eager, plain"].median
    static_base = stats["HF static cache + compile, plain"].median
    result["x_hf_eager"] = {n: s.median / base for n, s in stats.items()}
    result["x_hf_static_compile"] = {n: s.median / static_base for n, s in stats.items()}

    recompile_new = _same_cache(prompt, new, 8)
    print(f"recompiles: 20 changes of vector, scale, switch and positions ({recompile_new} new tokens, same cache)",
          flush=True)
    result["recompiles"] = dict(recompiles(compiled_ex, ids, dict(kwargs, max_new_tokens=recompile_new,
                                                                   min_new_tokens=recompile_new), site, width),
                                extractor="fxstore compiled, steered", new_tokens=recompile_new)
    save("recompiles")
    tl_name = "TransformerLens generate, steering hook"
    tl = transformer_lens_row(args.tl_python, {"layers": layers, "width": width, "heads": heads, "block": block,
                                               "batch": batch, "prompt": prompt, "new": new}, reps, args.threads)
    if isinstance(tl, str):
        result["skipped"][tl_name] = tl
    else:
        median = statistics.median(tl["samples_s"])
        result["transformer_lens"] = dict(tl, median_s=median, note="its own random model of the same size, in its "
                                          "own process after the interleaved rows (not interleaved)")
        result["median_s"][tl_name], result["range_s"][tl_name] = median, [min(tl["samples_s"]), max(tl["samples_s"])]
        result["x_hf_eager"][tl_name], result["x_hf_static_compile"][tl_name] = median / base, median / static_base
    result["load_average_at_end"] = os.getloadavg()
    save("done")

    print("\n| row | median s | range s | x HF eager | x HF static+compile | tokens = hooked HF |")
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    for name, median in result["median_s"].items():
        lo, hi = result["range_s"][name]
        print(f"| {name} | {median:.3f} | {lo:.3f}-{hi:.3f} | {result['x_hf_eager'][name]:.3f} | "
              f"{result['x_hf_static_compile'][name]:.3f} | {result['tokens_equal_hooked_hf'].get(name, '-')} |")
    for name, why in result["skipped"].items():
        print(f"| {name} | skipped: {why} | | | | |")
    for name, seconds in result["compile_s"].items():
        print(f"compile time, {name}: {seconds:.1f} s (first call {result['first_call_s'][name]:.1f} s minus median)")
    print(f"graphs over 20 changes of vector, scale, switch and positions: {result['recompiles']['new_graphs']} new")
    print(f"\nload at the start {info['load_average'][0]:.1f}, at the end {os.getloadavg()[0]:.1f} "
          "(medians of interleaved runs)", flush=True)
    if args.save:
        print(f"saved {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
