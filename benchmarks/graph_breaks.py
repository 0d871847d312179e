"""Graphs and graph breaks of a partially traced detection model under ``torch.compile``.

The figure for the partial frontend under compile (docs/capture.md) comes from this script's
recorded output (``benchmarks/results/graph-breaks-<date>-<commit>.json``)::

    python -m benchmarks.graph_breaks --save

It builds ``fasterrcnn_mobilenet_v3_large_320_fpn`` (random weights), an extractor with the
partial frontend, counts graphs and breaks with ``torch._dynamo.explain``, and checks that
the compiled (``aot_eager``) output and features equal the eager ones.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings

import torch
import torchvision
from torch.utils._pytree import tree_leaves

from fxstore import FeatureExtractor

from ._report import RESULTS, machine

__all__ = ["measure", "main"]

MODEL = "fasterrcnn_mobilenet_v3_large_320_fpn"
LAYERS = ("backbone.body", "rpn.head.conv", "roi_heads.box_head")


def measure(backend: str = "aot_eager") -> dict:
    """Graph count, break count and whether compiled results equal eager ones."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(MODEL, weights=None, weights_backbone=None, min_size=96, max_size=128).eval()
    x = [torch.rand(3, 96, 128)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ex = FeatureExtractor(model, list(LAYERS))
        with torch.no_grad():
            eager = ex(x)
            torch._dynamo.reset()
            explanation = torch._dynamo.explain(ex)(x)
            torch._dynamo.reset()
            compiled = torch.compile(ex, backend=backend)(x)
    a, b = tree_leaves(eager), tree_leaves(compiled)
    equal = len(a) == len(b) and all(torch.equal(p, q) for p, q in zip(a, b) if isinstance(p, torch.Tensor))
    return {"model": MODEL, "layers": list(LAYERS), "frontend": ex.trace_report.frontend, "backend": backend,
            "graphs": explanation.graph_count, "graph_breaks": explanation.graph_break_count,
            "compiled_equals_eager": equal}


def main(argv: list[str] | None = None) -> int:
    """Print the figures; with ``--save`` also record them in ``benchmarks/results``."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.graph_breaks", description=__doc__.splitlines()[0])
    parser.add_argument("--save", action="store_true", help="record the result in benchmarks/results")
    args = parser.parse_args(argv)
    result = measure()
    info = machine(torch.device("cpu"), torch.get_num_threads(),
                   "python -m benchmarks.graph_breaks" + (" --save" if args.save else ""))
    print(f"{result['model']} ({result['frontend']} frontend, {result['backend']}): {result['graphs']} graphs, "
          f"{result['graph_breaks']} breaks, compiled equals eager: {result['compiled_equals_eager']}")
    if args.save:
        path = RESULTS / f"graph-breaks-{info['date'].split(' ')[0]}-{info['commit'][:12]}.json"
        path.write_text(json.dumps({"machine": info, "result": result}, indent=2) + "\n")
        print(f"saved {path}", file=sys.stderr)
    return 0 if result["compiled_equals_eager"] else 1


if __name__ == "__main__":
    sys.exit(main())
