"""Token activations of a GPT-2-small-sized random model: tokens/s of fxstore vs the plain forward and others.

Every contender runs over the same batches of random token ids (``--batches`` x
``--batch-size`` windows of ``--context`` tokens) and stores the residual stream after two
blocks in bfloat16, one row per token (except the plain forward, which stores nothing):

* plain HF forward: ``GPT2LMHeadModel(input_ids, attention_mask)`` under ``inference_mode``,
  the floor;
* fxstore: ``extract_dataset`` with the tokenizer, end to end (tokenizing, model and
  tokenizer fingerprints, the graph run, the gather of real tokens, shards, manifest); the
  one-time ``torch.export`` of the graph is timed apart (it serves every later run);
* TransformerLens: ``HookedTransformer`` of the same size (random weights: a different
  parametrisation, same FLOPs), ``run_with_cache(names_filter=...)``, then the same writing
  (one safetensors file per batch with both layers and the token ids);
* SAELens: ``CacheActivationsRunner`` on the model folder (``AutoModelForCausalLM``, so it
  runs offline on random weights), which caches one hook per pass: two runs, their times
  added; in float16, as its arrow writer has no bfloat16.

Contenders run ``--repeats`` times, interleaved; the table shows medians and the ratio to the
plain forward, plus bytes written per token. TransformerLens and SAELens are optional
(``pip install -e '.[bench]'``); a missing one is reported, not fatal.

    python benchmarks/bench_text.py                       # 12 layers x 768, 4 batches of 8 x 128 tokens
    python benchmarks/bench_text.py --quick               # a tiny model, one repeat (smoke run)
"""

from __future__ import annotations

import argparse
import platform
import shutil
import statistics
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

import fxstore


