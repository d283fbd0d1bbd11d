"""Tissue surface: detection, focal curvature flattening (step 2) and interface crop (step 6).

The surface is where intensity rises most along depth (water or agarose remnant above, tissue below):
``z0(y, x) = argmax_z d/dz I_smoothed`` with sub-sample refinement. The curvature step fits a smooth
quadratic surface to ``z0`` and shifts every A-line so the fitted surface becomes flat; the crop step keeps a
physical depth below the surface, at one depth per slice (the lab's mode) or following the surface pixel by
pixel (tilted and curved cuts).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter, median_filter

from ..io.mosaic import create_mosaic_grid_like, open_mosaic_grid
from ..params import param
from ..slices import (SliceRunParams, SliceStepResult, current_dask_worker, map_subtasks, run_slice_step,
                      write_in_parts)
from ._slice_io import block_size_for, create_slice_like, iter_blocks, open_slice, write_blocks

__all__ = [
    "detect_interface",
    "fit_quadratic_surface",
    "surface_outliers",
    "shift_alines",
    "CurvatureParams",
    "fix_focal_curvature",
    "InterfaceCropParams",
    "crop_interface",
]

GIB = 1024**3


def detect_interface(volume: np.ndarray, sigma_xy: float = 2.0, sigma_z: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Surface depth per A-line.

    Parameters
    ----------
    volume : ndarray (z, y, x)
    sigma_xy, sigma_z : float
        Gaussian smoothing (pixels) before differentiating along depth.

    Returns
    -------
    depth : ndarray (y, x) float32
        Depth of the steepest rise, in samples (position of the half-way point between the two samples
        around the steepest step, refined with a parabola through the neighbouring steps).
    strength : ndarray (y, x) float32
        The steepest rise itself (low where there is no surface, e.g. empty agarose).
    """
    smooth = gaussian_filter(np.asarray(volume, np.float32), (sigma_z, sigma_xy, sigma_xy), mode="nearest")
    step = np.diff(smooth, axis=0)  # step[k] = I[k+1] - I[k]: a rise centred at k + 0.5
    k = np.argmax(step, axis=0)
    strength = np.take_along_axis(step, k[None], axis=0)[0]
    before = np.take_along_axis(step, np.clip(k - 1, 0, step.shape[0] - 1)[None], axis=0)[0]
    after = np.take_along_axis(step, np.clip(k + 1, 0, step.shape[0] - 1)[None], axis=0)[0]
    curvature = before - 2 * strength + after
    offset = np.where(curvature < 0, 0.5 * (before - after) / np.where(curvature < 0, curvature, -1), 0.0)
    depth = k + 0.5 + np.clip(offset, -0.5, 0.5)
    return depth.astype(np.float32), strength.astype(np.float32)


def fit_quadratic_surface(
    depth: np.ndarray, weight: np.ndarray, *, min_outlier_samples: float | None = 3.0, rounds: int = 3
) -> tuple[np.ndarray, np.ndarray]:
    """Weighted least-squares quadratic ``a + b y + c x + d y^2 + e x y + f x^2`` through a depth map, robust
    to outliers.

    Where the surface is faint (agarose, weak tissue) the steepest rise of an A-line can be a deep structure
    instead, tens of samples below the surface, over whole patches of the slice. The fit therefore starts from
    a least-median-of-squares estimate (the best of many fits to random handfuls of pixels: it ignores up to
    half of them) and drops the pixels :func:`surface_outliers` finds (``floor_samples=min_outlier_samples``)
    before each of ``rounds`` weighted least-squares refits.
    ``min_outlier_samples=None`` gives the plain weighted fit.

    Returns the fitted surface (same shape) and the six coefficients (for pixel coordinates).
    """
    ny, nx = depth.shape
    yy, xx = np.mgrid[0:ny, 0:nx].astype(np.float64)
    design = np.stack([np.ones_like(yy), yy, xx, yy**2, xx * yy, xx**2], axis=-1).reshape(-1, 6)
    values = depth.ravel().astype(np.float64)
    w = np.sqrt(np.clip(weight, 0, None)).ravel().astype(np.float64)

    def weighted_fit(mask):
        wk = np.where(mask, w, 0.0)
        return np.linalg.lstsq(design * wk[:, None], values * wk, rcond=None)[0]

    usable = np.flatnonzero(w > 0)
    coef = weighted_fit(w > 0)
    if min_outlier_samples is None or usable.size < 12:
        return (design @ coef).reshape(ny, nx).astype(np.float32), coef
    rng = np.random.default_rng(0)  # deterministic: the same slice gives the same surface
    probe = usable if usable.size <= 20000 else rng.choice(usable, 20000, replace=False)
    best, best_median = coef, np.median(np.abs(values[probe] - design[probe] @ coef))
    for _ in range(64):
        pick = rng.choice(usable, 8, replace=False)
        trial = np.linalg.lstsq(design[pick], values[pick], rcond=None)[0]
        median = np.median(np.abs(values[probe] - design[probe] @ trial))
        if median < best_median:
            best, best_median = trial, median
    coef, kept = best, None
    for _ in range(rounds):
        now = (w > 0) & ~surface_outliers(values, design @ coef, w > 0, min_outlier_samples)
        if now.sum() < 6 or (kept is not None and np.array_equal(now, kept)):
            break
        kept = now
        coef = weighted_fit(kept)
    return (design @ coef).reshape(ny, nx).astype(np.float32), coef


