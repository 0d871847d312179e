"""Generation while steering: fxstore's ``ex.generate`` against Hugging Face ``generate`` and the hook tools.

A random GPT-2-small-sized model (12 x 768), batch 4, prompt 32 tokens, 64 new tokens (``min_new_tokens``
keeps every row going), greedy, a steering vector added at block 6 on every position. Rows, timed as
medians of interleaved repetitions, ratios to Hugging Face's plain eager ``generate`` in the same run:

- HF eager (dynamic cache), plain; HF eager with a steering forward hook;
- HF static cache + ``torch.compile`` (inductor), plain: Hugging Face's documented fast path (it
  compiles the decode step; the prompt runs eagerly);
- nnsight ``generate`` steering every step (``tracer.iter[:]``);
- TransformerLens ``generate`` with a steering hook, when installed (its own random model of this size);
- fxstore eager steered; fxstore compiled (inductor) steered; fxstore compiled steered with 2 stored layers;
- the compile time of each compiled row (its first call minus its median call);
- dynamo's graph count over 20 changes of vector, scale, switch and positions on the compiled extractor.

Every steered row's tokens are checked against the hooked HF model's.

    python -m benchmarks.bench_generate --save     # the issue's sizes; recorded in results/
    python -m benchmarks.bench_generate --quick    # a tiny model, few repeats (smoke run)
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
import transformers

import fxstore

from ._report import RESULTS, machine
from ._timing import Contender, interleave

BLOCK = 6


def _model(layers: int, width: int, heads: int) -> transformers.GPT2LMHeadModel:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=layers, n_embd=width, n_head=heads, n_positions=256)
    return transformers.GPT2LMHeadModel(config).eval()


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


def _transformer_lens_runner(layers: int, width: int, heads: int, block: int, add: torch.Tensor, ids: torch.Tensor,
                             new: int) -> Callable[[], torch.Tensor] | str:
    try:
        from transformer_lens import HookedTransformer, HookedTransformerConfig
    except ImportError:
        return "transformer-lens is not installed in this environment (transformers 5.25)"
    config = HookedTransformerConfig(n_layers=layers, d_model=width, n_heads=heads, d_head=width // heads, n_ctx=256,
                                     d_vocab=50257, act_fn="gelu_new", normalization_type="LN")
    tl = HookedTransformer(config).eval()

    def run() -> torch.Tensor:
        with tl.hooks(fwd_hooks=[(f"blocks.{block}.hook_resid_post", lambda value, hook: value + add)]):
            return tl.generate(ids, max_new_tokens=new, do_sample=False, stop_at_eos=False, verbose=False)

    return run


def _timed_first(run: Callable[[], Any]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def recompiles(ex: Any, ids: torch.Tensor, kwargs: dict[str, Any], site: str, width: int) -> dict[str, int]:
    """Dynamo's graph count over 20 calls, each after a change of vector, scale, switch or positions."""
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_generate", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--save", action="store_true", help="record the result in benchmarks/results")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    layers, width, heads, batch, prompt, new = (12, 768, 12, 4, 32, 64) if not args.quick else (2, 64, 2, 2, 8, 6)
    block = BLOCK if not args.quick else 1
    reps = args.reps if not args.quick else 2
    site = f"transformer.h.{block}"
    model = _model(layers, width, heads)
    ids = torch.randint(1, model.config.vocab_size, (batch, prompt), generator=torch.Generator().manual_seed(0))
    add = 4.0 * torch.randn(width, generator=torch.Generator().manual_seed(1))
    kwargs = {"max_new_tokens": new, "min_new_tokens": new, "do_sample": False, "pad_token_id": 0}
    command = "python -m benchmarks.bench_generate" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    info = machine(torch.device("cpu"), torch.get_num_threads(), command)
    print(f"# bench_generate: GPT-2 {layers}x{width}, batch {batch}, prompt {prompt}, {new} new tokens, greedy, "
          f"{reps} reps, torch {torch.__version__}, transformers {transformers.__version__}, {info['cpu']}, "
          f"{torch.get_num_threads()} threads, load {info['load_average'][0]:.1f}", flush=True)

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
    skipped: dict[str, str] = {}
    for name, runner in (("nnsight generate, steering every step", _nnsight_runner(model, block, add, ids, kwargs)),
                         ("TransformerLens generate, steering hook",
                          _transformer_lens_runner(layers, width, heads, block, add, ids, new))):
        if isinstance(runner, str):
            skipped[name] = runner
        else:
            runs[name] = runner
    print("first calls of the compiled rows (compiling)...", flush=True)
    first = {name: _timed_first(run) for name, run in runs.items() if "compile" in name}
    print(f"  {', '.join(f'{n}: {s:.1f} s' for n, s in first.items())}; checking tokens, then timing", flush=True)
    with torch.no_grad():
        reference = hooked.generate(ids, **kwargs)
    checks = {}
    for name, run in runs.items():
        if "steer" in name and "TransformerLens" not in name:
            checks[name] = bool(torch.equal(run(), reference))
    stats = interleave([Contender(name, lambda run=run: (run(), None)[1]) for name, run in runs.items()], reps, 1,
                       torch.device("cpu"))
    base = stats["HF eager, plain"].median
    static_base = stats["HF static cache + compile, plain"].median
    result: dict[str, Any] = {
        "model": f"GPT2LMHeadModel {layers}x{width} (random)", "batch": batch, "prompt": prompt, "new_tokens": new,
        "reps": reps, "median_s": {n: s.median for n, s in stats.items()},
        "range_s": {n: [s.lo, s.hi] for n, s in stats.items()},
        "compile_s": {n: first[n] - stats[n].median for n in first}, "tokens_equal_hooked_hf": checks,
        "skipped": skipped,
    }
    print("\n| row | median s | range s | x HF eager | x HF static+compile | tokens = hooked HF |")
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    for name, s in stats.items():
        print(f"| {name} | {s.median:.3f} | {s.lo:.3f}-{s.hi:.3f} | {s.median / base:.3f} | "
              f"{s.median / static_base:.3f} | {checks.get(name, '-')} |", flush=True)
    for name, why in skipped.items():
        print(f"| {name} | skipped: {why} | | | | |")
    for name, seconds in result["compile_s"].items():
        print(f"compile time, {name}: {seconds:.1f} s")
    result["recompiles"] = recompiles(compiled_ex, ids[:, : prompt // 2], dict(kwargs, max_new_tokens=8, min_new_tokens=8),
                                      site, width)
    print(f"graphs over 20 changes of vector, scale, switch and positions: {result['recompiles']['new_graphs']} new",
          flush=True)
    result["load_average_at_end"] = os.getloadavg()
    print(f"\nload at the start {info['load_average'][0]:.1f}, at the end {os.getloadavg()[0]:.1f} "
          "(a shared machine: medians of interleaved runs)", flush=True)
    if args.save:
        path = RESULTS / f"generate-cpu-{info['date'].split(' ')[0]}-{info['commit'][:12]}.json"
        path.write_text(json.dumps({"machine": info, "result": result}, indent=2) + "\n")
        print(f"saved {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
