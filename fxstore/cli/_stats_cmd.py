"""``fxstore stats`` (a dataset's feature statistics to a file) and ``fxstore fid`` (the Fréchet distance).

Examples::

    fxstore stats resnet50 --layers avgpool --data images/ --out ref.safetensors --top-k 16
    fxstore fid ref.safetensors generated.safetensors
    fxstore fid ref.safetensors generated/          # the model, layer and options come from ref's identity
    torchrun --nproc-per-node 2 -m fxstore stats resnet50 --layers avgpool --data fake:1000 --out ref.safetensors
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from ..errors import ConfigError

__all__ = ["add_parsers"]


def add_parsers(commands: Any, model_help: str, pools: tuple[str, ...], dtypes: tuple[str, ...], positive: Any,
                natural: Any) -> None:
    """Register the ``stats`` and ``fid`` commands on the ``fxstore`` subparsers."""
    p = commands.add_parser("stats", help="write a dataset's feature statistics (mean, covariance, top-k) to a file")
    p.add_argument("model", help=model_help)
    p.add_argument("--layers", nargs="+", required=True, metavar="LAYER",
                   help="node names, module names or glob patterns (see 'fxstore nodes')")
    p.add_argument("--data", required=True, metavar="SOURCE", help="image folder, file.npy or fake:N; "
                   "text (hf:DIR models): .txt, .jsonl, .parquet or a datasets folder")
    p.add_argument("--out", required=True, metavar="FILE", help="statistics file to write (.safetensors)")
    _model_options(p, pools, dtypes, positive, natural)
    p.add_argument("--top-k", type=natural, default=0, metavar="K", help="keep each unit's K largest values and "
                   "where they occurred (default: 0)")
    p.add_argument("--no-moments", action="store_true", help="skip the covariance (mean, firing and top-k only)")
    p.add_argument("--checkpoint", metavar="FILE", help="save progress here; the same command again resumes")
    p.add_argument("--shard-size", type=positive, help="samples per shard (default: 1024; text: 16384 tokens)")
    p.add_argument("--compile", action="store_true", help="run the extractor through torch.compile")
    text = p.add_argument_group("text (hf:DIR models: one row per token)")
    text.add_argument("--tokenizer", metavar="DIR", help="tokenizer folder (default: the model folder)")
    text.add_argument("--text-field", metavar="NAME", help="text column (default: text, else input_ids)")
    text.add_argument("--max-length", type=positive, metavar="N", help="tokens kept per document")
    text.add_argument("--context-length", type=positive, metavar="N", help="concatenate documents into windows")
    text.add_argument("--skip-special", action="store_true", help="leave out BOS/EOS/CLS/SEP rows")
    p.set_defaults(run=_stats)

    f = commands.add_parser("fid", help="the Fréchet distance between two statistics files (or a file and data)")
    f.add_argument("a", metavar="A", help="statistics file (from 'fxstore stats')")
    f.add_argument("b", metavar="B", help="statistics file, or a data source computed with A's model, layer and "
                   "options")
    f.add_argument("--layer", metavar="NAME", help="the layer, when the files hold several")
    _model_options(f, pools, dtypes, positive, natural, for_fid=True)
    f.set_defaults(run=_fid)


def _model_options(p: Any, pools: tuple[str, ...], dtypes: tuple[str, ...], positive: Any, natural: Any,
                   for_fid: bool = False) -> None:
    if not for_fid:
        p.add_argument("--pool", choices=pools, default="none", help="reduce each layer in the graph (default: none)")
        p.add_argument("--dtype", choices=dtypes, help="cast the features before reducing (default: the layer's)")
    p.add_argument("--batch-size", type=positive, default=64, help="default: 64")
    p.add_argument("--image-size", type=positive, default=224, help="image side (default: 224)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ... (default: cpu)")
    p.add_argument("--num-workers", type=natural, default=0, help="data loader processes (default: 0)")
    p.add_argument("--weights", metavar="FILE", help="local state_dict file (default: random weights)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: 0)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar, no summary")


def _compute(args: argparse.Namespace, model_name: str, layers: Any, options: dict[str, Any]) -> dict[str, Any]:
    """Run ``feature_statistics`` on ``args.data`` with ``model_name`` and ``options``."""
    from ..capture import parse_device
    from ..stats import feature_statistics
    from .models import load_model
    from .sources import describe_source, is_text_source, open_source, open_text_source

    parse_device(args.device)
    common = dict(batch_size=args.batch_size, device=args.device, num_workers=args.num_workers,
                  progress=not args.quiet, model_name=model_name, **options)
    if model_name.startswith("hf:"):
        from .hf import load_hf

        if not is_text_source(args.data):
            raise ConfigError(f"data source '{args.data}' is not text for model '{model_name}'.\n"
                              "Hint: pass a .txt, .jsonl or .parquet file, or a datasets save_to_disk folder.")
        model, tokenizer = load_hf(model_name, getattr(args, "tokenizer", None))
        return feature_statistics(model, layers, open_text_source(args.data), tokenizer=tokenizer,
                                  data_name=args.data, **common)
    model = load_model(model_name, args.weights, seed=args.seed)
    return feature_statistics(model, layers, open_source(args.data, image_size=args.image_size),
                              data_name=describe_source(args.data, args.image_size), **common)


def _stats(args: argparse.Namespace) -> int:
    from ..stats import save_all

    options = dict(top_k=args.top_k, moments=not args.no_moments, dtype=args.dtype, shard_size=args.shard_size,
                   compile=args.compile, checkpoint=args.checkpoint)
    if args.model.startswith("hf:"):
        options.update(text_field=args.text_field, max_length=args.max_length, context_length=args.context_length,
                       skip_special=args.skip_special)
        if args.pool != "none" or args.weights is not None:
            raise ConfigError("--pool and --weights do not apply to hf: models.\n"
                              "Hint: the weights come from the model folder; token rows are not pooled.")
    else:
        options["reduce"] = args.pool
    result = _compute(args, args.model, args.layers, options)
    if os.environ.get("RANK", "0") == "0":  # torchrun's global rank: one writer
        save_all(result, args.out)
        if not args.quiet:
            layers = ", ".join(f"{k} (D={s.dim})" for k, s in result.items())
            count = next(iter(result.values())).count
            print(f"wrote the statistics of {count} rows to {args.out}: {layers}")
            print(f"load with: fxstore.FeatureStatistics.load({str(args.out)!r}, layer=...)")
    return 0


def _fid(args: argparse.Namespace) -> int:
    from ..stats import FeatureStatistics, frechet_distance, load_all

    if args.layer is None and len(layers := load_all(args.a)) > 1:
        raise ConfigError(f"'{args.a}' holds the statistics of {sorted(layers)}.\n"
                          f"Hint: pass --layer, one of {sorted(layers)}.")
    a = FeatureStatistics.load(args.a, args.layer)
    if os.path.isfile(args.b):
        b = FeatureStatistics.load(args.b, args.layer or a.layer)
    else:
        b = _recompute(args, a)
    print(f"{frechet_distance(a, b):.6f}")
    return 0


def _recompute(args: argparse.Namespace, a: Any) -> Any:
    """The statistics of the data source ``args.b`` with the model, layer and options recorded in ``a``."""
    identity = a.identity
    model_name = identity.get("model", {}).get("name")
    if not model_name:
        raise ConfigError(f"'{args.a}' does not record the model it was computed with.\n"
                          "Hint: compute B with 'fxstore stats' and pass both files.")
    recorded = identity.get("options", {})
    layers = {label: alias for label, alias in identity.get("layers", [])}
    options = {"reduce": recorded.get("reduce"), "dtype": recorded.get("dtype"), "moments": True}
    text = recorded.get("text") or {}
    options.update({k: text[k] for k in ("text_field", "max_length", "context_length", "skip_special") if k in text})
    args.data = args.b
    b = _compute(args, model_name, layers, options)
    if a.layer not in b:
        raise ConfigError(f"layer '{a.layer}' of '{args.a}' is not among {sorted(b)}.\nHint: pass --layer.")
    if b[a.layer].identity["model"]["fingerprint"] != identity.get("model", {}).get("fingerprint"):
        raise ConfigError(f"the model '{model_name}' built now is not the one '{args.a}' was computed with "
                          "(other weights).\nHint: pass the same --weights and --seed, or compare two files.")
    return b[a.layer]
