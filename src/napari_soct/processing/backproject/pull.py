"""Backprojection by pulling: every source voxel swept by the slices takes its value from the straightened volume.

Slice ``i``'s plane holds its pixels; between two consecutive planes lies a *slab* (two more planes, half a
slice spacing beyond the ends, close the swept region). A voxel belongs to slab ``j`` when it lies on or after
plane ``j`` and before plane ``j + 1`` (half-open, so neighbouring slabs never share a voxel) and its in-plane
position is within the slice rectangle, half a pixel beyond the edge pixels. Its straightened coordinates are
``s = j + t`` and ``(u, v) = (1 - t) (u_j, v_j) + t (u_j+1, v_j+1)``, ``(u_p, v_p)`` being its coordinates in
plane ``p``'s frame and ``t`` its position between the planes, linear along the voxel axis closest to the slab
normal (0 on plane ``j``, 1 on plane ``j + 1``). The value is the trilinear interpolation of the straightened
volume there (intensities), or the label with the largest trilinear weight (labels: ids are never mixed).

Voxels are enumerated exactly, column by column along that axis, so the cost follows the number of swept
voxels, slices never leave holes whatever their spacing, and every swept voxel is written once.

Where slices fold over (loops, or bends tighter than the slice's half-diagonal) a voxel may lie in slabs that
are not neighbours: it then takes the value of the one where it is nearest the slice centre (smallest in-plane
distance to the path; exact ties: either). Slice pixels beyond a bend's centre of curvature (past the line
where consecutive planes meet) are not used. :func:`may_fold` decides, from the geometry, whether this
bookkeeping is needed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .._jit import jit_enabled
from .geometry import SliceGeometry

__all__ = ["SlabPlan", "plan_slabs", "may_fold", "pull_block", "pull_memory_per_cell", "MODES"]

MODES = ("intensity", "labels")
_F = np.float32

#: Bytes of working memory per enumerated cell (about 30 float32 temporaries and the index arrays; measured
#: with tracemalloc).
pull_memory_per_cell = 256


@dataclass
class SlabPlan:
    """Per-slab constants for the pull, derived once from a :class:`SliceGeometry` (``n + 1`` slabs).

    Attributes
    ----------
    axis : ndarray (m,) int
        Axis (0 z, 1 y, 2 x) along which a slab's voxels are enumerated (closest to its normal).
    sign : ndarray (m,) int
        Sign of the normal along that axis.
    lo, hi : ndarray (m, 3)
        Slab bounding boxes (voxel ``z, y, x``).
    coefficients : ndarray (m + 1, 3, 4)
        Per plane, ``(u, v, w)`` as ``coef[:3] . voxel + coef[3]``.
    first_slice : ndarray (m,) int
        First straightened slice a slab interpolates from.
    blend : ndarray (m,) float
        1 for slabs between two slices, 0 for the two end caps (they repeat the end slice).
    may_fold : bool
        Whether a voxel may lie in two slabs that are not neighbours (see :func:`may_fold`); if not, the
        nearest-claim bookkeeping is skipped.
    """

    geometry: SliceGeometry
    axis: np.ndarray
    sign: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    coefficients: np.ndarray
    first_slice: np.ndarray
    blend: np.ndarray
    may_fold: bool = True


def may_fold(geometry: SliceGeometry) -> bool:
    """Whether the slices may fold over: a voxel lying in two slabs that are not neighbours.

    They cannot when (the slices then sweep a tube whose cross-sections do not meet) every slice stays within
    radius ``r`` of its centre, consecutive slices meet (their planes intersect) farther than ``1.25 r`` from the
    path, and slices farther apart along the path than ``1.6`` times the tube's diameter keep their centres more
    than that diameter apart. Otherwise (or when unsure) this returns True.
    """
    g = geometry
    corners = g.plane_corners()
    centres = corners.mean(axis=1)
    radius = float(np.linalg.norm(corners - centres[:, None], axis=2).max()) + 1.0
    gaps = np.linalg.norm(np.diff(centres, axis=0), axis=1)
    angles = np.arccos(np.clip(np.einsum("ij,ij->i", g.normals[:-1], g.normals[1:]), -1.0, 1.0))
    with np.errstate(divide="ignore", invalid="ignore"):
        meet = np.where(angles > 1e-12, gaps / angles, np.inf)
    if (meet < 1.25 * radius).any():
        return True
    from scipy.spatial import cKDTree

    # Far-apart slices coming close: test a subsample (every `step`-th centre, each within `spread` of the
    # skipped ones), so that the number of pairs stays small.
    spacing = float(np.median(gaps)) if gaps.size else 1.0
    step = max(1, int(radius / 4 / max(spacing, 1e-9)))
    arc = np.concatenate([[0.0], np.cumsum(gaps)])
    index = np.arange(0, len(centres), step)
    spread = float(gaps.max(initial=0.0)) * step
    diameter = 2 * radius + 1
    pairs = cKDTree(centres[index]).query_pairs(diameter + spread, output_type="ndarray")
    if len(pairs) == 0:
        return False
    along = np.abs(arc[index[pairs[:, 0]]] - arc[index[pairs[:, 1]]])
    return bool((along > 1.6 * (diameter + spread)).any())


def plan_slabs(geometry: SliceGeometry) -> SlabPlan:
    """Per-slab enumeration axis, bounds and plane coefficients."""
    g = geometry
    m = g.n_slabs
    mean_normal = g.normals[:-1] + g.normals[1:]
    axis = np.argmax(np.abs(mean_normal), axis=1)
    sign = np.sign(mean_normal[np.arange(m), axis]).astype(int)
    lo, hi = g.slab_bounds()
    coef = np.empty((m + 1, 3, 4))
    coef[:, :, :3] = g.inverse
    coef[:, :, 3] = -np.einsum("pij,pj->pi", g.inverse, g.origins)
    first = np.clip(np.arange(m) - 1, 0, g.n_slices - 1)
    blend = np.ones(m)
    blend[0] = blend[-1] = 0.0
    if g.n_slices == 1:
        blend[:] = 0.0
    return SlabPlan(g, axis, sign, lo, hi, coef, first, blend, may_fold(g))


def _split_positions(v, u, n_cols: int):
    """Fractions of rows ``v`` and columns ``u`` (positive: the chunk's padding keeps them >= 0.5) and the
    flat index of the pixel they fall in: ``(fv, fu, index)``. Truncation is the floor here, and several
    times faster than ``np.modf``."""
    v_int = v.astype(np.int32)
    u_int = u.astype(np.int32)
    fv = v - v_int.astype(np.float32)
    fu = u - u_int.astype(np.float32)
    v_int *= n_cols
    v_int += u_int
    return fv, fu, v_int.astype(np.intp)


def _gather_intensity(chunk, offset, fs, v, u):
    """Trilinear interpolation in a chunk ``(slices, rows, columns)``.

    ``offset`` is each sample's first slice times ``rows * columns`` (int), ``fs`` its fraction towards the
    next slice (None: 0); ``v`` and ``u`` are rows and columns, with one more row, column and slice in the chunk
    than the samples reach (edge padding).
    """
    n_cols = chunk.shape[2]
    plane = chunk.shape[1] * n_cols
    flat = chunk.reshape(-1)
    fv, fu, base = _split_positions(v, u, n_cols)
    base += offset

    def bilinear(index):  # index is moved along; the four corners of a pixel square, lerped
        c00 = flat.take(index)
        index += 1
        c01 = flat.take(index)
        index += n_cols
        c11 = flat.take(index)
        index -= 1
        c10 = flat.take(index)
        c01 -= c00
        c01 *= fu
        c00 += c01
        c11 -= c10
        c11 *= fu
        c10 += c11
        c10 -= c00
        c10 *= fv
        c00 += c10
        return c00

    value = bilinear(base)
    if fs is not None:
        base += plane - n_cols
        upper = bilinear(base)
        upper -= value
        upper *= fs
        value += upper
    return value


def _gather_labels(chunk, offset, fs, v, u):
    """The label with the largest trilinear weight among the eight neighbours (ids are never mixed)."""
    n_rows, n_cols = chunk.shape[1], chunk.shape[2]
    flat = chunk.reshape(-1)
    fv, fu, base = _split_positions(v, u, n_cols)
    plane = n_rows * n_cols
    base += offset
    offsets = [0, 1, n_cols, n_cols + 1]
    if fs is not None:
        offsets += [plane + o for o in offsets]
    labels = [flat.take(base + o) for o in offsets]
    first = labels[0]
    same = np.ones(len(first), bool)
    for other in labels[1:]:
        same &= other == first
    result = first.copy()
    mixed = np.flatnonzero(~same)
    if mixed.size == 0:
        return result
    fu, fv = fu[mixed], fv[mixed]
    w_v = [(1 - fv) * (1 - fu), (1 - fv) * fu, fv * (1 - fu), fv * fu]
    if fs is not None:
        f = fs[mixed]
        weights = [w * (1 - f) for w in w_v] + [w * f for w in w_v]
    else:
        weights = w_v
    mixed_labels = [lab[mixed] for lab in labels]
    best_score = np.full(mixed.size, -1.0, dtype=_F)
    best = mixed_labels[0].copy()
    for candidate in mixed_labels:
        score = np.zeros(mixed.size, dtype=_F)
        for lab, w in zip(mixed_labels, weights):
            score += np.where(lab == candidate, w, 0)
        take = score > best_score
        best_score[take] = score[take]
        best[take] = candidate[take]
    result[mixed] = best
    return result


def pull_block(
    plan: SlabPlan,
    out: np.ndarray,
    origin,
    read_slices: Callable[[int, int], np.ndarray],
    *,
    mode: str = "intensity",
    max_cells: int = 1 << 15,
    max_slices: int = 64,
    scratch: np.ndarray | None = None,
    workers: int = 1,
) -> int:
    """Backproject into one output block.

    Parameters
    ----------
    plan : SlabPlan
    out : ndarray (bz, by, bx)
        Output block, written where voxels are swept (others untouched); float32 for intensities, the label
        dtype for labels.
    origin : (3,) int
        Voxel ``(z, y, x)`` of ``out[0, 0, 0]`` in the sliced source grid.
    read_slices : callable
        ``read_slices(start, stop)`` returns straightened slices ``[start, stop)`` as ``(k, height, width)``.
    mode : {"intensity", "labels"}
    max_cells : int
        Cells enumerated per batch (bounds the working memory: about :data:`pull_memory_per_cell` bytes each).
    max_slices : int
        Straightened slices read per batch (at least 3).
    scratch : ndarray, optional
        A 4-byte-per-voxel buffer (e.g. int32) shaped like ``out``, reused between blocks; allocated when
        omitted (used only where slices may fold over).
    workers : int
        Threads enumerating batches in parallel (where slices cannot fold over); ``read_slices`` must then be
        thread-safe. Each holds one batch's working memory.

    Returns
    -------
    int
        Number of voxels swept (written).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    origin = np.asarray(origin, np.int64)
    shape = np.asarray(out.shape, np.int64)
    if int(np.prod(shape)) >= 2**31 - 1:
        raise ValueError(f"output block of {tuple(shape)} voxels is too large (at most 2**31 voxels)")
    block_hi = origin + shape - 1
    hits = np.flatnonzero(((plan.hi >= origin) & (plan.lo <= block_hi)).all(axis=1))
    if hits.size == 0:
        return 0
    if plan.may_fold and (scratch is None or scratch.shape != out.shape or scratch.dtype.itemsize != 4):
        scratch = np.empty(out.shape, np.int32)
    out_flat = out.reshape(-1)
    strides = np.array([shape[1] * shape[2], shape[2], 1], np.int64)
    compiled = jit_enabled()
    pull = _pull_batch_compiled if compiled else _pull_batch
    # The kernel holds no per-cell temporaries: its batches are bounded by the slices they read only.
    batches = _batches(plan, hits, origin, shape, 1 << 40 if compiled else max_cells, max(3, max_slices))
    if plan.may_fold:
        priority = scratch.view(_F).reshape(-1)
        priority.fill(np.inf)
        written = sum(pull(plan, batch, origin, shape, strides, out_flat, priority, read_slices, mode)
                      for batch in batches)
        # Claims overwritten where slices fold over were counted twice: count the voxels.
        return int(np.count_nonzero(np.isfinite(priority))) if written else 0
    # Without folds, batches write different voxels, but for a few on the plane two consecutive batches share
    # (either value is right there). In parallel, every other batch first, then the rest: the result does not
    # depend on thread timing.
    def run(batch):
        return pull(plan, batch, origin, shape, strides, out_flat, None, read_slices, mode)

    if workers <= 1:
        return sum(run(batch) for batch in batches)
    from concurrent.futures import ThreadPoolExecutor

    batches = list(batches)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="soct-pull") as pool:
        return sum(sum(pool.map(run, batches[phase::2])) for phase in (0, 1))


