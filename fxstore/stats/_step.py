"""One batch of a statistics run: the extractor's forward and the in-place reduction, as one step.

The step is built once per model, layers and options and kept in :data:`fxstore.capture.build_cache`
(weakly per model, rebuilt when a module, parameter or buffer of the model is replaced or a mode
changes), so a second call on a model seen before neither traces, self-checks nor compiles again.
With ``compile=`` the extractor and :func:`~._partials.accumulate` are compiled as one function,
whose inputs are the model inputs, the padding mask (tokens) and the accumulators (added to in
place): the dense rows never leave the compiled graph. A step runs eagerly the first time (its
extractor builds and self-checks its program then) and for a run's first batch (it creates the
accumulators, whose shapes depend on the data: ``reduce="flatten"`` of another image size); every
other batch runs compiled.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from typing import Any

import torch
from torch import nn

from ..capture import FeatureExtractor, build_cache, canonical_specs, parse_dtype
from ..dataset import REDUCTIONS
from ..errors import ConfigError
from ._options import Options, reduction_groups
from ._partials import accumulate, image_rows, token_rows

__all__ = ["Step", "image_step", "token_step"]

Sums = dict[str, dict[str, torch.Tensor]]
Tops = dict[str, tuple[torch.Tensor, torch.Tensor]]


class Step:
    """``step(*inputs, sums)``: one batch's forward and reduction (``sums`` added to in place), giving
    ``{layer: (top values, batch-local top rows)}``; compiled after its first runs when asked.

    Attributes:
        extractors: The extractors the step runs (one per reduction group).
    """

    def __init__(self, fn: Callable[..., Tops], extractors: list[FeatureExtractor], compile: bool | str) -> None:
        self.fn, self.extractors = fn, extractors
        backend = compile if isinstance(compile, str) else "inductor"
        self.compiled = torch.compile(fn, backend=backend) if compile else None
        self.ran = False  # the extractors' first call (program capture and self-check) is eager

    def __call__(self, *inputs: Any, sums: Sums) -> Tops:
        """Run one batch; ``sums`` (``{layer: {name: float64 tensor}}``) is added to in place.

        Eager for the step's first batch ever and for a run's first batch (``sums`` empty: the
        accumulators are created with the shapes of this data's rows), compiled otherwise.
        """
        if self.compiled is None or not self.ran or not sums:
            self.ran = True
            return self.fn(*inputs, sums)
        return self.compiled(*inputs, sums)  # type: ignore[no-any-return]


def _cast_transform(reduce: Callable[[torch.Tensor], torch.Tensor] | None,
                    dtype: torch.dtype | None) -> Callable[[torch.Tensor], torch.Tensor] | None:
    if reduce is None and dtype is None:
        return None

    def fxstore_stats_rows(x: torch.Tensor) -> torch.Tensor:
        if reduce is not None:
            x = reduce(x)
        return x if dtype is None else x.to(dtype)

    return fxstore_stats_rows


def _features(extractors: list[FeatureExtractor], x: Any) -> dict[str, torch.Tensor]:
    """Every extractor's features of one batch (one extractor per reduction group)."""
    features: dict[str, torch.Tensor] = {}
    for extractor in extractors:
        _, f = extractor(**x) if isinstance(x, Mapping) else extractor(x)
        clash = set(f) & set(features)
        if clash:
            raise ConfigError(f"layer '{sorted(clash)[0]}' is selected with two reductions.\n"
                              "Hint: select each layer once, or give the second one an alias with a dict "
                              "{layer: alias}.")
        features.update(f)
    return features


def _key(model: nn.Module, kind: str, groups: Any, o: Options) -> Hashable:
    specs = tuple((name, tuple(canonical_specs(group, model))) for name, group in groups)
    return ("feature_statistics", kind, specs, parse_dtype(o.dtype), o.top_k, o.moments, o.compile)


def image_step(model: nn.Module, layers: Any, o: Options) -> Step:
    """The step of image rows: ``step(x, sums=...)`` for a batch ``x`` (a tensor or a mapping of inputs)."""
    groups = reduction_groups(layers, o.reduce)
    dtype, top_k, moments = parse_dtype(o.dtype), o.top_k, o.moments

    def build(m: nn.Module) -> Step:
        extractors = [FeatureExtractor(m, group, keep_output=False, detach=True,
                                       transform=_cast_transform(REDUCTIONS[name], dtype))
                      for name, group in groups]

        def fxstore_stats_images(x: Any, sums: Sums) -> Tops:
            return {key: accumulate(sums.setdefault(key, {}), image_rows(key, rows), None, top_k, moments)
                    for key, rows in _features(extractors, x).items()}

        return Step(fxstore_stats_images, extractors, o.compile)

    return build_cache.get(model, _key(model, "images", groups, o), build)


def token_step(model: nn.Module, layers: Any, o: Options) -> Step:
    """The step of token rows: ``step(inputs, keep, sums=...)`` with the model's keyword ``inputs`` and the
    real-token mask ``keep [B, T]`` (an input: padding differs from batch to batch)."""
    top_k, moments = o.top_k, o.moments

    def build(m: nn.Module) -> Step:
        extractor = FeatureExtractor(m, layers, keep_output=False, detach=True, dtype=o.dtype)

        def fxstore_stats_tokens(inputs: dict[str, torch.Tensor], keep: torch.Tensor, sums: Sums) -> Tops:
            _, features = extractor(**inputs)
            flat = keep.reshape(-1)
            return {key: accumulate(sums.setdefault(key, {}), token_rows(key, value, keep.shape), flat, top_k,
                                    moments)
                    for key, value in features.items()}

        return Step(fxstore_stats_tokens, [extractor], o.compile)

    return build_cache.get(model, _key(model, "tokens", [("none", layers)], o), build)
