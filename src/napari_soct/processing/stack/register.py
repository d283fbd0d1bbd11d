"""Step 12: pairwise registration of consecutive slices in common space.

Each pair of consecutive used slices (``processing/stack/slots.py:assembly_slices``) is registered: the
*fixed* slice is the one cut first (smaller id), the *moving* slice the next one. The moving slice's top
(plane 0 is its cut surface) overlaps the fixed slice near plane ``e = round(T / dz * (moving_id - fixed_id))``
(``T`` the cut thickness, ``dz`` the axial voxel size). Only 2D planes are read, lazily from the zarr files.

Z match
-------
For each candidate plane ``q`` in ``e +- z_search_planes`` the score is the mean, over the first
``n = z_match_planes`` planes ``j`` of the moving slice, of the zero-lag Pearson correlation (NCC) between fixed
plane ``q + j`` and moving plane ``j`` over the centre ROI where both are non-zero, after a band-pass (Gaussian
of ``match_sigma_px`` minus Gaussian of ``background_sigma_px``, normalised over the valid pixels): the band-pass
removes speckle and the tissue outline, which is the same at every depth and would flatten the score; averaging
per-plane correlations over the first planes keeps the cut surface plane (mostly partial-volume medium) from
deciding alone. ``z_match_plane`` is the best ``q``; ``z_match_ncc`` its score.

Measured on the tiny phantom (3 seeds x 4 pairs, ``T / dz = 15``, slices as placed): plane 0 alone misses the
true plane by up to 5 planes (mean 3.5; the cut-surface plane is mostly partial-volume medium); the mean image
of the first 3 planes without band-pass by up to 4 (mean 0.9); the per-plane mean over 4 to 8 planes with the
band-pass by at most 1 (6 planes, the default: mean 0.42). Script: ``benchmarks/bench_register.py``.

Refinement
----------
The mean of the moving slice's first ``n`` planes ``j`` is registered onto the mean of the fixed planes
``q + j`` (both smoothed by ``match_sigma_px``), leaving out the planes whose z-match NCC at ``q`` is below 0.7
of the best one (a top plane spoilt by the surface crop would pull the registration). SimpleITK: correlation
metric on the ROI (fixed mask) and the moving slice's valid pixels (moving mask), regular-step gradient
descent (``learning_rate``, ``min_step``, ``iterations``; scales from the physical shift, so a step is in
pixels), ``pyramid_levels`` levels (shrink 2**k, smoothing sigma 2**k / 2 pixels), a translation, then for
``euler`` an Euler2D transform about the ROI centre started from it with a first step of ``learning_rate / 4``
(started a few pixels away, or with a 4 px first step, the rigid optimisation can run off into large
rotations). ``min_step`` is 1e-3, not the seed's 1e-2, which stops up to 0.33 degree short of a known 3 degree
rotation on a synthetic pair (0.02 degree at 1e-3).

A misalignment of a few pixels blurs the band-passed z match, so the z match is repeated with the moving
planes moved by the refinement, and the refinement at the new plane while it changes (3 rounds at most). The
result is bounded: one rotating by more than ``max_rotation_deg``, translating by more than
``max_translation_px``, or lowering the NCC is replaced by the identity (status ``fallback_identity``); so
is a pair whose best z-match NCC is below the gate ``max(min_match_ncc, match_fraction * typical)``, ``typical``
the 75th percentile over the stack's pairs (a high percentile: unrelated slices are a minority; nothing in common, e.g. a damaged slice; ``z_match_plane`` is then the expected plane):
how high the z-match NCC of related slices is depends on contrast and speckle (0.45-0.66 on the tiny phantom,
0.17 on the benchmark's low-contrast texture, while a slice of another phantom reaches 0.18 against the tiny
one), so no absolute threshold separates them; ``min_match_ncc`` (0.05) is the floor for pure noise (0.02). An exception in one pair gives an ``error`` row; the run goes
on.

SimpleITK maps fixed points to moving points, ``x -> R(a) (x - c) + c + t``; ``pairwise_registration.csv``
(``processing/stack/transforms.py``) maps moving to fixed, so the file holds the inverse: rotation ``-a``,
translation ``-R(-a) t``, the same centre ``c``.

Confidence
----------
``confidence = clip(ncc_after, 0, 1) * clip(z_match_ncc / (2 * gate), 0, 1) * (0.5 + 0.5 * sharpness)``
with ``sharpness = clip((peak - far) / z_prominence_full, 0, 1)``: ``peak`` is the best z-match score and
``far`` the median score of the candidates at least 3 planes from it (beyond the axial correlation of the
tissue). The first factor is how well the registered images agree (tissue outline included), the second
whether their inner structure agrees (the band-passed z match; twice the gate counts fully),
the third whether the depth is unambiguous (an ambiguous depth halves it). ``ncc_before`` / ``ncc_after`` are the
NCC of the registered images over the ROI before and after the transform (after = before for a fallback).
On the tiny phantom, consecutive slices score 0.74-0.97, a slice of another phantom 0.07-0.23, noise 0.00.
"""

from __future__ import annotations

import json
import math
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from scipy.ndimage import affine_transform, gaussian_filter

from ..io.atomic import IF_EXISTS_CHOICES, atomic_output, check_can_write
from ..io.omezarr import create_ome_zarr_image, open_ome_zarr
from ..memory import return_large_buffers_to_os
from ..params import param, validate_params
from ..progress import Cancelled, Progress
from .slots import assembly_slices
from .transforms import PairTransform, read_pairwise_registration, write_pairwise_registration

