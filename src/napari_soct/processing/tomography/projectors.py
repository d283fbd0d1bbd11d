"""Parallel-beam projectors on scikit-image's pixel grid: forward projection (ray sums) and back projection.

Geometry (the one of ``skimage.transform.radon`` and ``iradon``): an ``N x N`` image rotates about pixel
``(N // 2, N // 2)``; pixel ``(row, col)`` sits at ``x = col - N // 2``, ``y = row - N // 2``. At angle
``theta`` the ray with detector coordinate ``u`` is the line ``x cos(theta) - y sin(theta) = u``, and
detector index ``i`` has ``u = i - center`` (``center = n_detectors // 2`` unless said otherwise).

* :func:`forward_project` integrates the image along rays with Joseph's method: one sample where the ray
  crosses each image row (or column, for rays closer to the horizontal), linear interpolation between the
  two nearest pixels of that row, weighted by the ray length per row. Exact for images linear along rows.
  The rows are read from lookup tables resampled every 1/16 pixel (positions within 1/16 pixel).
* :func:`backproject` sums, at every pixel, the projections linearly interpolated at the pixel's detector
  coordinate (what ``iradon`` does with ``interpolation="linear"``). The interpolation reads a lookup table of
  the projection sampled every ``1 / steps`` pixel, so each pixel and angle costs one index computation and
  one gather; positions are rounded once to that grid (``steps = 128``: within 1/256 pixel).

Speed comes from the symmetries of the square pixel grid: the angles ``theta``, ``90 +- theta``,
``180 - theta``, ... (every regular set of angles has them) see the grid in the same way, so they share one
computation of sample positions and one memory gather that fetches the values of up to four angles at once
(as channels). Both functions work on numpy arrays with threads (numpy releases the GIL) or on CuPy arrays.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .._jit import jit_enabled

__all__ = ["backproject", "forward_project", "pixel_bands", "BACKPROJECT_STEPS", "FORWARD_STEPS"]

BACKPROJECT_STEPS = 128
FORWARD_STEPS = 16
_FRACTION_BITS = 16
_STRIP_ROWS = 32  # rows per strip of the forward projection (its padding grows with it)
# Indices per vectorised block: small enough for the CPU caches, large enough to amortise numpy calls.
_CPU_BLOCK = 1 << 15
_GPU_BLOCK = 1 << 24
# The eight symmetries of the square grid, as (a, b, c, d): pixel (x, y) -> (a x + b y, c x + d y). With base
# angle theta in [0, 45] degrees, symmetry k serves angle phi_k(theta) (t_phi(p) = t_theta(g_k(p))):
# theta, theta + 90, theta + 180, theta - 90, -theta, 90 - theta, 180 - theta, 270 - theta.
_SYMMETRIES = ((1, 0, 0, 1), (0, -1, 1, 0), (-1, 0, 0, -1), (0, 1, -1, 0),
               (1, 0, 0, -1), (0, -1, -1, 0), (-1, 0, 0, 1), (0, 1, 1, 0))


def pixel_bands(n: int, radius: float | None, rows: int) -> list[tuple[int, int, int, int]]:
    """Blocks ``(r0, r1, c0, c1)`` of ``rows`` image rows, each cut to the columns of the disc of ``radius``
    (about pixel ``n // 2``) that its rows touch; the whole width when ``radius`` is None."""
    c = n // 2
    bands = []
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        if radius is None:
            bands.append((r0, r1, 0, n))
            continue
        lo, hi = r0 - c, r1 - 1 - c
        nearest = 0 if lo <= 0 <= hi else min(abs(lo), abs(hi))
        if nearest > radius:
            continue
        half = int(math.floor(math.sqrt(radius * radius - nearest * nearest)))
        bands.append((r0, r1, max(0, c - half), min(n, c + half + 1)))
    return bands


def _symmetry_of(angle_deg: float) -> tuple[float, int]:
    """Base angle in [0, 45] degrees and the grid symmetry that maps it onto ``angle_deg``."""
    k = math.floor(angle_deg / 90.0)
    rest = angle_deg - 90.0 * k
    if rest <= 45.0:
        return rest, k % 4
    return 90.0 - rest, 4 + (k + 1) % 4


def _plan(theta) -> tuple[list, list[list[int]]]:
    """Work items ``[(base angle in radians, [(angle index, symmetry), ...]), ...]`` and the channel groups
    (symmetries computed together, at most four).

    Angles with the same base angle form one item and share its sample positions; the symmetries of such
    items are grouped four by four. An angle alone with its base angle that no shared group serves gets a
    one-channel group of its symmetry, so no channel is computed for nothing.
    """
    groups: dict[int, list] = {}
    bases: dict[int, float] = {}
    for i, angle in enumerate(np.rad2deg(np.asarray(theta, dtype=np.float64))):
        base, symmetry = _symmetry_of(float(angle))
        key = round(base * 1e6)  # one micro-degree apart is the same angle
        groups.setdefault(key, []).append((i, symmetry))
        bases.setdefault(key, base)
    items = []
    for key, members in groups.items():
        if len({s for _, s in members}) < len(members):  # duplicated angles: one item each
            items.extend((math.radians(bases[key]), [m]) for m in members)
        else:
            items.append((math.radians(bases[key]), members))
    shared = sorted({s for _, members in items if len(members) > 1 for _, s in members})
    channel_groups = [shared[k : k + 4] for k in range(0, len(shared), 4)]
    alone = sorted({members[0][1] for _, members in items if len(members) == 1} - set(shared))
    channel_groups += [[s] for s in alone]
    return items, channel_groups


def _items_for(items, channels):
    """The items' members whose symmetry is one of ``channels`` (items without any are left out)."""
    out = []
    for base, members in items:
        mine = [(i, s) for i, s in members if s in channels]
        if mine:
            out.append((base, mine))
    return out


def _gather(xp, table, index, out=None):
    """Rows of ``table`` (2-D, one record per row) at ``index``: shape ``index.shape + (record,)``."""
    if xp is np:
        # One gather of whole records (viewed as opaque bytes). Indices of the pixels a band holds outside the
        # circle can leave the table: they wrap around, as CuPy's take does, and those pixels are zeroed at the
        # end ("wrap" is also numpy's cheapest bounds handling).
        record = table.view(f"V{table.shape[1] * table.itemsize}").reshape(-1)
        got = np.take(record, index, mode="wrap", out=out)
        return got.view(table.dtype).reshape(*index.shape, table.shape[1])
    return xp.take(table, index, axis=0)


def fast_take(xp, table, index, out=None):
    """``table[index]`` (1-D table), out-of-range indices wrapping around as with CuPy's take."""
    if xp is np:
        return np.take(table, index, mode="wrap", out=out)  # numpy's cheapest bounds mode
    return xp.take(table, index, out=out)


def _split(items: list, parts: int) -> list[list]:
    parts = max(1, min(parts, len(items)))
    return [items[k::parts] for k in range(parts)]


def _run_parallel(function, groups: list, threads: int) -> list:
    if len(groups) <= 1 or threads <= 1:
        return [function(g) for g in groups]
    with ThreadPoolExecutor(max_workers=len(groups), thread_name_prefix="soct-tomo") as pool:
        return list(pool.map(function, groups))


def _seen_through(array, symmetry: int, inverse: bool = False):
    """View ``v`` of a square ``(2r+1)`` grid with ``v[p] = array[g(p)]`` (``g^-1`` when ``inverse``): flips
    and transposes only, no copy."""
    a, b, c, d = _SYMMETRIES[symmetry]
    if inverse:  # g is orthogonal: its inverse is its transpose
        b, c = c, b
    if b == 0:  # x' = a x, y' = d y
        return array[::d, ::a]
    return array.T[::b, ::c]  # x' = b y, y' = c x


def backproject(
    q,
    theta,
    output_size: int,
    center: float,
    *,
    circle: bool = True,
    threads: int = 1,
    steps: int = BACKPROJECT_STEPS,
    xp=np,
):
    """Sum of the projections linearly interpolated at every pixel (unfiltered, unscaled back projection).

    Parameters
    ----------
    q : array (n_angles, n_detectors), float32
        One projection per row (numpy or CuPy, matching ``xp``).
    theta : array of float
        Angles in radians.
    output_size : int
        The result is ``output_size x output_size``.
    center : float
        Detector index of the rotation axis.
    circle : bool
        Only pixels within ``output_size // 2`` of the centre (others are 0).
    threads : int
        CPU threads (angles are split among them, each with its own accumulator).
    steps : int
        Sub-pixel steps of the interpolation table.

    Returns
    -------
    array (output_size, output_size), float32

    Notes
    -----
    Like ``np.interp(t, detectors, q, left=0, right=0)``: zero beyond the first and last detector. The grid
    is made symmetric (``2 R + 1`` pixels, ``R = output_size // 2``) and cropped to ``output_size``.
    """
    n = int(output_size)
    theta = np.asarray(theta, dtype=np.float64)
    if xp is np and q.shape[1] >= 2 and jit_enabled():
        return _backproject_compiled(q, theta, n, center, circle, threads)
    r = n // 2
    grid = 2 * r + 1
    n_det = q.shape[1]
    reach = r + 1 if circle else math.sqrt(2.0) * r + 1  # |u| of the pixels computed, and a margin
    lo = max(0, int(math.floor(center - reach)))  # detectors the pixels can see
    hi = min(n_det, int(math.ceil(center + reach)) + 1)
    # Zeros before and after them, as far as the pixels reach (detectors may not cover the whole image).
    pad = max(2, lo - int(math.floor(center - reach)) + 2)
    pad_after = max(2, int(math.ceil(center + reach)) + 2 - hi)
    width = (hi - lo) + pad + pad_after
    per_table = width * steps
    gpu = xp is not np
    block = _GPU_BLOCK if gpu else _CPU_BLOCK
    offsets = np.arange(grid, dtype=np.float64) - r
    frac = xp.arange(steps, dtype=xp.float32) / steps
    items, channel_groups = _plan(theta)

    def tables_into(dest, projection):
        """``dest`` (width, steps), possibly strided: the projection every 1/steps detector."""
        padded = xp.zeros(width + 1, dtype=xp.float32)
        padded[pad : pad + hi - lo] = projection[lo:hi]
        slope = padded[1:] - padded[:-1]
        if lo == 0:
            slope[pad - 1] = 0  # zero before the first detector, no ramp up to it
        xp.multiply(slope[:, None], frac, out=dest)
        xp.add(dest, padded[:-1, None], out=dest)
        if hi == n_det:
            dest[pad + hi - lo - 1, 1:] = 0  # and zero after the last one

    def work(my_items):
        accs = {}
        for gi, channels in enumerate(channel_groups):
            mine = _items_for(my_items, channels)
            if not mine:
                continue
            n_ch = len(channels)
            per_chunk = max(1, min(len(mine), (block * 8 if gpu else 4 * block) // (per_table * n_ch)))
            rows = max(1, min(grid, block // max(1, per_chunk * grid)))
            bands = pixel_bands(grid, r if circle else None, rows)
            acc = xp.zeros((grid, grid, n_ch), dtype=xp.float32)
            table = xp.zeros((per_chunk, width, steps, n_ch), dtype=xp.float32)
            buffers = {}
            for k0 in range(0, len(mine), per_chunk):
                chunk = mine[k0 : k0 + per_chunk]
                na = len(chunk)
                for j, (_, members) in enumerate(chunk):
                    present = {s for _, s in members}
                    for ch, s in enumerate(channels):
                        if s not in present:
                            table[j, :, :, ch] = 0
                    for i, s in members:
                        tables_into(table[j, :, :, channels.index(s)], q[i])
                base = np.array([b for b, _ in chunk])
                # Fixed point with _FRACTION_BITS more bits, so the sum is rounded once (to the nearest step).
                scale = float(steps << _FRACTION_BITS)
                col_part = np.rint(scale * np.outer(np.cos(base), offsets)).astype(np.int64)
                row_part = np.rint(scale * (center - lo + pad - np.outer(np.sin(base), offsets))).astype(np.int64)
                row_part += ((np.arange(na, dtype=np.int64) * per_table) << _FRACTION_BITS)[:, None]
                row_part += 1 << (_FRACTION_BITS - 1)  # floor(x + 1/2): round to nearest
                col_part, row_part = xp.asarray(col_part), xp.asarray(row_part)
                flat = table[:na].reshape(na * per_table, n_ch)
                for r0, r1, c0, c1 in bands:
                    shape = (na, r1 - r0, c1 - c0)
                    if shape not in buffers:
                        buffers[shape] = xp.empty(shape, dtype=xp.int64)
                    index = buffers[shape]
                    xp.add(col_part[:, None, c0:c1], row_part[:, r0:r1, None], out=index)
                    xp.right_shift(index, _FRACTION_BITS, out=index)
                    values = _gather(xp, flat, index)
                    acc[r0:r1, c0:c1] += values[0] if na == 1 else values.sum(axis=0)
            accs[gi] = acc
        return accs

    parts = _run_parallel(work, _split(items, 1 if gpu else threads), threads)
    out = xp.zeros((grid, grid), dtype=xp.float32)
    for gi, channels in enumerate(channel_groups):
        accs = [p[gi] for p in parts if gi in p]
        if not accs:
            continue
        acc = accs[0]
        for extra in accs[1:]:
            acc += extra
        for ch, s in enumerate(channels):
            out += _seen_through(acc[:, :, ch], s)  # channel s holds, at grid point g(p), the value of pixel p
    out = out[:n, :n]
    if circle:
        yy, xx = np.ogrid[-r : n - r, -r : n - r]
        out[xp.asarray(yy**2 + xx**2 > r * r)] = 0
    return xp.ascontiguousarray(out)


def _backproject_compiled(q, theta, n: int, center: float, circle: bool, threads: int) -> np.ndarray:
    """:func:`backproject` by the numba kernel: the same grid symmetries as the numpy path (one position and
    interpolation weight per pixel for up to four angles), bands of rows spread over ``threads`` threads."""
    from ._kernels import backproject_channels

    r = n // 2
    grid = 2 * r + 1
    n_det = q.shape[1]
    radius = float(r) if circle else -1.0
    items, channel_groups = _plan(theta)
    rows = max(1, min(16, grid // max(1, 4 * threads)))
    # Interleaved bands: rows near the centre of a circle are longer, each thread gets some of each.
    bands = _split([(r0, min(grid, r0 + rows)) for r0 in range(0, grid, rows)], threads)
    out = np.zeros((grid, grid), dtype=np.float32)
    for channels in channel_groups:
        mine = _items_for(items, channels)
        if not mine:
            continue
        n_ch = len(channels)
        # Per item and detector: the channels' values, then their slopes to the next detector.
        table = np.zeros((len(mine), n_det + 1, 2 * n_ch), dtype=np.float32)
        for m, (_, members) in enumerate(mine):
            for i, s in members:
                table[m, :n_det, channels.index(s)] = q[i]
        table[:, :n_det, n_ch:] = table[:, 1:, :n_ch] - table[:, :-1, :n_ch]
        base = np.array([b for b, _ in mine])
        cos_base, sin_base = np.cos(base), np.sin(base)
        acc = np.zeros((grid, grid, len(channels)), dtype=np.float32)

        def run(my_bands, table=table, cos_base=cos_base, sin_base=sin_base, acc=acc):
            for r0, r1 in my_bands:
                backproject_channels(table, cos_base, sin_base, float(center), grid, radius, r0, r1, acc)

        _run_parallel(run, bands, threads)
        for ch, s in enumerate(channels):
            out += _seen_through(acc[:, :, ch], s)  # channel s holds, at grid point g(p), the value of pixel p
    out = out[:n, :n]
    if circle:
        yy, xx = np.ogrid[-r : n - r, -r : n - r]
        out[yy**2 + xx**2 > r * r] = 0
    return np.ascontiguousarray(out)


def forward_project(
    image,
    theta,
    n_det: int,
    center: float,
    *,
    radius: float,
    threads: int = 1,
    steps: int = FORWARD_STEPS,
    xp=np,
):
    """Ray sums of a square image by Joseph's method, one projection per angle.

    Parameters
    ----------
    image : array (M, M)
    theta : array of float
        Angles in radians.
    n_det : int
        Detector count; detector ``i`` is the ray ``u = i - center``.
    center : float
    radius : float
        Samples are taken within this distance of pixel ``(M // 2, M // 2)`` (the image must be zero beyond
        ``radius - 1``: rays farther out sum to 0).
    threads : int
    steps : int
        Sub-pixel steps of the row interpolation tables (sample positions rounded to ``1 / steps`` pixel).

    Returns
    -------
    array (n_angles, n_det), float32

    Notes
    -----
    Each angle is computed in the frame of its base angle (in [0, 45] degrees, where rays cross every row
    once), on the image seen through the grid symmetry that maps one onto the other. The image is processed
    in strips of rows; a strip's rows, resampled every ``1 / steps`` pixel for every symmetry in use, are
    one table from which a single gather fetches the interpolated values of up to four angles. Memory is
    bounded by the strip, whatever the image size.
    """
    m = image.shape[0]
    if image.shape != (m, m):
        raise ValueError(f"forward_project needs a square image, got {image.shape}")
    theta = np.asarray(theta, dtype=np.float64)
    r = m // 2
    grid = 2 * r + 1
    gpu = xp is not np
    block = _GPU_BLOCK if gpu else _CPU_BLOCK
    rows = max(1, min(grid, _STRIP_ROWS, block // max(1, n_det)))
    pad = rows + 3  # a strip's sample positions stay within the zero padding (see the bounds below)
    wide = grid + 2 * pad
    source = xp.zeros((grid, grid), dtype=xp.float32)
    source[:m, :m] = xp.asarray(image, dtype=xp.float32)
    items, channel_groups = _plan(theta)
    sino = xp.zeros((len(theta), n_det), dtype=xp.float32)
    detector = np.arange(n_det, dtype=np.float64) - center
    lines = np.arange(grid, dtype=np.float64) - r
    frac = xp.arange(steps, dtype=xp.float32) / steps
    strips = []
    for r0 in range(0, grid, rows):
        r1 = min(grid, r0 + rows)
        v = lines[r0:r1]
        v_in = v[np.abs(v) <= radius]
        if v_in.size:
            strips.append((r0, r1, v_in, np.sqrt(np.maximum(radius * radius - v_in * v_in, 0.0))))
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="soct-tomo") if threads > 1 and not gpu else None
    try:
        for channels in channel_groups:
            mine = _items_for(items, channels)
            if not mine:
                continue
            n_ch = len(channels)
            seen = []
            for s in channels:  # h_g = f o g^-1: the image as the base frame sees it through g
                seen.append(_seen_through(source, s, inverse=True))
            rays = [xp.zeros((n_det, n_ch), dtype=xp.float32) for _ in mine]
            table = xp.empty((rows, wide, steps, n_ch), dtype=xp.float32)
            geometry = [(math.tan(b), 1.0 / math.cos(b)) for b, _ in mine]
            for r0, r1, v_in, half in strips:
                nr = r1 - r0
                for ch in range(n_ch):
                    padded = xp.zeros((nr, wide + 1), dtype=xp.float32)
                    padded[:, pad : pad + grid] = seen[ch][r0:r1]
                    slope = padded[:, 1:] - padded[:, :-1]
                    xp.multiply(slope[:, :, None], frac, out=table[:nr, :, :, ch])
                    xp.add(table[:nr, :, :, ch], padded[:, :-1, None], out=table[:nr, :, :, ch])
                flat = table[:nr].reshape(nr * wide * steps, n_ch)
                row_start = np.arange(nr, dtype=np.intp) * (wide * steps)

                def one_strip(indices, r0=r0, r1=r1, v_in=v_in, half=half, flat=flat, row_start=row_start):
                    for k in indices:
                        slope, stretch = geometry[k]
                        # Rays through this strip's part of the disc. For any row of the strip, the in-row
                        # offset of such a ray is within radius + rows of the centre (|slope| <= 1).
                        lo_u = ((-half - v_in * slope) / stretch).min()
                        hi_u = ((half - v_in * slope) / stretch).max()
                        i0 = max(0, int(np.searchsorted(detector, lo_u, side="left")))
                        i1 = min(n_det, int(np.searchsorted(detector, hi_u, side="right")))
                        if i1 <= i0:
                            continue
                        row_part = np.rint(steps * (lines[r0:r1] * slope + r + pad)).astype(np.intp) + row_start
                        col_part = np.rint(steps * stretch * detector[i0:i1]).astype(np.intp)
                        index = xp.asarray(row_part)[:, None] + xp.asarray(col_part)[None, :]
                        rays[k][i0:i1] += _gather(xp, flat, index).sum(axis=0)

                groups = _split(list(range(len(mine))), threads if pool else 1)
                if pool is None or len(groups) == 1:
                    for g in groups:
                        one_strip(g)
                else:
                    list(pool.map(one_strip, groups))
            for k, (base, members) in enumerate(mine):
                stretch = geometry[k][1]
                for i, s in members:
                    sino[i] = rays[k][:, channels.index(s)] * np.float32(stretch)
    finally:
        if pool is not None:
            pool.shutdown()
    return sino
