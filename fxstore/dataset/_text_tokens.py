"""From text to the token sequences a model runs on: tokenize, cut, or concatenate into windows.

Two layouts:

* documents (default): each document is tokenized as its tokenizer does by default
  (``tokenizer(text)``: GPT-2 adds nothing, Llama a BOS, BERT ``[CLS] ... [SEP]``) and cut
  at ``max_length`` tokens (HF truncation: the closing special token stays). Sequence ``i``
  is document ``i``.
* windows (``context_length=N``): documents are tokenized without special tokens, each
  followed by the tokenizer's separator (EOS, else SEP), concatenated, and cut into windows
  of exactly ``N`` tokens, each starting with the tokens the tokenizer puts in front of a
  text by default (Llama's BOS, BERT's ``[CLS]``). The incomplete last window is dropped.

Already tokenized data (``input_ids`` per document) is used as given: nothing is added; the
windows layout concatenates it without separators.

The token ids of every sequence are held in one flat ``int32`` array (4 bytes per token; the
stored features of one layer take hundreds of times more).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import ConfigError

__all__ = ["Sequences", "tokenize", "tokenizer_fingerprint", "special_ids", "documents"]

_CHUNK = 1000  # documents per tokenizer call


@dataclasses.dataclass
class Sequences:
    """Token sequences in one flat array: sequence ``i`` is ``ids[offsets[i]:offsets[i + 1]]``."""

    ids: np.ndarray  # int32
    offsets: np.ndarray  # int64, one more than sequences
    dropped: int = 0  # tokens of an incomplete last window

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        return self.ids[self.offsets[i]:self.offsets[i + 1]]

    @property
    def lengths(self) -> np.ndarray:
        """Tokens per sequence."""
        return np.diff(self.offsets)


def documents(data: Any, text_field: str | None) -> Iterator[str | Sequence[int]]:
    """The documents of ``data``: strings, or lists of token ids (already tokenized).

    ``data`` is a list of strings, a list of token-id lists, or a table (a ``datasets.Dataset``,
    a list of dicts) with a text column (``text_field``, default ``"text"``) or an
    ``input_ids`` column.

    Raises:
        ConfigError: the column does not exist (naming the columns there are) or a value is
            neither text nor token ids.
    """
    columns = getattr(data, "column_names", None)
    if columns is not None:  # a datasets.Dataset: read one column, in chunks
        field = _field(list(columns), text_field)
        for lo in range(0, len(data), _CHUNK):
            yield from _checked(data[lo:lo + _CHUNK][field], field, lo)
        return
    if isinstance(data, (str, bytes)) or not isinstance(data, Iterable):
        raise ConfigError(f"text data of type {type(data).__name__} is not a collection of documents.\n"
                          "Hint: pass a list of strings, a datasets.Dataset or a list of token-id lists.")
    field = None
    for i, item in enumerate(data):
        if isinstance(item, Mapping):
            field = field or _field(list(item), text_field)
            if field not in item:
                raise ConfigError(f"document {i} has no field {field!r}; its fields are {sorted(item)}.\n"
                                  "Hint: every row needs the same text field.")
            item = item[field]
        elif text_field is not None and i == 0:
            raise ConfigError(f"text_field={text_field!r} was given but the documents are "
                              f"{type(item).__name__}, not rows with fields.\nHint: leave text_field unset.")
        yield from _checked([item], field or "text", i)


def _field(columns: list[str], text_field: str | None) -> str:
    if text_field is not None:
        if text_field not in columns:
            raise ConfigError(f"the data has no text field {text_field!r}; its fields are {columns}.\n"
                              "Hint: name the column holding the text with text_field=.")
        return text_field
    for name in ("text", "input_ids"):
        if name in columns:
            return name
    raise ConfigError(f"the data has no 'text' or 'input_ids' field; its fields are {columns}.\n"
                      "Hint: name the column holding the text with text_field=.")


def _checked(values: Iterable[Any], field: str, start: int) -> Iterator[str | Sequence[int]]:
    for i, value in enumerate(values, start):
        if isinstance(value, str):
            yield value
        elif isinstance(value, np.ndarray) or (isinstance(value, Sequence) and all(
                isinstance(t, (int, np.integer)) for t in value)):
            yield [int(t) for t in value]
        else:
            raise ConfigError(f"document {i} ({field!r}) is a {type(value).__name__}, neither text nor token ids.\n"
                              "Hint: the text field must hold strings; an input_ids field lists of integers.")


def special_ids(tokenizer: Any) -> set[int]:
    """The ids of the tokenizer's BOS, EOS, CLS, SEP and pad tokens (what ``skip_special`` drops)."""
    names = ("bos_token_id", "eos_token_id", "cls_token_id", "sep_token_id", "pad_token_id")
    return {int(v) for v in (getattr(tokenizer, n, None) for n in names) if v is not None}


