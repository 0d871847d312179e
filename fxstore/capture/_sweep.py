"""Activation patching grids as batched forwards of one program.

:func:`patch_sweep` stores each layer's value on the clean input, then runs one extractor
whose edits patch every layer from a mask buffer: row ``r`` of a batch is the corrupted input
with one (layer, position) cell taken from the clean run. Filling the masks for the next
batch is an in-place copy, so every batch runs the same (optionally compiled) program.

Both extractors are built once per model, layers and options (:data:`._fingerprint.build_cache`):
a sweep on a model it has seen costs its forwards. Each call writes its clean values and masks
into the patching edits (in place when their shapes are those of the last call).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree

from ..errors import EditError
from ._edits import Apply, Edit
from ._fingerprint import build_cache
from ._selection import canonical_specs
from .extractor import FeatureExtractor

__all__ = ["patch_sweep"]

Inputs = tuple[tuple[Any, ...], dict[str, Any]]


def _inputs(x: Any) -> Inputs:
    if isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], tuple) and isinstance(x[1], dict):
        return x[0], dict(x[1])
    return (x if isinstance(x, tuple) else (x,)), {}


def _repeat(inputs: Inputs, rows: int, what: str) -> Inputs:
    def repeat(leaf: torch.Tensor) -> torch.Tensor:
        if leaf.dim() == 0 or leaf.shape[0] != 1:
            raise EditError(
                f"patch_sweep: {what} has a tensor of shape {tuple(leaf.shape)}; it takes one example "
                "(batch dimension 1).\nHint: pass e.g. token ids of shape (1, T)."
            )
        return leaf.expand(rows, *leaf.shape[1:]).contiguous()

    return _pytree.tree_map_only(torch.Tensor, repeat, inputs)


def _patch(value: torch.Tensor, clean: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``value`` with ``clean`` where ``mask`` (over the leading dimensions) is true."""
    mask = mask.reshape(tuple(mask.shape) + (1,) * (value.dim() - mask.dim()))
    return torch.where(mask, clean.to(value.dtype), value)


