"""Compare a reconstructed volume with the phantom of the synthetic acquisition it was made from.

Frame
-----
The stacked volume (step 14, or 15 after it) carries its own placement: ``canvas_origin_mm`` ``[y, x]`` is the
stage reading of canvas pixel (0, 0), and the stage reports tile *centres*, so the sample position of pixel
(0, 0) is half a field of view before it; plane 0 is the cut surface of the first stacked slice ``k0`` (its
acquisition index), i.e. block depth ``k0 * T``. Volume voxel ``(p, i, j)`` (level 0, voxel size ``v``) is then
the sample point ``depth = k0 * T + p * v_z``, ``y = canvas_origin_y - FOV_y / 2 + i * v_y`` (same for x),
which :class:`TruthFrame` writes in the truth volume frame of :class:`~.acquisition.SyntheticAcquisition`
(full-resolution voxels, fractional). The truth there is the phantom itself (:meth:`Phantom.evaluate`), sampled
at those exact points, not the stored, possibly downsampled ``truth/volume.zarr``.

Pyramid levels
--------------
A coarser level of the volume is an area-weighted box mean of level 0 (see :mod:`..io.pyramid3d`); the truth is
averaged over the same boxes here (with its own implementation), so both sides of a comparison have the same
resolution. A coarse voxel counts as inside the truth when at least 99 % of its box is.

Memory
------
Nothing here holds a whole bench-sized volume: the functions that cover a whole volume go through it by blocks
of planes, and :class:`TruthOnVolumeGrid` can keep the sampled phantom in a zarr store so that evaluating it
(the slow part) happens once for all the levels.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "TruthFrame",
    "TruthOnVolumeGrid",
    "LevelFigures",
    "volume_in_truth_frame",
    "level_against_truth",
    "tissue_mask",
    "ncc_over_tissue",
    "level_ncc",
    "slice_placement_errors",
    "placement_drift_px",
    "z_overlap_errors",
]

#: Fraction of a coarse voxel's box that must lie inside the truth volume for the voxel to count.
INSIDE_FRACTION = 0.99
_DEFAULT_BLOCK_VOXELS = 1 << 25  # level-0 voxels per block (128 MiB as float32)


def _soct(image) -> dict:
    return image.attributes.get("soct", image.attributes)


# ------------------------------------------------------------------------------------------------ frame
@dataclass(frozen=True)
class TruthFrame:
    """Where a volume's level-0 grid lies in the truth frame of a synthetic acquisition.

    Attributes
    ----------
    origin_px : tuple of float
        ``(z, y, x)`` truth-frame coordinate (full-resolution truth voxels) of volume voxel ``(0, 0, 0)``.
    step_px : tuple of float
        Truth voxels per volume level-0 voxel along ``(z, y, x)`` (1 when the volume keeps the acquisition's
        voxel size).
    truth_shape : tuple of int
        Full-resolution shape of the truth volume; coordinates in ``[0, n - 1]`` are inside it.
    first_slice : int
        Id of the slice whose cut surface is plane 0.
    """

    origin_px: tuple[float, float, float]
    step_px: tuple[float, float, float]
    truth_shape: tuple[int, int, int]
    first_slice: int

    def coordinates(self, axis: int, index) -> np.ndarray:
        """Truth-frame coordinates of volume level-0 indices along ``axis`` (0: z, 1: y, 2: x)."""
        return self.origin_px[axis] + np.asarray(index, dtype=np.float64) * self.step_px[axis]

    def inside(self, axis: int, index) -> np.ndarray:
        """Whether level-0 indices along ``axis`` fall inside the truth volume."""
        t = self.coordinates(axis, index)
        return (t >= -1e-6) & (t <= self.truth_shape[axis] - 1 + 1e-6)


def volume_in_truth_frame(acq, image) -> TruthFrame:
    """Place a stacked volume in the truth frame of its acquisition, from the volume's own attributes.

    Parameters
    ----------
    acq : SyntheticAcquisition
        The acquisition the volume was reconstructed from.
    image : OmeZarrImage
        The stacked volume (attributes ``canvas_origin_mm`` and ``slice_z0``).

    Returns
    -------
    TruthFrame

    Raises
    ------
    ValueError
        If the volume lacks ``canvas_origin_mm`` or ``slice_z0``, or its first slice is not in ``acq``.
    """
    soct = _soct(image)
    missing = [k for k in ("canvas_origin_mm", "slice_z0") if k not in soct]
    if missing:
        raise ValueError(f"{image.path}: attribute(s) {', '.join(missing)} missing; is this a stacked volume?")
    first = min(int(s) for s in soct["slice_z0"])
    if first not in acq.slice_ids:
        raise ValueError(f"{image.path}: first slice {first} is not a slice of the acquisition {acq.slice_ids}")
    c = acq.config
    base_um = np.asarray(image.scales_mm[0][-3:], dtype=np.float64) * 1e3
    truth_um = np.asarray(acq.voxel_size_um, dtype=np.float64)
    origin_mm = np.asarray(soct["canvas_origin_mm"], dtype=np.float64)
    corner_mm = origin_mm - np.asarray(acq.fov_mm[::-1]) / 2  # stage readings are tile centres
    yx = (corner_mm - np.asarray(acq.volume_origin_mm)) / np.asarray(acq.pixel_mm)
    z0 = acq.slice_ids.index(first) * c.slice_thickness_um / truth_um[0]
    return TruthFrame(origin_px=(float(z0), float(yx[0]), float(yx[1])),
                      step_px=tuple(float(v) for v in base_um / truth_um),
                      truth_shape=tuple(int(n) for n in acq.volume_shape_full), first_slice=first)


class TruthOnVolumeGrid:
    """The phantom sampled at the volume's level-0 voxels, by blocks of planes.

    Parameters
    ----------
    acq : SyntheticAcquisition
    image : OmeZarrImage
        The stacked volume.
    cache : path-like, optional
        A zarr store (created, must not exist) that keeps every block once computed, so that several passes
        over the volume (one per pyramid level) evaluate the phantom once. Without it nothing is kept.
    """

    def __init__(self, acq, image, cache=None):
        self.acq = acq
        self.frame = volume_in_truth_frame(acq, image)
        self.shape = tuple(int(n) for n in image.levels[0].shape[-3:])
        self._store = None
        self._done: set[int] = set()
        if cache is not None:
            import zarr

            cache = Path(cache)
            if cache.exists():
                raise FileExistsError(f"cache: {cache} exists; give a new path (it is filled from scratch)")
            plane_bytes = 4 * self.shape[1] * self.shape[2]
            self._chunk = max(1, min(self.shape[0], (32 << 20) // max(plane_bytes, 1)))
            self._store = zarr.create_array(store=str(cache), shape=self.shape, dtype="float32",
                                            chunks=(self._chunk, *self.shape[1:]), fill_value=0.0)

    def _evaluate(self, z0: int, z1: int) -> np.ndarray:
        f, a = self.frame, self.acq
        tz = f.coordinates(0, np.arange(z0, z1))
        ty = f.coordinates(1, np.arange(self.shape[1]))
        tx = f.coordinates(2, np.arange(self.shape[2]))
        d = (tz * a.voxel_size_um[0] / 1000.0)[:, None, None]
        y = (a.volume_origin_mm[0] + ty * a.pixel_mm[0])[None, :, None]
        x = (a.volume_origin_mm[1] + tx * a.pixel_mm[1])[None, None, :]
        return a.phantom.evaluate(x, y, d)

    def planes(self, z0: int, z1: int) -> np.ndarray:
        """The truth at level-0 planes ``[z0, z1)`` (float32, ``(z1 - z0, Y, X)``)."""
        z0, z1 = max(0, int(z0)), min(self.shape[0], int(z1))
        if self._store is None:
            return self._evaluate(z0, z1)
        ch = self._chunk
        for k in range(z0 // ch, -(-z1 // ch)):
            if k not in self._done:
                lo, hi = k * ch, min(self.shape[0], (k + 1) * ch)
                self._store[lo:hi] = self._evaluate(lo, hi)
                self._done.add(k)
        return np.asarray(self._store[z0:z1])

    def inside(self, axis: int, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Whether level-0 indices ``[start, stop)`` along ``axis`` are inside the truth volume."""
        stop = self.shape[axis] if stop is None else stop
        return self.frame.inside(axis, np.arange(start, stop))


