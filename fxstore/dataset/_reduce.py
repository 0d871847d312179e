"""Per-layer reductions applied inside the graph, and the extractors that run them.

A reduction is the ``transform`` of a :class:`~fxstore.FeatureExtractor`, so it runs
inside the rewritten graph, right after the selected node, before the dtype cast and the
copy to the host: only the reduced values ever leave the device. Layers are grouped by
reduction and each group gets one extractor (sharing the model); a single reduction for
all layers, the common case, is one forward pass per batch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from ..capture import FeatureExtractor, layer_pairs
from ..errors import ConfigError

__all__ = ["REDUCTIONS", "global_avg_pool", "global_max_pool", "flatten", "build_extractors", "reductions"]


def global_avg_pool(x: torch.Tensor) -> torch.Tensor:
    """Mean over every axis after the channel axis: ``(N, C, ...) -> (N, C)``; 2-d input is kept."""
    return x.flatten(2).mean(-1) if x.dim() > 2 else x


def global_max_pool(x: torch.Tensor) -> torch.Tensor:
    """Maximum over every axis after the channel axis: ``(N, C, ...) -> (N, C)``; 2-d input is kept."""
    return x.flatten(2).amax(-1) if x.dim() > 2 else x


def flatten(x: torch.Tensor) -> torch.Tensor:
    """One row per sample: ``(N, ...) -> (N, prod(...))``."""
    return x.flatten(1) if x.dim() > 2 else x


REDUCTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor] | None] = {
    "none": None,
    "avg": global_avg_pool,
    "max": global_max_pool,
    "flatten": flatten,
}
"""Reductions by name; ``"none"`` stores the layer output unchanged."""


def _reduction(value: Any, where: str) -> str:
    name = "none" if value is None else value
    if name not in REDUCTIONS:
        raise ConfigError(
            f"reduce={value!r}{where} is not a reduction.\nHint: use one of {sorted(REDUCTIONS)} (or None)."
        )
    return name


def build_extractors(
    model: nn.Module,
    layers: Any,
    reduce: str | Mapping[Any, str | None] | None,
    *,
    dtype: torch.dtype | str | None,
    host: torch.device | None,
    non_blocking: bool,
) -> tuple[list[FeatureExtractor], list[str]]:
    """One extractor per reduction group, and each group's reduction name.

    Feature keys are not read here: an extractor whose frontend needs example inputs (a
    Hugging Face model) knows them only after its first call; :func:`reductions` maps them.

    Args:
        model: The model (shared by all extractors).
        layers: Layer specifications as for :class:`~fxstore.FeatureExtractor`.
        reduce: One reduction name for all layers, or ``{layer or alias: name}``; layers
            not in the mapping are stored unchanged.
        dtype: Cast of every feature.
        host: Device the features are copied to inside the graph (``None``: stay).
        non_blocking: Copy to ``host`` without waiting.

    Raises:
        ConfigError: an unknown reduction, or a mapping key that is not a selected layer.
    """
    pairs = layer_pairs(layers)
    if isinstance(reduce, Mapping):
        known = {id(spec) for spec, _ in pairs} | {id(alias) for _, alias in pairs if alias is not None}
        labels = {spec for spec, _ in pairs if isinstance(spec, str)} | {a for _, a in pairs if a is not None}
        for key in reduce:
            if id(key) not in known and key not in labels:
                raise ConfigError(
                    f"reduce has an entry for {key!r}, which is not one of the selected layers.\n"
                    "Hint: key the reduce mapping by the layer exactly as passed in layers (or its alias)."
                )
        chosen = [_reduction(reduce.get(alias, reduce.get(spec)) if alias is not None else reduce.get(spec),
                             f" for layer {spec!r}") for spec, alias in pairs]
    else:
        name = _reduction(reduce, "")
        chosen = [name] * len(pairs)
    groups: dict[str, dict[Any, str | None]] = {}
    for (spec, alias), name in zip(pairs, chosen, strict=True):
        groups.setdefault(name, {})[spec] = alias
    extractors = [FeatureExtractor(model, group, keep_output=False, detach=True, transform=REDUCTIONS[name],
                                   dtype=dtype, device=host, non_blocking=non_blocking)
                  for name, group in groups.items()]
    return extractors, list(groups)


def reductions(extractors: list[FeatureExtractor], names: list[str]) -> dict[str, str]:
    """The reduction of every feature key (after the extractors' first call).

    Raises:
        ConfigError: one key produced by two groups.
    """
    reduction_of: dict[str, str] = {}
    for ex, name in zip(extractors, names, strict=True):
        for key in ex.feature_keys:
            if key in reduction_of:
                raise ConfigError(
                    f"layer '{key}' is selected with two reductions ({reduction_of[key]!r} and {name!r}).\n"
                    "Hint: select each layer once, or give the second one an alias with a dict {layer: alias}."
                )
            reduction_of[key] = name
    return reduction_of
