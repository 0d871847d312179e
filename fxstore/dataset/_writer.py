"""A background thread that writes batches while the next batch computes.

On CUDA the features leave the graph through a non-blocking copy into pinned host memory;
the job waits for that copy's event, so the copy and the disk write overlap the next
batch's forward pass. On CPU the thread overlaps the disk write with the next forward.
At most ``depth`` batches wait, which bounds the memory in flight.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from types import TracebackType

__all__ = ["BackgroundWriter"]

_STOP = object()


class BackgroundWriter:
    """Runs submitted jobs in order, in one thread (or inline when ``enabled`` is false).

    The first error a job raises is re-raised by the next :meth:`submit` or by leaving the
    ``with`` block; later jobs are dropped.
    """

    def __init__(self, enabled: bool = True, depth: int = 2) -> None:
        self.enabled = enabled
        self._queue: queue.Queue[object] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> BackgroundWriter:
        if self.enabled:
            self._thread = threading.Thread(target=self._run, name="fxstore-writer", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is _STOP:
                return
            if self._error is None:
                try:
                    job()  # type: ignore[operator]
                except BaseException as e:  # noqa: BLE001 - handed to the main thread
                    self._error = e

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def submit(self, job: Callable[[], None]) -> None:
        """Queue ``job`` (blocks while ``depth`` jobs wait); re-raise an earlier job's error."""
        self._raise()
        if self._thread is None:
            job()
        else:
            self._queue.put(job)

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join()
            self._thread = None
        if kind is None:
            self._raise()
