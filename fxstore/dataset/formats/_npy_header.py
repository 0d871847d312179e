"""The header of fxstore's ``.npy`` files: numpy's own header, plus a trailing comment naming the run.

A ``.npy`` header is a Python dict literal that numpy parses with ``ast.literal_eval``, so a comment
after it is ignored by every reader (``numpy.load``, also with ``mmap_mode``). fxstore writes::

    {'descr': '<f4', 'fortran_order': False, 'shape': (24, 10), } # fxstore run=sha256:... inputs=sha256:...

``run`` is the digest of the run identity (what a safetensors shard's header names), ``inputs`` the
digest of the manifest's row ranges and their inputs' digests (:func:`rows_digest`): together the
run's *generation*. Both follow from the run, so the same extraction writes the same bytes; a file
of a sibling run (same identity, other data) or of a rewritten folder names another generation and
is refused by a reader on every open, without hashing data. While a run writes, ``inputs`` is
``unfinished``; the finish writes the digest in place (the header keeps its length) before the rename.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from ..folder.checksums import ALGORITHM, digest_bytes

__all__ = ["UNFINISHED", "npy_header", "npy_layout", "rows_digest", "run_tag", "raw_run", "write_inputs"]

UNFINISHED = "unfinished"
_MAGIC = b"\x93NUMPY\x01\x00"  # format version 1.0: a 2-byte header length
_ALIGN = 64  # numpy aligns the data to 64 bytes
_DIGEST_CHARS = len(ALGORITHM) + 1 + 64
_TAG = re.compile(rb"# fxstore run=(" + ALGORITHM.encode() + rb":[0-9a-f]{64}) inputs=(\S+) *\n\Z")
_RAW = re.compile(rb"# fxstore run=(" + ALGORITHM.encode() + rb":[0-9a-f]{64}) ")
_MAX_RAW = 4096  # bytes read to find the tag of a damaged header (fxstore's headers are far shorter)


def npy_header(dtype: np.dtype, shape: tuple[int, ...], run: str, inputs: str = UNFINISHED) -> bytes:
    """The bytes before the data of fxstore's ``.npy`` file: magic, length, dict literal, comment, padding.

    Its length does not depend on ``inputs`` (a digest or :data:`UNFINISHED`), so the finish can write the
    digest in place.

    Example:
        >>> import io, numpy as np
        >>> from fxstore.dataset.formats._npy_header import npy_header
        >>> head = npy_header(np.dtype("float32"), (2, 3), "sha256:" + "0" * 64)
        >>> len(head) % 64, np.load(io.BytesIO(head + bytes(24))).shape
        (0, (2, 3))
    """
    descr, dims = np.lib.format.dtype_to_descr(dtype), tuple(int(d) for d in shape)
    literal = f"{{'descr': {descr!r}, 'fortran_order': False, 'shape': {dims!r}, }}"
    comment = f" # fxstore run={run} inputs="
    used = len(_MAGIC) + 2 + len(literal) + len(comment) + _DIGEST_CHARS + 1  # + "\n"
    text = literal + comment + inputs.ljust(_DIGEST_CHARS) + " " * (-used % _ALIGN) + "\n"
    return _MAGIC + len(text).to_bytes(2, "little") + text.encode("latin1")


def rows_digest(shards: list[dict[str, Any]]) -> str:
    """The digest of a manifest's ``shards``: each one's row range and the digest of its inputs.

    Example:
        >>> from fxstore.dataset.formats._npy_header import rows_digest
        >>> rows_digest([{"start": 0, "count": 8}]) == rows_digest([{"start": 0, "count": 8, "inputs": None}])
        True
    """
    rows = [[s["start"], s["count"], s.get("inputs")] for s in shards]
    return digest_bytes(json.dumps(rows, separators=(",", ":")).encode())


def npy_layout(source: Path | BinaryIO) -> tuple[tuple[int, ...], np.dtype, int] | None:
    """``(shape, dtype, data offset)`` from a ``.npy`` header (a path or an open file), or ``None`` if it is not one."""
    if not hasattr(source, "read"):
        try:
            with open(os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC), "rb") as f:
                return npy_layout(f)
        except OSError:
            return None
    try:
        source.seek(0)
        version = np.lib.format.read_magic(source)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(source)
        return (tuple(shape), dtype, source.tell()) if not fortran else None
    except (OSError, ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None


def run_tag(f: BinaryIO, offset: int) -> tuple[str, str] | None:
    """``(run, inputs)`` from the comment of a parsed ``.npy`` header whose data starts at ``offset``
    (``None``: the header names no run, it is not fxstore's)."""
    try:
        f.seek(0)
        head = f.read(offset)
    except OSError:
        return None
    found = _TAG.search(head)
    return None if found is None else (found[1].decode(), found[2].decode())


def raw_run(path: Path) -> str | None:
    """The run a ``.npy`` file's comment names, found in its first bytes even when the header does not parse
    (a damaged header: the comment may have survived)."""
    try:
        with open(os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC), "rb") as f:
            head = f.read(_MAX_RAW)
    except OSError:
        return None
    found = _RAW.search(head)
    return None if found is None else found[1].decode()


def write_inputs(path: Path, dtype: np.dtype, shape: tuple[int, ...], run: str, inputs: str) -> None:
    """Write the finished header (naming ``inputs``) over the unfinished one of ``path``, durably."""
    head = npy_header(dtype, shape, run, inputs)
    fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.pwrite(fd, head, 0)
        os.fsync(fd)
    finally:
        os.close(fd)
