"""Dataset statistics computed inside the graph: moments, Fréchet distance, firing frequency, top activations.

A workflow above capture and dataset: it builds a :class:`~fxstore.FeatureExtractor` whose graph
returns each batch's partial sums, reads the data as :func:`~fxstore.extract_dataset` does, and keeps
only float64 accumulators.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ..capture import Layers
from ..dataset.batches import TextOptions
from ._options import Options
from ._result import FeatureStatistics, frechet_distance, load_all, save_all
from ._run import run_statistics

__all__ = ["feature_statistics", "FeatureStatistics", "frechet_distance", "save_all", "load_all"]


def feature_statistics(
    model: nn.Module,
    layers: Layers,
    data: Iterable[Any],
    *,
    batch_size: int = 64,
    top_k: int = 0,
    moments: bool = True,
    reduce: str | Mapping[Any, str | None] | None = None,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    num_workers: int = 0,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    input_key: int | str | None = None,
    shard_size: int | None = None,
    compile: bool | str = False,
    checkpoint: str | os.PathLike[str] | None = None,
    progress: bool = True,
    model_name: str | None = None,
    data_name: str | None = None,
    tokenizer: Any = None,
    text_field: str | None = None,
    max_length: int | None = None,
    context_length: int | None = None,
    skip_special: bool = False,
) -> dict[str, FeatureStatistics]:
    """The statistics of the selected layers' rows over a whole dataset, without keeping the rows.

    Rows: an image model's feature ``[N, D]`` gives N rows (``reduce="avg"`` pools ``[N, C, H, W]``
    to ``[N, C]``); a language model (``tokenizer=``) gives one row per real token, padding excluded,
    exactly the rows ``extract_dataset(..., tokenizer=...)`` stores. Each batch is added in place, on
    the device, to float64 accumulators (sum, ``x.T @ x``, firing counts) and per-unit top-k lists,
    right after the extractor's graph (compiled: in the same graph, the padding mask an input); under
    ``torchrun`` every rank computes its share of the shards and the ranks' accumulators are merged
    at the end. What a call builds (the extractor, its self-check, the compiled step) is kept in
    ``fxstore.capture.build_cache``: a second call on the same model only runs its batches.

    Args:
        model: The model (left as it is: its modes come back, and it is moved only for the run).
        layers: What to reduce, as for :class:`~fxstore.FeatureExtractor`.
        data: A map-style ``Dataset``, any iterable of batches (a ``DataLoader``), or with
            ``tokenizer=`` texts, a ``datasets.Dataset`` or token-id sequences.
        batch_size: Batch size when ``data`` is a ``Dataset`` or text.
        top_k: Per unit, keep the ``top_k`` largest values and where they occurred (0: none).
        moments: Compute the covariance (``False``: only count, mean, firing and top-k; for large ``D``
            the covariance is ``D² `` float64 values).
        reduce: ``"avg"``/``"max"`` (global pooling of ``(N, C, ...)`` maps), ``"flatten"`` or ``None``,
            for all layers or as ``{layer or alias: name}`` (layers not in the mapping: ``None``).
        dtype: Cast the features to this dtype before reducing (the sums stay float64).
        device: Device to run on (default: the model's).
        num_workers: Loader processes when ``data`` is a ``Dataset``.
        collate_fn: Collate function when ``data`` is a ``Dataset``.
        input_key: Field of the batch passed to the model (as in ``extract_dataset``).
        shard_size: Samples (text: token rows) per shard: the unit of checkpointing and of sharing work
            between ranks (default 1024, text 16384).
        compile: Run the extractor and the reduction as one ``torch.compile``'d step (``True``: inductor;
            a string names the backend, e.g. ``"aot_eager"``).
        checkpoint: A file to save progress to after every shard; the same call again resumes from it
            (another model, data, layers or options are refused), and a finished run is read back.
        progress: Show a tqdm progress bar (rank 0 only).
        model_name: Name of the model recorded in the identity.
        data_name: Description of the data recorded in the identity.
        tokenizer: A Hugging Face tokenizer: ``data`` is text (see ``extract_dataset``).
        text_field: The text column (default ``"text"``, else ``"input_ids"``).
        max_length: Tokens per document kept (default: the model's maximum).
        context_length: Concatenate the documents and run windows of this many tokens.
        skip_special: Leave out BOS/EOS/CLS/SEP rows.

    Returns:
        ``{feature key: FeatureStatistics}``.

    Raises:
        ConfigError: an invalid option, or a layer that does not give one row per sample (or token).
        LayerNotFoundError: a layer matches nothing.
        OutputError: the checkpoint holds another run, or cannot be written.

    Example:
        >>> import torch, fxstore
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
        >>> images = torch.utils.data.TensorDataset(torch.rand(10, 3, 8, 8))
        >>> s = fxstore.feature_statistics(net, ["1"], images, reduce="avg", batch_size=4, top_k=3,
        ...                                progress=False)["1"]
        >>> s.count, tuple(s.mean.shape), tuple(s.cov.shape), s.cov.dtype, tuple(s.top_indices.shape)
        (10, (4,), (4, 4), torch.float64, (4, 3))
    """
    if shard_size is None:
        shard_size = 1024 if tokenizer is None else 16384
    text = None
    if tokenizer is not None:
        text = TextOptions(text_field, max_length, context_length, None, skip_special)
    options = Options(batch_size, top_k, moments, "none" if reduce is None else reduce, dtype, device, num_workers,
                      collate_fn, input_key, shard_size, compile, checkpoint, progress, model_name, data_name,
                      tokenizer, text)
    return run_statistics(model, layers, data, options)
