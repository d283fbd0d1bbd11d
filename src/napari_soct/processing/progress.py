"""Progress reporting and cancellation shared by all processing steps (no GUI code).

Steps take ``progress(done, total, message)`` and ``cancel`` (anything with ``is_set()``, e.g. a
``threading.Event``); the napari widgets and the CLI plug their own callbacks in.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

__all__ = ["Cancelled", "Progress", "ProgressCallback"]

ProgressCallback = Callable[[int, int, str], None]


class Cancelled(RuntimeError):
    """The user cancelled a running step; partial outputs were removed."""


class Progress:
    """Thread-safe counter of work units that forwards to a callback and checks for cancellation."""

    def __init__(self, total: int, callback: ProgressCallback | None = None, cancel=None):
        self.total = int(total)
        self.done = 0
        self._callback = callback
        self._cancel = cancel
        self._lock = threading.Lock()

    def check(self) -> None:
        """Raise :class:`Cancelled` if cancellation was requested."""
        if self._cancel is not None and self._cancel.is_set():
            raise Cancelled("cancelled by the user")

    def advance(self, n: int = 1, message: str = "") -> None:
        """Count ``n`` finished units, report, then check for cancellation."""
        with self._lock:
            self.done += n
            done = self.done
        if self._callback is not None:
            self._callback(done, self.total, message)
        self.check()