def _affixes(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The tokens the tokenizer puts before and after a text by default."""
    with_special = list(tokenizer("x")["input_ids"])
    plain = list(tokenizer("x", add_special_tokens=False)["input_ids"])
    for k in range(len(with_special) - len(plain) + 1):
        if with_special[k:k + len(plain)] == plain:
            return with_special[:k], with_special[k + len(plain):]
    return [], []


def tokenize(data: Any, tokenizer: Any, *, text_field: str | None, max_length: int,
             context_length: int | None) -> Sequences:
    """Tokenize ``data`` into the sequences the model runs on (see the module docstring).

    Raises:
        ConfigError: no documents, or a document with no token.
    """
    windows = context_length is not None
    ids: list[np.ndarray] = []
    lengths: list[int] = []
    separator: list[int] = []
    prefix: list[int] = []
    pretokenized = None
    chunk: list[Any] = []
    index = 0

    def flush() -> None:
        nonlocal index
        if pretokenized:
            encoded = [list(c) if windows else list(c)[:max_length] for c in chunk]
        elif windows:
            encoded = tokenizer(chunk, add_special_tokens=False)["input_ids"]
        else:
            encoded = tokenizer(chunk, truncation=True, max_length=max_length)["input_ids"]
        for i, tokens in enumerate(encoded, index):
            if len(tokens) == 0:
                raise ConfigError(f"document {i} is empty: it has no token.\n"
                                  "Hint: drop empty documents first (e.g. dataset.filter(lambda r: r['text'].strip())).")
            ids.append(np.asarray(list(tokens) + separator, dtype=np.int32))
            lengths.append(len(tokens) + len(separator))
        index += len(chunk)
        chunk.clear()

    for doc in documents(data, text_field):
        if pretokenized is None:
            pretokenized = not isinstance(doc, str)
            if windows and not pretokenized:
                prefix, _ = _affixes(tokenizer)
                sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
                separator = [] if sep is None else [int(sep)]
        elif pretokenized == isinstance(doc, str):
            raise ConfigError(f"document {index + len(chunk)} mixes text and token ids with the documents before it.\n"
                              "Hint: pass either texts or token-id lists.")
        chunk.append(doc)
        if len(chunk) == _CHUNK:
            flush()
    if chunk:
        flush()
    if not ids:
        raise ConfigError("the text data holds no document.\nHint: pass at least one non-empty document.")
    flat = np.concatenate(ids)
    if not windows:
        return Sequences(flat, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
    return _windows(flat, np.asarray(prefix, dtype=np.int32), context_length)


def _windows(stream: np.ndarray, prefix: np.ndarray, n: int) -> Sequences:
    body = n - len(prefix)
    if body < 1:
        raise ConfigError(f"context_length={n} leaves no room after the {len(prefix)} leading special tokens.\n"
                          "Hint: use a longer context length.")
    count = len(stream) // body
    if count == 0:
        raise ConfigError(f"the data has {len(stream)} tokens, fewer than one window of context_length={n}.\n"
                          "Hint: use a shorter context length or more text.")
    blocks = stream[:count * body].reshape(count, body)
    if len(prefix):
        blocks = np.concatenate([np.broadcast_to(prefix, (count, len(prefix))), blocks], axis=1)
    offsets = np.arange(count + 1, dtype=np.int64) * n
    return Sequences(np.ascontiguousarray(blocks).reshape(-1), offsets, dropped=len(stream) - count * body)


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A SHA-256 over the tokenizer's class, vocabulary/model, special tokens and padding side.

    Example:
        >>> from fxstore.dataset._text_tokens import tokenizer_fingerprint
        >>> class Tok:
        ...     padding_side = "right"
        ...     special_tokens_map = {"eos_token": "</s>"}
        ...     def get_vocab(self): return {"a": 0, "</s>": 1}
        >>> tokenizer_fingerprint(Tok()) == tokenizer_fingerprint(Tok()), tokenizer_fingerprint(Tok())[:7]
        (True, 'sha256:')
    """
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    digest.update(json.dumps(getattr(tokenizer, "special_tokens_map", {}), sort_keys=True, default=str).encode())
    digest.update(str(getattr(tokenizer, "padding_side", "")).encode())
    return "sha256:" + digest.hexdigest()