def _footprints(plan: SlabPlan, slabs, origin, shape):
    """Per slab, the integer ranges (block-local, clipped) of the two axes across its enumeration axis."""
    lo = np.maximum(np.ceil(plan.lo[slabs] - origin - 1e-6), 0).astype(np.int64)
    hi = np.minimum(np.floor(plan.hi[slabs] - origin + 1e-6), shape - 1).astype(np.int64)
    return lo, hi


def _batches(plan: SlabPlan, hits, origin, shape, max_cells, max_slices):
    """Group intersecting slabs into runs of consecutive slabs of one enumeration axis and sign, within
    ``max_cells`` cells and ``max_slices`` straightened slices."""
    lo, hi = _footprints(plan, hits, origin, shape)
    keep = (hi >= lo).all(axis=1)
    hits, lo, hi = hits[keep], lo[keep], hi[keep]
    axes = plan.axis[hits]
    signs = plan.sign[hits]
    batch: list[int] = []
    key = None
    fa = fb = 0
    for n, slab in enumerate(hits):
        c = axes[n]
        a, b = [ax for ax in range(3) if ax != c]
        ext = hi[n] - lo[n] + 1
        new_fa, new_fb = max(fa, ext[a]), max(fb, ext[b])
        this_key = (c, signs[n])
        if batch and (this_key != key or (len(batch) + 1) * new_fa * new_fb > max_cells
                      or slab != batch[-1][0] + 1 or len(batch) + 2 > max_slices):
            yield batch
            batch, fa, fb = [], 0, 0
            new_fa, new_fb = ext[a], ext[b]
        key = this_key
        fa, fb = new_fa, new_fb
        batch.append((slab, lo[n], hi[n]))
    if batch:
        yield batch


