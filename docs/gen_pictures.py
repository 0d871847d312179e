"""Generate the pictures the documentation shows, from code: ``python docs/gen_pictures.py OUTDIR``.

Writes, into ``OUTDIR`` (created if needed):

* ``resnet18_graph.svg``: a resnet18 extractor's captured graph at depth 1 (``layer2`` stored,
  ``layer1``'s gradient tapped, ``layer2.0`` edited, everything after ``layer3`` pruned);
* ``gpt2_graph.svg``: a tiny GPT-2 (2 blocks, random weights) through the export frontend at depth 2;
* ``patching.svg``: a ``fxstore.patch_sweep`` grid of that GPT-2, drawn by ``fxstore.plot_patching``;
* ``features.png``: 16 channels of resnet18's ``layer1`` on a synthetic image (``fxstore.plot_features``).

Everything is seeded and needs no download (random weights, made-up tokens); it takes a few
seconds on a CPU. The ``dot`` binary (Debian package ``graphviz``) must be on ``PATH``.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import torch
import torchvision

import fxstore

WORDS = ["<|endoftext|>", "When", " Mary", " and", " John", " went", " to", " the", " store", ",", " John",
         " gave", " a", " drink", " to"]


def resnet_graph(out: Path) -> None:
    model = torchvision.models.resnet18().eval()
    ex = fxstore.FeatureExtractor(model, ["layer2", "layer3"], grads=["layer1"], keep_output=False,
                                  edits={"layer2.0": fxstore.Scale(0.5)})
    with torch.no_grad():
        _, features = ex(torch.rand(1, 3, 224, 224))
    ex.draw(out / "resnet18_graph.svg", depth=1, features=features, direction="LR")


def tiny_gpt2() -> torch.nn.Module:
    import transformers

    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=len(WORDS) + 5, n_positions=32,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).eval()


def gpt2_graph(out: Path, model: torch.nn.Module, ids: torch.Tensor) -> None:
    ex = fxstore.FeatureExtractor(model, ["transformer.h.0", "transformer.h.1.mlp"], grads=["transformer.h.1.attn"],
                                  edits={"transformer.h.0.attn": fxstore.Add(torch.zeros(32))},
                                  example_inputs=((ids,), {}))
    ex.draw(out / "gpt2_graph.svg", depth=2)


def patching(out: Path, model: torch.nn.Module, ids: torch.Tensor) -> None:
    corrupted = ids.clone()
    corrupted[0, 1], corrupted[0, 3] = ids[0, 3], ids[0, 1]  # swap the two names
    layers = ["transformer.h.0", "transformer.h.1"]
    positions = list(range(ids.shape[1]))
    answer, other = int(ids[0, 1]), int(ids[0, 3])  # " Mary" against " John"

    def logit_difference(output: object) -> torch.Tensor:
        return output.logits[:, -1, answer] - output.logits[:, -1, other]

    with torch.no_grad():
        baseline = logit_difference(model(corrupted))  # each cell: the change a patch makes (0: none)
    grid = fxstore.patch_sweep(model, ids, corrupted, layers, lambda output: logit_difference(output) - baseline,
                               positions=positions)
    tokens = [WORDS[i] for i in ids[0].tolist()]
    figure = fxstore.plot_patching(grid, layers, positions=positions, tokens=tokens)
    figure.savefig(out / "patching.svg")  # random weights: the picture shows the layout, not a finding


def features(out: Path) -> None:
    model = torchvision.models.resnet18().eval()
    side = torch.linspace(-1, 1, 128)
    rings = torch.sin(12 * (side[:, None] ** 2 + side[None, :] ** 2).sqrt())  # a synthetic image: rings
    image = torch.stack([rings, rings.flip(0), rings.flip(1)])[None]
    with torch.no_grad():
        _, feats = fxstore.FeatureExtractor(model, ["layer1"], keep_output=False)(image)
    fxstore.plot_features(feats["layer1"][0], channels=16, title="resnet18 layer1").savefig(out / "features.png",
                                                                                            dpi=100)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="directory to write the pictures to")
    out = parser.parse_args(argv).out
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    resnet_graph(out)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = tiny_gpt2()
    ids = torch.arange(1, len(WORDS))[None]
    gpt2_graph(out, model, ids)
    patching(out, model, ids)
    features(out)
    for path in sorted(out.iterdir()):
        print(f"wrote {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
