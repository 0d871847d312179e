"""The ``fxstore`` command: list a model's nodes, extract a dataset's features, generate text, show a result.

Examples::

    fxstore nodes resnet50 --shapes --filter 'layer4.*'
    fxstore extract resnet50 --layers layer3 layer4 --pool avg --data images/ --out feats/
    torchrun --nproc-per-node 2 -m fxstore extract resnet50 --layers layer4 --data fake:1000 --out feats/
    fxstore info feats/
    fxstore verify feats/
    fxstore export resnet50 --layers layer3 layer4 --pool avg --format onnx --out feats.onnx
    fxstore draw resnet50 --layers layer3 layer4 --depth 1 --out graph.svg
    fxstore generate hf:gpt2-dir --prompt "the cat" --max-new-tokens 20 --add transformer.h.6=happy.pt:4

Errors in the arguments or the inputs print one line (``fxstore extract: error: ...``)
and exit with status 2 (usage) or 1 (anything else fxstore refuses).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from ..dataset import FORMATS
from ..errors import FxStoreError
from . import _draw_cmd, _export_cmd, _generate_cmd, _stats_cmd
from ._node_table import format_table, node_rows
from .hints import flag_hint

__all__ = ["main"]

_DTYPES = ("float32", "float16", "bfloat16", "float64")
_POOLS = ("none", "avg", "max", "flatten")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fxstore", description="Capture layer outputs of PyTorch models with torch.fx.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    model_help = "torchvision name (resnet50), timm:NAME, hf:DIR (local Hugging Face folder), or package.module:factory"
    nodes = commands.add_parser("nodes", help="list the selectable nodes of a model")
    nodes.add_argument("model", help=model_help)
    nodes.add_argument("--filter", metavar="PATTERN", help="glob over node names, e.g. 'layer4.*'")
    nodes.add_argument("--shapes", action="store_true", help="show output shapes (runs a dummy input)")
    nodes.add_argument("--input-shape", type=int, nargs="+", metavar="N", help="dummy input shape without batch axis "
                       "(default: 3 SIZE SIZE)")
    nodes.add_argument("--image-size", type=_positive, default=224, help="side of the dummy image (default: 224)")
    nodes.add_argument("--weights", metavar="FILE", help="local state_dict file (default: random weights)")
    nodes.set_defaults(run=_nodes)

    extract = commands.add_parser("extract", help="write the features of a dataset to a folder")
    extract.add_argument("model", help=model_help)
    extract.add_argument("--layers", nargs="+", required=True, metavar="LAYER",
                         help="node names, module names or glob patterns (see 'fxstore nodes')")
    extract.add_argument("--data", required=True, metavar="SOURCE", help="image folder, file.npy or fake:N; text: .txt, .jsonl, .parquet or a datasets folder")
    extract.add_argument("--out", required=True, metavar="DIR", help="output folder (resumed if interrupted)")
    extract.add_argument("--format", choices=FORMATS, default="safetensors", help="default: safetensors")
    extract.add_argument("--pool", choices=_POOLS, default="none", help="reduce each layer in the graph (default: none)")
    extract.add_argument("--dtype", choices=_DTYPES, help="stored dtype (default: the layer's)")
    extract.add_argument("--batch-size", type=_positive, default=64, help="default: 64")
    extract.add_argument("--shard-size", type=_positive, help="samples per shard (default: 1024; text: 16384 tokens)")
    extract.add_argument("--image-size", type=_positive, default=224, help="image side (default: 224)")
    extract.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ... (default: cpu)")
    extract.add_argument("--num-workers", type=_natural, default=0, help="data loader processes (default: 0)")
    extract.add_argument("--weights", metavar="FILE", help="local state_dict file (default: random weights)")
    extract.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: 0)")
    extract.add_argument("--overwrite", action="store_true", help="start over instead of resuming")
    extract.add_argument("--overlap", choices=("auto", "on", "off"), default="auto",
                         help="write in a background thread during the next batch (default: auto = on for CUDA)")
    extract.add_argument("--quiet", "-q", action="store_true", help="no progress bar, no summary")
    text = extract.add_argument_group("text (hf:DIR models: one row per token)")
    text.add_argument("--tokenizer", metavar="DIR", help="tokenizer folder (default: the model folder)")
    text.add_argument("--text-field", metavar="NAME", help="text column of .jsonl/.parquet/datasets data "
                      "(default: text, else input_ids)")
    text.add_argument("--max-length", type=_positive, metavar="N", help="tokens kept per document "
                      "(default: the model's maximum)")
    text.add_argument("--context-length", type=_positive, metavar="N", help="concatenate documents and cut "
                      "windows of N tokens (no padding)")
    text.add_argument("--shuffle", type=_natural, metavar="SEED", help="write the rows in a seeded random order")
    text.add_argument("--skip-special", action="store_true", help="store no BOS/EOS/CLS/SEP rows")
    extract.set_defaults(run=_extract)

    _export_cmd.add_parser(commands, model_help, _POOLS, _DTYPES, _positive)
    _draw_cmd.add_parser(commands, model_help, _positive, _natural)
    _stats_cmd.add_parsers(commands, model_help, _POOLS, _DTYPES, _positive, _natural)
    _generate_cmd.add_parser(commands, _positive, _natural)

    info = commands.add_parser("info", help="show the manifest of an output folder and whether it verifies, "
                                            "or an exported artifact's metadata")
    info.add_argument("out", metavar="DIR|FILE")
    info.add_argument("--quick", action="store_true", help="check sizes and headers only, not checksums")
    info.set_defaults(run=_info)

    verify = commands.add_parser("verify", help="check every file of an output folder against its checksums")
    verify.add_argument("out", metavar="DIR")
    verify.set_defaults(run=_verify)
    return parser


def _positive(text: str) -> int:
    value = _natural(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def _natural(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is negative")
    return value


def _nodes(args: argparse.Namespace) -> int:
    from .models import load_model

    model = load_model(args.model, args.weights)
    shape = None
    if args.shapes:
        shape = (1, *(args.input_shape or (3, args.image_size, args.image_size)))
    example = None
    if args.model.startswith("hf:"):  # fx cannot trace most transformers: capture them from token ids
        import torch

        vocab = int(getattr(getattr(model, "config", None), "vocab_size", 2) or 2)
        example = (torch.randint(0, vocab, (1, 8), generator=torch.Generator().manual_seed(0)),)
    rows = node_rows(model, args.filter, None if example is not None else shape, example)
    if not rows:
        raise FxStoreError(f"no node of '{args.model}' matches '{args.filter}'.\nHint: try --filter '*relu*'.")
    print(format_table(rows if args.shapes else [r[:2] for r in rows],
                       ("node", "kind", "shape") if args.shapes else ("node", "kind")))
    return 0


def _extract(args: argparse.Namespace) -> int:
    from ..dataset import extract_dataset
    from .models import load_model
    from .sources import describe_source, open_source

    _check_device(args.device)
    if args.model.startswith("hf:"):
        from ._text_command import extract_text_command

        return extract_text_command(args, _command(args.argv), _is_main())
    model = load_model(args.model, args.weights, seed=args.seed)
    data = open_source(args.data, image_size=args.image_size)
    result = extract_dataset(
        model, args.layers, data, args.out, format=args.format, reduce=args.pool, dtype=args.dtype,
        batch_size=args.batch_size, shard_size=args.shard_size, device=args.device, num_workers=args.num_workers,
        overlap=None if args.overlap == "auto" else args.overlap == "on", progress=not args.quiet,
        overwrite=args.overwrite,
        model_name=args.model, data_name=describe_source(args.data, args.image_size), command=_command(args.argv),
    )
    if not args.quiet and _is_main():
        shapes = ", ".join(f"{k} {tuple(v['shape'])} {v['dtype']}" for k, v in result["features"].items())
        print(f"wrote {result['num_samples']} samples to {args.out} ({result['format']}): {shapes}")
        print(f"load with: fxstore.load_features({str(args.out)!r})")
    return 0


def _check_device(name: str) -> None:
    """Refuse a device this machine does not have before the model is even loaded."""
    from ..capture import parse_device

    parse_device(name)


def _info(args: argparse.Namespace) -> int:
    from ..dataset import read_manifest, verify_folder

    if os.path.isfile(args.out):
        return _export_cmd.info(args.out)

    manifest: dict[str, Any] = dict(read_manifest(args.out))
    problems = verify_folder(args.out, manifest, checksums=not args.quick)
    manifest.pop("identity", None)
    manifest["verified"] = ("structure only (--quick)" if args.quick else True) if not problems else False
    if problems:
        manifest["problems"] = problems
    print(json.dumps(manifest, indent=2))
    return 0


def _verify(args: argparse.Namespace) -> int:
    from ..dataset import data_files, read_manifest, verify_folder

    manifest = read_manifest(args.out)
    problems = verify_folder(args.out, manifest)
    files = data_files(manifest)
    if problems:
        for problem in problems:
            print(f"BAD {problem}")
        found = f"{len(problems)} problem" + ("s" if len(problems) != 1 else "")
        print(f"fxstore verify: error: {found} in {args.out} ({files} data files). "
              "Hint: run the same extraction again: it recomputes what is damaged.", file=sys.stderr)
        return 1
    print(f"OK {args.out}: {files} data files, {manifest['num_samples']} samples, every {manifest['checksum']} "
          "checksum matches")
    return 0


def _is_main() -> bool:
    return os.environ.get("RANK", "0") == "0"  # torchrun's global rank


def _command(argv: Sequence[str]) -> str:
    return shlex.join(["fxstore", *argv])


def _one_line(error: str | BaseException) -> str:
    return " ".join(line.strip() for line in str(error).splitlines() if line.strip())


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``fxstore`` command line; return the exit status.

    Args:
        argv: Arguments without the program name (default: ``sys.argv[1:]``).

    Example:
        >>> from fxstore.cli import main
        >>> main(["nodes", "resnet18", "--filter", "layer4.1.relu*"])
        node             kind
        layer4.1.relu    ReLU
        layer4.1.relu_1  ReLU
        0
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    args.argv = argv
    started = time.time_ns()
    try:
        status = args.run(args)
        sys.stdout.flush()  # a closed pipe shows here, not as a message at exit
        return status
    except BrokenPipeError:  # the reader of our output left (fxstore info DIR | head): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except (FxStoreError, OSError) as e:  # refused input, unreadable data file
        print(f"fxstore {args.command}: error: {_one_line(flag_hint(str(e)))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if args.command == "extract" and _finished_since(args.out, started):
            print(f"fxstore extract: interrupted after the extraction finished: {args.out} is complete.",
                  file=sys.stderr)
            return 0
        print(f"fxstore {args.command}: interrupted; run the same command again to resume.", file=sys.stderr)
        return 130


def _finished_since(out: Any, started: int) -> bool:
    """Whether ``out`` holds a valid manifest written by this command (after ``started``, in ns)."""
    from ..dataset import read_manifest
    from ..dataset.folder.names import MANIFEST

    try:
        written = (Path(out) / MANIFEST).lstat().st_mtime_ns
        read_manifest(out)
    except (OSError, FxStoreError, KeyboardInterrupt):
        return False
    return written >= started

if __name__ == "__main__":
    sys.exit(main())
