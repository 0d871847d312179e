"""``fxstore extract hf:DIR ... --data corpus.jsonl``: token rows from a local Hugging Face model."""

from __future__ import annotations

import argparse

from ..errors import ConfigError

__all__ = ["extract_text_command"]

_IMAGE_ONLY = {"pool": "none", "weights": None}


def extract_text_command(args: argparse.Namespace, command: str, main: bool) -> int:
    """Run the text extraction the parsed ``args`` describe; print a summary on rank 0."""
    from ..dataset import extract_dataset
    from .hf import load_hf
    from .sources import is_text_source, open_text_source

    for name, default in _IMAGE_ONLY.items():
        if getattr(args, name) != default:
            raise ConfigError(f"--{name} does not apply to hf: models.\n"
                              "Hint: the weights come from the model folder; token rows are not pooled.")
    if not is_text_source(args.data):
        raise ConfigError(f"data source '{args.data}' is not text for model '{args.model}'.\n"
                          "Hint: pass a .txt, .jsonl or .parquet file, or a datasets save_to_disk folder.")
    model, tokenizer = load_hf(args.model, args.tokenizer)
    data = open_text_source(args.data)
    result = extract_dataset(
        model, args.layers, data, args.out, format=args.format, dtype=args.dtype, batch_size=args.batch_size,
        shard_size=args.shard_size, device=args.device, overlap=None if args.overlap == "auto" else args.overlap == "on",
        progress=not args.quiet, overwrite=args.overwrite, model_name=args.model, data_name=args.data,
        command=command, tokenizer=tokenizer, text_field=args.text_field, max_length=args.max_length,
        context_length=args.context_length, shuffle=args.shuffle, skip_special=args.skip_special,
    )
    if not args.quiet and main:
        text = result["text"]
        shapes = ", ".join(f"{k} {tuple(v['shape'])} {v['dtype']}" for k, v in result["features"].items())
        print(f"wrote {result['num_samples']} token rows of {text['num_sequences']} sequences to {args.out} "
              f"({result['format']}): {shapes}")
        print(f"load with: fxstore.load_features({str(args.out)!r})")
    return 0
