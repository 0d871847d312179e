"""``fxstore draw``: draw what an extractor captures from a model (stored, tapped, edited, pruned).

Examples::

    fxstore draw resnet50 --layers layer3 layer4 --depth 1 --out graph.svg
    fxstore draw resnet18 --layers layer2 --grads layer1 --features-only --out cut.png
    fxstore draw hf:./gpt2 --layers transformer.h.6 --depth 3 --out gpt2.pdf
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from ._export_cmd import model_and_input

__all__ = ["add_parser", "run"]


def add_parser(commands: Any, model_help: str, positive: Any, natural: Any) -> None:
    """Register the ``draw`` command on the ``fxstore`` subparsers."""
    p = commands.add_parser("draw", help="draw the captured graph: stored nodes, gradient taps, the pruned part")
    p.add_argument("model", help=model_help + ", or hf:DIR")
    p.add_argument("--layers", nargs="+", default=[], metavar="LAYER",
                   help="node names, module names or glob patterns to store (see 'fxstore nodes')")
    p.add_argument("--grads", nargs="+", default=[], metavar="LAYER", help="layers whose gradients are tapped")
    p.add_argument("--out", required=True, metavar="FILE", type=_picture,
                   help="picture to write: .svg, .png, .pdf (or .dot, .gv: the graphviz source)")
    p.add_argument("--depth", type=natural, metavar="N", help="collapse modules deeper than N levels "
                   "(default: every node)")
    p.add_argument("--features-only", action="store_true", help="keep_output=False: show the part that is cut")
    p.add_argument("--direction", choices=("TB", "LR"), default="TB", help="top to bottom or left to right "
                   "(default: TB)")
    p.add_argument("--weights", metavar="FILE", help="local state_dict file (default: random weights)")
    p.add_argument("--image-size", type=positive, default=224, help="side of the example image (default: 224)")
    p.add_argument("--seq-len", type=positive, default=16, help="tokens of the example input of hf: models "
                   "(default: 16)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: 0)")
    p.set_defaults(run=run, batch_size=1)


def _picture(text: str) -> str:
    from ..draw import FORMATS

    if Path(text).suffix.lower().lstrip(".") not in FORMATS:
        raise argparse.ArgumentTypeError(f"{text!r} does not end in " + ", ".join(f".{f}" for f in FORMATS))
    return text


def run(args: argparse.Namespace) -> int:
    """Build the extractor, run it once on an example (for the shapes), draw it, say what was drawn."""
    from ..capture import FeatureExtractor

    model, example = model_and_input(args)
    ex = FeatureExtractor(model, list(args.layers), grads=list(args.grads) or None,
                          keep_output=not args.features_only, example_inputs=example)
    with torch.no_grad():
        _, features = ex(*example)
    ex.draw(args.out, depth=args.depth, features=features, direction=args.direction)
    nodes = ex.graph_description.nodes
    counts = {what: sum(1 for n in nodes if test(n)) for what, test in (
        ("stored", lambda n: n.keys), ("tapped", lambda n: n.grad_keys), ("pruned", lambda n: n.pruned))}
    print(f"wrote {args.out}: {ex.trace_report.frontend} frontend, " + ", ".join(
        f"{count} {what}" for what, count in counts.items()) + " nodes")
    return 0
