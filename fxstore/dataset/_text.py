"""Token-level extraction from language models: one stored row per real token.

:func:`~fxstore.extract_dataset` comes here when it is given a ``tokenizer``. The flow:

1. tokenize the documents (``_text_tokens``), cut them into shards of token rows and the
   shards into padded batches (``_text_batches``);
2. probe the first batch: the row shape and dtype of every layer (a layer's output must be
   ``(batch, sequence, ...)``; a Hugging Face block's output is its hidden states);
3. rank 0 checks the output folder, every rank computes its shards: the model runs on
   ``input_ids``, ``attention_mask`` and ``position_ids`` (counted over real tokens, so left
   and right padding give the values of a document run alone), the real tokens' rows are
   gathered (on the device) and written with the ``token_id``, ``sequence``, ``position`` columns;
4. with ``shuffle``, the unshuffled rows are written to a hidden folder first and then
   permuted into the output (``_shuffle``); rank 0 writes the manifest.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..capture import FeatureExtractor
from ..errors import ConfigError
from . import _distributed, _shuffle, formats
from ._loop import Step, first_batch_errors, write_all
from ._text_batches import TextBatch, TextPlan, make_text_plan
from ._text_tokens import special_ids, tokenize, tokenizer_fingerprint
from .folder import manifest
from .folder.checksums import identity_digest
from .folder.files import os_errors
from .folder.names import STAGING
from .folder.ownership import remove_staging, start_staging
from .formats import ArraySpec, Sink
from .run import placed, run_folder

__all__ = ["TextOptions", "extract_text", "TOKEN_COLUMNS", "model_inputs"]

TOKEN_COLUMNS = ("token_id", "sequence", "position")
"""The per-row columns stored beside the features."""

"""Hidden folder inside the output holding the unshuffled rows while a shuffled run is in progress."""

_COLUMN_DTYPES = {"token_id": torch.int32, "sequence": torch.int64, "position": torch.int32}


@dataclasses.dataclass(frozen=True)
class TextOptions:
    """The text options of :func:`~fxstore.extract_dataset`."""

    text_field: str | None = None
    max_length: int | None = None
    context_length: int | None = None
    shuffle: int | None = None
    skip_special: bool = False
    pad_to: int = 16


def extract_text(model: nn.Module, layers: Any, data: Any, out: Path, tokenizer: Any, text: TextOptions,
                 o: Any) -> dict[str, Any]:
    """Run :func:`~fxstore.extract_dataset`'s text path (``o`` holds its general options)."""
    _check(text, o)
    if tokenizer is None or not callable(tokenizer):
        raise ConfigError("text extraction needs a tokenizer.\nHint: pass tokenizer=AutoTokenizer.from_pretrained(DIR).")
    ranks = _distributed.join()
    try:
        with placed(model, o.device, ranks) as device:
            extractor = _extractor(model, layers, o.dtype)
            max_length = _max_length(model, tokenizer, text)
            text = dataclasses.replace(text, max_length=max_length)
            plan = _plan(data, tokenizer, max_length, text, o)
            specs = _probe(extractor, plan, device)
            identity = _identity(model, tokenizer, specs, plan, text, o)
            if text.shuffle is None:
                return _run(extractor, plan, specs, out, identity, device, o, ranks)
            return _run_shuffled(extractor, plan, specs, out, identity, device, text.shuffle, o, ranks)
    finally:
        ranks.close()


