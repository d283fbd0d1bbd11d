"""Array backends: numpy (the reference) and CuPy when it is installed and sees a CUDA GPU."""

from __future__ import annotations

import functools
import os

import numpy as np

__all__ = ["BACKEND_CHOICES", "array_module", "module_of", "to_numpy", "default_threads"]

BACKEND_CHOICES = ("auto", "cpu", "cuda")


@functools.cache
def _cupy():
    """The cupy module when it imports and a CUDA device is visible, else None (silent CPU fallback)."""
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() > 0:
            return cupy
    except Exception:  # noqa: BLE001 - no CuPy, no driver, no device: all mean "use the CPU"
        pass
    return None


def array_module(backend: str = "auto"):
    """The array module for a backend name.

    ``"cpu"`` is numpy; ``"cuda"`` is CuPy (ValueError when it is not usable); ``"auto"`` is CuPy when
    usable, numpy otherwise.
    """
    if backend not in BACKEND_CHOICES:
        raise ValueError(f"backend must be one of {BACKEND_CHOICES}, got {backend!r}")
    if backend == "cpu":
        return np
    cupy = _cupy()
    if cupy is None:
        if backend == "cuda":
            raise ValueError("backend 'cuda' needs CuPy and a CUDA GPU; neither is usable here (use 'cpu')")
        return np
    return cupy


def module_of(array):
    """numpy for numpy arrays (and anything else), cupy for CuPy arrays."""
    if type(array).__module__.startswith("cupy"):
        return _cupy() or np
    return np


def to_numpy(array) -> np.ndarray:
    """A numpy array from a numpy or CuPy array."""
    if type(array).__module__.startswith("cupy"):
        return array.get()
    return np.asarray(array)


def default_threads() -> int:
    """CPU cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not on Linux
        return max(1, os.cpu_count() or 1)
