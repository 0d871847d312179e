"""``make demo``: the ``fxstore`` command line on an embedded default.

A random-weight resnet18 on a synthetic source (``fake:N``), written to a temporary
folder: the node table (an excerpt), the extraction with its progress bar, the manifest,
and how to load the result. Extra arguments replace the default extraction arguments,
e.g. ``python -m fxstore.demo extract resnet50 --layers layer4 --data fake:64 --out /tmp/x``.
"""

from __future__ import annotations

import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from .cli._main import main as cli

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
        from .dataset.reader import load_features

        feats = load_features(out)
        print(">>> {k: v.shape for k, v in feats.items()}")
        print({k: v.shape for k, v in feats.items()})
        print("# or without fxstore: safetensors.torch.load_file(...) on each shard in manifest['shards']")
    return 0


if __name__ == "__main__":
    sys.exit(main())
