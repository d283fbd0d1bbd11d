"""numba kernels of the tomography projectors and SART (imported only when :func:`..._jit.jit_enabled`).

Same geometry and results as the numpy paths in :mod:`.projectors` and :mod:`.sart` (see there), computed
pixel by pixel.
Each kernel releases the GIL and works on a band of image rows, so callers split the image among threads.
"""

from __future__ import annotations

import math

import numba
import numpy as np


# Contraction and reassociation only: NaN and infinity keep their meaning.
_FAST = {"contract", "reassoc", "nsz", "arcp"}


@numba.njit(nogil=True, cache=True, fastmath=_FAST, error_model="numpy")
def backproject_channels(table, cos_base, sin_base, center, grid, radius, r0, r1, acc):  # pragma: no cover
    """Rows ``[r0, r1)`` of back projections that share their sample positions, added into ``acc``.

    Item ``m`` is a base angle (``cos_base[m]``, ``sin_base[m]``) and up to ``C`` projections seen through grid
    symmetries (channels): ``table[m, detector, :C]`` holds their values and ``table[m, detector, C:]`` the
    slopes to the next detector (float32; one extra detector of zeros, so a position exactly on the last
    detector reads its value). Pixel ``(i, j)`` of the symmetric ``grid x grid`` frame, at ``x = j - grid // 2``,
    ``y = i - grid // 2``, reads every item at ``t = center + x cos - y sin``, linearly interpolated, zero
    outside the detectors, once for all its channels: ``acc[i, j, channel]``. Positions are float32 along a
    row (within 1e-4 pixel). ``radius < 0``: every pixel, else only those within ``radius`` of the centre.
    """
    n_items = table.shape[0]
    last = table.shape[1] - 2
    n_ch = table.shape[2] // 2
    half = grid // 2
    for i in range(r0, r1):
        y = i - half
        if radius >= 0:
            h2 = radius * radius - y * y
            if h2 < 0:
                continue
            reach = int(math.floor(math.sqrt(h2)))
            c0 = max(0, half - reach)
            c1 = min(grid, half + reach + 1)
        else:
            c0, c1 = 0, grid
        for m in range(n_items):
            cs = cos_base[m]
            start = center - y * sin_base[m] - half * cs  # t at column 0
            j0, j1 = c0, c1  # the columns whose t lies within [0, last]: no test in the loop
            if cs > 1e-12:
                j0 = max(j0, int(math.ceil(-start / cs)))
                j1 = min(j1, int(math.floor((last - start) / cs)) + 1)
            elif cs < -1e-12:
                j0 = max(j0, int(math.ceil((last - start) / cs)))
                j1 = min(j1, int(math.floor(-start / cs)) + 1)
            elif not (0.0 <= start <= last):
                continue
            while j0 < j1 and not (0.0 <= start + j0 * cs <= last):
                j0 += 1
            while j1 > j0 and not (0.0 <= start + (j1 - 1) * cs <= last):
                j1 -= 1
            start32 = np.float32(start)
            cs32 = np.float32(cs)
            if n_ch == 4:
                for j in range(j0, j1):
                    t = start32 + np.float32(j) * cs32
                    k = np.int32(t)
                    f = t - np.float32(k)
                    acc[i, j, 0] += table[m, k, 0] + f * table[m, k, 4]
                    acc[i, j, 1] += table[m, k, 1] + f * table[m, k, 5]
                    acc[i, j, 2] += table[m, k, 2] + f * table[m, k, 6]
                    acc[i, j, 3] += table[m, k, 3] + f * table[m, k, 7]
            else:
                for j in range(j0, j1):
                    t = start32 + np.float32(j) * cs32
                    k = np.int32(t)
                    f = t - np.float32(k)
                    for ch in range(n_ch):
                        acc[i, j, ch] += table[m, k, ch] + f * table[m, k, n_ch + ch]


@numba.njit(nogil=True, cache=True, fastmath=_FAST, error_model="numpy")
def sart_ray_sums(padded, pad, center, cos_a, sin_a, shift, bands, sums):  # pragma: no cover - compiled
    """Ray sums of one SART projection: bilinear samples of the padded image ``(side, side)`` every pixel
    along each ray, over ``bands`` rows ``(s0, s1, i0, i1)`` of samples ``s`` and rays ``i``; positions
    clipped to the padded image, as the numpy path does. Adds into ``sums`` (float64, one per ray)."""
    side = padded.shape[0]
    limit = side - 2.0
    origin = center + pad
    for b in range(bands.shape[0]):
        s0, s1, i0, i1 = bands[b, 0], bands[b, 1], bands[b, 2], bands[b, 3]
        for i in range(i0, i1):
            t = i - center + shift
            total = 0.0
            for s in range(s0, s1):
                along = s - center
                row = min(max(along * cos_a - t * sin_a + origin, 0.0), limit)
                col = min(max(along * sin_a + t * cos_a + origin, 0.0), limit)
                r = int(row)
                c = int(col)
                fr = row - r
                fc = col - c
                upper = padded[r, c] + fc * (padded[r, c + 1] - padded[r, c])
                lower = padded[r + 1, c] + fc * (padded[r + 1, c + 1] - padded[r + 1, c])
                total += upper + fr * (lower - upper)
            sums[i] += total


@numba.njit(nogil=True, cache=True, fastmath=_FAST, error_model="numpy")
def sart_spread(image, center, cos_a, sin_a, shift, deviation, bands, window, radius2,
                relaxation):  # pragma: no cover - compiled
    """Add ``relaxation`` x the deviations of one projection, linearly interpolated at each pixel's detector
    coordinate (zero beyond the detectors) and weighted by the Hamming window along the ray's chord
    (``window`` sampled in ``s^2 / s0^2``, a last entry of 0 beyond the chord), to ``image`` over ``bands``
    ``(r0, r1, c0, c1)``."""
    n = deviation.shape[0]
    steps = window.shape[0] - 2  # samples of the window over [0, 1]
    top = 1.0 + 1.0 / steps
    for b in range(bands.shape[0]):
        r0, r1, c0, c1 = bands[b, 0], bands[b, 1], bands[b, 2], bands[b, 3]
        for r in range(r0, r1):
            y = r - center
            for c in range(c0, c1):
                x = c - center
                t = x * cos_a - y * sin_a
                d = center - shift + t
                k = int(math.floor(d))
                f = d - k
                a = deviation[k] if 0 <= k < n else 0.0
                b_ = deviation[k + 1] if 0 <= k + 1 < n else 0.0
                value = a + f * (b_ - a)
                t2 = t * t
                ratio = (x * x + y * y - t2) / max(radius2 - t2, 1e-6)
                ratio = min(max(ratio, 0.0), top)
                image[r, c] += relaxation * value * window[int(ratio * steps)]


def warm_up() -> None:
    """Compile (or load from numba's disk cache) the kernels, on 3 x 3 images."""
    bands = np.array([[0, 3, 0, 3]], np.int64)
    sart_ray_sums(np.zeros((7, 7), np.float32), 2, 1, 1.0, 0.0, 0.0, bands, np.zeros(3))
    sart_spread(np.zeros((3, 3), np.float32), 1, 1.0, 0.0, 0.0, np.zeros(3, np.float32), bands,
                np.zeros(6, np.float32), 1.0, 0.15)
    for n_ch in (1, 4):
        table = np.zeros((1, 4, 2 * n_ch), np.float32)
        backproject_channels(table, np.ones(1), np.zeros(1), 1.0, 3, 1.0, 0, 3, np.zeros((3, 3, n_ch), np.float32))
