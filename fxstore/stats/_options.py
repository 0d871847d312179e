"""The options of :func:`~fxstore.feature_statistics`, checked before any work."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..capture import FeatureExtractor, layer_pairs, parse_dtype, spec_label
from ..dataset import REDUCTIONS
from ..dataset.batches import TextOptions
from ..errors import ConfigError

__all__ = ["Options", "check", "layer_labels"]


@dataclasses.dataclass(frozen=True)
class Options:
    """The keyword options of :func:`~fxstore.feature_statistics`."""

    batch_size: int
    top_k: int
    moments: bool
    reduce: str
    dtype: torch.dtype | str | None
    device: torch.device | str | None
    num_workers: int
    collate_fn: Callable[[list[Any]], Any] | None
    input_key: int | str | None
    shard_size: int
    compile: bool | str
    checkpoint: str | os.PathLike[str] | None
    progress: bool
    model_name: str | None
    data_name: str | None
    tokenizer: Any
    text: TextOptions | None

    def recorded(self) -> dict[str, Any]:
        """The options that change the statistics (part of the run identity)."""
        dtype = parse_dtype(self.dtype)
        return {"reduce": self.reduce, "dtype": None if dtype is None else str(dtype).removeprefix("torch."),
                "top_k": self.top_k, "moments": self.moments, "batch_size": self.batch_size,
                "shard_size": self.shard_size, "input_key": self.input_key,
                "text": None if self.text is None else dataclasses.asdict(self.text)}


def check(model: nn.Module, layers: Any, o: Options) -> None:
    """Refuse bad options before any work.

    Raises:
        ConfigError: naming the option, with a hint.
    """
    if isinstance(model, FeatureExtractor):
        raise ConfigError("model is a FeatureExtractor: feature_statistics builds its own, with the reduction "
                          "inside the graph.\nHint: pass the plain model (extractor.wrapped_model) and layers=.")
    if layers is None or (isinstance(layers, (list, tuple, set, frozenset, dict, str)) and len(layers) == 0):
        raise ConfigError(f"layers={layers!r} selects no layer: there would be nothing to reduce.\n"
                          "Hint: pass layers=[...], e.g. layers=['avgpool'] (fxstore.node_names(model) lists them).")
    for name, value, low in (("batch_size", o.batch_size, 1), ("top_k", o.top_k, 0), ("shard_size", o.shard_size, 1),
                             ("num_workers", o.num_workers, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ConfigError(f"{name}={value!r} must be an integer >= {low}.\nHint: e.g. {name}={max(low, 16)}.")
    if not isinstance(o.reduce, str) or o.reduce not in REDUCTIONS:
        raise ConfigError(f"reduce={o.reduce!r} is not a reduction.\n"
                          f"Hint: use one of {sorted(REDUCTIONS)} (or None), one for all layers.")
    if o.text is not None and o.reduce != "none":
        raise ConfigError(f"reduce={o.reduce!r} does not apply to token rows (one row per real token).\n"
                          "Hint: leave reduce unset with tokenizer=.")
    if o.text is not None and (o.collate_fn is not None or o.input_key is not None):
        raise ConfigError("collate_fn= and input_key= do not apply to text data: fxstore tokenizes and batches it.\n"
                          "Hint: leave them unset; the text column is text_field=.")
    parse_dtype(o.dtype)


def layer_labels(layers: Any) -> list[Any]:
    """The selected layers as JSON-able labels (part of the run identity)."""
    return [[spec_label(spec), alias] for spec, alias in layer_pairs(layers)]