# ------------------------------------------------------------------------------------------- box means
def _edges(n_in: int, n_out: int, factor: float, start: int, stop: int) -> np.ndarray:
    """Level-0 box edges of level voxels ``[start, stop)``: ``e_j = min(j * factor, n_in)``, the last one ``n_in``."""
    j = np.arange(start, stop + 1, dtype=np.float64)
    edges = np.minimum(j * factor, float(n_in))
    edges[j >= n_out] = float(n_in)
    return edges


def _box_mean(a: np.ndarray, axis: int, edges: np.ndarray) -> np.ndarray:
    """Area-weighted means of ``a`` between fractional ``edges`` (relative to ``a``'s first index) along ``axis``."""
    n = a.shape[axis]
    shape = list(a.shape)
    shape[axis] = n + 1
    cum = np.zeros(shape, np.float64)
    tail = [slice(None)] * a.ndim
    tail[axis] = slice(1, None)
    np.cumsum(a, axis=axis, dtype=np.float64, out=cum[tuple(tail)])  # cum[0] = 0: sums start at an edge
    index = np.minimum(np.floor(edges).astype(np.intp), n - 1)
    bshape = [1] * a.ndim
    bshape[axis] = -1
    frac = (edges - index).reshape(bshape)
    lo = np.take(cum, index, axis=axis)
    at = lo + frac * (np.take(cum, index + 1, axis=axis) - lo)
    del cum, lo
    return (np.diff(at, axis=axis) / np.diff(edges).reshape(bshape)).astype(np.float32)