def _claims(c, stop, cross_lower, inverse_thickness, u_lower, uc_lower, du, duc, v_lower, vc_lower, dv, dvc,
            mid, half):
    """``(valid, t, u, v)`` of the voxels at column position ``c`` (arrays broadcast together)."""
    t = c - cross_lower
    t *= inverse_thickness
    u = uc_lower * c
    u += u_lower
    step = duc * c
    step += du
    step *= t
    u += step
    v = vc_lower * c
    v += v_lower
    np.multiply(dvc, c, out=step)
    step += dv
    step *= t
    v += step
    valid = c < stop
    np.subtract(u, mid[0], out=step)
    np.abs(step, out=step)
    valid &= step <= half[0]
    np.subtract(v, mid[1], out=step)
    np.abs(step, out=step)
    valid &= step <= half[1]
    return valid, t, u, v


def _pull_batch(plan, batch, origin, shape, strides, out_flat, prio_flat, read_slices, mode) -> int:
    g = plan.geometry
    slabs = np.array([b[0] for b in batch])
    lo = np.array([b[1] for b in batch])
    hi = np.array([b[2] for b in batch])
    c_axis = int(plan.axis[slabs[0]])
    sign = int(plan.sign[slabs[0]])
    a_axis, b_axis = [ax for ax in range(3) if ax != c_axis]
    k = len(slabs)
    fa = int((hi[:, a_axis] - lo[:, a_axis]).max()) + 1
    fb = int((hi[:, b_axis] - lo[:, b_axis]).max()) + 1
    # Block-local coordinates: voxel = origin + local. Plane coefficients are shifted accordingly.
    coef = plan.coefficients[np.concatenate([slabs, slabs + 1])].copy()  # (2k, 3, 4)
    coef[:, :, 3] += coef[:, :, :3] @ origin.astype(float)
    # Columns and rows shifted by one: the slices get one row and column of edge padding on each side, so the
    # interpolation needs no clipping (a voxel reaches half a pixel beyond the edge pixels).
    coef[:, :2, 3] += 1.0
    lower, upper = coef[:k], coef[k:]
    a_local = (lo[:, a_axis][:, None] + np.arange(fa)[None, :])[:, :, None]  # (k, fa, 1)
    b_local = (lo[:, b_axis][:, None] + np.arange(fb)[None, :])[:, None, :]  # (k, 1, fb)

    def affine_ab(rows, divisor=None):  # the part of an affine map that depends on a and b, as (k, fa, fb)
        d = 1.0 if divisor is None else divisor[:, None, None]
        part_a = ((rows[:, a_axis][:, None, None] * a_local + rows[:, 3][:, None, None]) / d).astype(_F)
        part_b = ((rows[:, b_axis][:, None, None] * b_local) / d).astype(_F)
        return part_a + part_b

    def per_slab(values):
        return np.asarray(values, _F)[:, None, None]

    # Where each plane crosses a cell's column (w = wa a + wb b + wc c + w0 = 0); the slab is half-open:
    # w_lower >= 0 and w_upper < 0, i.e. c in [first, stop).
    cross_lower = affine_ab(-lower[:, 2], lower[:, 2, c_axis])
    cross_upper = affine_ab(-upper[:, 2], upper[:, 2, c_axis])
    if sign > 0:
        first = np.ceil(cross_lower)
        stop = np.ceil(cross_upper)
    else:
        first = np.floor(cross_upper)
        first += 1
        stop = np.floor(cross_lower)
        stop += 1
    np.maximum(first, _F(0), out=first)
    np.minimum(stop, _F(shape[c_axis]), out=stop)
    # Padding cells of slabs with smaller footprints than the batch's may fall outside the block: empty them.
    a_out, b_out = a_local >= shape[a_axis], b_local >= shape[b_axis]
    if a_out.any() or b_out.any():
        np.copyto(stop, first, where=a_out | b_out)
    count = stop - first
    n_iter = int(count.max()) if count.size else 0
    if n_iter <= 0:
        return 0
    # Position across the slab: 0 on the lower plane, 1 on the upper one, linear along the column.
    with np.errstate(divide="ignore", invalid="ignore"):
        inverse_thickness = np.subtract(cross_upper, cross_lower)
        np.divide(_F(1), inverse_thickness, out=inverse_thickness)
    consts = dict(
        uc_lower=per_slab(lower[:, 0, c_axis]), duc=per_slab(upper[:, 0, c_axis] - lower[:, 0, c_axis]),
        vc_lower=per_slab(lower[:, 1, c_axis]), dvc=per_slab(upper[:, 1, c_axis] - lower[:, 1, c_axis]),
    )
    per_cell = dict(
        stop=stop, cross_lower=cross_lower, inverse_thickness=inverse_thickness,
        u_lower=affine_ab(lower[:, 0]), du=affine_ab(upper[:, 0] - lower[:, 0]),
        v_lower=affine_ab(lower[:, 1]), dv=affine_ab(upper[:, 1] - lower[:, 1]),
    )
    mid = (_F((g.width - 1) / 2 + 1), _F((g.height - 1) / 2 + 1))
    half = (_F(g.width / 2), _F(g.height / 2))

    # The first voxel of every column, densely; then the columns holding more voxels, compressed.
    with np.errstate(invalid="ignore"):
        valid, t, u, v = _claims(first, **per_cell, **consts, mid=mid, half=half)
    cells = np.flatnonzero(valid)
    picks = [(cells, first.reshape(-1).take(cells), t.reshape(-1).take(cells), u.reshape(-1).take(cells),
              v.reshape(-1).take(cells))]
    del valid, t, u, v
    if n_iter > 1:
        more = np.flatnonzero(count.reshape(-1) > 1)
        del count
        c = first.reshape(-1).take(more)
        sub_cells = {name: arr.reshape(-1).take(more) for name, arr in per_cell.items()}
        slab_of = more // (fa * fb)
        sub_consts = {name: arr.reshape(-1).take(slab_of) for name, arr in consts.items()}
        for _ in range(1, n_iter):
            c += 1
            valid, t, u, v = _claims(c, **sub_cells, **sub_consts, mid=mid, half=half)
            sel = np.flatnonzero(valid)
            if sel.size:
                picks.append((more.take(sel), c.take(sel), t.take(sel), u.take(sel), v.take(sel)))
            # Only the columns with still more voxels go on.
            going = np.flatnonzero(c + 1 < sub_cells["stop"])
            if going.size == 0:
                break
            if going.size < 0.7 * c.size:
                more, c = more.take(going), c.take(going)
                sub_cells = {name: arr.take(going) for name, arr in sub_cells.items()}
                sub_consts = {name: arr.take(going) for name, arr in sub_consts.items()}
    # The straightened slices this batch needs, edge-padded by one along each axis for the interpolation.
    first_slice = plan.first_slice[slabs]
    s_start = int(first_slice.min())
    s_stop = int(min(g.n_slices, first_slice.max() + 2))
    chunk = _padded(read_slices(s_start, s_stop), g, np.float32 if mode == "intensity" else None)
    plane_size = chunk.shape[1] * chunk.shape[2]
    offset_of_slab = (first_slice - s_start).astype(np.intp) * plane_size
    blend = plan.blend[slabs].astype(_F)
    interior = bool(blend.all())
    ab_offset = (a_local * strides[a_axis] + b_local * strides[b_axis]).reshape(-1)
    written = 0
    for cells, c, t, u, v in picks:
        if cells.size == 0:
            continue
        # Output positions: the (a, b) part per cell, then the column position per voxel.
        target = ab_offset.take(cells)
        target += c.astype(np.intp) * strides[c_axis]
        slab_index = cells // (fa * fb)
        del cells, c
        kept = _keep_nearest(prio_flat, target, u, v, mid) if prio_flat is not None else None
        if kept is not None:
            target, u, v, t, slab_index = (x[kept] for x in (target, u, v, t, slab_index))
        offset = offset_of_slab.take(slab_index)
        fs = t if interior else (t * blend.take(slab_index) if blend.any() else None)
        gather = _gather_intensity if mode == "intensity" else _gather_labels
        out_flat[target] = gather(chunk, offset, fs, v, u)
        written += target.size
    return written


