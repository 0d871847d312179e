"""``make demo``: the ``fxstore`` command line on an embedded default.

A random-weight resnet18 on a synthetic source (``fake:N``), written to a temporary
folder: the node table (an excerpt), the extraction with its progress bar, the manifest,
and how to load the result. Then a language model: a tiny random GPT-2 with a tokenizer
trained on the spot, saved with ``save_pretrained``, run over a ``.jsonl`` corpus with one
row per token, and generation with and without a steering vector (``fxstore.steering_vectors``
from contrastive pairs), eager and compiled, with the compiled run's graph count. Extra arguments replace the default extraction arguments,
e.g. ``python -m tools.demo extract resnet50 --layers layer4 --data fake:64 --out /tmp/x``.
"""

from __future__ import annotations

import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from fxstore.cli import main as cli

__all__ = ["main"]

MODEL = "resnet18"
LAYERS = ("layer2", "layer3", "layer4", "fc")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo (or, given arguments, the command line with them); return the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv:
        return cli(argv)
    with tempfile.TemporaryDirectory(prefix="fxstore-demo-") as tmp:
        out = Path(tmp) / "features"
        steps = [
            ["nodes", MODEL, "--shapes", "--image-size", "64", "--filter", "layer4.1.*"],
            ["extract", MODEL, "--layers", *LAYERS, "--pool", "avg", "--dtype", "float16", "--data", "fake:512",
             "--image-size", "64", "--batch-size", "64", "--shard-size", "256", "--out", str(out)],
        ]
        for step in steps:
            print(f"\n$ fxstore {' '.join(step)}", flush=True)
            status = cli(step)
            if status:
                return status
        print(f"\n$ cat {out / 'manifest.json'}  (abridged)")
        manifest = json.loads((out / "manifest.json").read_text())
        manifest.pop("identity")
        print(json.dumps(manifest, indent=2))
        print("\n# load it (lazy, rows in sample order):")
        print(f">>> feats = fxstore.load_features({str(out)!r})")
        from fxstore import load_features

        feats = load_features(out)
        print(">>> {k: v.shape for k, v in feats.items()}")
        print({k: v.shape for k, v in feats.items()})
        print("# or without fxstore: safetensors.torch.load_file(...) on each shard in manifest['shards']")
        return _text_demo(Path(tmp))


TEXT = ("the cat sat on the mat", "a dog ran after the cat", "birds sang in the tall green trees",
        "the old stone wall stood near the trees", "a cat and a dog sat in the sun")


def _tiny_language_model(folder: Path) -> None:
    """A random 3-block GPT-2 and a WordLevel tokenizer trained on :data:`TEXT`, saved in ``folder``."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(TEXT, trainers.WordLevelTrainer(special_tokens=["[UNK]", "<|endoftext|>"]))
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]",
                                                     eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        config = transformers.GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=3, n_head=2, n_positions=64,
                                         bos_token_id=1, eos_token_id=1)
        transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _text_demo(tmp: Path) -> int:
    try:
        import transformers  # noqa: F401
    except ImportError:
        print("\n(skipping the language-model demo: pip install transformers)")
        return 0
    from fxstore.cli.hf import no_progress_bars

    model, corpus, out = tmp / "tiny-gpt2", tmp / "corpus.jsonl", tmp / "acts"
    with no_progress_bars():
        _tiny_language_model(model)
    corpus.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(TEXT * 40)))
    print(f"\n# a language model: a random 3-block GPT-2 saved with save_pretrained in {model}, "
          f"{len(TEXT) * 40} documents in {corpus.name}")
    step = ["extract", f"hf:{model}", "--layers", "transformer.h.1", "transformer.h.2", "--data", str(corpus),
            "--text-field", "text", "--max-length", "32", "--dtype", "bfloat16", "--shuffle", "0", "--out", str(out)]
    print(f"\n$ fxstore {' '.join(step)}", flush=True)
    status = cli(step)
    if status:
        return status
    from fxstore import load_features

    acts = load_features(out)
    print(f">>> acts = fxstore.load_features({str(out)!r})  # one row per real token, shuffled")
    print({k: (v.shape, str(v.dtype)) for k, v in acts.items()})
    print(">>> acts['token_id'][:5], acts['sequence'][:5], acts['position'][:5]")
    print(acts["token_id"][:5], acts["sequence"][:5], acts["position"][:5])
    print("# train on it: for batch in fxstore.BatchLoader(out, batch_size=4096): ...")
    return _generation_demo(model)


POSITIVE = ("the cat sat on the mat", "a cat and a dog sat in the sun")
NEGATIVE = ("birds sang in the tall green trees", "the old stone wall stood near the trees")


def _generation_demo(folder: Path) -> int:
    import torch
    import transformers

    import fxstore
    from fxstore.cli.hf import no_progress_bars

    with no_progress_bars():
        model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    tokenizer.pad_token, tokenizer.padding_side = tokenizer.eos_token, "left"
    site, read = "transformer.h.1", "transformer.h.2"
    vector = fxstore.steering_vectors(model, list(POSITIVE), list(NEGATIVE), [site], tokenizer=tokenizer)[site]
    print(f"\n# generation: fxstore.steering_vectors for {site} (the mean difference of its last-token outputs on "
          f"{POSITIVE} vs {NEGATIVE}), |v| = {vector.norm():.2f}")
    prompts = tokenizer(["the dog", "birds sang in the"], return_tensors="pt", padding=True)
    greedy = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
    ex = fxstore.FeatureExtractor(model, [read], edits={site: fxstore.Add(vector, scale=8.0)})
    print(f">>> ex = fxstore.FeatureExtractor(model, [{read!r}], edits={{{site!r}: fxstore.Add(v, scale=8.0)}})")
    plain = model.generate(**prompts, **greedy)
    out = ex.generate(**prompts, **greedy)
    for name, tokens in (("model.generate (plain)", plain), ("ex.generate (steered)", out.sequences)):
        print(f"{name:24s}", tokenizer.batch_decode(tokens, skip_special_tokens=True))
    print(f">>> out.features[{read!r}].shape  # every position, prompt and generated")
    print(tuple(out.features[read].shape))
    counters = torch._dynamo.utils.counters["stats"]
    ex.compile(backend="aot_eager")  # inductor works the same, at a longer compile
    compiled = ex.generate(**prompts, **greedy)
    graphs = counters["unique_graphs"]
    print(f"\n>>> ex.compile(backend='aot_eager'); ex.generate(...)  # same tokens: "
          f"{torch.equal(compiled.sequences, out.sequences)}; dynamo graphs: {graphs} (prompt + decode step)")
    for scale, positions in ((16.0, "all"), (8.0, "generated"), (0.0, [2, 5])):
        ex.edits[site].update(scale=scale)
        steered = ex.generate(**prompts, edit_positions=positions, **greedy)
        print(f"scale={scale:4.1f} edit_positions={positions!s:9s}", tokenizer.batch_decode(steered.sequences,
                                                                                          skip_special_tokens=True))
    print(f"# dynamo graphs after 3 new scales and position choices: {counters['unique_graphs']} "
          f"({counters['unique_graphs'] - graphs} new)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
