"""The one translation table from the library's words to the command line's: a library hint names
Python options (``overwrite=True``, ``reduce='avg'``); the CLI prints the flags that set them.

Example:
    >>> print(flag_hint("refusing to resume.\\nHint: use overwrite=True to start over."))
    refusing to resume.
    Hint: use --overwrite to start over.
"""

from __future__ import annotations

import re

__all__ = ["FLAGS", "flag_hint"]

FLAGS = {
    "overwrite": "--overwrite",
    "reduce": "--pool",
    "dtype": "--dtype",
    "format": "--format",
    "out": "--out",
    "layers": "--layers",
    "device": "--device",
    "batch_size": "--batch-size",
    "shard_size": "--shard-size",
    "num_workers": "--num-workers",
    "max_length": "--max-length",
    "context_length": "--context-length",
    "text_field": "--text-field",
    "shuffle": "--shuffle",
    "skip_special": "--skip-special",
    "overlap": "--overlap",
}
"""``{library option: the CLI flag that sets it}`` (the options of ``extract_dataset`` the CLI exposes)."""

_OPTION = re.compile(r"(?<![\w.])(" + "|".join(FLAGS) + r")=(True\b|'[^']*'|\[[^\]]*\]|\d+|\.\.\.)?")


def _flag(match: re.Match[str]) -> str:
    flag, value = FLAGS[match.group(1)], match.group(2) or ""
    if value in ("", "True", "..."):
        return flag
    if value.startswith("["):
        value = " ".join(v.strip(" '\"") for v in value[1:-1].split(",")) or "..."
    return f"{flag} {value.strip(chr(39))}"


def flag_hint(message: str) -> str:
    """``message`` with the options its ``Hint:`` names written as the CLI flags that set them."""
    head, sep, hint = message.partition("Hint:")
    return head + sep + _OPTION.sub(_flag, hint) if sep else message
