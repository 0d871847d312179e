"""``fxstore export``: write a model's extractor as an ONNX file, an AOTInductor package or a torch.export archive.

Examples::

    fxstore export resnet50 --layers layer3 layer4 --pool avg --format onnx --out feats.onnx
    fxstore export resnet50 --weights resnet50.pt --layers layer3 layer4 --format aoti --out feats.pt2
    fxstore export hf:./gpt2 --layers transformer.h.6 --format exported --out gpt2-h6.pt2
    fxstore export hf:./gpt2 --layers transformer.h.11 --steer transformer.h.6 --format onnx --out steered.onnx
    fxstore info feats.onnx
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch

from ..errors import ConfigError

__all__ = ["add_parser", "run", "info", "model_and_input"]

_HF = "hf:"


def add_parser(commands: Any, model_help: str, pools: tuple[str, ...], dtypes: tuple[str, ...], positive: Any) -> None:
    """Register the ``export`` command on the ``fxstore`` subparsers."""
    from ..capture import EXPORT_FORMATS as FORMATS

    p = commands.add_parser("export", help="write a deployable extractor (ONNX, AOTInductor, torch.export)")
    p.add_argument("model", help=model_help + ", or hf:DIR")
    p.add_argument("--layers", nargs="+", required=True, metavar="LAYER",
                   help="node names, module names or glob patterns (see 'fxstore nodes')")
    p.add_argument("--format", choices=FORMATS, required=True, help="artifact format")
    p.add_argument("--out", required=True, metavar="FILE", help="file to write (.onnx or .pt2)")
    p.add_argument("--weights", metavar="FILE", help="local state_dict file (default: random weights)")
    p.add_argument("--image-size", type=positive, default=224, help="side of the example image (default: 224)")
    p.add_argument("--seq-len", type=positive, default=16, help="tokens of the example input of hf: models "
                   "(default: 16)")
    p.add_argument("--batch-size", type=positive, default=2, help="batch of the example input (default: 2)")
    p.add_argument("--pool", choices=pools, default="none", help="reduce each layer in the graph (default: none)")
    p.add_argument("--dtype", choices=dtypes, help="stored dtype (default: the layer's)")
    p.add_argument("--keep-output", action="store_true", help="also return the model output (default: features only)")
    p.add_argument("--static", action="store_true", help="fix every input shape (default: dynamic batch, sequence, "
                   "image size where the model allows)")
    p.add_argument("--steer", nargs="+", default=[], metavar="LAYER",
                   help="add a steering vector (fxstore.Add, zeros) at each layer: the artifact takes it as inputs "
                   "edit_<layer>_vector, _scale and _enabled after the model's (default: none)")
    p.add_argument("--no-verify", action="store_true", help="skip running the artifact against the eager extractor")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: 0)")
    p.set_defaults(run=run)


def model_and_input(args: argparse.Namespace) -> tuple[torch.nn.Module, tuple[Any, ...]]:
    """The model named by ``args.model`` and a seeded example input (``fxstore draw`` shares it)."""
    if args.model.startswith(_HF):
        try:
            from .hf import load_hf
        except ImportError as e:
            raise ConfigError(f"model '{args.model}' needs the hf: loader, which this fxstore does not have.\n"
                              "Hint: load the model in Python and call FeatureExtractor.export.") from e
        model, _ = load_hf(args.model, need_tokenizer=False)
        if args.weights is not None:
            raise ConfigError("--weights does not apply to hf: models (their folder holds the weights).\n"
                              "Hint: drop --weights.")
        vocab = int(getattr(model.config, "vocab_size", 2) or 2)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(args.seed)
            ids = torch.randint(0, vocab, (args.batch_size, args.seq_len))
        return model, (ids,)
    from .models import load_model

    model = load_model(args.model, args.weights, seed=args.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        x = torch.rand(args.batch_size, 3, args.image_size, args.image_size)
    return model, (x,)


def run(args: argparse.Namespace) -> int:
    """Build the extractor, export it, verify it, and print what was written."""
    from ..capture import FeatureExtractor, export_extractor
    from ..dataset import REDUCTIONS

    model, example = model_and_input(args)
    ex = FeatureExtractor(model, list(args.layers), keep_output=args.keep_output, detach=True,
                          transform=REDUCTIONS[args.pool], dtype=args.dtype, example_inputs=example,
                          edits=_steering(model, args.steer, example))
    report = export_extractor(ex, args.out, example, args.format, dynamic=not args.static,
                              verify=not args.no_verify, model_name=args.model)
    meta = report.metadata
    shapes = ", ".join(f"{k} {_shape(v['shape'])} {v['dtype']}" for k, v in meta["features"].items())
    dynamic = ", ".join(f"{k} {lo}..{hi}" for k, (lo, hi) in meta["dynamic"].items()) or "none (static shapes)"
    print(f"wrote {args.format} {args.out}: {shapes}")
    print(f"dynamic axes: {dynamic}")
    for edit in meta["edits"]:
        inputs = ", ".join(f"{i['name']} {_shape(i['shape'])} {i['dtype']}" for i in edit["inputs"])
        print(f"edit {edit['kind']} on {edit['key']}: inputs {inputs}")
    if report.max_diff is None:
        print("not verified (--no-verify)")
    else:
        print(f"verified against the eager extractor: max abs difference {report.max_diff:.3g}")
    return 0


def _steering(model: torch.nn.Module, layers: list[str], example: tuple[Any, ...]) -> dict[str, Any] | None:
    """A zero steering vector per layer: ``[channels, 1, 1]`` for an image map, ``[hidden]`` otherwise."""
    if not layers:
        return None
    from ..capture import Add, FeatureExtractor

    probe = FeatureExtractor(model, list(layers), keep_output=False, detach=True, example_inputs=example)
    with torch.no_grad():
        _, values = probe(*example)
    edits: dict[str, Any] = {}
    for layer in layers:
        value = values.get(layer, values.get(f"{layer}:0"))
        if not isinstance(value, torch.Tensor) or value.dim() < 2:
            raise ConfigError(f"--steer {layer}: the layer's value is {_described(value)}, not a batch of "
                              "features.\nHint: steer one module or node name whose output is a tensor "
                              "(see 'fxstore nodes').")
        shape = (value.shape[1], 1, 1) if value.dim() == 4 else (value.shape[-1],)
        edits[layer] = Add(torch.zeros(shape, dtype=value.dtype))
    return edits


def _described(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return "several values (a glob?)" if value is None else type(value).__name__


def info(path: str) -> int:
    """``fxstore info FILE``: print the metadata of an exported artifact."""
    from ..capture import read_metadata

    print(json.dumps(read_metadata(path), indent=2))
    return 0


def _shape(shape: list[Any]) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"
