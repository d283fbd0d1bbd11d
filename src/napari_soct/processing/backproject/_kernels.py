"""numba kernel of the pull backprojection (imported only when :func:`..._jit.jit_enabled`).

The same enumeration and interpolation as the numpy path of :mod:`.pull` (read its docstring for the geometry),
voxel by voxel instead of over arrays: for each slab of a batch, each cell of its footprint, the voxels of the
cell's column between the slab's two planes. Positions are computed in float64 (the numpy path uses float32),
so a voxel lying exactly on a slab boundary may be claimed by the other slab: either value is right there.
"""

from __future__ import annotations

import math

import numba
import numpy as np


@numba.njit(nogil=True, cache=True, inline="always")
def _bilinear(flat, index, n_cols, fu, fv):  # pragma: no cover - compiled
    c00 = flat[index]
    c01 = flat[index + 1]
    c10 = flat[index + n_cols]
    c11 = flat[index + n_cols + 1]
    top = c00 + fu * (c01 - c00)
    bottom = c10 + fu * (c11 - c10)
    return top + fv * (bottom - top)


@numba.njit(nogil=True, cache=True, inline="always")
def _largest_weight_label(flat, index, n_cols, plane, fu, fv, fs, both_planes):  # pragma: no cover - compiled
    """The label with the largest trilinear weight among the pixel square's corners (one or two planes);
    ties go to the first corner in the order (r, c), (r, c+1), (r+1, c), (r+1, c+1), then the upper plane."""
    n = 8 if both_planes else 4
    first = flat[index]
    same = True
    for k in range(1, n):
        offset = (k // 4) * plane + ((k // 2) % 2) * n_cols + (k % 2)
        if flat[index + offset] != first:
            same = False
            break
    if same:
        return first
    best = first
    best_score = -1.0
    for k in range(n):
        offset_k = (k // 4) * plane + ((k // 2) % 2) * n_cols + (k % 2)
        candidate = flat[index + offset_k]
        score = 0.0
        for m in range(n):
            offset_m = (m // 4) * plane + ((m // 2) % 2) * n_cols + (m % 2)
            if flat[index + offset_m] == candidate:
                w = (fv if (m // 2) % 2 else 1.0 - fv) * (fu if m % 2 else 1.0 - fu)
                if both_planes:
                    w *= fs if m >= 4 else 1.0 - fs
                score += w
        if score > best_score:
            best_score = score
            best = candidate
    return best


@numba.njit(nogil=True, cache=True)
def pull_batch(chunk, lower, upper, lo, hi, c_axis, sign, shape, strides, slab_offset, blend, mid, half,
               out_flat, priority, labels):  # pragma: no cover - compiled
    """Backproject the slabs of one batch into a block; returns the number of voxels written.

    Parameters
    ----------
    chunk : ndarray (slices, rows, columns)
        The straightened slices the batch reads, edge-padded (one more slice, row and column).
    lower, upper : ndarray (k, 3, 4) float64
        Per slab, its lower and upper plane's ``(u, v, w)`` as ``coef[:3] . voxel + coef[3]`` in block-local
        voxels, ``u`` and ``v`` shifted by the padding.
    lo, hi : ndarray (k, 3) int64
        Per slab, the block-local voxel range of its footprint (inclusive).
    c_axis, sign : int
        Enumeration axis and the sign of the slab normal along it (the same for the whole batch).
    shape, strides : ndarray (3,) int64
        The block's shape and its strides in elements.
    slab_offset : ndarray (k,) int64
        Flat offset in ``chunk`` of each slab's first slice.
    blend : ndarray (k,) float64
        1 between two slices, 0 for the end caps (they repeat the end slice).
    mid, half : ndarray (2,) float64
        Slice centre and half extent ``(u, v)`` in padded pixels.
    out_flat : ndarray
        The block, flat; written where voxels are swept.
    priority : ndarray float32
        Per block voxel, the distance of its claim to the slice centre (``inf``: unclaimed), updated; the
        nearest claim wins (a later one only when strictly nearer). Empty: no bookkeeping (no folds).
    labels : bool
        Label mode (largest weight) instead of trilinear interpolation.
    """
    n_cols = chunk.shape[2]
    plane = chunk.shape[1] * n_cols
    flat = chunk.reshape(-1)
    a_axis = 1 if c_axis == 0 else 0
    b_axis = 1 if c_axis == 2 else 2
    track = priority.size > 0
    written = 0
    c_limit = shape[c_axis]
    for s in range(lower.shape[0]):
        # Per slab: where each plane crosses a cell's column, linear in the cell's (a, b).
        la = -lower[s, 2, a_axis] / lower[s, 2, c_axis]
        lb = -lower[s, 2, b_axis] / lower[s, 2, c_axis]
        l0 = -lower[s, 2, 3] / lower[s, 2, c_axis]
        ua = -upper[s, 2, a_axis] / upper[s, 2, c_axis]
        ub = -upper[s, 2, b_axis] / upper[s, 2, c_axis]
        u0 = -upper[s, 2, 3] / upper[s, 2, c_axis]
        both = blend[s] != 0.0
        for a in range(lo[s, a_axis], hi[s, a_axis] + 1):
            for b in range(lo[s, b_axis], hi[s, b_axis] + 1):
                # The slab is c in [first, stop) along the cell's column.
                cross_lower = la * a + lb * b + l0
                cross_upper = ua * a + ub * b + u0
                if sign > 0:
                    first = math.ceil(cross_lower)
                    stop = math.ceil(cross_upper)
                else:
                    first = math.floor(cross_upper) + 1
                    stop = math.floor(cross_lower) + 1
                first = max(first, 0.0)
                stop = min(stop, c_limit)
                if first >= stop:
                    continue
                inverse_thickness = 1.0 / (cross_upper - cross_lower)
                u_lower = lower[s, 0, a_axis] * a + lower[s, 0, b_axis] * b + lower[s, 0, 3]
                v_lower = lower[s, 1, a_axis] * a + lower[s, 1, b_axis] * b + lower[s, 1, 3]
                du = upper[s, 0, a_axis] * a + upper[s, 0, b_axis] * b + upper[s, 0, 3] - u_lower
                dv = upper[s, 1, a_axis] * a + upper[s, 1, b_axis] * b + upper[s, 1, 3] - v_lower
                duc = upper[s, 0, c_axis] - lower[s, 0, c_axis]
                dvc = upper[s, 1, c_axis] - lower[s, 1, c_axis]
                cell = a * strides[a_axis] + b * strides[b_axis]
                for c in range(int(first), int(stop)):
                    t = (c - cross_lower) * inverse_thickness
                    u = u_lower + lower[s, 0, c_axis] * c + (du + duc * c) * t
                    v = v_lower + lower[s, 1, c_axis] * c + (dv + dvc * c) * t
                    if abs(u - mid[0]) > half[0] or abs(v - mid[1]) > half[1]:
                        continue
                    target = cell + c * strides[c_axis]
                    if track:
                        distance = np.float32((u - mid[0]) ** 2 + (v - mid[1]) ** 2)
                        if not distance < priority[target]:
                            continue
                        if priority[target] == np.inf:
                            written += 1
                        priority[target] = distance
                    else:
                        written += 1
                    vi = int(v)  # positions are >= 0.5 (padding): truncation is the floor
                    ui = int(u)
                    fv = v - vi
                    fu = u - ui
                    index = slab_offset[s] + vi * n_cols + ui
                    fs = t * blend[s]
                    if labels:
                        out_flat[target] = _largest_weight_label(flat, index, n_cols, plane, fu, fv, fs, both)
                    else:
                        value = _bilinear(flat, index, n_cols, fu, fv)
                        if both:
                            value += fs * (_bilinear(flat, index + plane, n_cols, fu, fv) - value)
                        out_flat[target] = value
    return written


def warm_up() -> None:
    """Compile (or load from numba's disk cache) the kernel for float32 intensities and uint64 labels, with
    a one-voxel batch, so that later calls start at once."""
    lower = np.zeros((1, 3, 4))
    lower[0, 2] = (0.0, 0.0, 1.0, 0.0)  # w = x: the slab is 0 <= x < 1 along its column
    upper = lower.copy()
    upper[0, 2, 3] = -1.0
    lower[0, 0, 3] = lower[0, 1, 3] = upper[0, 0, 3] = upper[0, 1, 3] = 1.0
    cell = np.zeros((1, 3), np.int64)
    three = np.ones(3, np.int64)
    for dtype, labels in ((np.float32, False), (np.uint64, True)):
        chunk = np.zeros((2, 3, 3), dtype)
        out = np.zeros(1, dtype)
        pull_batch(chunk, lower, upper, cell, cell, 2, 1, three, three, np.zeros(1, np.int64), np.ones(1),
                   np.ones(2), np.ones(2), out, np.empty(0, np.float32), labels)