def _pull_batch_compiled(plan, batch, origin, shape, strides, out_flat, prio_flat, read_slices, mode) -> int:
    """:func:`_pull_batch` by the numba kernel (same inputs, same result up to voxels on slab boundaries)."""
    from ._kernels import pull_batch

    g = plan.geometry
    slabs = np.array([b[0] for b in batch])
    lo = np.array([b[1] for b in batch], np.int64)
    hi = np.array([b[2] for b in batch], np.int64)
    k = len(slabs)
    coef = plan.coefficients[np.concatenate([slabs, slabs + 1])].copy()
    coef[:, :, 3] += coef[:, :, :3] @ origin.astype(float)
    coef[:, :2, 3] += 1.0  # one row and column of edge padding on each side of the slices
    first_slice = plan.first_slice[slabs]
    s_start = int(first_slice.min())
    s_stop = int(min(g.n_slices, first_slice.max() + 2))
    chunk = _padded(read_slices(s_start, s_stop), g, np.float32 if mode == "intensity" else None)
    offsets = (first_slice - s_start).astype(np.int64) * (chunk.shape[1] * chunk.shape[2])
    mid = np.array([(g.width - 1) / 2 + 1, (g.height - 1) / 2 + 1])
    half = np.array([g.width / 2, g.height / 2])
    priority = prio_flat if prio_flat is not None else np.empty(0, np.float32)
    return int(pull_batch(chunk, coef[:k], coef[k:], lo, hi, int(plan.axis[slabs[0]]), int(plan.sign[slabs[0]]),
                          np.asarray(shape, np.int64), np.asarray(strides, np.int64), offsets,
                          plan.blend[slabs].astype(np.float64), mid, half, out_flat, priority,
                          mode == "labels"))