def surface_outliers(depth: np.ndarray, fitted: np.ndarray, tissue: np.ndarray, floor_samples: float) -> np.ndarray:
    """Tissue pixels whose detected surface lies further from the fitted one than ``floor_samples`` or 4 robust
    sigma (1.4826 MAD over the tissue), whichever is more: deep structures taken for the surface."""
    off = np.abs(depth - fitted)
    if not tissue.any():
        return np.zeros(depth.shape, bool)
    return tissue & (off > max(float(floor_samples), 4.0 * 1.4826 * float(np.median(off[tissue]))))


def shift_alines(volume: np.ndarray, start: np.ndarray, depth: int) -> np.ndarray:
    """``out[z, y, x] = volume[start[y, x] + z, y, x]`` for ``z < depth``; samples past the end are zero."""
    nz = volume.shape[0]
    if nz == 0:  # no sample to take (every A-line starts past the end)
        return np.zeros((depth, *volume.shape[1:]), volume.dtype)
    z = np.arange(depth)[:, None, None] + np.asarray(start, np.int64)[None]
    valid = (z >= 0) & (z < nz)
    out = np.take_along_axis(volume, np.clip(z, 0, nz - 1), axis=0)
    out[~valid] = 0
    return out


def _tissue_weight(strength: np.ndarray) -> np.ndarray:
    """Pixels with a clear surface (the lab's rule: a rise above 10 % of the strongest)."""
    return (strength > 0.1 * np.percentile(strength, 99.5)).astype(np.float32)


# ---------------------------------------------------------------------------------------- curvature (step 2)
@dataclass
class CurvatureParams(SliceRunParams):
    """Focal curvature correction: flatten the smooth (quadratic) surface fitted to the detected interface."""

    sigma_xy: float = param(2.0, "Lateral smoothing before surface detection, pixels", min=0.0)
    sigma_z: float = param(1.0, "Axial smoothing before surface detection, samples", min=0.0)
    fit_downsample: int = param(4, "Fit the surface on every n-th A-line (speed)", min=1, advanced=True)