def _factors(image, level: int) -> np.ndarray:
    return np.asarray(image.scales_mm[level][-3:], np.float64) / np.asarray(image.scales_mm[0][-3:], np.float64)


def _level_block(image, level: int, truth: TruthOnVolumeGrid, start: int, stop: int, noise_seed=None,
                 coverage: bool = False):
    """Level planes ``[start, stop)``: (data, truth, valid, noisy truth or None, data coverage or None), the truth
    averaged like the pyramid (over the level-0 voxels with data); coverage = fraction of each voxel's level-0
    box that has data (``!= 0``)."""
    data = np.asarray(image.levels[level][start:stop], dtype=np.float32)
    n0 = truth.shape
    nl = tuple(int(n) for n in image.levels[level].shape[-3:])
    if level == 0:
        base = truth.planes(start, stop)
        inside = [truth.inside(0, start, stop), truth.inside(1), truth.inside(2)]
        noisy = None if noise_seed is None else base * _speckle(truth.acq, noise_seed, start, stop, n0[1:])
        valid = inside[0][:, None, None] & inside[1][None, :, None] & inside[2][None, None, :]
        return data, base, valid, noisy, ((data > 0).astype(np.float32) if coverage else None)
    f = _factors(image, level)
    ez = _edges(n0[0], nl[0], f[0], start, stop)
    b0, b1 = int(math.floor(ez[0])), min(n0[0], int(math.ceil(ez[-1] - 1e-9)))
    ey, ex = _edges(n0[1], nl[1], f[1], 0, nl[1]), _edges(n0[2], nl[2], f[2], 0, nl[2])

    def reduce(block, ez_rel):
        return _box_mean(_box_mean(_box_mean(block, 2, ex), 1, ey), 0, ez_rel)

    # The pyramid averages the voxels with data only (0 = no data): the truth is averaged over the same ones.
    has_data = (np.asarray(image.levels[0][b0:b1]) != 0).astype(np.float32)
    covered = reduce(has_data, ez - b0)
    empty = covered <= 0

    def masked_mean(block):
        mean = reduce(block * has_data, ez - b0)
        np.divide(mean, covered, out=mean, where=~empty)
        mean[empty] = 0
        return mean

    base = truth.planes(b0, b1)
    noisy = None
    if noise_seed is not None:
        noisy = masked_mean(base * _speckle(truth.acq, noise_seed, b0, b1, n0[1:]))
    averaged = masked_mean(base)
    del base
    if not coverage:
        covered = None
    # Inside is separable, so the inside fraction of a box is the product of the per-axis fractions.
    frac = [_box_mean(truth.inside(0, b0, b1).astype(np.float32), 0, ez - b0),
            _box_mean(truth.inside(1).astype(np.float32), 0, ey),
            _box_mean(truth.inside(2).astype(np.float32), 0, ex)]
    valid = (frac[0][:, None, None] * frac[1][None, :, None] * frac[2][None, None, :]) > INSIDE_FRACTION
    return data, averaged, valid, noisy, covered