def _padded(slices, geometry, dtype) -> np.ndarray:
    """Slices ``(k, rows, columns)`` with one more slice at the end and one more row and column on each side,
    repeating the edges."""
    slices = np.asarray(slices)
    if slices.shape[1:] != (geometry.height, geometry.width):
        raise ValueError(f"straightened slices are {slices.shape[1:]}, the configuration says "
                         f"{(geometry.height, geometry.width)}")
    k, h, w = slices.shape
    chunk = np.empty((k + 1, h + 2, w + 2), dtype or slices.dtype)
    chunk[:k, 1 : h + 1, 1 : w + 1] = slices
    chunk[:k, 1 : h + 1, 0] = slices[:, :, 0]
    chunk[:k, 1 : h + 1, w + 1] = slices[:, :, -1]
    chunk[:k, 0] = chunk[:k, 1]
    chunk[:k, h + 1] = chunk[:k, h]
    chunk[k] = chunk[k - 1]
    return chunk


def _keep_nearest(prio_flat, target, u, v, mid):
    """Record each voxel's claim distance to the slice centre; return which claims to keep (None: all).

    A voxel is claimed once, except where slices fold over (by non-neighbouring slabs) or where it lies on the
    plane two neighbouring slabs share (up to rounding; either is right): the claim nearest the slice centre
    wins, and a later claim only replaces an earlier one when strictly nearer.
    """
    distance = u - mid[0]
    distance *= distance
    step = v - mid[1]
    step *= step
    distance += step
    del step
    better = distance < prio_flat.take(target)
    keep = None if better.all() else better
    if keep is not None:
        target, distance = target[keep], distance[keep]
    prio_flat[target] = distance
    lost = prio_flat.take(target) != distance
    if not lost.any():
        return keep
    while True:  # duplicates within this batch: the nearest claim wins after a few rounds
        retry = np.flatnonzero(lost & (distance < prio_flat.take(target)))
        if retry.size == 0:
            break
        prio_flat[target[retry]] = distance[retry]
        lost = prio_flat.take(target) != distance
    won = ~lost
    if keep is None:
        return won
    keep[np.flatnonzero(keep)[lost]] = False
    return keep
