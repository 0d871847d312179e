"""The options of :func:`~fxstore.feature_statistics`, checked before any work."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from ..capture import FeatureExtractor, layer_pairs, parse_dtype, spec_label
from ..dataset import REDUCTIONS
from ..dataset.batches import TextOptions
from ..errors import ConfigError

__all__ = ["Options", "check", "layer_labels", "reduction_groups"]


@dataclasses.dataclass(frozen=True)
class Options:
    """The keyword options of :func:`~fxstore.feature_statistics`."""

    batch_size: int
    top_k: int
    moments: bool
    reduce: str | Mapping[Any, str | None]
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
        reduce = self.reduce if isinstance(self.reduce, str) else [
            [spec_label(layer), name] for layer, name in self.reduce.items()]
        return {"reduce": reduce, "dtype": None if dtype is None else str(dtype).removeprefix("torch."),
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
    names = list(o.reduce.values()) if isinstance(o.reduce, Mapping) else [o.reduce]
    for name in names:
        if not (name is None or (isinstance(name, str) and name in REDUCTIONS)):
            raise ConfigError(f"reduce={o.reduce!r}: {name!r} is not a reduction.\n"
                              f"Hint: use one of {sorted(REDUCTIONS)} (or None), for all layers or as {{layer: name}}.")
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


def reduction_groups(layers: Any, reduce: str | Mapping[Any, str | None]) -> list[tuple[str, dict[Any, str | None]]]:
    """The selected layers grouped by reduction: ``[(reduction name, {spec: alias})]`` (one extractor each).

    Raises:
        ConfigError: a mapping key that is not one of the selected layers (as passed, or its alias).
    """
    pairs = layer_pairs(layers)
    if isinstance(reduce, str):
        return [(reduce, dict(pairs))]
    labels = {spec_label(spec) for spec, _ in pairs} | {alias for _, alias in pairs if alias is not None}
    for key in reduce:
        if key not in labels and spec_label(key) not in labels:
            raise ConfigError(f"reduce has an entry for {key!r}, which is not one of the selected layers.\n"
                              "Hint: key the reduce mapping by the layer exactly as passed in layers (or its alias).")
    by_label = {spec_label(k): v for k, v in reduce.items()}
    groups: dict[str, dict[Any, str | None]] = {}
    for spec, alias in pairs:
        name = by_label.get(alias, by_label.get(spec_label(spec))) if alias is not None else by_label.get(
            spec_label(spec))
        groups.setdefault(name or "none", {})[spec] = alias
    return list(groups.items())
