"""Checksums of data files: SHA-256, the hash ``sha256sum`` checks, read in large blocks.

SHA-256 comes with Python (``hashlib``, OpenSSL underneath, hardware-accelerated on
current x86 and ARM CPUs): about 530 MB/s on the 2-core CI machine, faster than BLAKE2b
there (220 MB/s). A digest is written as ``"sha256:<hex>"``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

__all__ = ["ALGORITHM", "digest_bytes", "digest_file", "identity_digest", "is_digest"]

ALGORITHM = "sha256"
_BLOCK = 8 << 20
_DIGEST = re.compile(rf"{ALGORITHM}:[0-9a-f]{{64}}")


def is_digest(value: object) -> bool:
    """Whether ``value`` is a well-formed digest string (``"sha256:<64 hex digits>"``)."""
    return isinstance(value, str) and _DIGEST.fullmatch(value) is not None


def digest_bytes(data: bytes | memoryview) -> str:
    """The checksum of ``data``.

    Example:
        >>> from fxstore.dataset.folder.checksums import digest_bytes
        >>> digest_bytes(b"abc")[:23]
        'sha256:ba7816bf8f01cfea'
    """
    return f"{ALGORITHM}:{hashlib.sha256(data).hexdigest()}"


def digest_file(path: str | os.PathLike[str], offset: int = 0, length: int | None = None) -> str:
    """The checksum of ``length`` bytes of a file from ``offset`` (default: to the end).

    Raises:
        OSError: the file cannot be read, or is shorter than ``offset + length``.
    """
    digest = hashlib.sha256()
    with open(os.open(Path(path), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC), "rb") as f:
        f.seek(offset)
        left = length
        while left is None or left > 0:
            block = f.read(_BLOCK if left is None else min(_BLOCK, left))
            if not block:
                if left is not None:
                    raise OSError(f"{path} ends {left} bytes early")
                break
            digest.update(block)
            if left is not None:
                left -= len(block)
    return f"{ALGORITHM}:{digest.hexdigest()}"


def identity_digest(identity: dict[str, object]) -> str:
    """The checksum of what fixes a run's rows (canonical JSON): what each shard's header names as its run.

    It covers the whole run identity except the data's description (``data``) and how it was
    batched (``batch_size``): the same data passed as a ``Dataset`` or as a ``DataLoader`` gives
    the same bytes. The data itself is covered by each shard's ``inputs`` digest.

    Example:
        >>> from fxstore.dataset.folder.checksums import identity_digest
        >>> identity_digest({"a": 1, "b": [2]}) == identity_digest({"b": [2], "a": 1, "data": "x"})
        True
    """
    rows = {k: v for k, v in identity.items() if k not in ("data", "batch_size")}
    return digest_bytes(json.dumps(rows, sort_keys=True, separators=(",", ":")).encode())
