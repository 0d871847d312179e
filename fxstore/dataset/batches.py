"""The batches of :func:`~fxstore.extract_dataset`, for workflows above the dataset layer (``fxstore.stats``).

A workflow that reduces a dataset instead of writing it reads the data exactly as an extraction
does: the same shards and batches of a map-style dataset or a stream (:func:`make_plan`, :func:`pick`),
the same tokenized, padded token batches with their mask of stored rows (:func:`token_plan`,
:func:`model_inputs`), and the same ranks under ``torchrun`` (:func:`join`).
"""

from __future__ import annotations

import types
from typing import Any

from torch import nn

from ._batches import Batch, Plan, batch_size_of, make_plan, pick, refuse_text
from ._compute import _hash_inputs, inputs_digest, to_device
from ._distributed import Ranks, join
from ._text import TextOptions, _check, _max_length, _plan, model_inputs, text_identity
from ._text_batches import TextBatch, TextPlan

__all__ = ["to_device", "Batch", "Plan", "make_plan", "pick", "batch_size_of", "refuse_text", "Ranks", "join", "TextOptions",
           "TextBatch", "TextPlan", "token_plan", "model_inputs", "hash_inputs", "shard_digest"]


def token_plan(model: nn.Module, data: Any, tokenizer: Any, text: TextOptions, *, batch_size: int,
               shard_size: int) -> tuple[TextPlan, dict[str, Any]]:
    """Tokenize ``data`` and cut it into shards and padded batches, as ``extract_dataset(tokenizer=...)`` does.

    Args:
        model: The language model (its number of positions bounds ``max_length``).
        data: Texts, a ``datasets.Dataset`` or list of dicts, or token-id sequences.
        tokenizer: The model's Hugging Face tokenizer.
        text: The text options (``shuffle`` must be ``None``: a reduction has no row order).
        batch_size: Sequences per batch.
        shard_size: Token rows per shard.

    Returns:
        The plan, and the text part of the run identity (tokenizer fingerprint, token digest, options).

    Raises:
        ConfigError: an invalid option, a tokenizer that does not fit, or empty documents.
    """
    o = types.SimpleNamespace(reduce=None, collate_fn=None, input_key=None, target_key=None, shard_size=shard_size,
                              batch_size=batch_size, format="none", model_name=None, data_name="")
    _check(text, o)
    text = TextOptions(text.text_field, _max_length(model, tokenizer, text), text.context_length, text.shuffle,
                       text.skip_special, text.pad_to)
    plan = _plan(data, tokenizer, text.max_length, text, o)
    return plan, text_identity(tokenizer, plan, text)


def _input_options(input_key: int | str | None, batch_size: int = 1, collate_fn: Any = None) -> Any:
    return types.SimpleNamespace(input_key=input_key, target_key=False, batch_size=batch_size, collate_fn=collate_fn)


def hash_inputs(hasher: Any, raw: Any, input_key: int | str | None) -> None:
    """Feed the model input of the raw batch ``raw`` to ``hasher``, as ``extract_dataset`` digests a shard's inputs."""
    _hash_inputs(hasher, raw, _input_options(input_key), False)


def shard_digest(plan: Plan, shard: int, *, input_key: int | str | None, batch_size: int, collate_fn: Any) -> str:
    """The digest of one shard's model inputs, read again from a map-style dataset (``sha256:...``)."""
    return inputs_digest(plan, shard, _input_options(input_key, batch_size, collate_fn), False)