def _curvature_slice(params: CurvatureParams):
    def process(in_path: Path, out_tmp: Path, tracker) -> dict:
        mosaic = open_mosaic_grid(in_path)
        data = mosaic.array
        step = params.fit_downsample
        # The fit needs the surface everywhere but not every A-line: a strided read is enough.
        coarse = np.asarray(data[:, ::step, ::step], np.float32)
        depth, strength = detect_interface(coarse, params.sigma_xy / step, params.sigma_z)
        weight = _tissue_weight(strength)
        fitted, coef = fit_quadratic_surface(depth, weight)
        ny, nx = data.shape[1:]
        yy, xx = np.mgrid[0:ny, 0:nx].astype(np.float64) / step
        full = (coef[0] + coef[1] * yy + coef[2] * xx + coef[3] * yy**2 + coef[4] * xx * yy + coef[5] * xx**2)
        shift = np.rint(full - full.min()).astype(np.int64)
        out = create_mosaic_grid_like(out_tmp, mosaic, extra_attributes={"curvature_coefficients": coef.tolist()})
        for x, y in mosaic.tile_positions():
            region = mosaic.tile_region(x, y)
            out[region] = shift_alines(mosaic.read_tile(x, y), shift[region[1:]], data.shape[0])
            tracker.advance(1, f"slice {mosaic.slice_id}: tile x{x} y{y}")
        tissue = weight > 0
        outlier = surface_outliers(depth, fitted, tissue, 3.0)
        inliers = tissue & ~outlier
        residual = float(np.sqrt(np.mean((depth - fitted)[inliers] ** 2))) if inliers.any() else float("nan")
        return {"surface_range_samples": float(full.max() - full.min()), "fit_rms_samples": residual,
                "outlier_fraction": float(outlier.sum() / max(tissue.sum(), 1)), "coefficients": coef.tolist()}

    return process


