"""One writer per output folder: ``flock`` locks that the operating system drops when a process dies.

Rank 0 of a run holds an exclusive lock on ``out/.fxstore-lock`` (which names its process)
for the whole run; every rank of the run, rank 0 included, holds a shared lock on the folder
itself. A second run needs both exclusively, so it is refused while any process of the first
run lives -- also when rank 0 died and another rank still writes. Nothing waits: a refused
run stops at once with a one-line message.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import stat
import sys
import time
from pathlib import Path
from typing import Any

from ...errors import OutputError
from .files import os_errors, read_small
from .names import LOCK_FILE

__all__ = ["FolderLock", "is_lock_file"]


def is_lock_file(path: Path) -> bool:
    """Whether ``path`` is a lock file fxstore wrote (empty, or the JSON it writes; a regular file, never a link)."""
    try:
        text = read_small(path, 1 << 16).decode()
    except (OSError, UnicodeDecodeError):
        return False
    return text == "" or _holder(text) is not None


def _holder(text: str) -> dict[str, Any] | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) and "fxstore_lock" in value else None


class FolderLock:
    """The locks one process of a run holds on ``out``; :meth:`release` (or process death) drops them."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self._file: int | None = None
        self._folder: int | None = None
        self._before: bytes | None = None  # what the lock file held before this run (None: this run created it)

    def acquire(self, command: str | None) -> None:
        """Rank 0: take the folder for this run, or refuse at once.

        Raises:
            OutputError: another run holds the folder (naming its process), or it is unwritable.
        """
        with os_errors(self.out):
            self.out.mkdir(parents=True, exist_ok=True)
            path = self.out / LOCK_FILE
            for _ in range(20):  # the lock file can be removed by a finishing run between open and flock
                fd, created = _open_lock(self.out, path)
                if not _try(fd, fcntl.LOCK_EX):
                    text = _read(fd)
                    os.close(fd)
                    raise _busy(self.out, _holder(text))
                if _same_file(fd, path):
                    break
                os.close(fd)
            else:  # pragma: no cover - a storm of finishing runs
                raise OutputError(f"cannot lock '{self.out}'.\nHint: run the command again.")
            self._file = fd
            text = _read(fd)
            self._before = None if created else os.pread(fd, 1 << 16, 0)
            if text and _holder(text) is None:
                self.release(remove=False)
                raise OutputError(
                    f"'{path}' is not an fxstore lock file; fxstore does not touch files it did not write.\n"
                    "Hint: move that file away, or write to another folder."
                )
            self._folder = os.open(self.out, os.O_RDONLY | os.O_CLOEXEC)
            if not _try(self._folder, fcntl.LOCK_EX):
                self.release(remove=False)
                raise OutputError(
                    f"'{self.out}' is still used by a process of an earlier run (a torchrun rank?).\n"
                    "Hint: wait for it to end, or stop it, then run the command again."
                )
            fcntl.flock(self._folder, fcntl.LOCK_SH)  # the other ranks of this run join with shared locks
            info = {"fxstore_lock": 1, "pid": os.getpid(), "host": socket.gethostname(),
                    "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": command or " ".join(sys.argv)}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode(), 0)

    def join(self) -> None:
        """Another rank of the run that rank 0 locked: hold the folder's shared lock."""
        with os_errors(self.out):
            self._folder = os.open(self.out, os.O_RDONLY | os.O_CLOEXEC)
            fcntl.flock(self._folder, fcntl.LOCK_SH)

    def release(self, remove: bool = True, finished: bool = False) -> None:
        """Drop the locks; rank 0 also removes the lock file (while still holding it).

        Args:
            remove: Remove the lock file (``False``: leave it untouched; nothing was written to it yet).
            finished: The run completed (or found the folder complete): a lock file an earlier, killed run left
                (empty, or naming a dead process) goes too. Otherwise a lock file that was there before this
                run gets back the bytes it had: a refused or failed run changes nothing it did not create.
        """
        if self._file is not None:
            with contextlib.suppress(OSError):
                if remove and (finished or self._before is None):
                    (self.out / LOCK_FILE).unlink()
                elif remove:
                    os.ftruncate(self._file, 0)
                    os.pwrite(self._file, self._before or b"", 0)
            os.close(self._file)
            self._file = None
        if self._folder is not None:
            os.close(self._folder)
            self._folder = None


def _open_lock(out: Path, path: Path) -> tuple[int, bool]:
    """Open (or create) the lock file, never following a symlink nor opening a FIFO or device.

    Returns:
        ``(descriptor, whether this call created the file)``.
    """
    flags = os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
    for _ in range(20):  # a finishing run can remove the file between the two opens
        try:
            return os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o644), True
        except FileExistsError:
            pass
        try:
            fd = os.open(path, flags)
            break
        except FileNotFoundError:
            continue
        except OSError as e:  # ELOOP: a symlink; ENXIO: a FIFO without a reader
            raise _not_a_lock(path) from e
    else:  # pragma: no cover - a storm of finishing runs
        raise OutputError(f"cannot lock '{out}'.\nHint: run the command again.")
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise _not_a_lock(path)
    return fd, False


def _not_a_lock(path: Path) -> OutputError:
    return OutputError(
        f"'{path}' is not an fxstore lock file (a link, FIFO, device or folder); fxstore does not open, follow or "
        "delete it.\nHint: move it away, or write to another folder."
    )


def _try(fd: int, kind: int) -> bool:
    try:
        fcntl.flock(fd, kind | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _read(fd: int) -> str:
    try:
        return os.pread(fd, 1 << 16, 0).decode()
    except (OSError, UnicodeDecodeError):
        return "?"


def _busy(out: Path, holder: dict[str, Any] | None) -> OutputError:
    who = "another process"
    if holder is not None:
        who = (f"process {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}: "
               f"{holder.get('command')}")
    return OutputError(
        f"'{out}' is being written by another fxstore run ({who}).\n"
        "Hint: wait for that run to finish (or stop it), or write to another folder."
    )
