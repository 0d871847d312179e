"""``fxstore generate``: a Hugging Face causal LM generates from prompts, steered and read by fxstore.

Examples::

    fxstore generate hf:gpt2-dir --prompt "the cat" --max-new-tokens 20
    fxstore generate hf:gpt2-dir --prompts-file prompts.txt --max-new-tokens 20 \\
        --add transformer.h.6=happy.pt:4 --layers transformer.h.10 --out feats.safetensors --compile

The prompts run in left-padded batches of ``--batch-size`` through
:meth:`fxstore.FeatureExtractor.generate` (built once: later batches reuse its programs); each
generated text (prompt and continuation, special tokens left out) is printed on stdout in prompt
order, one per line, as its batch finishes. ``--out`` writes every stored layer's values at every
position the model ran on (``[prompts, prompt_len + new_tokens - 1, ...]``) and the token ids
(``sequences``) of one batch to a safetensors file.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path
from typing import Any

from ..errors import ConfigError

__all__ = ["add_parser"]

_POSITIONS = ("all", "prompt", "generated")
_SEQUENCES = "sequences"


def add_parser(commands: Any, positive: Any, natural: Any) -> None:
    """Register the ``generate`` command on the ``fxstore`` subparsers."""
    p = commands.add_parser("generate", help="generate text with a Hugging Face causal LM (hf:DIR), steered by "
                                             "--add edits, storing --layers at every position")
    p.add_argument("model", help="hf:DIR (a local folder written by save_pretrained)")
    p.add_argument("--prompt", action="append", default=[], metavar="TEXT", help="a prompt (repeat for a batch)")
    p.add_argument("--prompts-file", metavar="FILE", help="more prompts, one per line (blank lines skipped)")
    p.add_argument("--max-new-tokens", type=positive, default=32, metavar="N", help="default: 32")
    p.add_argument("--layers", nargs="+", default=[], metavar="LAYER",
                   help="modules whose outputs are stored at every position, e.g. transformer.h.10 (needs --out)")
    p.add_argument("--add", action="append", default=[], metavar="LAYER=VEC[:SCALE]",
                   help="add SCALE (default 1) times the vector in VEC (.pt or .safetensors: a tensor, or a dict "
                        "holding LAYER, as fxstore.steering_vectors returns) to LAYER's output; repeatable")
    p.add_argument("--positions", choices=_POSITIONS, default="all",
                   help="where the --add edits apply (default: all, prompt and generated tokens)")
    p.add_argument("--out", metavar="FILE", help="write the stored layers and the token ids (.safetensors; the "
                                                 "prompts must fit one batch)")
    p.add_argument("--batch-size", type=positive, default=16, metavar="N",
                   help="prompts generated together, left-padded (default: 16)")
    p.add_argument("--compile", nargs="?", const="inductor", metavar="BACKEND",
                   help="run compiled programs with a static KV cache (torch.compile backend, default: inductor)")
    sampling = p.add_argument_group("decoding (default: greedy)")
    sampling.add_argument("--do-sample", action="store_true", help="sample instead of taking the most likely token")
    sampling.add_argument("--temperature", type=float, metavar="T", help="sampling temperature")
    sampling.add_argument("--top-k", type=positive, metavar="K", help="sample among the K most likely tokens")
    sampling.add_argument("--top-p", type=float, metavar="P", help="nucleus sampling threshold")
    sampling.add_argument("--seed", type=int, default=0, help="seed of the sampling (default: 0)")
    p.add_argument("--tokenizer", metavar="DIR", help="tokenizer folder (default: the model folder)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ... (default: cpu)")
    p.add_argument("--quiet", "-q", action="store_true", help="print the texts only, no summary on stderr")
    p.set_defaults(run=_generate)


def _generate(args: argparse.Namespace) -> int:
    import sys

    import torch

    from ..capture import FeatureExtractor, parse_device
    from .hf import PREFIX, load_hf

    if not args.model.startswith(PREFIX):
        raise ConfigError(f"generate: model {args.model!r} is not a Hugging Face folder.\n"
                          "Hint: save the causal LM with model.save_pretrained(DIR) and pass hf:DIR.")
    if args.layers and not args.out:
        raise ConfigError("generate: --layers given without --out; the stored values would be lost.\n"
                          "Hint: add --out FILE.safetensors.")
    if args.out and not str(args.out).endswith(".safetensors"):
        raise ConfigError(f"generate: --out {args.out} is not a .safetensors file.\nHint: name it FILE.safetensors.")
    device = parse_device(args.device)
    prompts = _prompts(args.prompt, args.prompts_file)
    if args.out and len(prompts) > args.batch_size:
        raise ConfigError(f"generate: --out stores one batch, and {len(prompts)} prompts exceed --batch-size "
                          f"{args.batch_size}.\nHint: pass --batch-size {len(prompts)}, or split the prompts.")
    model, tok = load_hf(args.model, args.tokenizer)
    model = model.to(device)
    edits = {layer: _edit(layer, path, scale, device) for layer, path, scale in map(_parse_add, args.add)}
    ex = FeatureExtractor(model, list(args.layers), edits=edits)
    if args.compile:
        ex.compile(backend=args.compile)
    tok.padding_side = "left"  # generation continues each row from its last token
    options: dict[str, Any] = {"max_new_tokens": args.max_new_tokens, "do_sample": args.do_sample,
                               "pad_token_id": tok.pad_token_id}
    options.update({k: v for k, v in (("temperature", args.temperature), ("top_k", args.top_k),
                                      ("top_p", args.top_p)) if v is not None})
    if edits:
        options["edit_positions"] = args.positions
    torch.manual_seed(args.seed)  # once: batch after batch draw from one random stream
    for start in range(0, len(prompts), args.batch_size):
        batch = tok(prompts[start:start + args.batch_size], return_tensors="pt", padding=True).to(device)
        out = ex.generate(batch["input_ids"], attention_mask=batch.get("attention_mask"), **options)
        for text in tok.batch_decode(out.sequences, skip_special_tokens=True):
            print(text, flush=True)
    if args.out:
        _save(args.out, out, prompts, args)
        if not args.quiet:
            shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in out.features.items())
            print(f"wrote {args.out}: {_SEQUENCES} {tuple(out.sequences.shape)}" + (f", {shapes}" if shapes else ""),
                  file=sys.stderr)
    return 0


def _prompts(given: list[str], path: str | None) -> list[str]:
    prompts = list(given)
    if path is not None:
        try:
            lines = Path(path).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"generate: cannot read --prompts-file {path} ({type(e).__name__}).\n"
                              "Hint: give a UTF-8 text file with one prompt per line.") from e
        prompts += [line for line in lines if line.strip()]
    if not prompts or not all(p.strip() for p in prompts):
        raise ConfigError("generate: no prompt (or an empty one).\n"
                          "Hint: pass --prompt TEXT (repeatable) or --prompts-file FILE with one prompt per line.")
    return prompts


def _parse_add(text: str) -> tuple[str, str, float]:
    """``LAYER=FILE[:SCALE]`` as ``(layer, file, scale)``."""
    layer, sep, rest = text.partition("=")
    path, scale = rest, 1.0
    head, colon, tail = rest.rpartition(":")
    if colon and head:
        try:
            scale = float(tail)
            path = head
        except ValueError:
            pass
    if not sep or not layer or not path or not math.isfinite(scale):
        raise ConfigError(f"generate: --add {text!r} is not LAYER=VEC[:SCALE].\n"
                          "Hint: e.g. --add transformer.h.6=happy.pt:4 (a vector file, scale 4).")
    return layer, path, scale


def _edit(layer: str, path: str, scale: float, device: Any) -> Any:
    """An ``Add`` of the vector for ``layer`` found in ``path``."""
    import torch

    from ..capture import Add

    if not os.path.isfile(path):
        raise ConfigError(f"generate: --add {layer}={path}: no such file.\n"
                          "Hint: save a vector with torch.save(vecs, 'v.pt') or safetensors.torch.save_file.")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            loaded: Any = load_file(path)
        else:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load / safetensors raise many types for a bad file
        raise ConfigError(f"generate: --add {layer}={path}: cannot read it ({type(e).__name__}).\n"
                          "Hint: a .pt file written by torch.save or a .safetensors file.") from e
    if isinstance(loaded, dict):
        vector = loaded.get(layer, next(iter(loaded.values())) if len(loaded) == 1 else None)
        if vector is None:
            raise ConfigError(f"generate: --add {layer}={path}: the file holds {sorted(loaded)[:6]}, not {layer!r}.\n"
                              "Hint: name the layer as in the file (fxstore.steering_vectors keys it by layer).")
    else:
        vector = loaded
    if not isinstance(vector, torch.Tensor) or not vector.is_floating_point() or vector.dim() == 0:
        raise ConfigError(f"generate: --add {layer}={path} holds no floating-point vector.\n"
                          "Hint: save a tensor of the layer's width, e.g. torch.save(vecs[layer], 'v.pt').")
    return Add(vector.to(device), scale=scale)


def _save(path: str, out: Any, prompts: list[str], args: argparse.Namespace) -> None:
    from safetensors.torch import save_file

    if _SEQUENCES in out.features:
        raise ConfigError(f"generate: a stored layer is named {_SEQUENCES!r}, the key of the token ids.\n"
                          "Hint: store it under an alias (Python: layers={'...': 'name'}).")
    tensors = {k: v.contiguous().cpu() for k, v in out.features.items()}
    tensors[_SEQUENCES] = out.sequences.cpu()
    metadata = {"prompts": json.dumps(prompts), "prompt_length": str(out.prompt_length), "model": args.model,
                "max_new_tokens": str(args.max_new_tokens)}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path, metadata=metadata)