def patch_sweep(
    model: nn.Module,
    clean: Any,
    corrupted: Any,
    layers: Sequence[Any],
    metric: Callable[[Any], torch.Tensor],
    positions: Iterable[int] | None = None,
    batch_size: int = 32,
    *,
    compile: bool | dict[str, Any] = False,
    frontend: str = "auto",
) -> torch.Tensor:
    """The activation-patching grid: ``metric`` of the corrupted run with each (layer, position) patched
    from the clean run.

    Cell ``[i, j]`` is ``metric(model(corrupted))`` with layer ``i``'s value at token position
    ``positions[j]`` (dimension 1 of the value) replaced by its value in ``model(clean)``; without
    positions, cell ``[i]`` patches the whole value. The cells run as batched forwards of one
    program (one row per cell, ``batch_size`` rows a call), not one forward per cell.

    The two extractors a sweep runs (one reads the clean values, one patches) are built once per
    model, layers and options and kept in ``fxstore.capture.build_cache`` (weakly per model,
    rebuilt when a module, parameter or buffer of the model is replaced or a mode changes):
    a sweep on a model it has seen costs its forwards, whatever the inputs' sequence length.
    Calls sharing a model must not run in two threads at once.

    Args:
        model: The model (not modified).
        clean: The clean input for one example (a tensor, a tuple of args, or ``(args, kwargs)``;
            batch dimension 1).
        corrupted: The corrupted input, same form and shapes.
        layers: Layers to patch, in any form ``FeatureExtractor`` accepts; each must be one node
            (a module's first output for a tuple output).
        metric: Maps the model's output for a batch to one value per row.
        positions: Token positions to patch; ``None`` patches whole values.
        batch_size: Rows per forward.
        compile: Run the program compiled: ``True`` (``torch.compile(fullgraph=True)``) or a dict
            of ``torch.compile`` options.
        frontend: The extractor's frontend (see :class:`FeatureExtractor`).

    Returns:
        A tensor ``[len(layers), len(positions)]`` (``[len(layers)]`` without positions).

    Raises:
        EditError: a layer matching several nodes, a position out of range, inputs with a batch
            dimension other than 1, or a metric that does not give one value per row.

    Example:
        >>> import torch, fxstore
        >>> _ = torch.manual_seed(0)
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2)).eval()
        >>> clean, corrupted = torch.rand(1, 5, 3), torch.rand(1, 5, 3)
        >>> grid = fxstore.patch_sweep(net, clean, corrupted, ["0", "1"], lambda y: y[:, -1, 0], positions=[3, 4])
        >>> tuple(grid.shape)
        (2, 2)
        >>> bool(grid[0, 1] == net(clean)[0, -1, 0])  # patching the last token's first layer: the clean run
        True
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise EditError(f"patch_sweep: batch_size={batch_size!r} must be a positive int.\nHint: use e.g. 32.")
    layers = list(layers) if isinstance(layers, (list, tuple)) else [layers]
    clean_in, corrupted_in = _inputs(clean), _inputs(corrupted)
    specs = tuple(canonical_specs(layers, model))
    reader = build_cache.get(model, ("features", specs, frontend), lambda m: FeatureExtractor(
        m, layers, keep_output=False, frontend=frontend, example_inputs=clean_in))
    with torch.no_grad():
        _, feats = reader(*clean_in[0], **clean_in[1])
    values = [feats[_one_key(reader, layer)].detach() for layer in layers]
    cells_per_layer = 1 if positions is None else len(positions := list(positions))
    masks = []
    for layer, value in zip(layers, values):
        if positions is None:
            masks.append(torch.zeros(batch_size, dtype=torch.bool, device=value.device))
            continue
        length = value.shape[1] if value.dim() > 1 else 0
        bad = [p for p in positions if not -length <= p < length]
        if bad:
            raise EditError(
                f"patch_sweep: positions {bad} are out of range for layer {layer!r}, whose value has shape "
                f"{tuple(value.shape)} (positions index dimension 1).\nHint: use positions below {length}."
            )
        masks.append(torch.zeros(batch_size, length, dtype=torch.bool, device=value.device))
    rows_in = _repeat(corrupted_in, batch_size, "corrupted")

    def build(m: nn.Module) -> tuple[FeatureExtractor, Callable[..., Any]]:
        edits = {layer: Apply(_patch, value, mask) for layer, value, mask in zip(layers, values, masks)}
        extractor = FeatureExtractor(m, frontend=frontend, example_inputs=rows_in, edits=edits)
        if not compile:
            return extractor, extractor
        options = {"fullgraph": True} | (compile if isinstance(compile, dict) else {})
        return extractor, torch.compile(extractor, **options)

    compile_key = repr(sorted(compile.items())) if isinstance(compile, dict) else bool(compile)
    patched, run = build_cache.get(model, ("patch_sweep: patch", specs, frontend, batch_size, compile_key), build)
    for i, (value, mask) in enumerate(zip(values, masks)):
        _write(patched.edits[_label(patched, i)], t0=value, t1=mask)
    cells = len(layers) * cells_per_layer
    every = _all_masks(masks, positions, cells_per_layer, -(-cells // batch_size) * batch_size)
    results = []
    with torch.no_grad():
        for start in range(0, cells, batch_size):
            for i, rows in enumerate(every):
                patched.edits[_label(patched, i)].update(t1=rows[start:start + batch_size])
            scores = metric(run(*rows_in[0], **rows_in[1])[0])
            if not isinstance(scores, torch.Tensor) or scores.shape[:1] != (batch_size,) or scores.dim() != 1:
                got = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
                raise EditError(
                    f"patch_sweep: metric returned {got} for a batch of {batch_size} rows; it must return one "
                    "value per row.\nHint: e.g. lambda logits: logits[:, -1, a] - logits[:, -1, b]."
                )
            results.append(scores[: min(batch_size, cells - start)].detach())
    grid = torch.cat(results)
    return grid if positions is None else grid.reshape(len(layers), cells_per_layer)


def _all_masks(masks: list[torch.Tensor], positions: list[int] | None, per_layer: int,
               rows: int) -> list[torch.Tensor]:
    """Per layer, the patch masks of every cell, one row each (``rows`` of them, the last batch padded):
    cell ``i * per_layer + j`` patches layer ``i`` at ``positions[j]`` (the whole value without positions)."""
    device = masks[0].device
    cell_layer = torch.arange(len(masks), device=device).repeat_interleave(per_layer)
    out = []
    for i, mask in enumerate(masks):
        full = torch.zeros((rows, *mask.shape[1:]), dtype=torch.bool, device=device)
        mine = torch.nonzero(cell_layer == i).flatten()
        if positions is None:
            full[mine] = True
        else:
            where = torch.tensor(positions, device=device).remainder(mask.shape[1])
            full[mine, where] = True
        out.append(full)
    return out


def _write(edit: Edit, **tensors: torch.Tensor) -> None:
    """Give a cached patching edit this call's tensors: in place when the shape, dtype and device are the same."""
    current = edit.values()
    same = {k: v for k, v in tensors.items()
            if (v.shape, v.dtype, v.device) == (current[k].shape, current[k].dtype, current[k].device)}
    if same:
        edit.update(**same)
    for name, value in tensors.items():
        if name not in same:
            setattr(edit, name, value)  # a buffer of another shape (another sequence length): replaced


def _label(extractor: FeatureExtractor, i: int) -> str:
    return list(extractor.edits)[i]


def _one_key(extractor: FeatureExtractor, layer: Any) -> str:
    keys = [k for k in extractor.keys_for(layer) if ":" not in k or k.endswith(":0")]
    if len(keys) != 1:
        raise EditError(
            f"patch_sweep: layer {layer!r} is {len(keys)} nodes ({keys[:4]}); each layer of a sweep is one node.\n"
            "Hint: name one node or module call per layer (fxstore.node_names(model) lists them)."
        )
    return keys[0]
