"""Hugging Face models from local folders (``hf:DIR``): the class ``config.json`` names, and its tokenizer.

Nothing is downloaded and no code from the folder runs: the class is looked up in
``transformers`` by the name in ``config.json``'s ``architectures`` (so layer names are the
ones users see on that class: ``transformer.h.6`` for ``GPT2LMHeadModel``), weights load
from ``safetensors`` files only, and ``trust_remote_code`` is never set. The tokenizer comes
from the same folder unless another is named. A tokenizer without a pad token (GPT-2's)
gets one: the EOS token (else BOS, UNK, then id 0); padded positions are masked and never
stored, so which id pads does not change a stored value.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import ConfigError

__all__ = ["load_hf", "load_tokenizer", "PREFIX"]

PREFIX = "hf:"
"""Model names starting with this prefix are local Hugging Face folders."""


def load_hf(path: str | os.PathLike[str], tokenizer: str | os.PathLike[str] | None = None, *,
            need_tokenizer: bool = True) -> tuple[nn.Module, Any]:
    """Load a model saved with ``save_pretrained`` and its tokenizer, offline and without running code.

    Args:
        path: The model folder (``config.json`` + ``*.safetensors``), with or without the
            ``hf:`` prefix.
        tokenizer: Folder of the tokenizer (default: ``path``).
        need_tokenizer: Raise when no tokenizer is found; otherwise return ``None`` for it.

    Returns:
        ``(model in eval mode, tokenizer or None)``; the tokenizer always has a pad token.

    Raises:
        ConfigError: no folder, no ``config.json``, an architecture ``transformers`` does not
            have, no safetensors weights, or no tokenizer.

    Example:
        >>> import tempfile, transformers
        >>> folder = tempfile.mkdtemp()
        >>> cfg = transformers.GPT2Config(vocab_size=8, n_embd=8, n_layer=1, n_head=2, n_positions=16)
        >>> transformers.GPT2LMHeadModel(cfg).save_pretrained(folder)
        >>> model, tok = load_hf("hf:" + folder, need_tokenizer=False)
        >>> type(model).__name__, model.training, tok
        ('GPT2LMHeadModel', False, None)
    """
    folder = _folder(path, "model")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"model folder '{folder}' has no config.json.\n"
                          "Hint: point hf:DIR to a folder written by model.save_pretrained(DIR).")
    architectures = json.loads(config_file.read_text()).get("architectures") or []
    if not architectures:
        raise ConfigError(f"'{config_file}' names no architectures.\n"
                          "Hint: save the model with save_pretrained, which records its class there.")
    import transformers

    cls = getattr(transformers, architectures[0], None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ConfigError(
            f"'{config_file}' names architecture {architectures[0]!r}, which transformers "
            f"{transformers.__version__} does not have.\nHint: models whose code lives in the folder "
            "(trust_remote_code) are refused; upgrade transformers or load the model in Python."
        )
    if not any(folder.glob("*.safetensors")):
        raise ConfigError(f"model folder '{folder}' has no .safetensors weights.\n"
                          "Hint: save with model.save_pretrained(DIR) (safetensors is its default); "
                          "pickled .bin weights are refused.")
    try:
        with no_progress_bars():
            model = cls.from_pretrained(folder, use_safetensors=True, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, RuntimeError) as e:
        raise ConfigError(f"cannot load model folder '{folder}': {type(e).__name__}: {_first(e)}\n"
                          "Hint: the folder must hold what save_pretrained wrote for this class.") from e
    tok = load_tokenizer(folder if tokenizer is None else tokenizer, required=need_tokenizer,
                         named=tokenizer is not None)
    return model.eval(), tok


def load_tokenizer(path: str | os.PathLike[str], *, required: bool = True, named: bool = True) -> Any:
    """The tokenizer saved in ``path`` (``AutoTokenizer``, local files only), with a pad token.

    Raises:
        ConfigError: when ``required`` and the folder holds no tokenizer.
    """
    folder = _folder(path, "tokenizer")
    from transformers import AutoTokenizer

    files = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "tokenizer.model")
    if not any((folder / f).is_file() for f in files):
        if not required:
            return None
        where = "" if named else " (the model folder)"
        raise ConfigError(f"'{folder}'{where} holds no tokenizer (none of {', '.join(files)}).\n"
                          "Hint: save one there with tokenizer.save_pretrained(DIR), or pass --tokenizer DIR.")
    try:
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"cannot load the tokenizer in '{folder}': {type(e).__name__}: {_first(e)}\n"
                          "Hint: save it with tokenizer.save_pretrained(DIR).") from e
    return with_pad_token(tok)


def with_pad_token(tokenizer: Any) -> Any:
    """Give ``tokenizer`` a pad token if it has none (EOS, else BOS, else UNK; else id 0 is used)."""
    if getattr(tokenizer, "pad_token_id", None) is None:
        for name in ("eos_token", "bos_token", "unk_token"):
            token = getattr(tokenizer, name, None)
            if token is not None:
                tokenizer.pad_token = token
                break
    return tokenizer


@contextlib.contextmanager
def no_progress_bars() -> Iterator[None]:
    """Silence transformers' weight-loading bars (fxstore's own bar reports the run)."""
    from transformers.utils import logging

    enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            logging.enable_progress_bar()


def _folder(path: str | os.PathLike[str], what: str) -> Path:
    text = os.fspath(path)
    folder = Path(text[len(PREFIX):] if text.startswith(PREFIX) else text)
    if not folder.is_dir():
        raise ConfigError(f"{what} folder '{folder}' does not exist.\n"
                          f"Hint: pass a local folder written by save_pretrained (nothing is downloaded).")
    return folder


def _first(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0]
