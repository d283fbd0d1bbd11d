"""Keeping the process's memory close to what a step holds (memory budgets are about resident memory)."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

__all__ = ["return_large_buffers_to_os"]

_M_MMAP_THRESHOLD = -3
_ONE_MIB = 1 << 20


@functools.cache
def return_large_buffers_to_os() -> bool:
    """Make glibc serve every buffer over 1 MiB with its own mapping, returned to the OS when freed.

    By default glibc raises that threshold each time a large buffer is freed, after which tile-sized arrays
    come from the heap and freed ones stay resident: resident memory then grows well past what a step
    holds. Fixing the threshold keeps resident memory within the step's memory budget. Process-wide; a
    no-op where the C library is not glibc.

    Returns
    -------
    bool
        True when the setting was applied.
    """
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return bool(mallopt(_M_MMAP_THRESHOLD, _ONE_MIB))