def _speckle(acq, seed: int, z0: int, z1: int, shape_yx) -> np.ndarray:
    """Multiplicative speckle of the phantom, averaged over its repeats: Gamma(k n, 1 / (k n)), mean 1.

    Drawn per level-0 plane from ``(seed, plane)`` so that every level and every block sees the same noise.
    """
    k = float(acq.config.speckle_shape) * int(acq.config.n_repeat)
    out = np.empty((z1 - z0, *shape_yx), np.float32)
    for i, z in enumerate(range(z0, z1)):
        out[i] = np.random.default_rng([int(seed), 11, z]).gamma(k, 1.0 / k, size=shape_yx)
    return out


def level_against_truth(acq, image, level: int, planes: tuple[int, int] | None = None, *,
                        truth: TruthOnVolumeGrid | None = None):
    """One pyramid level of the volume next to the truth averaged onto the same grid.

    Parameters
    ----------
    acq : SyntheticAcquisition
    image : OmeZarrImage
        The stacked volume.
    level : int
        Pyramid level.
    planes : (int, int), optional
        Level planes ``[start, stop)`` (default: all; on a large volume go through it by blocks, the level-0
        planes under the block are held in memory).
    truth : TruthOnVolumeGrid, optional
        The sampled phantom (give one with a cache when several levels are compared).

    Returns
    -------
    data : numpy.ndarray
        The level's voxels (float32).
    truth : numpy.ndarray
        The phantom at the level-0 voxels, box-averaged like the pyramid (float32).
    valid : numpy.ndarray of bool
        Voxels whose box lies inside the truth volume.
    """
    truth = truth or TruthOnVolumeGrid(acq, image)
    n = int(image.levels[level].shape[0])
    start, stop = (0, n) if planes is None else (max(0, int(planes[0])), min(n, int(planes[1])))
    data, averaged, valid, _, _ = _level_block(image, level, truth, start, stop)
    return data, averaged, valid