def _tokenizer(vocab: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {f"t{i}": i for i in range(vocab - 1)} | {"<|endoftext|>": vocab - 1}
    tok = Tokenizer(models.WordLevel(words, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


class Bench:
    """The model, the batches and one timing function per contender."""

    def __init__(self, args: argparse.Namespace, root: Path) -> None:
        from transformers import GPT2Config, GPT2LMHeadModel

        self.args, self.root = args, root
        torch.manual_seed(0)
        self.config = GPT2Config(n_layer=args.n_layer, n_embd=args.d_model, n_head=args.d_model // 64,
                                 n_positions=max(args.context, 128), vocab_size=args.vocab)
        self.model = GPT2LMHeadModel(self.config).eval()
        self.tok = _tokenizer(args.vocab)
        self.folder = root / "model"
        self.model.save_pretrained(self.folder)
        self.tok.save_pretrained(self.folder)
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, args.vocab - 1, (args.batches * args.batch_size, args.context), generator=g)
        self.tokens = self.ids.numel()
        self.layers = [f"transformer.h.{i}" for i in args.layers]
        self.bytes_per_token: dict[str, float] = {}
        self.notes: dict[str, str] = {}

    def batches(self):
        return self.ids.split(self.args.batch_size)

    def plain(self, _: int) -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            for batch in self.batches():
                self.model(input_ids=batch, attention_mask=torch.ones_like(batch), use_cache=False)
        return time.perf_counter() - start

    def fxstore_setup(self) -> None:
        start = time.perf_counter()
        self.extractor = fxstore.FeatureExtractor(self.model, self.layers, keep_output=False, dtype=torch.bfloat16)
        first = self.ids[: self.args.batch_size]
        with torch.inference_mode():
            self.extractor(input_ids=first, attention_mask=torch.ones_like(first),
                           position_ids=torch.arange(first.shape[1]).expand_as(first), use_cache=False)
        self.notes["fxstore"] = f"one-time export {time.perf_counter() - start:.1f} s (not in the rate)"

    def fxstore(self, k: int) -> float:
        out = self.root / f"fx-{k}"
        docs = self.ids.tolist()
        start = time.perf_counter()
        fxstore.extract_dataset(self.extractor, None, docs, out, tokenizer=self.tok, batch_size=self.args.batch_size,
                                shard_size=self.args.batch_size * self.args.context * 2, progress=False)
        elapsed = time.perf_counter() - start
        self.bytes_per_token["fxstore"] = _size(out) / self.tokens
        if k == 0:
            self._verify(out)
        shutil.rmtree(out)
        return elapsed

    def _verify(self, out: Path) -> None:
        rows = fxstore.load_features(out)
        n = self.args.context
        with torch.inference_mode():
            states = self.model(input_ids=self.ids[:1], output_hidden_states=True).hidden_states
        same = all(torch.equal(rows[name][:n], states[i + 1][0].bfloat16()) or torch.allclose(
            rows[name][:n].float(), states[i + 1][0].bfloat16().float(), atol=2e-2, rtol=2e-2)
            for name, i in zip(self.layers, self.args.layers))
        self.notes["fxstore"] += "; rows match hidden_states" if same else "; ROWS DIFFER from hidden_states"

    def lens_setup(self) -> None:
        from transformer_lens import HookedTransformer, HookedTransformerConfig

        cfg = HookedTransformerConfig(n_layers=self.args.n_layer, d_model=self.args.d_model, d_head=64,
                                      n_heads=self.args.d_model // 64, d_mlp=4 * self.args.d_model,
                                      d_vocab=self.args.vocab, n_ctx=max(self.args.context, 128), act_fn="gelu_new",
                                      normalization_type="LN", device="cpu", seed=0)
        self.lens_model = HookedTransformer(cfg).eval()
        self.hooks = [f"blocks.{i}.hook_resid_post" for i in self.args.layers]

    def lens(self, k: int) -> float:
        out = self.root / f"lens-{k}"
        out.mkdir()
        start = time.perf_counter()
        with torch.inference_mode():
            for b, batch in enumerate(self.batches()):
                _, cache = self.lens_model.run_with_cache(batch, names_filter=self.hooks)
                rows = {name: cache[h].flatten(0, 1).bfloat16().contiguous() for name, h in zip(self.layers, self.hooks)}
                rows["token_id"] = batch.flatten().to(torch.int32)
                save_file(rows, out / f"batch-{b:05d}.safetensors")
        elapsed = time.perf_counter() - start
        self.bytes_per_token["TransformerLens"] = _size(out) / self.tokens
        shutil.rmtree(out)
        return elapsed

    def saelens_setup(self) -> None:
        import datasets
        import sae_lens  # noqa: F401

        self.token_table = datasets.Dataset.from_dict({"input_ids": self.ids.tolist()})

    def saelens(self, k: int) -> float:
        from sae_lens import CacheActivationsRunner, CacheActivationsRunnerConfig

        elapsed, size = 0.0, 0
        for layer in self.layers:  # one hook point per pass
            out = self.root / f"sae-{k}-{layer}"
            cfg = CacheActivationsRunnerConfig(
                dataset_path=str(self.root / "unused"), model_name=str(self.folder),
                model_class_name="AutoModelForCausalLM", hook_name=layer, d_in=self.args.d_model,
                training_tokens=self.tokens, context_size=self.args.context, model_batch_size=self.args.batch_size,
                new_cached_activations_path=str(out), shuffle=False, dtype="float16", device="cpu",
                prepend_bos=False, buffer_size_gb=(self.tokens + 0.5) * self.args.d_model * 2 / 1e9)  # one buffer
            runner = CacheActivationsRunner(cfg, override_dataset=self.token_table)
            start = time.perf_counter()
            runner.run()
            elapsed += time.perf_counter() - start
            size += _size(out)
            shutil.rmtree(out)
        self.bytes_per_token["SAELens"] = size / self.tokens
        self.notes["saelens"] = "float16: its arrow writer has no bfloat16; one hook per pass, 2 passes"
        return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-layer", type=int, default=12)
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--layers", type=int, nargs="+", default=[6, 8])
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--contenders", default="plain,fxstore,lens,saelens")
    parser.add_argument("--quick", action="store_true", help="tiny model, one repeat (smoke run)")
    args = parser.parse_args(argv)
    if args.quick:
        args.n_layer, args.d_model, args.vocab, args.layers = 3, 64, 512, [0, 1]
        args.context, args.batch_size, args.batches, args.repeats = 32, 2, 2, 1
    root = Path(tempfile.mkdtemp(prefix="fxstore-bench-text-"))
    try:
        bench = Bench(args, root)
        names = {"plain": "plain HF forward", "fxstore": "fxstore", "lens": "TransformerLens", "saelens": "SAELens"}
        chosen = [c.strip() for c in args.contenders.split(",") if c.strip()]
        runs: dict[str, Callable[[int], float]] = {}
        failed: dict[str, str] = {}
        for c in chosen:
            setup = getattr(bench, f"{c}_setup", None)
            try:
                if setup is not None:
                    setup()
                getattr(bench, c)(-1)  # warm-up run
                runs[c] = getattr(bench, c)
            except Exception as e:  # a contender that cannot run here is reported, not fatal
                traceback.print_exc()
                failed[c] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:150]
        times: dict[str, list[float]] = {c: [] for c in runs}
        for k in range(args.repeats):
            for c, run in runs.items():  # interleaved, so drift hits all
                times[c].append(run(k))
        rate = {c: bench.tokens / statistics.median(t) for c, t in times.items()}
        base = rate.get("plain")
        print(f"GPT-2 {args.n_layer} layers x {args.d_model}, vocab {args.vocab}, random weights; layers "
              f"{bench.layers} in bfloat16; {args.batches} batches x {args.batch_size} x {args.context} tokens "
              f"= {bench.tokens} tokens per run, {args.repeats} runs (median)")
        print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
              f"torch {torch.__version__}")
        print("\n| Contender | tokens/s | × plain | bytes/token | note |\n|---|---:|---:|---:|---|")
        for c in chosen:
            if c in failed:
                print(f"| {names[c]} | - | - | - | could not run: {failed[c]} |")
                continue
            ratio = f"{rate[c] / base:.2f}" if base else "-"
            size = bench.bytes_per_token.get(names[c] if c != "fxstore" else "fxstore")
            print(f"| {names[c]} | {rate[c]:.0f} | {ratio} | {'-' if size is None else f'{size:.0f}'} | "
                  f"{bench.notes.get(c, '')} |")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
