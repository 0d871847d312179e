"""TransformerLens ``generate`` with a steering hook, timed in its own interpreter.

TransformerLens is not a dependency of fxstore's environment, so it lives in a virtual environment
of its own (``HookedTransformer`` is gone in transformer-lens 4: install ``transformer-lens<4``);
``bench_generate --tl-python PATH`` runs this file with that interpreter (it imports neither
fxstore nor anything of this repository) and reads one JSON line from its stdout::

    {"first_s": ..., "samples_s": [...], "versions": {...}, "tokens": [batch, prompt + new]}

A random ``HookedTransformer`` of the benchmark's size (GPT-2's vocabulary, LayerNorm, gelu_new),
greedy, ``max_new_tokens`` new tokens (``stop_at_eos=False``: every row keeps going), the vector
added to ``blocks.{block}.hook_resid_post`` (a block's output) at every position, prompt and
generated, with TransformerLens' own KV cache.
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> int:
    parser = argparse.ArgumentParser()
    for name in ("layers", "width", "heads", "block", "batch", "prompt", "new", "reps", "threads"):
        parser.add_argument(f"--{name}", type=int, required=True)
    args = parser.parse_args()

    from importlib.metadata import version

    import torch
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = HookedTransformerConfig(n_layers=args.layers, d_model=args.width, n_heads=args.heads,
                                     d_head=args.width // args.heads, d_mlp=4 * args.width, n_ctx=256, d_vocab=50257,
                                     act_fn="gelu_new", normalization_type="LN")
    model = HookedTransformer(config).eval()
    ids = torch.randint(1, 50257, (args.batch, args.prompt), generator=torch.Generator().manual_seed(0))
    add = 4.0 * torch.randn(args.width, generator=torch.Generator().manual_seed(1))
    hook = (f"blocks.{args.block}.hook_resid_post", lambda value, hook: value + add)

    def run() -> torch.Tensor:
        with torch.no_grad(), model.hooks(fwd_hooks=[hook]):
            return model.generate(ids, max_new_tokens=args.new, do_sample=False, stop_at_eos=False, verbose=False)

    start = time.perf_counter()
    out = run()
    first = time.perf_counter() - start
    samples = []
    for _ in range(args.reps):
        start = time.perf_counter()
        run()
        samples.append(time.perf_counter() - start)
    versions = {name: version(name) for name in ("transformer-lens", "transformers", "torch")}
    print(json.dumps({"first_s": first, "samples_s": samples, "versions": versions, "tokens": list(out.shape)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