def fix_focal_curvature(source, out_dir, params: CurvatureParams | None = None, *, progress=None,
                        cancel=None) -> SliceStepResult:
    """Step 2: shift every A-line of each mosaic grid so the fitted focal surface is flat.

    Writes ``slice_z{NN}_curvature.ome.zarr`` (mosaic layout) and ``curvature_metrics.json``.
    """
    params = params or CurvatureParams()

    def memory(path):
        mosaic = open_mosaic_grid(path)
        z, ny, nx = mosaic.array.shape
        s = params.fit_downsample
        return 4 * (z * (ny // s + 1) * (nx // s + 1) * 4 + 4 * int(np.prod(mosaic.tile_shape)) + 3 * ny * nx * 2)

    return run_slice_step(
        "curvature", source, out_dir, _curvature_slice(params), params, progress=progress, cancel=cancel,
        units_per_slice=lambda p: len(open_mosaic_grid(p).tile_positions()), memory_per_slice_bytes=memory,
    )


# ------------------------------------------------------------------------------------ interface crop (step 6)
@dataclass
class InterfaceCropParams(SliceRunParams):
    """Interface crop: detect the tissue surface and keep a physical depth below it."""

    depth_um: float = param(600.0, "Depth kept below the surface", min=0.0, unit="um")
    mode: str = param("per_pixel", "'per_slice': one surface depth per slice (the lab's); 'per_pixel': follow "
                      "tilted and curved surfaces A-line by A-line", choices=("per_slice", "per_pixel"))
    sigma_xy: float = param(2.0, "Lateral smoothing before surface detection, pixels", min=0.0)
    sigma_z: float = param(1.0, "Axial smoothing before surface detection, samples", min=0.0)
    surface_smoothing_px: int = param(
        9, "Median filter of the per-pixel surface (removes single-A-line outliers), pixels", min=1,
        advanced=True,
    )
    max_surface_step_um: float = param(
        50.0, "Per-pixel mode: an A-line's surface further than this (or 4 robust sigma, if more) from the "
        "smooth surface fitted to the slice is taken as a deep structure, and the fitted surface used there",
        min=0.0, unit="um", advanced=True,
    )


def _detect_block(path: Path, params: InterfaceCropParams, core: tuple[slice, slice]):
    """Surface depth and strength of the A-lines in ``core`` (read with the lateral smoothing's reach around)."""
    data = open_slice(path).levels[0]
    reach = int(4.0 * params.sigma_xy + 0.5)  # scipy's Gaussian kernel radius (truncate=4)
    padded = tuple(slice(max(0, c.start - reach), min(n, c.stop + reach)) for c, n in zip(core, data.shape[1:]))
    d, s = detect_interface(data[(slice(None), *padded)], params.sigma_xy, params.sigma_z)
    inner = tuple(slice(c.start - p.start, c.stop - p.start) for c, p in zip(core, padded))
    return d[inner], s[inner]


def _band_side(shape, side: int, parts: int = 2) -> int:
    """A block side (a multiple of 32 pixels, at most ``side``) that splits each lateral axis of the slice into
    about ``parts`` blocks."""
    per_part = -(-max(shape[1], shape[2]) // parts)
    return max(32, min(side, -(-per_part // 32) * 32))


def _cropped_block(keep: int, start: np.ndarray, data, core) -> np.ndarray:
    """``keep`` samples of each A-line of ``data``'s block at ``core``, from its row of ``start`` on. Only the
    depths some A-line of the block keeps are read (a crop usually keeps a fraction of the imaged depth)."""
    first = start[core]
    z0 = min(max(int(first.min()), 0), data.shape[0])
    z1 = max(min(int(first.max()) + keep, data.shape[0]), z0)
    return shift_alines(np.asarray(data[(slice(z0, z1), *core)], np.float32), first - z0, keep)


def _crop_slice(params: InterfaceCropParams):
    def process(in_path: Path, out_tmp: Path, tracker) -> dict:
        image = open_slice(in_path)
        data = image.levels[0]
        nz = data.shape[0]
        dz_um = image.scales_mm[0][0] * 1e3
        keep = max(1, min(nz, int(round(params.depth_um / dz_um))))
        side = block_size_for(data.shape, int(params.memory_budget_gb * GIB / max(params.workers, 1)), copies=6)
        blocks = list(iter_blocks(data.shape, side))
        # Pass 1: the surface of every A-line (kept: it is 2D) and the slice's median depth over tissue. Each
        # A-line's surface depends on its neighbours within the smoothing's reach only, so the blocks (bands of
        # rows as sub-tasks on a dask worker) give the same result however the slice is split.
        depth = np.zeros(data.shape[1:], np.float32)
        strength = np.zeros(data.shape[1:], np.float32)
        detect_side = side if current_dask_worker() is None else _band_side(data.shape, side)
        cores = [core for core, _ in iter_blocks(data.shape, detect_side)]
        found = map_subtasks(partial(_detect_block, in_path, params), cores, "soct-crop-surface")
        for core, (d, s) in zip(cores, found):
            depth[core], strength[core] = d, s
        tissue = _tissue_weight(strength) > 0
        slice_depth = float(np.median(depth[tissue])) if tissue.any() else 0.0
        if params.mode == "per_pixel":
            # Where no surface is visible (empty agarose, weak signal), or the steepest rise is a deep structure
            # far from the smooth surface fitted to the rest, follow that smooth surface rather than noise.
            if tissue.any():
                fitted, _ = fit_quadratic_surface(depth, tissue.astype(np.float32))
                outlier = surface_outliers(depth, fitted, tissue, params.max_surface_step_um / dz_um)
                depth = np.where(tissue & ~outlier, depth, fitted)
            surface = median_filter(depth, size=params.surface_smoothing_px, mode="nearest")
            start = np.floor(surface).astype(np.int64)
        else:
            start = np.full(depth.shape, int(np.floor(slice_depth)), np.int64)
        writer = create_slice_like(out_tmp, image, "crop", depth=keep, extra={"interface_mode": params.mode})
        write_in_parts(partial(write_blocks, in_path, partial(_cropped_block, keep), side), out_tmp, writer,
                       tracker, len(blocks), "soct-crop-part", shared=start)
        return {"interface_depth_samples": slice_depth, "interface_depth_um": slice_depth * dz_um,
                "surface_range_samples": float(np.ptp(start[tissue])) if tissue.any() else 0.0,
                "tissue_fraction": float(tissue.mean()), "kept_samples": keep}

    return process


def crop_interface(source, out_dir, params: InterfaceCropParams | None = None, *, progress=None,
                   cancel=None) -> SliceStepResult:
    """Step 6: keep ``depth_um`` below the detected tissue surface of each slice.

    Writes ``slice_z{NN}_crop.ome.zarr`` (multiscale) and ``crop_metrics.json``.
    """
    params = params or InterfaceCropParams()

    def units(path):
        shape = open_slice(path).levels[0].shape
        side = block_size_for(shape, int(params.memory_budget_gb * GIB / max(params.workers, 1)), copies=6)
        return len(list(iter_blocks(shape, side)))

    return run_slice_step("crop", source, out_dir, _crop_slice(params), params, progress=progress, cancel=cancel,
                          units_per_slice=units)
