"""Optional compiled kernels: numba, when it is installed (``pip install "napari-soct[fast]"``).

The numpy code paths are the reference and always work; a few hot loops (back projections) also exist as
numba kernels, which do the same arithmetic without numpy's temporaries. numba is optional because its
releases cap numpy's version: as a requirement it could one day downgrade numpy in a user's environment.

``NAPARI_SOCT_JIT=0`` in the environment turns the kernels off (the numpy paths are then used everywhere).
Kernels compile on first use (a second or two) and are cached on disk by numba where it can write.
"""

from __future__ import annotations

import functools
import os

__all__ = ["jit_enabled", "numba_module", "warm_up"]


@functools.cache
def numba_module():
    """The numba module, or None when it is not installed (or does not import)."""
    try:
        import numba
    except Exception:  # noqa: BLE001 - any import failure means "no kernels", never an error
        return None
    return numba


def jit_enabled() -> bool:
    """Whether compiled kernels are used: numba imports and ``NAPARI_SOCT_JIT`` is not ``0``."""
    if os.environ.get("NAPARI_SOCT_JIT", "1").strip() == "0":
        return False
    return numba_module() is not None


def warm_up() -> bool:
    """Compile (or load from numba's disk cache) every kernel now rather than at its first use: e.g. before
    timing or measuring memory, or in a worker process's setup. Returns whether the kernels are enabled."""
    if not jit_enabled():
        return False
    from .backproject import _kernels as backproject_kernels
    from .tomography import _kernels as tomography_kernels

    backproject_kernels.warm_up()
    tomography_kernels.warm_up()
    return True