def _check(text: TextOptions, o: Any) -> None:
    for name in ("max_length", "context_length", "pad_to"):
        value = getattr(text, name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ConfigError(f"{name}={value!r} must be a positive integer.\nHint: e.g. {name}=128.")
    if text.shuffle is not None and (not isinstance(text.shuffle, int) or isinstance(text.shuffle, bool)
                                     or text.shuffle < 0):
        raise ConfigError(f"shuffle={text.shuffle!r} must be a seed (an integer >= 0) or None.\nHint: shuffle=0.")
    if o.reduce not in (None, "none"):
        raise ConfigError(f"reduce={o.reduce!r} does not apply to token rows.\n"
                          "Hint: token rows are stored one per token; leave reduce unset.")
    for name in ("collate_fn", "input_key", "target_key"):
        if getattr(o, name) is not None:
            raise ConfigError(f"{name}= does not apply to text data: fxstore tokenizes and batches it.\n"
                              "Hint: leave it unset; the text column is text_field=.")


def _extractor(model: nn.Module, layers: Any, dtype: Any) -> FeatureExtractor:
    if isinstance(model, FeatureExtractor):
        if layers is not None or dtype is not None:
            raise ConfigError("layers and dtype must be None when a FeatureExtractor is passed.\n"
                              "Hint: configure the extractor itself, or pass the plain model.")
        return model
    if layers is None:
        raise ConfigError("no layers selected.\nHint: pass layers=[...], e.g. ['transformer.h.6'].")
    return FeatureExtractor(model, layers, keep_output=False, dtype=dtype)


def _max_length(model: nn.Module, tokenizer: Any, text: TextOptions) -> int:
    positions = _positions(model)
    for name in ("max_length", "context_length"):
        value = getattr(text, name)
        if value is not None and positions is not None and value > positions[1]:
            raise ConfigError(
                f"{name}={value} is more than the {positions[1]} positions of {type(model).__name__} "
                f"(config.{positions[0]}).\nHint: use {name}={positions[1]} or less."
            )
    if text.max_length is not None:
        return text.max_length
    candidates = [getattr(tokenizer, "model_max_length", None)] + ([positions[1]] if positions else [])
    known = [int(c) for c in candidates if isinstance(c, int) and 0 < c < 1_000_000]
    return min(known) if known else 512


def _positions(model: nn.Module) -> tuple[str, int] | None:
    """The model's number of positions and the config field it comes from (``None``: not known)."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and 0 < value < 1_000_000:
            return name, value
    return None


def _plan(data: Any, tokenizer: Any, max_length: int, text: TextOptions, o: Any) -> TextPlan:
    sequences = tokenize(data, tokenizer, text_field=text.text_field, max_length=max_length,
                         context_length=text.context_length)
    stored = np.ones(len(sequences.ids), dtype=bool)
    if text.skip_special:
        stored = ~np.isin(sequences.ids, sorted(special_ids(tokenizer)))
    if not stored.any():
        raise ConfigError("no token is left to store: every token is a special token.\n"
                          "Hint: drop skip_special=True, or check the data.")
    pad = getattr(tokenizer, "pad_token_id", None)
    left = getattr(tokenizer, "padding_side", "right") == "left"
    return make_text_plan(sequences, stored, o.shard_size, o.batch_size, text.pad_to,
                          0 if pad is None else int(pad), left)


def _plain(model: nn.Module) -> nn.Module:
    """The user's model inside a :class:`FeatureExtractor` (the model itself otherwise)."""
    return model.wrapped_model if isinstance(model, FeatureExtractor) else model


@functools.lru_cache(maxsize=64)
def _accepted(forward: Callable[..., Any]) -> frozenset[str]:
    params = inspect.signature(forward).parameters
    named = {name for name, p in params.items() if p.kind is not inspect.Parameter.VAR_KEYWORD}
    if len(named) < len(params):  # **kwargs: the two inputs every language model takes
        named |= {"attention_mask", "position_ids"}
    return frozenset(named)


def model_inputs(extractor: FeatureExtractor, batch: TextBatch, device: torch.device) -> dict[str, torch.Tensor]:
    """The keyword inputs of one batch for the model inside ``extractor``, on ``device``."""
    accepted = _accepted(type(_plain(extractor)).forward)
    inputs = {k: v.to(device, non_blocking=True) for k, v in batch.inputs.items()
              if k == "input_ids" or k in accepted}
    if "use_cache" in accepted:
        inputs["use_cache"] = False  # a cache in the output cannot be exported, and is not needed
    return inputs


def _forward(extractor: FeatureExtractor, batch: TextBatch, device: torch.device) -> dict[str, torch.Tensor]:
    """The stored rows of one batch: features at real tokens, and the token columns."""
    _, features = extractor(**model_inputs(extractor, batch, device))
    keep = batch.keep.to(device)
    rows: dict[str, torch.Tensor] = {}
    for key, value in features.items():
        if not isinstance(value, torch.Tensor) or value.dim() < 3 or tuple(value.shape[:2]) != tuple(keep.shape):
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ConfigError(
                f"layer '{key}' gives {shape}, not one value per token ({tuple(keep.shape)} + feature shape).\n"
                "Hint: select layers whose output is (batch, sequence, ...): blocks, attention or MLP outputs.")
        rows[key] = value[keep].to("cpu", non_blocking=True)
    cpu_keep = batch.keep
    rows["token_id"] = batch.inputs["input_ids"][cpu_keep].to(torch.int32)
    rows["sequence"] = batch.sequence[:, None].expand_as(cpu_keep)[cpu_keep]
    rows["position"] = batch.inputs["position_ids"][cpu_keep].to(torch.int32)
    return rows


def _probe(extractor: FeatureExtractor, plan: TextPlan, device: torch.device) -> list[ArraySpec]:
    batch = next(plan.batches(0))
    with first_batch_errors(f"the first batch (input_ids {tuple(batch.inputs['input_ids'].shape)})",
                            "check that the tokenizer belongs to the model."), torch.inference_mode():
        rows = _forward(extractor, batch, device)
    clash = [k for k in rows if k in TOKEN_COLUMNS and k in extractor.feature_keys]
    if clash:
        raise ConfigError(f"a layer is named {clash[0]!r}, like a stored token column.\n"
                          "Hint: rename the layer with a dict {layer: alias}.")
    plan.first_rows = rows  # shard 0 starts with this very batch: computed once
    return [ArraySpec(k, tuple(v.shape[1:]), v.dtype) for k, v in rows.items()]


def _identity(model: nn.Module, tokenizer: Any, specs: list[ArraySpec], plan: TextPlan, text: TextOptions,
              o: Any) -> dict[str, Any]:
    def entry(s: ArraySpec) -> dict[str, Any]:
        kind = {"kind": "token"} if s.key in TOKEN_COLUMNS else {"reduce": "none"}
        return {"shape": list(s.shape), "dtype": str(s.dtype).removeprefix("torch."), **kind}

    inner = _plain(model)
    return {
        "format": o.format,
        "model": {"name": o.model_name or type(inner).__name__, "fingerprint": manifest.model_fingerprint(inner)},
        "features": {s.key: entry(s) for s in specs},
        "target": None,
        "num_samples": plan.num_rows,
        "shard_size": o.shard_size,
        "batch_size": o.batch_size,
        "data": o.data_name,
        "text": text_identity(tokenizer, plan, text),
    }


def text_identity(tokenizer: Any, plan: TextPlan, text: TextOptions) -> dict[str, Any]:
    """The text part of a token run's identity: tokenizer, token digest and options (no model fingerprint)."""
    seqs = plan.sequences
    return {
        "tokenizer": {"name": getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__,
                      "fingerprint": tokenizer_fingerprint(tokenizer),
                      "padding_side": "left" if plan.left else "right", "pad_token_id": plan.pad_id},
        "rows": "one per token: " + ", ".join(TOKEN_COLUMNS) + " and the layers",
        "num_sequences": len(seqs), "num_tokens": int(len(seqs.ids)), "dropped_tokens": seqs.dropped,
        "tokens": _tokens_digest(seqs.ids, seqs.offsets),
        "max_length": None if text.context_length else text.max_length,
        "context_length": text.context_length, "skip_special": text.skip_special,
        "shuffle": text.shuffle, "pad_to": text.pad_to,
    }


def _tokens_digest(ids: np.ndarray, offsets: np.ndarray) -> str:
    """The content of the data as the model sees it: every token id and where each sequence starts."""
    digest = hashlib.sha256(np.ascontiguousarray(offsets, dtype=np.int64).tobytes())
    digest.update(np.ascontiguousarray(ids, dtype=np.int32).tobytes())
    return f"sha256:{digest.hexdigest()}"


@dataclasses.dataclass
class _Rows:
    """What the run skeleton (:func:`.run.run_folder`) reads of a plan."""

    shards: dict[int, tuple[int, int]]
    num_samples: int

    def all_shards(self) -> list[int]:
        return sorted(self.shards)


def _mine(shards: list[int], done: set[int], ranks: _distributed.Ranks) -> list[int]:
    return [k for k in shards if k not in done][ranks.rank::ranks.world]


def _run(extractor: FeatureExtractor, plan: TextPlan, specs: list[ArraySpec], out: Path, identity: dict[str, Any],
         device: torch.device, o: Any, ranks: _distributed.Ranks) -> dict[str, Any]:
    sink = formats.get(o.format)(out, specs, plan.num_rows, identity_digest(identity))

    def work(decision: dict[str, Any]) -> None:
        mine = _mine(sorted(plan.shards), set(decision["done"]), ranks)
        _compute(extractor, plan, mine, sink, device, o, ranks)

    return run_folder(out, identity, sink, _Rows(plan.shards, plan.num_rows), o, ranks, work)


def _compute(extractor: FeatureExtractor, plan: TextPlan, mine: list[int], sink: Sink, device: torch.device,
             o: Any, ranks: _distributed.Ranks) -> None:
    total = sum(plan.shards[k][1] for k in mine)
    write_all(_steps(extractor, plan, mine, device), sink, plan.shards, device, o, ranks, total, "tok")


def _steps(extractor: FeatureExtractor, plan: TextPlan, mine: list[int], device: torch.device) -> Iterator[Step]:
    for shard in mine:
        for batch in plan.batches(shard):
            rows = plan.take_probe_rows(batch) or _forward(extractor, batch, device)
            yield Step(batch.shard, batch.start, batch.last, rows, batch.count)


def _run_shuffled(extractor: FeatureExtractor, plan: TextPlan, specs: list[ArraySpec], out: Path,
                  identity: dict[str, Any], device: torch.device, seed: int, o: Any,
                  ranks: _distributed.Ranks) -> dict[str, Any]:
    """Unshuffled rows into the hidden staging folder (an fxstore folder of its own), then permuted into ``out``."""
    staging = out / STAGING
    n = plan.num_rows
    shards = {k: (k * o.shard_size, min(o.shard_size, n - k * o.shard_size)) for k in range(-(-n // o.shard_size))}
    sink = formats.get(o.format)(out, specs, n, identity_digest(identity))

    def work(decision: dict[str, Any]) -> None:
        unshuffled_identity = {**identity, "format": "safetensors", "text": {**identity["text"], "shuffle": None}}
        left = [k for k in sorted(shards) if k not in set(decision["done"])]
        if not left:  # every output shard done (a kill while the staging folder was removed): it is not needed
            return
        if ranks.main:
            with os_errors(staging):
                start_staging(staging, unshuffled_identity)  # its marker first: recognised in any partial state
        ranks.barrier()
        source = _run(extractor, plan, specs, staging, unshuffled_identity, device,
                      dataclasses.replace(o, format="safetensors", overwrite=False), ranks)
        mine = _mine(sorted(shards), set(decision["done"]), ranks)
        sink.open()
        try:
            _shuffle.write_permuted(staging, source, sink, shards, mine, seed, progress=o.progress and ranks.main)
        finally:
            with os_errors(out):
                sink.close()

    def before_finish() -> None:
        if staging.is_dir():
            with os_errors(out):
                remove_staging(staging)  # before the manifest: a finished folder holds only the shuffled rows

    return run_folder(out, identity, sink, _Rows(shards, n), o, ranks, work, before_finish)
