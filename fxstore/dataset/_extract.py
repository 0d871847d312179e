"""Extract features of a whole dataset to disk: streamed, resumable, multi-process.

The flow of :func:`extract_dataset`:

1. place the model (``run.placed``), build one extractor per reduction group (``_reduce``) and
   probe the model on a tiny first batch, which fixes every stored array's row shape and dtype;
2. hand the folder to the one run skeleton (``run.run_folder``): rank 0 locks and checks it
   (``folder``), every rank computes the batches of its shards (``_batches``, ``_compute``)
   through the one compute/write loop (``_loop``, a background writer, the format's sink),
   and rank 0 writes ``manifest.json``.

Text (``tokenizer=``) takes the same skeleton through ``_text``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..capture import FeatureExtractor, Layers
from ..errors import ConfigError
from . import _distributed, formats
from ._batches import Plan, make_plan
from ._compute import TARGET, compute, probe
from ._reduce import build_extractors, reductions
from .folder import manifest
from .folder.checksums import identity_digest
from .formats import ArraySpec
from .run import placed, run_folder

__all__ = ["extract_dataset"]


def extract_dataset(
    model: nn.Module,
    layers: Layers | None,
    data: Iterable[Any],
    out: str | os.PathLike[str],
    *,
    format: str = "safetensors",
    reduce: str | Mapping[Any, str | None] | None = None,
    dtype: torch.dtype | str | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    input_key: int | str | None = None,
    target_key: int | str | bool | None = None,
    shard_size: int | None = None,
    device: torch.device | str | None = None,
    overlap: bool | None = None,
    progress: bool = True,
    overwrite: bool = False,
    model_name: str | None = None,
    data_name: str | None = None,
    command: str | None = None,
    tokenizer: Any = None,
    text_field: str | None = None,
    max_length: int | None = None,
    context_length: int | None = None,
    shuffle: int | None = None,
    skip_special: bool = False,
) -> dict[str, Any]:
    """Run ``model`` over ``data`` and write the selected layers' outputs to ``out``.

    Features are written batch by batch (at most one shard per rank is held in memory),
    in atomic, checksummed shards of ``shard_size`` samples. Run the same call again after
    an interruption and it resumes, keeping the shards that verify and producing
    byte-identical files (on a finished folder it verifies and repairs); under ``torchrun`` every rank computes its share of the shards and rank 0
    writes the manifest. The model runs in eval mode under ``torch.inference_mode``.

    Args:
        model: The model, or a ready :class:`~fxstore.FeatureExtractor` (then ``layers``,
            ``reduce`` and ``dtype`` must be ``None``).
        layers: What to store, as for :class:`~fxstore.FeatureExtractor`.
        data: A map-style ``Dataset`` (read in batches of ``batch_size`` by fxstore, each
            rank reading only its shards), or any iterable of batches (a ``DataLoader``).
            A batch is a tensor, a tuple ``(input, target, ...)`` or a dict.
        out: Output folder; created if missing.
        format: ``"safetensors"`` (shards) or ``"npy"`` (one memory-mapped file per layer).
        reduce: ``"avg"``/``"max"`` (global pooling of ``(N, C, ...)`` maps to ``(N, C)``),
            ``"flatten"`` or ``None``, for all layers or as ``{layer or alias: name}``.
            Runs inside the graph, before the copy to the host.
        dtype: Stored dtype of the features (cast inside the graph).
        batch_size: Batch size when ``data`` is a ``Dataset``.
        num_workers: Loader processes when ``data`` is a ``Dataset``.
        collate_fn: Collate function when ``data`` is a ``Dataset``.
        input_key: Field of the batch passed to the model; default: a tensor batch itself,
            element 0 of a tuple, or the first of ``input, inputs, image, images,
            pixel_values, x`` in a dict. A dict input is passed as keyword arguments.
        target_key: Field stored as ``"target"``; ``None`` stores a tuple's second element
            or a dict's ``target``/``targets``/``label``/``labels``/``y`` field if present;
            ``False`` stores nothing.
        shard_size: Samples per shard: the unit of writing, resuming and sharing work
            (default 1024; for text: rows, i.e. tokens, default 16384, a shard ending at the
            first document end at or past it).
        device: Device to run on (default: the model's); the model is moved there (and
            back, if the run fails).
        overlap: Copy to the host and write in a background thread while the next batch
            computes; default: on for CUDA, off on CPU (where the writer competes with the
            forward pass for cores).
        progress: Show a tqdm progress bar (rank 0 only).
        overwrite: Delete an earlier extraction in ``out`` instead of resuming it (refused,
            deleting nothing, if ``out`` holds any file fxstore did not write).
        model_name: Name of the model recorded in the manifest.
        data_name: Description of the data recorded in the manifest (part of the identity).
        command: Command recorded in the manifest (default: ``sys.argv``).
        tokenizer: A Hugging Face tokenizer: ``data`` is then text (a list of strings, a
            ``datasets.Dataset`` or list of dicts with a text or ``input_ids`` column, or
            token-id lists) and one row is stored per real token, with the columns
            ``token_id``, ``sequence`` and ``position`` (see docs/language-models.md).
        text_field: The text column (default ``"text"``, else ``"input_ids"``).
        max_length: Tokens per document kept (default: the model's maximum).
        context_length: Concatenate the documents and run windows of this many tokens.
        shuffle: Seed: write the token rows in a seeded random order (a permutation).
        skip_special: Store no BOS/EOS/CLS/SEP/pad rows.

    Returns:
        The manifest (also in ``out/manifest.json``).

    Raises:
        ConfigError: an invalid option, or a model or batch that does not fit the data.
        OutputError: ``out`` is unwritable, too small, in use by another run, holds files
            fxstore did not write, or holds a different extraction.
        LayerNotFoundError: a layer matches nothing.

    Example:
        >>> import tempfile, torch
        >>> from fxstore.dataset import extract_dataset
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
        >>> data = torch.utils.data.TensorDataset(torch.rand(10, 3, 8, 8), torch.arange(10))
        >>> m = extract_dataset(model, ["0", "1"], data, tempfile.mkdtemp(), reduce="avg",
        ...                     batch_size=4, shard_size=8, progress=False)
        >>> m["num_samples"], m["features"]["1"]["shape"], m["target"]["dtype"], len(m["shards"])
        (10, [4], 'int64', 2)
    """
    if shard_size is None:
        shard_size = 1024 if tokenizer is None else 16384
    check_layers(model, layers)
    _check_options(format, batch_size, shard_size, num_workers)
    options = _Options(format, reduce, dtype, batch_size, num_workers, collate_fn, input_key, target_key, shard_size,
                       device, overlap, progress, overwrite, model_name, data_name or type(data).__name__, command)
    if tokenizer is not None:  # token rows from a language model
        from ._text import TextOptions, extract_text

        text = TextOptions(text_field, max_length, context_length, shuffle, skip_special)
        return extract_text(model, layers, data, Path(out), tokenizer, text, options)
    ranks = _distributed.join()
    try:
        return _extract(model, layers, data, Path(out), ranks, options)
    finally:
        ranks.close()


@dataclasses.dataclass(frozen=True)
class _Options:
    """The keyword options of :func:`extract_dataset`."""

    format: str
    reduce: str | Mapping[Any, str | None] | None
    dtype: torch.dtype | str | None
    batch_size: int
    num_workers: int
    collate_fn: Callable[[list[Any]], Any] | None
    input_key: int | str | None
    target_key: int | str | bool | None
    shard_size: int
    device: torch.device | str | None
    overlap: bool | None
    progress: bool
    overwrite: bool
    model_name: str | None
    data_name: str
    command: str | None


def check_layers(model: nn.Module, layers: Any) -> None:
    """Refuse, before any work, a selection that names no layer (``None`` or empty) for a plain model.

    Raises:
        ConfigError: naming the value and how to list the model's layers.
    """
    if isinstance(model, FeatureExtractor):
        return
    empty = layers is None or (isinstance(layers, (list, tuple, set, frozenset, dict, str)) and len(layers) == 0)
    if empty:
        raise ConfigError(
            f"layers={layers!r} selects no layer: there would be nothing to store.\n"
            "Hint: pass layers=[...], e.g. layers=['layer4'] (fxstore.node_names(model) lists them)."
        )


def _check_options(format: str, batch_size: int, shard_size: int, num_workers: int) -> None:
    if format not in formats.FORMATS:
        raise ConfigError(f"format={format!r} is not an output format.\nHint: use one of {formats.NAMES}.")
    for name, value, low in (("batch_size", batch_size, 1), ("shard_size", shard_size, 1),
                             ("num_workers", num_workers, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ConfigError(f"{name}={value!r} must be an integer >= {low}.\nHint: e.g. {name}={max(low, 64)}.")


def _extract(model: nn.Module, layers: Any, data: Any, out: Path, ranks: _distributed.Ranks,
             o: _Options) -> dict[str, Any]:
    with placed(model, o.device, ranks) as device:
        extractors, names = _extractors(model, layers, o, device)
        plan, first = make_plan(data, o.shard_size, o.collate_fn)
        specs = probe(extractors, first, o, device)
        reduction_of = reductions(extractors, names)
        identity = _identity(model, specs, reduction_of, plan, data, o)
        sink = formats.get(o.format)(out, specs, plan.num_samples, identity_digest(identity))

        def work(decision: dict[str, Any]) -> None:
            mine = _assign(plan, set(decision["done"]), ranks)
            check = {int(k): v for k, v in decision["check"].items()}
            compute(extractors, plan, mine, sink, device, o, ranks, check)

        return run_folder(out, identity, sink, plan, o, ranks, work)


def _extractors(model: nn.Module, layers: Any, o: _Options,
                device: torch.device) -> tuple[list[FeatureExtractor], list[str]]:
    if isinstance(model, FeatureExtractor):
        if layers is not None or o.reduce is not None or o.dtype is not None:
            raise ConfigError(
                "layers, reduce and dtype must be None when a FeatureExtractor is passed.\n"
                "Hint: configure the extractor itself, or pass the plain model."
            )
        return [model], ["none"]
    if layers is None:
        raise ConfigError("no layers selected.\nHint: pass layers=[...]; list them with fxstore.node_names(model).")
    host = torch.device("cpu") if device.type != "cpu" else None
    return build_extractors(model, layers, o.reduce, dtype=o.dtype, host=host,
                            non_blocking=device.type == "cuda")


def _identity(model: nn.Module, specs: list[ArraySpec], reduction_of: dict[str, str], plan: Plan, data: Any,
              o: _Options) -> dict[str, Any]:
    def entry(s: ArraySpec) -> dict[str, Any]:
        return {"shape": list(s.shape), "dtype": str(s.dtype).removeprefix("torch.")}

    target = next((s for s in specs if s.key == TARGET), None)
    classes = _class_names(data)
    return {
        "format": o.format,
        "model": {"name": o.model_name or type(model).__name__, "fingerprint": manifest.model_fingerprint(model)},
        "features": {s.key: {**entry(s), "reduce": reduction_of.get(s.key, "none")} for s in specs if s is not target},
        "target": None if target is None else {**entry(target), **({"classes": classes} if classes else {})},
        "num_samples": plan.num_samples,
        "shard_size": o.shard_size,
        "batch_size": o.batch_size if plan.indexed else None,
        "data": o.data_name,
    }


def _class_names(data: Any) -> list[str] | None:
    """The class names of an ``ImageFolder``-like dataset (also inside a ``Subset`` or ``DataLoader``), else ``None``."""
    for source in (data, getattr(data, "dataset", None)):
        classes = getattr(source, "classes", None)
        if isinstance(classes, (list, tuple)) and classes and all(isinstance(c, str) for c in classes):
            return list(classes)
    return None


def _assign(plan: Plan, done: set[int], ranks: _distributed.Ranks) -> Callable[[int], bool]:
    """The shards this rank computes: an equal share of what is left."""
    shards = plan.all_shards()
    if shards is not None:
        left = [k for k in shards if k not in done]
        mine = set(left[ranks.rank::ranks.world])
        return mine.__contains__
    return lambda k: k not in done and k % ranks.world == ranks.rank
