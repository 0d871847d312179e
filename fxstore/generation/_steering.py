"""Steering vectors from contrastive pairs, read with fxstore's extractor.

The workflow of repeng and steering-vectors on fxstore's read path: run every positive and
negative example through one captured program (a :class:`~fxstore.FeatureExtractor` with
``keep_output=False``, so the model runs only up to the last layer read), take each sequence's
value at one token (or the mean over its tokens), and reduce the pair differences to one
vector per layer.

Sequences of different lengths share a batch right-padded, with an attention mask when the
model's ``forward`` takes one: a real token never attends to padding on its right (causal
attention) nor to masked padding, and keeps its own position, so each sequence reads what it
reads alone. A model without an ``attention_mask`` argument gets batches of equal lengths only.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..capture import FeatureExtractor, Layers, build_cache, canonical_specs, spec_label
from ..errors import ConfigError

__all__ = ["steering_vectors"]

METHODS = ("mean_diff", "pca")


def steering_vectors(
    model: nn.Module,
    positive: Sequence[str] | Sequence[torch.Tensor],
    negative: Sequence[str] | Sequence[torch.Tensor],
    layers: Layers,
    *,
    method: str = "mean_diff",
    tokenizer: Any = None,
    position: int | str = -1,
    batch_size: int = 32,
) -> dict[str, torch.Tensor]:
    """One steering vector per layer from contrastive pairs ``(positive[i], negative[i])``.

    Each sequence's value at a layer is read at one token (``position``); the vector is
    computed from the pair differences ``d_i = value(positive[i]) - value(negative[i])``:

    - ``method="mean_diff"``: their mean, ``mean_i d_i``;
    - ``method="pca"``: the first principal component of the differences, **centred**
      (``d_i - mean_i d_i``, as scikit-learn's PCA and repeng's ``pca_diff`` do): the unit
      vector along which the differences vary most, its sign chosen so that it points the way
      of the mean difference. It needs at least two pairs whose differences are not all equal.

    The model runs in its current mode (call ``model.eval()`` first) under ``torch.no_grad``;
    the extractor it is read with is built once per model and layers (later calls reuse it, see
    :data:`fxstore.capture.build_cache`). The model is not modified.

    Args:
        model: The model, e.g. a Hugging Face causal LM.
        positive: Strings (with ``tokenizer``) or 1-D token-id tensors of any lengths.
        negative: The same number of strings or tensors; ``negative[i]`` pairs with ``positive[i]``.
        layers: The layers to read, in any form :class:`~fxstore.FeatureExtractor` takes; each
            must be one node (a module's first output for a tuple output) whose value is
            ``[batch, tokens, ...]``.
        method: ``"mean_diff"`` or ``"pca"``.
        tokenizer: A Hugging Face tokenizer for string pairs (special tokens added as it adds
            them; its padding side does not matter: sequences are padded on the right here).
        position: The token read from each sequence: an int indexes its real tokens
            (``-1``, the default: its last real token; ``0``: its first), ``"mean"`` averages
            over its real tokens.
        batch_size: Sequences per forward.

    Returns:
        ``{layer: vector}`` keyed by each layer's name (its alias for a dict ``{layer: alias}``),
        each vector of the layer's value shape without batch and token dimensions, in its dtype.

    Raises:
        ConfigError: unequal numbers of positive and negative examples, no pairs, an unknown
            method or position, a position beyond a sequence, fewer than two pairs for
            ``"pca"``, strings without a tokenizer, examples that are neither strings nor 1-D
            integer tensors (or have no tokens), or a layer whose value is not ``[batch, tokens, ...]``.

    Example:
        >>> import torch, transformers, fxstore
        >>> _ = torch.manual_seed(0)
        >>> config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32)
        >>> model = transformers.GPT2LMHeadModel(config).eval()
        >>> positive = [torch.tensor([5, 9, 3]), torch.tensor([7, 1])]
        >>> negative = [torch.tensor([5, 9, 4, 2]), torch.tensor([8, 1])]
        >>> vecs = fxstore.steering_vectors(model, positive, negative, ["transformer.h.0"])
        >>> tuple(vecs["transformer.h.0"].shape)
        (32,)
        >>> hidden = lambda ids: model(ids[None], output_hidden_states=True).hidden_states[1][0, -1]
        >>> with torch.no_grad():
        ...     by_hand = ((hidden(positive[0]) - hidden(negative[0])) + (hidden(positive[1]) - hidden(negative[1]))) / 2
        >>> torch.allclose(vecs["transformer.h.0"], by_hand, atol=1e-5)
        True
    """
    if method not in METHODS:
        raise ConfigError(
            f"steering_vectors: method={method!r} is not a method.\nHint: use one of {', '.join(map(repr, METHODS))}."
        )
    if position != "mean" and (not isinstance(position, int) or isinstance(position, bool)):
        raise ConfigError(
            f"steering_vectors: position={position!r} is not a position.\n"
            "Hint: use an int (-1: each sequence's last real token) or 'mean' (the mean over its real tokens)."
        )
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ConfigError(f"steering_vectors: batch_size={batch_size!r} must be a positive int.\nHint: use e.g. 32.")
    pos = _sequences(positive, "positive", tokenizer)
    neg = _sequences(negative, "negative", tokenizer)
    if not pos or len(pos) != len(neg):
        raise ConfigError(
            f"steering_vectors: {len(pos)} positive and {len(neg)} negative examples; they must be pairs "
            "(positive[i] with negative[i]), at least one.\nHint: pass two lists of the same, non-zero length."
        )
    if method == "pca" and len(pos) < 2:
        raise ConfigError(
            "steering_vectors: method='pca' needs at least two pairs (the differences are centred, so one pair "
            "has no variance).\nHint: add pairs, or use method='mean_diff'."
        )
    specs = canonical_specs(layers, model)
    labels = [alias or spec_label(spec) for spec, alias in specs]
    if not labels:
        raise ConfigError("steering_vectors: no layers given.\nHint: pass e.g. ['model.layers.6'].")
    values = _read(model, pos + neg, layers, (tuple(specs), labels), position, batch_size)
    n = len(pos)
    return {label: _reduce(values[label][:n] - values[label][n:], method, label).to(values[label].dtype)
            for label in labels}


def _sequences(examples: Any, name: str, tokenizer: Any) -> list[torch.Tensor]:
    """``examples`` as 1-D token-id tensors (strings tokenized, one by one: no padding)."""
    if isinstance(examples, (str, torch.Tensor)) or not isinstance(examples, Sequence):
        raise ConfigError(
            f"steering_vectors: {name} must be a list of strings or of 1-D token-id tensors, got "
            f"{type(examples).__name__}.\nHint: pass a list, e.g. {name}=['I love it', ...] with tokenizer=tok."
        )
    examples = list(examples)
    if any(isinstance(e, str) for e in examples):
        if not all(isinstance(e, str) for e in examples):
            raise ConfigError(
                f"steering_vectors: {name} mixes strings and other values.\nHint: pass all strings or all tensors."
            )
        if tokenizer is None:
            raise ConfigError(
                f"steering_vectors: {name} holds strings but no tokenizer was given.\n"
                "Hint: pass tokenizer=AutoTokenizer.from_pretrained(...), or 1-D token-id tensors."
            )
        examples = [torch.as_tensor(ids, dtype=torch.long) for ids in tokenizer(examples)["input_ids"]]
    out = []
    for i, ids in enumerate(examples):
        if not isinstance(ids, torch.Tensor) or ids.dim() != 1 or ids.is_floating_point() or ids.is_complex():
            got = f"shape {tuple(ids.shape)}, {ids.dtype}" if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise ConfigError(
                f"steering_vectors: {name}[{i}] is not a 1-D token-id tensor ({got}).\n"
                "Hint: pass 1-D integer tensors (ids[0] of a [1, T] batch), or strings with tokenizer=."
            )
        if ids.numel() == 0:
            raise ConfigError(
                f"steering_vectors: {name}[{i}] has no tokens.\nHint: drop empty examples."
            )
        out.append(ids.long())
    return out


def _read(model: nn.Module, sequences: list[torch.Tensor], layers: Layers, selection: tuple[Any, list[str]],
          position: int | str, batch_size: int) -> dict[str, torch.Tensor]:
    """Each layer's value of every sequence at ``position``: ``{label: [len(sequences), ...]}``.

    ``selection`` is ``(canonical specs, labels)``; the extractor comes from ``build_cache``, under the key
    ``patch_sweep`` reads its clean values with (the two share it).
    """
    specs, labels = selection
    for i, ids in enumerate(sequences):
        if position != "mean" and not -len(ids) <= position < len(ids):  # type: ignore[operator]
            raise ConfigError(
                f"steering_vectors: position={position} is beyond example {i} of the positives then negatives "
                f"({len(ids)} tokens).\nHint: use a position within every sequence (-1: the last token)."
            )
    parameters = inspect.signature(model.forward).parameters
    masked = "attention_mask" in parameters
    extra = {"use_cache": False} if "use_cache" in parameters else {}
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    chunks: list[list[int]] = []
    for i in order:  # by length; equal lengths only when the model cannot be told about padding
        last = chunks[-1] if chunks else None
        if last is None or len(last) == batch_size or (not masked and len(sequences[last[0]]) != len(sequences[i])):
            chunks.append([i])
        else:
            last.append(i)
    read: dict[str, list[torch.Tensor | None]] = {label: [None] * len(sequences) for label in labels}
    extractor = None
    with torch.no_grad():
        for chunk in chunks:
            lengths = torch.tensor([len(sequences[i]) for i in chunk], device=device)
            ids = torch.zeros(len(chunk), int(lengths.max()), dtype=torch.long, device=device)
            for row, i in enumerate(chunk):
                ids[row, : len(sequences[i])] = sequences[i].to(device)
            mask = (torch.arange(ids.shape[1], device=device) < lengths[:, None]).long()
            inputs = ((), {"input_ids": ids, "attention_mask": mask, **extra}) if masked else ((ids,), extra)
            if extractor is None:
                extractor = build_cache.get(model, ("features", specs, "auto"), lambda m, inputs=inputs: FeatureExtractor(
                    m, layers, keep_output=False, example_inputs=inputs))
            _, features = extractor(*inputs[0], **inputs[1])
            for label in labels:
                value = _one(extractor, features, label, ids.shape)
                for row, i in enumerate(chunk):
                    real = value[row, : int(lengths[row])]
                    read[label][i] = real.mean(0) if position == "mean" else real[position]
    return {label: torch.stack(rows) for label, rows in read.items()}  # type: ignore[misc]


def _one(extractor: FeatureExtractor, features: dict[str, torch.Tensor], label: str,
         shape: torch.Size) -> torch.Tensor:
    keys = [k for k in extractor.keys_for(label) if ":" not in k or k.endswith(":0")]
    if len(keys) != 1:
        raise ConfigError(
            f"steering_vectors: layer '{label}' is {len(keys)} nodes ({keys[:4]}); a steering vector is read "
            "from one node per layer.\nHint: name one module or node per layer (fxstore.node_names(model) lists them)."
        )
    value = features[keys[0]]
    if value.dim() < 2 or tuple(value.shape[:2]) != tuple(shape):
        raise ConfigError(
            f"steering_vectors: layer '{label}' has a value of shape {tuple(value.shape)} for token ids of shape "
            f"{tuple(shape)}; it must be [batch, tokens, ...].\nHint: read a layer of the token stream, such as a "
            "transformer block (e.g. 'model.layers.6')."
        )
    return value


def _reduce(diffs: torch.Tensor, method: str, label: str) -> torch.Tensor:
    """The mean difference, or the first principal component of the centred differences."""
    work = diffs.to(torch.float64 if diffs.dtype == torch.float64 else torch.float32).flatten(1)
    mean = work.mean(0)
    if method == "mean_diff":
        return mean.reshape(diffs.shape[1:])
    centred = work - mean
    _, singular, vh = torch.linalg.svd(centred, full_matrices=False)
    if not bool(singular[0] > 0):
        raise ConfigError(
            f"steering_vectors: at layer '{label}' every pair differs by the same value, so the centred "
            "differences have no principal component.\nHint: use method='mean_diff', or add varied pairs."
        )
    component = vh[0]
    if bool(component @ mean < 0):
        component = -component
    return component.reshape(diffs.shape[1:])