__all__ = [
    "RegistrationParams",
    "RegistrationResult",
    "register_pairwise",
    "register_slice_pair",
    "warp_moving_to_fixed",
    "pearson_ncc",
    "pair_confidence",
]

GIB = 1024**3
CSV_NAME = "pairwise_registration.csv"
METRICS_NAME = "register_metrics.json"
OVERLAY_NAME = "pair_overlays.ome.zarr"
FAR_PLANES = 3  # z-match candidates this far from the peak give the "far" level of the sharpness
EULER_STEP_DIVISOR = 4.0  # the Euler stage starts from the translation stage with a smaller first step
Z_MATCH_PIXELS = 250_000  # larger ROIs are z-matched in block means
MAX_ROUNDS = 3  # z match / refinement rounds (the z match is repeated with the moving slice moved)
KEEP_FRACTION = 0.7  # moving planes whose z-match NCC is below this fraction of the best one are not registered


@dataclass
class RegistrationParams:
    """Pairwise registration of consecutive slices (z match, then a bounded 2D rigid refinement)."""

    transform: str = param("euler", "Refinement transform: rotation + translation (euler) or translation only",
                           choices=("euler", "translation"))
    max_translation_px: float = param(20.0, "Larger refined translations fall back to the identity", min=0.0,
                                      unit="px")
    max_rotation_deg: float = param(5.0, "Larger refined rotations fall back to the identity", min=0.0,
                                    unit="degree")
    min_ncc_gain: float = param(
        0.002, "A refinement that raises the NCC by less than this is not kept (identity): below it, the change "
        "is within the speckle noise and would only add drift when the transforms are composed", min=0.0,
        advanced=True)
    z_search_planes: int = param(5, "Fixed planes searched on each side of the expected overlap plane", min=0)
    z_match_planes: int = param(6, "First planes of the moving slice compared in the z match (and averaged for "
                                "the refinement)", min=1)
    roi_fraction: float = param(0.75, "Side of the centre ROI (of the region both slices cover) that is compared",
                                min=0.05, max=1.0)
    slice_thickness_um: float = param(0.0, "Cut thickness T; 0 takes the median stage_z_mm step between slices",
                                      min=0.0, unit="um")
    interpolated_dir: str = param("", "Folder of interpolated slots (step 11) to register too; empty: none")
    slice_config: str = param("", "slice_config.csv whose excluded slices are skipped; empty: none")
    min_match_ncc: float = param(0.05, "A best z-match NCC below this means no common content: identity fallback",
                                 min=0.0, max=1.0, advanced=True)
    match_fraction: float = param(0.4, "So does one below this fraction of the stack's typical z-match NCC (75th "
                                  "percentile over the pairs)", min=0.0, max=1.0, advanced=True)
    match_sigma_px: float = param(1.0, "Gaussian smoothing (speckle) before matching and registering", min=0.0,
                                  unit="px", advanced=True)
    background_sigma_px: float = param(4.0, "Gaussian background removed before the z match (0: none)", min=0.0,
                                       unit="px", advanced=True)
    z_prominence_full: float = param(0.05, "Z-match peak prominence (NCC) that counts as fully sharp in the "
                                     "confidence", min=1e-6, advanced=True)
    pyramid_levels: int = param(3, "Multiscale levels of the refinement", min=1, max=8, advanced=True)
    learning_rate: float = param(4.0, "Initial gradient-descent step", min=1e-6, unit="px", advanced=True)
    min_step: float = param(1e-3, "Gradient descent stops below this step", min=1e-8, unit="px", advanced=True)
    iterations: int = param(200, "Gradient-descent iterations per level (at most)", min=1, advanced=True)
    max_metric_pixels: int = param(50_000, "ROI pixels sampled by the refinement metric at most (random "
                                   "sampling above)", min=1000, advanced=True)
    overlay_max_px: int = param(1024, "Long side of the fixed/moving overlay image per pair (0: no overlays)",
                                min=0, unit="px", advanced=True)
    workers: int = param(2, "Threads: slice pairs registered in parallel, SimpleITK threads per pair share them",
                         min=1, max=256)
    memory_budget_gb: float = param(4.0, "Peak memory the step may use, in GiB", min=1e-6, unit="GiB",
                                    advanced=True)
    if_exists: str = param("error", "Existing outputs: 'error' refuses, 'skip' keeps them, 'overwrite' replaces "
                           "them", choices=IF_EXISTS_CHOICES, advanced=True)


@dataclass
class RegistrationResult:
    """Outputs of :func:`register_pairwise`.

    Attributes
    ----------
    pairs : list of PairTransform
        One per consecutive pair of used slices (the rows of ``pairwise_registration.csv``).
    pair_metrics : list of dict
        Per pair: z-match scores per candidate plane, sharpness, ROI, status reason, seconds.
    overlay_path : Path or None
        ``pair_overlays.ome.zarr``: ``(pair, 2, y, x)``, channel 0 the matched fixed planes, channel 1 the
        moving top after the written transform (downsampled by ``overlay_factor``).
    """

    out_dir: Path
    csv_path: Path
    metrics_path: Path
    overlay_path: Path | None = None
    pairs: list[PairTransform] = field(default_factory=list)
    pair_metrics: list[dict] = field(default_factory=list)
    slice_thickness_um: float = float("nan")
    z_match_gate: float = float("nan")
    overlay_factor: int = 1
    seconds: float = 0.0
    workers_used: int = 0
    skipped: bool = False

    def count(self, status: str) -> int:
        return sum(p.status == status for p in self.pairs)