# ------------------------------------------------------------------------------------------------- NCC
def tissue_mask(acq, data: np.ndarray, truth: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Voxels that count: inside the truth, with data (``> 0``), and tissue in the truth (above the mid-level
    between agarose and tissue)."""
    c = acq.config
    return valid & (data > 0) & (truth > 0.5 * (c.agarose_level + c.tissue_level))


def ncc_over_tissue(acq, data: np.ndarray, truth: np.ndarray, valid: np.ndarray) -> tuple[float, int]:
    """Pearson correlation of the volume and the truth over :func:`tissue_mask`.

    Returns
    -------
    ncc : float
        NaN when fewer than 2 voxels count.
    n_voxels : int
    """
    mask = tissue_mask(acq, data, truth, valid)
    acc = _Moments()
    acc.add(truth[mask], data[mask])
    return acc.ncc(), acc.n


class _Moments:
    """Streaming Pearson correlation (float64 sums, shifted by the first block's means for precision)."""

    def __init__(self):
        self.n = 0
        self.shift = None
        self.s = np.zeros(5)  # sum a, sum b, sum a2, sum b2, sum ab

    def add(self, a: np.ndarray, b: np.ndarray) -> None:
        if a.size == 0:
            return
        a = a.astype(np.float64)
        b = b.astype(np.float64)
        if self.shift is None:
            self.shift = (a.mean(), b.mean())
        a -= self.shift[0]
        b -= self.shift[1]
        self.n += a.size
        self.s += (a.sum(), b.sum(), a @ a, b @ b, a @ b)

    def ncc(self) -> float:
        if self.n < 2:
            return float("nan")
        sa, sb, saa, sbb, sab = self.s
        cov = sab - sa * sb / self.n
        va, vb = saa - sa * sa / self.n, sbb - sb * sb / self.n
        return float(cov / math.sqrt(va * vb)) if va > 0 and vb > 0 else float("nan")


@dataclass
class LevelFigures:
    """NCC of one pyramid level against the truth.

    Attributes
    ----------
    level : int
    voxel_um : tuple of float
        ``(z, y, x)`` voxel size of the level.
    ncc : float
        Over tissue (:func:`tissue_mask`).
    n_voxels : int
        Voxels that counted.
    speckle_ceiling : float
        NCC of the truth times the phantom's speckle alone (one realisation, averaged the same way) against the
        truth over the same voxels: what a perfect reconstruction of one acquisition of each voxel would reach.
        NaN when not computed.
    ncc_covered, n_covered : float, int
        The same NCC over the tissue voxels whose whole box has data (at least ``min_coverage`` of it): a
        coarse voxel at the border of the data is the mean of data and "no data" zeros (the pyramid averages
        both), which the truth is not. NaN / 0 when not computed.
    """

    level: int
    voxel_um: tuple[float, float, float]
    ncc: float
    n_voxels: int
    speckle_ceiling: float = float("nan")
    ncc_covered: float = float("nan")
    n_covered: int = 0


def level_ncc(acq, image, level: int, *, truth: TruthOnVolumeGrid | None = None, speckle_ceiling: bool = False,
              min_coverage: float | None = None, seed: int = 0, max_block_voxels: int = _DEFAULT_BLOCK_VOXELS,
              progress=None) -> LevelFigures:
    """NCC over tissue of a whole pyramid level against the truth, block by block.

    Parameters
    ----------
    acq, image, level
        See :func:`level_against_truth`.
    truth : TruthOnVolumeGrid, optional
        Give one with a cache when several levels are compared.
    speckle_ceiling : bool
        Also compute :attr:`LevelFigures.speckle_ceiling`.
    min_coverage : float, optional
        Also compute :attr:`LevelFigures.ncc_covered` over the voxels with at least this fraction of their
        level-0 box holding data (reads level 0 again under every block).
    seed : int
        Seed of the speckle draws.
    max_block_voxels : int
        Level-0 voxels under one block (the memory holds a few float64 copies of that).
    progress : callable, optional
        ``progress(done_planes, total_planes)`` after each block.

    Returns
    -------
    LevelFigures
    """
    truth = truth or TruthOnVolumeGrid(acq, image)
    n = int(image.levels[level].shape[0])
    fz = float(_factors(image, level)[0])
    plane0 = truth.shape[1] * truth.shape[2]
    step = max(1, int(max_block_voxels // max(1, plane0) / fz))
    acc, ceiling, covered = _Moments(), _Moments(), _Moments()
    for start in range(0, n, step):
        stop = min(n, start + step)
        data, averaged, valid, noisy, coverage = _level_block(
            image, level, truth, start, stop, noise_seed=seed if speckle_ceiling else None,
            coverage=min_coverage is not None)
        mask = tissue_mask(acq, data, averaged, valid)
        acc.add(averaged[mask], data[mask])
        if noisy is not None:
            ceiling.add(averaged[mask], noisy[mask])
        if coverage is not None:
            mask &= coverage >= min_coverage - 1e-6
            covered.add(averaged[mask], data[mask])
        if progress is not None:
            progress(stop, n)
    voxel = tuple(float(v) * 1e3 for v in image.scales_mm[level][-3:])
    return LevelFigures(level, voxel, acc.ncc(), acc.n, ceiling.ncc() if speckle_ceiling else float("nan"),
                        covered.ncc() if min_coverage is not None else float("nan"), covered.n)


# ------------------------------------------------------------------------------------------- placement
def slice_placement_errors(acq, image, *, truth: TruthOnVolumeGrid | None = None, skip_planes: int = 2,
                           last_planes: int = 12, upsample: int = 20, block_planes: int = 16) -> dict:
    """Residual XY shift of each slice's section of the volume against the truth at the same depths.

    Each slice's own planes (from its first plane + ``skip_planes`` down to the next slice's first plane; the
    last slice: ``last_planes`` planes) are averaged in depth, in the volume and in the truth, over the pixels
    that have data and lie inside the truth in every one of those planes; the sub-pixel phase correlation
    (``skimage.registration.phase_cross_correlation``, truth as reference) of the two averages, both smoothed by a
    Gaussian of 1 pixel, is the slice's placement error.

    Parameters
    ----------
    acq : SyntheticAcquisition
    image : OmeZarrImage
        The stacked volume (attribute ``slice_z0``).
    truth : TruthOnVolumeGrid, optional
    skip_planes, last_planes, upsample, block_planes : int
        Planes left out under the cut surface; depth of the last slice's section; phase-correlation upsampling
        (precision ``1 / upsample`` px); planes read at once.

    Returns
    -------
    dict
        ``{slice_id: (dy, dx)}`` in level-0 pixels: the shift that moves the volume's section onto the truth
        (a section placed ``+s`` too far gives ``-s``).
    """
    from scipy import ndimage
    from skimage.registration import phase_cross_correlation

    truth = truth or TruthOnVolumeGrid(acq, image)
    level0 = image.levels[0]
    z0s = {int(s): int(z) for s, z in _soct(image)["slice_z0"].items()}
    ids = sorted(z0s)
    inside_yx = truth.inside(1)[:, None] & truth.inside(2)[None, :]
    errors = {}
    for i, sid in enumerate(ids):
        start = z0s[sid] + skip_planes
        stop = z0s[ids[i + 1]] if i + 1 < len(ids) else min(level0.shape[0], start + last_planes)
        if stop <= start:
            continue
        keep = inside_yx & bool(truth.inside(0, start, stop).all())
        m_sum = np.zeros(level0.shape[-2:], np.float64)
        t_sum = np.zeros_like(m_sum)
        for z in range(start, stop, block_planes):
            z1 = min(stop, z + block_planes)
            block = np.asarray(level0[z:z1], dtype=np.float32)
            keep &= (block > 0).all(axis=0)
            m_sum += block.sum(axis=0)
            t_sum += truth.planes(z, z1).sum(axis=0)
        ys, xs = np.nonzero(keep)
        if ys.size == 0:
            continue
        box = (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
        n = stop - start
        shift, _, _ = phase_cross_correlation(ndimage.gaussian_filter(t_sum[box] / n, 1),
                                              ndimage.gaussian_filter(m_sum[box] / n, 1), upsample_factor=upsample)
        errors[sid] = (float(shift[0]), float(shift[1]))
    return errors


def placement_drift_px(errors: dict) -> float:
    """Change of the placement error from the first to the last slice (pixels): the drift over the stack."""
    ids = sorted(errors)
    if len(ids) < 2:
        return 0.0
    d = np.asarray(errors[ids[-1]]) - np.asarray(errors[ids[0]])
    return float(np.hypot(*d))


def z_overlap_errors(acq, z_matches_csv, *, plane_um: float | None = None) -> dict:
    """Z offset used by the stacking minus the true one, per pair of consecutive stacked slices.

    The cut surface of slice ``k + gap`` lies ``gap * T`` below the one of slice ``k``, i.e. at plane
    ``gap * T / dz`` of slice ``k`` (``T`` the true cut thickness, ``dz`` the plane spacing).

    Parameters
    ----------
    acq : SyntheticAcquisition
    z_matches_csv : path-like
        ``z_matches.csv`` of the stacking (columns ``fixed_id, moving_id, used``).
    plane_um : float, optional
        Plane spacing of the stacked slices (default: the acquisition's axial sampling).

    Returns
    -------
    dict
        ``{(fixed_id, moving_id): used - true}`` in planes.
    """
    path = Path(z_matches_csv)
    if not path.is_file():
        raise FileNotFoundError(f"z_matches_csv: {path} is not a file")
    dz = float(plane_um or acq.config.axial_resolution_um)
    per_slice = acq.config.slice_thickness_um / dz
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    missing = {"fixed_id", "moving_id", "used"} - set(rows[0] if rows else {"fixed_id", "moving_id", "used"})
    if missing:
        raise ValueError(f"{path}: column(s) {', '.join(sorted(missing))} missing")
    return {(int(r["fixed_id"]), int(r["moving_id"])):
            float(r["used"]) - (int(r["moving_id"]) - int(r["fixed_id"])) * per_slice for r in rows}
