"""Plots of fxstore's results with matplotlib: a patching grid as a heatmap, feature maps as tiles.

Both build a ``matplotlib.figure.Figure`` directly (no pyplot: no global figure, no backend
switched), which Jupyter shows inline and ``fig.savefig(path)`` writes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import ConfigError
from . import _deps

__all__ = ["plot_patching", "plot_features"]


def _array(values: Any, what: str) -> np.ndarray:
    """``values`` (a tensor, array or nested list) as a float numpy array."""
    if hasattr(values, "detach"):
        values = values.detach().float().cpu().numpy()
    try:
        return np.asarray(values, dtype=float)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{what} is not numeric ({type(values).__name__}: {e}).\n"
                          "Hint: pass the tensor fxstore returned.") from e


def _label(layer: Any) -> str:
    if isinstance(layer, str):
        return layer
    return getattr(layer, "__name__", None) or type(layer).__name__


def plot_patching(grid: Any, layers: Sequence[Any], positions: Sequence[int] | None = None,
                  tokens: Sequence[str] | None = None, ax: Any = None) -> Any:
    """A ``patch_sweep`` grid as a heatmap: layers down, positions across, zero white.

    The colour map is diverging (``RdBu_r``) with limits ``±max|grid|``, so zero is white and the
    sign of each cell's effect reads at a glance; a colour bar gives the scale.

    Args:
        grid: ``patch_sweep``'s result: ``[len(layers), len(positions)]``, or ``[len(layers)]`` when
            whole values were patched (drawn as one column).
        layers: The layers swept, in the grid's order (their names label the rows).
        positions: The token positions swept (default ``0, 1, ...``); they label the columns.
        tokens: The input's tokens (strings): column ``j`` is labelled ``tokens[positions[j]]``.
        ax: A matplotlib ``Axes`` to draw into (its figure is returned); default: a new figure.

    Returns:
        The ``matplotlib.figure.Figure``.

    Raises:
        ConfigError: a grid that is not 1-D or 2-D, or layers, positions or tokens that do not fit it.

    Example:
        >>> import torch, fxstore
        >>> grid = torch.tensor([[0.5, -1.0, 0.0], [2.0, 0.25, -0.5]])
        >>> fig = fxstore.plot_patching(grid, ["h.0", "h.1"], positions=[0, 1, 2], tokens=["The", " cat", " sat"])
        >>> ax = fig.axes[0]
        >>> [t.get_text() for t in ax.get_xticklabels()], ax.images[0].get_clim()
        (['The', ' cat', ' sat'], (-2.0, 2.0))
    """
    values = _array(grid, "plot_patching: grid")
    if values.ndim == 1:
        values = values[:, None]
    if values.ndim != 2:
        raise ConfigError(f"plot_patching: grid has shape {values.shape}; it must be [layers, positions] or "
                          "[layers].\nHint: pass fxstore.patch_sweep's result.")
    rows, columns = values.shape
    layers = list(layers) if isinstance(layers, (list, tuple)) else [layers]
    if len(layers) != rows:
        raise ConfigError(f"plot_patching: {len(layers)} layers for a grid of {rows} rows (shape {values.shape}).\n"
                          "Hint: pass the layers given to patch_sweep, in the same order.")
    cells = list(range(columns)) if positions is None else [int(p) for p in positions]
    if len(cells) != columns:
        raise ConfigError(f"plot_patching: {len(cells)} positions for a grid of {columns} columns "
                          f"(shape {values.shape}).\nHint: pass the positions given to patch_sweep.")
    labels = [str(p) for p in cells]
    if tokens is not None:
        tokens = list(tokens)
        bad = [p for p in cells if not -len(tokens) <= p < len(tokens)]
        if bad:
            raise ConfigError(f"plot_patching: positions {bad} are out of range for {len(tokens)} tokens.\n"
                              "Hint: pass every token of the input (tokens[p] labels position p).")
        labels = [str(tokens[p]) for p in cells]
    finite = values[np.isfinite(values)]
    limit = float(np.abs(finite).max()) if finite.size else 0.0
    limit = limit if limit > 0 else 1.0
    if ax is None:
        figure = _deps.figure_class()(figsize=(max(4.0, 0.5 * columns + 2.5), max(2.5, 0.35 * rows + 1.5)),
                                      layout="constrained")
        ax = figure.add_subplot()
    image = ax.imshow(values, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto", interpolation="nearest")
    ax.set_yticks(range(rows), [_label(layer) for layer in layers])
    ax.set_xticks(range(columns), labels, rotation=90 if tokens is not None else 0)
    ax.set_xlabel("patched position" if positions is not None or columns > 1 else "whole value")
    ax.set_ylabel("layer")
    ax.figure.colorbar(image, ax=ax, label="metric")
    return ax.figure


def plot_features(tensor: Any, channels: Sequence[int] | int | None = None, *, columns: int | None = None,
                  cmap: str = "viridis", title: str | None = None) -> Any:
    """Feature maps of an image model as a grid of tiles, one per channel.

    Each tile is one channel's ``H × W`` map with its own colour scale (its minimum dark, its
    maximum bright) and the channel's index as its title.

    Args:
        tensor: One example's feature map ``[C, H, W]``, or ``[1, C, H, W]``.
        channels: The channels to show: a list of indices, or a number ``n`` (the first ``n``);
            default: the first 64.
        columns: Tiles per row (default: about the square root of the number of tiles).
        cmap: A matplotlib colour map name.
        title: The figure's title.

    Returns:
        The ``matplotlib.figure.Figure`` (one ``Axes`` per tile, in channel order).

    Raises:
        ConfigError: a tensor that is not ``[C, H, W]`` or ``[1, C, H, W]``, or channels out of range.

    Example:
        >>> import torch, torchvision, fxstore
        >>> m = torchvision.models.resnet18().eval()
        >>> _, feats = fxstore.FeatureExtractor(m, ["layer1"], keep_output=False)(torch.rand(1, 3, 64, 64))
        >>> fig = fxstore.plot_features(feats["layer1"], channels=8)
        >>> len(fig.axes), fig.axes[3].get_title(), fig.axes[3].images[0].get_array().shape
        (8, '3', (16, 16))
    """
    values = _array(tensor, "plot_features: tensor")
    if values.ndim == 4 and values.shape[0] == 1:
        values = values[0]
    if values.ndim != 3:
        raise ConfigError(f"plot_features: the tensor has shape {values.shape}; it must be one example's feature "
                          "map [C, H, W] or [1, C, H, W].\nHint: pass feats[key][i] for example i of a batch.")
    count = values.shape[0]
    if channels is None or isinstance(channels, int):
        n = min(count, 64) if channels is None else channels
        if isinstance(n, bool) or n < 1:
            raise ConfigError(f"plot_features: channels={channels!r} must be a positive number or a list of "
                              "indices.\nHint: e.g. channels=16.")
        picked = list(range(min(n, count)))
    else:
        picked = [int(c) for c in channels]
        bad = [c for c in picked if not 0 <= c < count]
        if bad or not picked:
            raise ConfigError(f"plot_features: channels {bad or picked} are not among the tensor's {count} "
                              f"channels.\nHint: use indices from 0 to {count - 1}.")
    if columns is not None and (isinstance(columns, bool) or not isinstance(columns, int) or columns < 1):
        raise ConfigError(f"plot_features: columns={columns!r} must be a positive int.\nHint: e.g. columns=8.")
    width = columns or math.ceil(math.sqrt(len(picked)))
    height = math.ceil(len(picked) / width)
    figure = _deps.figure_class()(figsize=(1.6 * width, 1.6 * height + (0.4 if title else 0)), layout="constrained")
    for i, channel in enumerate(picked):
        ax = figure.add_subplot(height, width, i + 1)
        ax.imshow(values[channel], cmap=cmap, interpolation="nearest")
        ax.set_title(str(channel), fontsize=8)
        ax.set_axis_off()
    if title:
        figure.suptitle(title)
    return figure