# --- image helpers -------------------------------------------------------------------------------------------------
def pearson_ncc(a: np.ndarray, b: np.ndarray, mask: np.ndarray, min_pixels: int = 16) -> float:
    """Zero-lag normalised cross-correlation (Pearson) of ``a`` and ``b`` over ``mask``; NaN when fewer than
    ``min_pixels`` pixels or no variance."""
    n = int(np.count_nonzero(mask))
    if n < min_pixels:
        return float("nan")
    if n == mask.size:
        x, y = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    else:
        x, y = a[mask].astype(np.float64), b[mask].astype(np.float64)
    sx, sy = x.sum(), y.sum()
    sxx, syy = float(x @ x) - sx * sx / n, float(y @ y) - sy * sy / n
    sxy = float(x @ y) - sx * sy / n
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else float("nan")


def _smooth_valid(image: np.ndarray, valid: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian smoothing of the valid pixels only (normalised convolution): no data stays out of the average."""
    if sigma <= 0:
        return np.where(valid, image, 0).astype(np.float32)
    weight = gaussian_filter(valid.astype(np.float32), sigma)
    values = gaussian_filter(np.where(valid, image, 0).astype(np.float32), sigma)
    return np.where(valid, values / np.maximum(weight, 1e-6), 0).astype(np.float32)


def _band_pass(image: np.ndarray, valid: np.ndarray, sigma: float, background: float) -> np.ndarray:
    out = _smooth_valid(image, valid, sigma)
    if background > 0:
        out = np.where(valid, out - _smooth_valid(image, valid, background), 0).astype(np.float32)
    return out


def _mean_planes(planes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean over the valid (non-zero) planes of each pixel, and where at least one plane is valid."""
    valid = planes > 0
    count = valid.sum(axis=0)
    total = np.where(valid, planes, 0).sum(axis=0, dtype=np.float64)
    return (total / np.maximum(count, 1)).astype(np.float32), count > 0


def warp_moving_to_fixed(moving: np.ndarray, pair: PairTransform, order: int = 1) -> np.ndarray:
    """Resample a 2D moving image into the fixed frame with ``pair`` (moving -> fixed, the file convention):
    ``out(q) = moving(pair^-1(q))``; outside the moving image is 0."""
    inverse = np.linalg.inv(pair.matrix())  # fixed (x, y) -> moving (x, y)
    # scipy indexes (row, col) = (y, x): swap both axes of the linear part and the offset.
    return affine_transform(moving, inverse[:2, :2][::-1, ::-1], inverse[:2, 2][::-1], order=order,
                            mode="constant", cval=0.0, output=np.float32)


def _centre_roi(valid: np.ndarray, fraction: float) -> tuple[slice, slice] | None:
    """Centre crop (``fraction`` of each side) of the bounding box of ``valid``; None when empty."""
    rows, cols = np.flatnonzero(valid.any(axis=1)), np.flatnonzero(valid.any(axis=0))
    if rows.size == 0:
        return None
    out = []
    for lo, hi in ((rows[0], rows[-1] + 1), (cols[0], cols[-1] + 1)):
        side = max(1, int(round((hi - lo) * fraction)))
        start = lo + (hi - lo - side) // 2
        out.append(slice(int(start), int(start + side)))
    return out[0], out[1]


def _sitk_register(fixed, moving, fixed_mask, moving_mask, centre_xy, params: RegistrationParams, threads: int):
    """SimpleITK refinement; returns the transform as (rotation_deg, tx_px, ty_px) moving -> fixed about
    ``centre_xy`` (see the module docstring for the inversion) and the optimiser's stop condition.

    For ``euler`` a translation is registered first and starts the Euler2D registration, whose first step is
    ``learning_rate / 4`` (it corrects what the translation left): a rigid optimisation started several pixels
    away, or with a 4 px first step, can run off into large rotations (measured on smooth random textures)."""
    import SimpleITK as sitk

    # Only the fixed mask's box and a margin the moving image may move across are registered; the crop's origin
    # keeps physical coordinates = canvas pixels (x = column, y = row; spacing 1).
    rows, cols = np.flatnonzero(fixed_mask.any(axis=1)), np.flatnonzero(fixed_mask.any(axis=0))
    margin = int(math.ceil(params.max_translation_px)) + 8
    y0, y1 = max(0, rows[0] - margin), min(fixed.shape[0], rows[-1] + 1 + margin)
    x0, x1 = max(0, cols[0] - margin), min(fixed.shape[1], cols[-1] + 1 + margin)
    box = (slice(y0, y1), slice(x0, x1))

    def image(array, dtype):
        out = sitk.GetImageFromArray(np.ascontiguousarray(array[box], dtype=dtype))
        out.SetOrigin((float(x0), float(y0)))
        return out

    fixed_image, moving_image = image(fixed, np.float32), image(moving, np.float32)
    fixed_mask_image, moving_mask_image = image(fixed_mask, np.uint8), image(moving_mask, np.uint8)
    n_mask = int(np.count_nonzero(fixed_mask))
    levels = params.pyramid_levels
    shrink = [2 ** (levels - 1 - k) for k in range(levels)]

    def run(transform, learning_rate):
        reg = sitk.ImageRegistrationMethod()
        reg.SetNumberOfThreads(threads)  # SimpleITK ignores OMP_NUM_THREADS: set explicitly
        reg.SetMetricAsCorrelation()
        reg.SetMetricFixedMask(fixed_mask_image)
        reg.SetMetricMovingMask(moving_mask_image)
        if n_mask > params.max_metric_pixels:
            reg.SetMetricSamplingStrategy(reg.RANDOM)
            reg.SetMetricSamplingPercentage(params.max_metric_pixels / n_mask, 12345)
        else:
            reg.SetMetricSamplingStrategy(reg.NONE)
        reg.SetInterpolator(sitk.sitkLinear)
        reg.SetOptimizerAsRegularStepGradientDescent(
            learningRate=learning_rate, minStep=params.min_step, numberOfIterations=params.iterations,
            relaxationFactor=0.5, gradientMagnitudeTolerance=1e-8,
        )
        reg.SetOptimizerScalesFromPhysicalShift()
        reg.SetShrinkFactorsPerLevel(shrink)
        reg.SetSmoothingSigmasPerLevel([f / 2 if f > 1 else 0 for f in shrink])
        reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
        reg.SetInitialTransform(transform, inPlace=True)
        reg.Execute(fixed_image, moving_image)
        return reg.GetOptimizerStopConditionDescription()

    translation = sitk.TranslationTransform(2)
    stop = run(translation, params.learning_rate)
    angle, t = 0.0, np.array(translation.GetOffset())
    if params.transform == "euler":
        euler = sitk.Euler2DTransform()
        euler.SetCenter(tuple(float(c) for c in centre_xy))
        euler.SetTranslation(tuple(float(v) for v in t))
        stop = run(euler, params.learning_rate / EULER_STEP_DIVISOR)
        angle, t = euler.GetAngle(), np.array(euler.GetTranslation())
    # fixed -> moving x -> R(a)(x - c) + c + t; moving -> fixed p -> R(-a)(p - c) + c - R(-a) t.
    r_inv = np.array([[math.cos(-angle), -math.sin(-angle)], [math.sin(-angle), math.cos(-angle)]])
    tx, ty = -(r_inv @ t)
    return -math.degrees(angle), float(tx), float(ty), stop


# --- one pair ----------------------------------------------------------------------------------------------------
@dataclass
class _PairJob:
    index: int
    fixed_id: int
    moving_id: int
    fixed_path: Path
    moving_path: Path
    expected_plane: int


def _level0(path: Path):
    return open_ome_zarr(path).levels[0]


def _reduce(image: np.ndarray, valid: np.ndarray, factor: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean of the valid pixels of ``factor`` x ``factor`` blocks; a block is valid when half its pixels are."""
    if factor == 1:
        return image, valid
    ny, nx = (image.shape[0] // factor) * factor, (image.shape[1] // factor) * factor
    shape = (ny // factor, factor, nx // factor, factor)
    count = valid[:ny, :nx].reshape(shape).sum(axis=(1, 3))
    total = np.where(valid, image, 0)[:ny, :nx].reshape(shape).sum(axis=(1, 3), dtype=np.float64)
    return (total / np.maximum(count, 1)).astype(np.float32), count >= factor * factor / 2


def _z_scores(fixed, top: np.ndarray, top_valid: np.ndarray, candidates: list[int], roi, params: RegistrationParams,
              min_valid: int) -> dict[int, float]:
    """Z-match score of each candidate fixed plane: mean over the moving planes ``j`` of the NCC of fixed plane
    ``q + j`` and moving plane ``j`` (band-passed, ROI, valid in both). Reads the fixed planes in the ROI only.

    A ROI of more than ``Z_MATCH_PIXELS`` is compared in blocks (mean of ``f`` x ``f`` pixels, the filters
    scaled by ``1 / f``), so the cost stays bounded on large canvases."""
    n, nz_fixed = top.shape[0], fixed.shape[0]
    roi_pixels = (roi[0].stop - roi[0].start) * (roi[1].stop - roi[1].start)
    factor = max(1, math.ceil(math.sqrt(roi_pixels / Z_MATCH_PIXELS)))
    sigma, background = params.match_sigma_px / factor, params.background_sigma_px / factor
    min_valid = max(16, min_valid // factor**2)

    def prepare(image, valid):
        image, valid = _reduce(image, valid, factor)
        return _band_pass(image, valid, sigma, background), valid

    moving = [prepare(top[j][roi], top_valid[j][roi]) for j in range(n)]
    r_first, r_last = candidates[0], min(candidates[-1] + n, nz_fixed)
    table = np.full((r_last - r_first, n), np.nan)
    for i in range(r_last - r_first):
        r = r_first + i
        plane = np.asarray(fixed[r, roi[0], roi[1]], dtype=np.float32)
        band, valid = prepare(plane, plane > 0)
        if np.count_nonzero(valid) < min_valid:
            continue
        for j in range(n):
            if r - j in candidates:
                table[i, j] = pearson_ncc(band, moving[j][0], valid & moving[j][1], min_valid)
    scores, per_plane = {}, {}
    for q in candidates:
        values = np.array([table[q + j - r_first, j] if q + j < r_last else np.nan for j in range(n)])
        per_plane[q] = values
        finite = values[np.isfinite(values)]
        scores[q] = float(np.mean(finite)) if finite.size else float("nan")
    return scores, per_plane


def pair_confidence(ncc_after: float, z_match_ncc: float, sharpness: float, gate: float) -> float:
    """``clip(ncc_after) * clip(z_match_ncc / (2 gate)) * (0.5 + 0.5 sharpness)`` (module docstring); 0 for NaN."""
    if not (np.isfinite(ncc_after) and np.isfinite(z_match_ncc)):
        return 0.0
    structure = float(np.clip(z_match_ncc / (2 * gate), 0, 1)) if gate > 0 else 1.0
    return float(np.clip(ncc_after, 0, 1) * structure * (0.5 + 0.5 * sharpness))


def _peak(scores: dict[int, float], z_prominence_full: float) -> tuple[int | None, float, float]:
    """Best candidate, its score and the sharpness of the peak (module docstring)."""
    finite = {q: s for q, s in scores.items() if np.isfinite(s)}
    if not finite:
        return None, float("nan"), 0.0
    best = max(finite, key=finite.get)
    far = [s for q, s in finite.items() if abs(q - best) >= FAR_PLANES] or [s for q, s in finite.items() if q != best]
    sharpness = float(np.clip((finite[best] - np.median(far)) / z_prominence_full, 0, 1)) if far else 0.0
    return best, finite[best], sharpness


def register_slice_pair(fixed_path, moving_path, fixed_id: int, moving_id: int, expected_plane: int,
                        params: RegistrationParams, *, threads: int = 1, check=None) -> tuple[PairTransform, dict,
                                                                                            tuple | None]:
    """Register one pair (z match, bounded refinement, z match again with the refined transform); see the module
    docstring.

    Returns
    -------
    pair : PairTransform
    metrics : dict
        Z-match scores per candidate, sharpness, ROI, reason for a fallback.
    images : tuple or None
        ``(fixed_image, moving_warped)`` full-canvas 2D images for the overlay (None when there is no overlap).
    """
    check = check or (lambda: None)
    fixed, moving = _level0(Path(fixed_path)), _level0(Path(moving_path))
    if fixed.shape[1:] != moving.shape[1:]:
        raise ValueError(f"{moving_path}: canvas {moving.shape[1:]} differs from {fixed_path} {fixed.shape[1:]}; "
                         "slices must be in one common space (step 10)")
    n = min(params.z_match_planes, moving.shape[0])
    pair = PairTransform(fixed_id=fixed_id, moving_id=moving_id, expected_z_plane=int(expected_plane),
                         z_match_plane=int(expected_plane), status="fallback_identity")
    metrics: dict = {"fixed_id": fixed_id, "moving_id": moving_id, "expected_z_plane": int(expected_plane)}
    nz_fixed = fixed.shape[0]
    candidates = [q for q in range(expected_plane - params.z_search_planes, expected_plane + params.z_search_planes + 1)
                  if 0 <= q < nz_fixed]
    if not candidates:
        metrics["reason"] = f"expected plane {expected_plane} is outside the fixed slice's {nz_fixed} planes"
        return pair, metrics, None

    top = np.asarray(moving[0:n], dtype=np.float32)
    top_valid = top > 0
    reference = np.asarray(fixed[candidates[len(candidates) // 2]], dtype=np.float32)
    roi = _centre_roi(top_valid.any(axis=0) & (reference > 0), params.roi_fraction)
    del reference
    if roi is None:
        metrics["reason"] = "the slices share no valid pixel"
        return pair, metrics, None
    ry, rx = roi
    metrics["roi"] = {"y0_px": ry.start, "x0_px": rx.start, "height_px": ry.stop - ry.start,
                      "width_px": rx.stop - rx.start}
    centre_xy = ((rx.start + rx.stop - 1) / 2.0, (ry.start + ry.stop - 1) / 2.0)
    pair.center_x_px, pair.center_y_px = centre_xy
    min_valid = max(16, int(0.25 * (ry.stop - ry.start) * (rx.stop - rx.start)))
    roi_mask = np.zeros(top.shape[1:], bool)
    roi_mask[roi] = True

    def kept_planes(plane: int) -> list[int]:
        """Moving planes used for the refinement: those whose z-match NCC at ``plane`` is not far below the best
        (a plane spoilt by the surface crop would otherwise pull the registration)."""
        values = per_plane.get(plane)
        if values is None or not np.isfinite(values).any() or np.nanmax(values) < params.min_match_ncc:
            return list(range(n))  # no reliable match (yet, e.g. misaligned): every plane
        top_value = np.nanmax(values)
        kept = [j for j in range(n) if np.isfinite(values[j]) and values[j] >= KEEP_FRACTION * top_value]
        return kept or list(range(n))

    def refine(plane: int):
        """Register at ``plane``: images, valid masks, the transform found and why it is out of bounds (or "")."""
        kept = kept_planes(plane)
        mean, moving_valid = _mean_planes(top[kept])
        moving_img = _smooth_valid(mean, moving_valid, params.match_sigma_px)
        fixed_planes = [plane + j for j in kept if plane + j < nz_fixed]
        mean, fixed_valid = _mean_planes(np.stack([np.asarray(fixed[r], dtype=np.float32) for r in fixed_planes]))
        fixed_img = _smooth_valid(mean, fixed_valid, params.match_sigma_px)
        del mean
        check()
        rotation, tx, ty, stop = _sitk_register(fixed_img, moving_img, roi_mask & fixed_valid, moving_valid, centre_xy,
                                                params, threads)
        found = PairTransform(fixed_id, moving_id, center_x_px=centre_xy[0], center_y_px=centre_xy[1], tx_px=tx,
                              ty_px=ty, rotation_deg=rotation)
        metrics.setdefault("refinements", []).append({"plane": plane, "moving_planes": kept, "rotation_deg": rotation,
                                                      "tx_px": tx, "ty_px": ty, "optimizer": stop})
        why = ""
        if abs(rotation) > params.max_rotation_deg:
            why = f"rotation {rotation:.2f} deg > max_rotation_deg {params.max_rotation_deg}"
        elif math.hypot(tx, ty) > params.max_translation_px:
            why = f"translation {math.hypot(tx, ty):.2f} px > max_translation_px {params.max_translation_px}"
        return fixed_img, fixed_valid, moving_img, moving_valid, found, why

    def z_match(transform: PairTransform | None):
        if transform is None or transform.is_identity:
            return _z_scores(fixed, top, top_valid, candidates, roi, params, min_valid)
        moved = np.stack([warp_moving_to_fixed(top[j], transform) for j in range(n)])
        moved_valid = np.stack([warp_moving_to_fixed(top_valid[j].astype(np.float32), transform, order=0) > 0.5
                                for j in range(n)])
        return _z_scores(fixed, moved, moved_valid, candidates, roi, params, min_valid)

    # z match as placed, refine at the best plane, z match again with the moving top moved by that refinement
    # (a few pixels of misalignment blur the band-passed match; done even when the refinement is out of bounds,
    # to tell "too far" from "nothing in common"), refine again while the plane changes.
    found, plane = None, None
    for _ in range(MAX_ROUNDS):
        scores, per_plane = z_match(found)
        best, _, _ = _peak(scores, params.z_prominence_full)
        matched = best if best is not None else int(np.clip(expected_plane, 0, nz_fixed - 1))
        if matched == plane:
            break  # the scores belong to the transform found at this plane
        plane = matched
        fixed_img, fixed_valid, moving_img, moving_valid, found, why = refine(plane)
        if found.is_identity:
            break  # nothing moved: the z match would not change
    else:
        scores, per_plane = z_match(found)
    del top, top_valid
    best, peak, sharpness = _peak(scores, params.z_prominence_full)
    metrics["z_scores"] = {str(q): (round(s, 5) if np.isfinite(s) else None) for q, s in scores.items()}
    metrics["sharpness"] = sharpness
    pair.z_match_ncc = peak

    def confidence(ncc):
        return pair_confidence(ncc, peak, sharpness, params.min_match_ncc)

    mask = roi_mask & fixed_valid
    ncc_before = pearson_ncc(fixed_img, moving_img, mask & moving_valid)
    pair.ncc_before = pair.ncc_after = ncc_before
    pair.confidence = confidence(ncc_before)
    if best is None or not peak >= params.min_match_ncc:
        metrics["reason"] = (f"z-match NCC {peak:.3f} < min_match_ncc {params.min_match_ncc}" if best is not None
                             else "no candidate plane of the fixed slice has data under the ROI")
        return pair, metrics, (fixed_img, moving_img)
    pair.z_match_plane = int(plane)
    if why:
        metrics["reason"] = why
        return pair, metrics, (fixed_img, moving_img)
    warped = warp_moving_to_fixed(moving_img, found)
    warped_valid = warp_moving_to_fixed(moving_valid.astype(np.float32), found, order=0) > 0.5
    ncc_after = pearson_ncc(fixed_img, warped, mask & warped_valid)
    if not found.is_identity and not (np.isfinite(ncc_after) and (not np.isfinite(ncc_before)
                                                                  or ncc_after > ncc_before)):
        metrics["reason"] = f"NCC did not improve ({ncc_before:.4f} -> {ncc_after:.4f})"
        return pair, metrics, (fixed_img, moving_img)
    if np.isfinite(ncc_before) and ncc_after <= ncc_before + params.min_ncc_gain:
        # Already aligned: the slices match as placed, the refinement's change is within the noise.
        metrics["reason"] = (f"aligned as placed: the refinement raised the NCC by {ncc_after - ncc_before:.4f} "
                             f"<= min_ncc_gain {params.min_ncc_gain}; identity kept")
        pair.status = "ok"
        return pair, metrics, (fixed_img, moving_img)
    pair.tx_px, pair.ty_px, pair.rotation_deg = found.tx_px, found.ty_px, found.rotation_deg
    pair.ncc_after, pair.status = ncc_after, "ok"
    pair.confidence = confidence(ncc_after)
    return pair, metrics, (fixed_img, warped)


# --- the step ----------------------------------------------------------------------------------------------------
def _slice_thickness_um(files: dict[int, Path], params: RegistrationParams) -> float:
    if params.slice_thickness_um > 0:
        return float(params.slice_thickness_um)
    stage_z = {}
    for sid, path in files.items():
        value = (open_ome_zarr(path).attributes.get("soct") or {}).get("stage_z_mm")
        if value is not None:
            stage_z[sid] = float(value)
    ids = sorted(stage_z)
    steps = [(stage_z[b] - stage_z[a]) * 1000.0 / (b - a) for a, b in zip(ids, ids[1:])]
    thickness = float(np.median(steps)) if steps else float("nan")
    if not (np.isfinite(thickness) and thickness > 0):
        raise ValueError("cannot derive the cut thickness from the slices' stage_z_mm attributes "
                         f"({len(stage_z)} slice(s) have it); set parameter 'slice_thickness_um'")
    return abs(thickness)


def _voxel_size_um(path: Path) -> list[float]:
    image = open_ome_zarr(path)
    soct = image.attributes.get("soct") or {}
    if "voxel_size_um" in soct:
        return [float(v) for v in soct["voxel_size_um"]]
    return [s * 1000.0 for s in image.scales_mm[0]]


def _block_mean(image: np.ndarray, factor: int, shape: tuple[int, int]) -> np.ndarray:
    if factor == 1:
        return image
    ny, nx = shape
    padded = np.zeros((ny * factor, nx * factor), np.float32)
    padded[: image.shape[0], : image.shape[1]] = image
    return padded.reshape(ny, factor, nx, factor).mean(axis=(1, 3))


def register_pairwise(common_dir, out_dir, params: RegistrationParams | None = None, *, interpolated_dir="",
                      slice_config="", progress=None, cancel=None) -> RegistrationResult:
    """Step 12: register each pair of consecutive used slices (see the module docstring).

    Parameters
    ----------
    common_dir : path
        Slices in common space (``10_common/slice_z{NN}_common.ome.zarr``).
    out_dir : path
        Receives ``pairwise_registration.csv``, ``register_metrics.json`` and ``pair_overlays.ome.zarr``.
    interpolated_dir, slice_config : path, optional
        Interpolated slots to include and the configuration whose excluded slices are left out; when empty,
        the parameters of the same names are used.
    progress, cancel
        ``progress(done, total, message)`` per pair; ``cancel.is_set()`` stops between pairs.
    """
    params = params or RegistrationParams()
    validate_params(params)
    started = time.perf_counter()
    return_large_buffers_to_os()
    out_dir = Path(out_dir)
    csv_path, metrics_path, overlay_path = out_dir / CSV_NAME, out_dir / METRICS_NAME, out_dir / OVERLAY_NAME
    result = RegistrationResult(out_dir, csv_path, metrics_path)
    if not check_can_write(csv_path, params.if_exists):
        result.pairs = read_pairwise_registration(csv_path)
        result.overlay_path = overlay_path if overlay_path.exists() else None
        result.skipped = True
        return result
    interpolated_dir = interpolated_dir or params.interpolated_dir
    slice_config = slice_config or params.slice_config
    if slice_config and not Path(slice_config).is_file():
        raise ValueError(f"parameter 'slice_config': {slice_config} is not a file")
    files = assembly_slices(common_dir, interpolated_dir, slice_config)
    ids = sorted(files)
    if len(ids) < 2:
        raise ValueError(f"{common_dir}: {len(ids)} used slice(s); registration needs at least two")
    thickness = _slice_thickness_um(files, params)
    dz = _voxel_size_um(files[ids[0]])[0]
    canvas = tuple(_level0(files[ids[0]]).shape[1:])
    jobs = [_PairJob(i, a, b, files[a], files[b], int(round(thickness / dz * (b - a))))
            for i, (a, b) in enumerate(zip(ids, ids[1:]))]
    result.slice_thickness_um = thickness

    # Memory per pair in flight: the moving top planes, the z-search block and ~14 full-canvas 2D images.
    n = params.z_match_planes
    per_pair = 4 * canvas[0] * canvas[1] * (2 * n + 2 * params.z_search_planes + 14)
    budget = int(params.memory_budget_gb * GIB)
    if budget < per_pair:
        raise ValueError(f"memory_budget_gb={params.memory_budget_gb} is below the {per_pair / GIB:.2f} GiB one slice "
                         f"pair needs on a {canvas[0]}x{canvas[1]} canvas; raise memory_budget_gb")
    n_parallel = max(1, min(params.workers, len(jobs), budget // per_pair))
    threads = max(1, params.workers // n_parallel)
    result.workers_used = n_parallel

    factor = max(1, math.ceil(max(canvas) / params.overlay_max_px)) if params.overlay_max_px else 0
    overlay_shape = (math.ceil(canvas[0] / factor), math.ceil(canvas[1] / factor)) if factor else None
    result.overlay_factor = factor or 1
    tracker = Progress(len(jobs), progress, cancel)
    pairs: list[PairTransform | None] = [None] * len(jobs)
    pair_metrics: list[dict | None] = [None] * len(jobs)
    stop = threading.Event()

    def check():
        if stop.is_set():
            raise Cancelled("cancelled by the user")
        tracker.check()

    def run(job: _PairJob, overlay):
        pair_started = time.perf_counter()
        try:
            pair, metrics, images = register_slice_pair(job.fixed_path, job.moving_path, job.fixed_id, job.moving_id,
                                                        job.expected_plane, params, threads=threads, check=check)
        except Cancelled:
            raise
        except Exception as err:  # one failing pair must not stop the run: an error row, reported
            pair = PairTransform(job.fixed_id, job.moving_id, expected_z_plane=job.expected_plane,
                                 z_match_plane=job.expected_plane, confidence=0.0, status="error")
            metrics, images = {"fixed_id": job.fixed_id, "moving_id": job.moving_id,
                               "error": f"{type(err).__name__}: {err}"}, None
        metrics["status"] = pair.status
        metrics["seconds"] = round(time.perf_counter() - pair_started, 3)
        if overlay is not None and images is not None:
            for channel, image in enumerate(images):
                overlay[job.index, channel] = _block_mean(image, factor, overlay_shape)
        return job, pair, metrics

    def run_all(overlay):
        with ThreadPoolExecutor(max_workers=n_parallel, thread_name_prefix="register") as pool:
            pending = {pool.submit(run, job, overlay) for job in jobs}
            try:
                while pending:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for future in done:
                        job, pair, metrics = future.result()
                        pairs[job.index], pair_metrics[job.index] = pair, metrics
                        tracker.advance(1, f"pair {job.fixed_id}->{job.moving_id}: {pair.status}, "
                                           f"confidence {pair.confidence:.2f}")
            except BaseException:
                stop.set()
                for future in pending:
                    future.cancel()
                raise

    out_dir.mkdir(parents=True, exist_ok=True)
    if factor:
        with atomic_output(overlay_path, "overwrite") as tmp:
            pixel_mm = [v * 1e-3 * factor for v in _voxel_size_um(files[ids[0]])[1:]]
            overlay = create_ome_zarr_image(
                tmp, (len(jobs), 2, *overlay_shape), (1.0, 1.0, *pixel_mm), chunks=(1, 1, *overlay_shape),
                name="fixed / moving per pair", axes=("pair", "c", "y", "x"),
                attributes={"soct": {"step": "register", "pairs": [[j.fixed_id, j.moving_id] for j in jobs],
                                     "channels": ["fixed", "moving_registered"], "downsample": factor}},
            )
            _mark_overlay_axes(Path(tmp))
            run_all(overlay)
        result.overlay_path = overlay_path
    else:
        run_all(None)

    result.pairs = [p for p in pairs if p is not None]
    result.pair_metrics = [m for m in pair_metrics if m is not None]
    gate = result.z_match_gate = _apply_stack_gate(result.pairs, result.pair_metrics, params)
    result.seconds = time.perf_counter() - started
    summary = {s: result.count(s) for s in ("ok", "fallback_identity", "error")}
    confidences = [p.confidence for p in result.pairs]
    with atomic_output(metrics_path, "overwrite") as tmp:
        Path(tmp).write_text(json.dumps(_finite({
            "params": asdict(params),
            "slices": {str(s): str(p) for s, p in files.items()},
            "slice_thickness_um": thickness,
            "z_match_gate": gate,
            "voxel_size_z_um": dz,
            "canvas_shape": list(canvas),
            "workers_used": n_parallel,
            "threads_per_pair": threads,
            "seconds": round(result.seconds, 3),
            "summary": {**summary, "median_confidence": float(np.median(confidences)) if confidences else None},
            "pairs": [{**m, **{k: v for k, v in asdict(p).items() if k not in m}}
                      for p, m in zip(result.pairs, result.pair_metrics)],
        }), indent=2, default=_json_default))
    # Pairs set by hand (issue 9) survive a re-registration: a user's correction is never silently dropped.
    if csv_path.exists():
        manual = {(p.fixed_id, p.moving_id): p for p in read_pairwise_registration(csv_path) if p.manual}
        result.pairs = [manual.get((p.fixed_id, p.moving_id), p) for p in result.pairs]
    write_pairwise_registration(csv_path, result.pairs, if_exists="overwrite")
    return result


def _apply_stack_gate(pairs: list[PairTransform], metrics: list[dict], params: RegistrationParams) -> float:
    """Pairs whose z-match NCC is below ``gate = max(min_match_ncc, match_fraction * typical)`` (``typical``: the
    75th percentile over the stack's pairs) have nothing in common with their neighbour: identity fallback.
    Confidences use the gate. Returns the gate."""
    values = [p.z_match_ncc for p in pairs if p.status != "error" and np.isfinite(p.z_match_ncc)]
    typical = float(np.percentile(values, 75)) if values else 0.0
    gate = max(params.min_match_ncc, params.match_fraction * typical)
    for pair, m in zip(pairs, metrics):
        if pair.status == "error" or "sharpness" not in m:
            continue
        if pair.status == "ok" and not pair.z_match_ncc >= gate:
            m["reason"] = (f"z-match NCC {pair.z_match_ncc:.3f} < {gate:.3f} ({params.match_fraction} x the "
                           "stack's typical z-match NCC)")
            m["demoted"] = {"rotation_deg": pair.rotation_deg, "tx_px": pair.tx_px, "ty_px": pair.ty_px}
            pair.tx_px = pair.ty_px = pair.rotation_deg = 0.0
            pair.ncc_after, pair.status, pair.z_match_plane = pair.ncc_before, "fallback_identity", pair.expected_z_plane
            m["status"] = pair.status
        pair.confidence = pair_confidence(pair.ncc_after, pair.z_match_ncc, m["sharpness"], gate)
    return gate


def _mark_overlay_axes(path: Path) -> None:
    """The overlay's first two axes are an index and channels, not space (NGFF axis types)."""
    import zarr

    group = zarr.open_group(str(path), mode="r+", zarr_format=3)
    ome = dict(group.attrs["ome"])
    axes = ome["multiscales"][0]["axes"]
    axes[0] = {"name": "pair"}
    axes[1] = {"name": "c", "type": "channel"}
    group.attrs["ome"] = ome


def _finite(value):
    """JSON has no NaN: non-finite floats become null."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    if isinstance(value, float | np.floating) and not math.isfinite(value):
        return None
    return value


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
