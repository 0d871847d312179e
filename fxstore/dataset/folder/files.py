"""Files of the output folder: atomic writes, early checks (writable, free space), error translation.

Every file fxstore writes into an output folder goes through :func:`atomic_write` (a hidden
temporary file in the same folder, ``fsync``, then ``os.replace``), so a killed process
leaves either the old file or the complete new one, never a torn file.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ...errors import OutputError
from .names import PROBE, temp_path

__all__ = ["NotPlainFile", "atomic_write", "atomic_write_json", "check_writable", "check_free_space",
           "os_errors", "read_small", "read_json", "plain_stat", "create_exclusive", "check_depth", "cut",
           "cut_list", "open_plain", "file_key", "remove_probe"]

JSON_LIMIT = 256 << 20
"""The largest manifest or run record fxstore reads (a manifest of a million shards is about 200 MB)."""
JSON_DEPTH = 32
"""The deepest nesting fxstore accepts in a manifest or run record (its own are 4 deep)."""
_NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC


class NotPlainFile(OSError):
    """A name fxstore reads or writes is a symlink, FIFO, device or folder, or is too large to be fxstore's."""


def create_exclusive(path: Path) -> int:
    """Create ``path`` as a new file (never following a symlink, never opening what exists); its descriptor.

    Raises:
        FileExistsError: something (a file, a symlink, a FIFO) already has that name.
    """
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o644)


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers only ever see the complete file.

    The temporary file is created with ``O_EXCL | O_NOFOLLOW``: a file, symlink or FIFO already
    at the temporary name is never opened (its owner is the caller's question: see ``_ownership``).
    ``path`` itself is replaced by the rename, which never follows a symlink at ``path``.
    """
    tmp = temp_path(path)
    fd = create_exclusive(tmp)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    os.replace(tmp, path)


def plain_stat(path: Path) -> os.stat_result | None:
    """``lstat`` of ``path`` if it is a regular file (not a symlink, FIFO, device or folder), else ``None``."""
    try:
        info = os.lstat(path)
    except OSError:
        return None
    return info if stat.S_ISREG(info.st_mode) else None


def file_key(info: os.stat_result) -> tuple[int, int, int, int]:
    """What tells one file from another at the same name: device, inode, size and modification time."""
    return info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns


def open_plain(path: Path) -> tuple[int, os.stat_result]:
    """Open a regular file for reading: ``lstat`` first (a link, FIFO, device or folder is never opened), then
    ``O_NOFOLLOW | O_NONBLOCK`` and ``fstat`` again; ``(descriptor, fstat)``.

    Raises:
        NotPlainFile: not a regular file.
        OSError: it cannot be opened (``FileNotFoundError``: it is gone).
    """
    if not stat.S_ISREG(os.lstat(path).st_mode):
        raise NotPlainFile(f"{path.name} is not a plain file")
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | _NOFOLLOW)
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise NotPlainFile(f"{path.name} is not a plain file")
    return fd, info


def read_small(path: Path, limit: int = JSON_LIMIT) -> bytes:
    """Read a file fxstore may own, refusing (without blocking) anything but a small regular file.

    ``lstat`` comes first; the file is opened with ``O_NOFOLLOW | O_NONBLOCK`` (a FIFO swapped in
    between cannot block) and checked again with ``fstat``; at most ``limit`` bytes are read.

    Raises:
        NotPlainFile: a symlink, FIFO, device or folder, or larger than ``limit``.
        OSError: the file cannot be read.
    """
    info = os.lstat(path)
    if not stat.S_ISREG(info.st_mode):
        raise NotPlainFile(f"{path.name} is not a plain file")
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | _NOFOLLOW)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise NotPlainFile(f"{path.name} is not a plain file")
        if info.st_size > limit:
            raise NotPlainFile(f"{path.name} is {info.st_size} bytes, more than the {limit} fxstore reads")
        chunks, left = [], limit + 1
        while left > 0:
            block = os.read(fd, min(left, 8 << 20))
            if not block:
                break
            chunks.append(block)
            left -= len(block)
        data = b"".join(chunks)
        if len(data) > limit:
            raise NotPlainFile(f"{path.name} grew past the {limit} bytes fxstore reads")
        return data
    finally:
        os.close(fd)


def read_json(path: Path, limit: int = JSON_LIMIT, depth: int = JSON_DEPTH) -> Any:
    """Parse a small JSON file fxstore may own (:func:`read_small`), refusing deep nesting.

    Raises:
        NotPlainFile: as :func:`read_small`.
        OSError: the file cannot be read.
        ValueError: not UTF-8 JSON, or nested deeper than ``depth``.
    """
    text = read_small(path, limit).decode()
    try:
        value = json.loads(text)
    except RecursionError:
        raise ValueError(f"nested deeper than {depth} levels") from None
    check_depth(value, depth)
    return value


def check_depth(value: Any, depth: int = JSON_DEPTH) -> None:
    """Raise ``ValueError`` if the parsed JSON ``value`` nests deeper than ``depth`` (checked without recursion)."""
    stack = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, (dict, list)):
            if level > depth:
                raise ValueError(f"nested deeper than {depth} levels")
            stack.extend((child, level + 1) for child in (item.values() if isinstance(item, dict) else item))


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON (keys in insertion order, number lists on one line) atomically."""
    text = _NUMBER_LIST.sub(lambda m: "[" + " ".join(m.group(1).split()) + "]", json.dumps(obj, indent=2))
    atomic_write(path, (text + "\n").encode())


_NUMBER_LIST = re.compile(r"\[\n\s*((?:-?[\d.eE+]+,?\s*)+)\]")  # a raw newline never occurs inside a JSON string


def check_writable(out: Path) -> None:
    """Create ``out`` if needed and prove a file can be written there (with the probe file, created and removed).

    An empty probe already there is what a killed run leaves: it is left in place here (a run that is then
    refused deletes nothing) and removed by the run once it is accepted (:func:`remove_probe`); the folder's
    writability is then proven by the run's first write.

    Raises:
        OutputError: naming the folder and the operating system's reason, or a probe that is not fxstore's.
    """
    probe = out / PROBE
    with os_errors(out):
        out.mkdir(parents=True, exist_ok=True)
        try:
            fd = create_exclusive(probe)
        except FileExistsError:
            info = plain_stat(probe)
            if info is None or info.st_size:  # not the empty file a killed probe leaves
                raise OutputError(
                    f"'{cut(probe)}' is in the way: fxstore writes its probe there, and does not touch files it did "
                    "not write.\nHint: move that file away, or write to another folder."
                ) from None
            return
        os.close(fd)
        probe.unlink()


def remove_probe(out: Path) -> None:
    """Remove the empty probe a killed run left (a run accepted into the folder calls this)."""
    info = plain_stat(out / PROBE)
    if info is not None and info.st_size == 0:
        (out / PROBE).unlink()


def check_free_space(out: Path, needed: int) -> None:
    """Refuse to start when ``out`` has less free space than ``needed`` bytes.

    Raises:
        OutputError: with the needed and available sizes.
    """
    if needed <= 0:
        return
    free = shutil.disk_usage(out).free
    if needed > free:
        raise OutputError(
            f"the output folder '{out}' needs about {_size(needed)} but its disk has {_size(free)} free.\n"
            "Hint: free space, write elsewhere (out=...), store fewer layers, pool them (reduce='avg') "
            "or use a smaller dtype (dtype='float16')."
        )


@contextlib.contextmanager
def os_errors(out: Path) -> Iterator[None]:
    """Turn ``OSError`` (permission denied, disk full, ...) into an :class:`OutputError`."""
    try:
        yield
    except OSError as e:
        if os.path.lexists(out) and not out.is_dir():
            raise OutputError(
                f"the output folder '{_short(out)}' is not a folder (a file or a link to one is there).\n"
                "Hint: choose another output folder (out=...)."
            ) from e
        hint = ("free space on that disk or write elsewhere" if e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
                else "choose a folder you can write to")
        reason = e.strerror or str(e)
        where = _short(e.filename or out)
        raise OutputError(
            f"cannot write the output folder '{_short(out)}': {reason} ({where}).\n"
            f"Hint: {hint}; run the same command again to resume after the last complete shard."
        ) from e


def cut(value: Any, limit: int = 200) -> str:
    """``value`` as text for a message, cut in the middle when longer than ``limit`` characters (with its length).

    Example:
        >>> cut("a" * 500 + "b" * 500, 40)
        'aaaaaaaaa...bbbbbbbbbb (1000 characters)'
    """
    text = str(value)
    if len(text) <= limit:
        return text
    suffix = f" ({len(text)} characters)"
    keep = max(limit - len(suffix) - 3, 2)  # the result is at most ``limit`` long: cutting it again changes nothing
    return f"{text[:keep // 2]}...{text[len(text) - (keep - keep // 2):]}{suffix}"


def cut_list(items: list[Any], limit: int = 8, each: int = 200) -> str:
    """The first ``limit`` items on one line (each :func:`cut`), then how many more.

    Example:
        >>> cut_list([f"f{i}" for i in range(10)], 3)
        'f0; f1; f2; ... and 7 more'
    """
    more = len(items) - limit
    return "; ".join(cut(item, each) for item in items[:limit]) + (f"; ... and {more} more" if more > 0 else "")


_short = cut


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"
