"""Step 14: stack the slices into one 3D volume with a multi-resolution pyramid.

Inputs are the common-space slices of step 10 (every slice painted on one canvas, ``0`` = no data), the filled
slots of step 11 (``interpolated_dir``), the exclusions of ``slice_config`` and, optionally, the pairwise
transforms of step 12 (``pairwise_registration.csv``; without it XY placement is the common canvas as it is,
"motor only").

Z placement
-----------
Consecutive slices ``F`` (fixed, above) and ``M`` (moving, below) overlap in depth: plane 0 of ``M`` (its cut
surface) is imaged at plane ``d`` of ``F``, expected at ``d_exp = gap * T / dz`` (``T`` the cut thickness,
``gap`` the difference of slice ids). ``d`` is the registration's ``z_match_plane`` when the pair has one;
otherwise it is searched in ``d_exp +- z_search_planes`` (leaving at least ``MIN_OVERLAP_PLANES`` shared planes;
with less expected overlap the offset is ``d_exp``): the score of ``d`` is the mean over the overlapping planes
of the zero-lag NCC (Pearson) of ``F[d + p]`` and ``M[p]`` over the pixels valid in both, after a band pass
(Gaussians of 1 and 4 pixels: speckle smoothed, slow variations removed), on a coarse pyramid level of the
slices, ``M`` resampled by its XY placement relative to ``F`` plus the whole-pixel offset a phase correlation of
the planes around ``d_exp`` still finds (motor errors, without a registration). Outliers: with ``m`` the median
offset per slice (``T / dz`` with fewer than 3 measured pairs) and ``o_med`` the median overlap (valid planes of
``F`` minus ``d``), a pair with ``|d - gap * m| > outlier_threshold_frac * o_med`` is an outlier; its offset is
replaced by the mean of its neighbouring pairs' (or by ``gap * m``), unless the pair has high registration
confidence (``>= confidence_full``, or manual). Slice ``k`` then starts at plane
``z0_k = sum of the used offsets before it`` (``z0 = 0`` for the first slice).

XY placement
------------
A pair transform maps moving canvas pixels into the fixed slice's (see :mod:`.transforms`). Each pair is gated
by its confidence ``c`` (manual rows: 1): ``c >= confidence_full`` full transform, ``c >= confidence_rotation``
rotation only, else skipped (identity); ``status = error`` is skipped, ``apply_rotation_only`` keeps only
rotations, rotations are clamped to ``max_rotation_deg``. Slice ``k`` is placed in the frame of the first slice
by the composition of the gated pair transforms from the first slice, written as the composed rotations
``Q_k`` (about the pairs' centres) plus a cumulative translation ``U_k = sum_{i<=k} L_{i-1} w_i t_i`` (``L`` the
linear part of ``Q``, ``w_i = c_i`` when ``confidence_weighted``, else 1; without ``accumulate_translations``
only the slice's own pair translation). ``U`` is smoothed along the stack by a Gaussian of
``translation_smooth_sigma`` slices and capped at ``max_cumulative_drift_px``. With ``max_blend_refinement_px >
0``, a phase correlation of the z-averaged overlap of each pair (after placement) adds a shift of at most that
many pixels to the moving slice and all slices below it.

Blending
--------
In the z overlap of two slices (from the lower slice's plane 0 to the upper slice's last valid plane, a valid
plane being one with at least half the data of the slice's fullest plane), ``hann`` cross-fades with
``w(z) = (1 - cos(pi z / (n - 1))) / 2`` rising from the upper to the lower slice, ``average`` takes the mean,
``none`` keeps the lower slice (its planes are the shallower, better ones). Per voxel only slices with data
(``> 0``) count, so where one side has no data the other is kept as it is (a slice whose weight is 0 there
still counts for ``MIN_WEIGHT``, which only matters where it alone has data). A slice's planes below its valid
ones give way to the next slice where it has data.

Output (``out_dir``)
--------------------
``{subject}.ome.zarr``: ``(z, y, x)`` float32 on the common canvas (grown if placed slices leave it), levels: the
base voxel size, power-of-two levels and the analysis resolutions of ``pyramid_resolutions_um`` coarser than the
base, sorted, all built in one streaming pass (see :mod:`..io.pyramid3d`); group attributes
``section_thickness_planes`` (``T / dz``, read by step 15), ``canvas_origin_mm`` ``[y, x]``, ``slice_z0``
``{sid: first plane}``, ``voxel_size_um``, ``subject``. ``z_matches.csv`` (per pair), ``stacking_decisions.csv``
(per slice) and ``stack_metrics.json``.

Memory: the volume is written slab by slab along z; a slab reads only the planes of the slices that cover it,
within each slice's data bounding box; the slab height is set so that the slab, its sources, the blending
buffers of ``workers`` threads and the pyramid writer fit ``memory_budget_gb``. Every write covers whole
chunks (level-0 slabs are whole z-rows of chunks).
"""

from __future__ import annotations

import csv
import io
import json
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
from scipy.ndimage import affine_transform, gaussian_filter1d

from ..io.atomic import atomic_output, check_can_write
from ..io.omezarr import COMPRESSION_CHOICES, OmeZarrImage, open_ome_zarr
from ..io.pyramid3d import Pyramid3DWriter, create_ome_zarr_pyramid3d, parse_resolutions_um, pyramid_voxel_sizes
from ..memory import return_large_buffers_to_os
from ..params import param, validate_params
from ..slices import SliceRunParams
from ..progress import Progress
from .slots import assembly_slices
from .transforms import PairTransform, read_pairwise_registration

__all__ = [
    "StackParams",
    "StackResult",
    "ZMatch",
    "SliceDecision",
    "stack_slices",
    "STACK_BLENDS",
    "Z_MATCH_COLUMNS",
    "DECISION_COLUMNS",
]

GIB = 1024**3
STACK_BLENDS = ("hann", "average", "none")
#: Pixels per plane of the coarse copies used to survey slices (valid planes, data bounding box).
SURVEY_PIXELS = 65_536
#: Pixels per plane of the copies compared by the z-overlap search.
SEARCH_PIXELS = 65_536
#: Band pass of the z-overlap search (coarse pixels): speckle smoothed, slow variations removed.
BAND_PASS_SIGMAS = (1.0, 4.0)
#: Planes two slices must share for their z overlap to be searched (else the offset is the expected one).
MIN_OVERLAP_PLANES = 3
#: Side of the (level-0) crop compared by the blend refinement.
REFINE_SIDE = 512
#: Float32 planes a blending thread holds besides its sources (weighted sum, weights, the warped value, its mask
#: weight and the warped source mask), with a margin.
BLEND_PLANES_PER_THREAD = 7
#: Weight given where the blend says 0: a slice that alone has data there is kept, elsewhere it counts for nothing.
MIN_WEIGHT = 1e-6


@dataclass
class StackParams(SliceRunParams):
    """Stacking of the common-space slices into one volume with a multi-resolution pyramid."""

    subject: str = param("brain", "Name of the output volume: <subject>.ome.zarr")
    slice_thickness_um: float = param(0.0, "Cut thickness T (0: from the slices' stage_z_mm)", min=0.0, unit="um")
    z_search_planes: int = param(5, "Planes searched on each side of the expected offset when z comes from NCC",
                                 min=0, max=1000, unit="planes")
    outlier_threshold_frac: float = param(
        0.5, "A z offset deviating from the median by more than this fraction of the median overlap is an outlier "
        "(replaced from its neighbours unless the pair has high confidence)", min=0.0)
    confidence_full: float = param(0.6, "Pairs with registration confidence >= this get their full transform",
                                   min=0.0, max=1.0)
    confidence_rotation: float = param(0.3, "Pairs with confidence >= this (and below confidence_full) get their "
                                       "rotation only; below, the transform is skipped", min=0.0, max=1.0)
    apply_rotation_only: bool = param(False, "Use only the rotation of the pairwise transforms (XY translation from "
                                      "the motor positions, i.e. the common canvas)")
    accumulate_translations: bool = param(True, "Accumulate the pairwise translations along the stack (off: each "
                                          "slice gets its own pair's translation only)")
    confidence_weighted: bool = param(True, "Weight each pairwise translation by its confidence before accumulating")
    translation_smooth_sigma: float = param(0.0, "Gaussian smoothing of the cumulative translations along the "
                                            "stack (0: none)", min=0.0, unit="slices")
    max_cumulative_drift_px: float = param(0.0, "Cap on the cumulative translation from the motor placement "
                                           "(0: unlimited)", min=0.0, unit="px")
    max_rotation_deg: float = param(5.0, "Pairwise rotations are clamped to +- this", min=0.0, max=180.0, unit="deg")
    blend: str = param("hann", "Blending in the z overlap: hann cross-fade, average, or none (the lower slice)",
                       choices=STACK_BLENDS)
    max_blend_refinement_px: float = param(0.0, "Largest sub-pixel shift a phase correlation of the overlap may add "
                                           "before blending (0: no refinement)", min=0.0, unit="px")
    interpolated_dir: str = param("", "Folder of interpolated slots (step 11) to stack too; empty: none")
    slice_config: str = param("", "slice_config.csv whose excluded slices are left out; empty: none")
    pyramid_resolutions_um: str = param("10,25,50,100", "Analysis resolutions added to the pyramid (those coarser "
                                        "than the base voxel size), comma separated", unit="um")
    compression: str = param("blosc-lz4", "Compression of the output", choices=COMPRESSION_CHOICES, advanced=True)
    workers: int = param(2, "Threads reading and blending planes", min=1, max=256, advanced=True)


@dataclass
class ZMatch:
    """Z offset of one pair: plane of the fixed slice where the moving slice's plane 0 lies."""

    fixed_id: int
    moving_id: int
    expected: float
    found: float = float("nan")
    used: int = 0
    overlap_planes: int = 0
    ncc: float = float("nan")
    outlier: bool = False
    source: str = "expected"  # registration, ncc, expected
    action: str = "expected"  # found, replaced, kept_high_confidence, expected

    @property
    def pair(self) -> str:
        return f"{self.fixed_id}-{self.moving_id}"


@dataclass
class SliceDecision:
    """How one slice was placed (pair values are those applied, after gating, clamping and weighting)."""

    slice_id: int
    source: str = "common"  # common or interpolated
    z0: int = 0
    planes: int = 0
    valid_planes: int = 0
    fixed_id: int = -1
    gate: str = "reference"  # reference, full, rotation, skip
    reason: str = ""
    confidence: float = float("nan")
    manual: bool = False
    rotation_deg: float = 0.0
    tx_px: float = 0.0
    ty_px: float = 0.0
    cumulative_rotation_deg: float = 0.0
    cumulative_tx_px: float = 0.0
    cumulative_ty_px: float = 0.0
    capped: bool = False
    refine_tx_px: float = 0.0
    refine_ty_px: float = 0.0


Z_MATCH_COLUMNS = ("pair", *(f.name for f in fields(ZMatch)))
DECISION_COLUMNS = tuple(f.name for f in fields(SliceDecision))


@dataclass
class StackResult:
    """Outputs of :func:`stack_slices`.

    Attributes
    ----------
    path : Path
        ``{subject}.ome.zarr``.
    shape : tuple of int
        Level-0 ``(z, y, x)``.
    voxel_sizes_um : list of tuple
        Voxel size of every pyramid level, finest first.
    slice_z0 : dict
        First plane of each slice.
    """

    path: Path
    z_matches_path: Path
    decisions_path: Path
    metrics_path: Path
    shape: tuple[int, ...] = ()
    voxel_sizes_um: list = field(default_factory=list)
    canvas_origin_mm: tuple[float, float] = (0.0, 0.0)
    section_thickness_planes: float = 0.0
    slice_z0: dict = field(default_factory=dict)
    z_matches: list[ZMatch] = field(default_factory=list)
    decisions: list[SliceDecision] = field(default_factory=list)
    slab_planes: int = 0
    seconds: float = 0.0
    skipped: bool = False

    @property
    def volume_path(self) -> Path:
        """The stacked volume (same as :attr:`path`)."""
        return self.path


# ------------------------------------------------------------------------------------------------ slices
@dataclass
class _Slice:
    sid: int
    path: Path
    image: OmeZarrImage
    interpolated: bool
    n_planes: int = 0
    n_valid: int = 0  # planes down to the last one with at least half the data of the fullest plane
    n_last: int = 0  # planes down to the last one with any data
    bbox: tuple[int, int, int, int] = (0, 0, 0, 0)  # y0, y1, x0, x1 of the data on the canvas
    stage_z_mm: float | None = None

    @property
    def level0(self):
        return self.image.levels[0]


def _coarse_view(image: OmeZarrImage, max_pixels: int):
    """A reader of planes at a coarse lateral resolution: ``(read(z0, z1) -> array, factor_y, factor_x, exact)``.

    The finest pyramid level (all planes, y and x reduced) with at most ``max_pixels`` per plane, read whole
    (``exact``: its pixels are means of level 0, so any data shows; coarse pixel ``i`` is centred on level-0
    ``(i + 0.5) f - 0.5``); otherwise the coarsest such level (or level 0) read with a stride (coarse pixel ``i``
    is that level's pixel ``i s``).
    """
    level0 = image.levels[0]
    nz = level0.shape[0]
    usable = [k for k in range(len(image.levels)) if image.levels[k].ndim == 3 and image.levels[k].shape[0] == nz]
    fits = [k for k in usable if image.levels[k].shape[1] * image.levels[k].shape[2] <= max_pixels]
    k = fits[0] if fits else usable[-1]
    arr = image.levels[k]
    fy = image.scales_mm[k][1] / image.scales_mm[0][1]
    fx = image.scales_mm[k][2] / image.scales_mm[0][2]
    step = max(1, math.ceil(math.sqrt(arr.shape[1] * arr.shape[2] / max(1, max_pixels))))
    if step == 1:
        return (lambda z0, z1: np.asarray(arr[z0:z1], dtype=np.float32)), fy, fx, True
    if k == 0:
        return (lambda z0, z1: np.asarray(arr[z0:z1, ::step, ::step], dtype=np.float32)), step, step, False
    # Strided pyramid level: treat it as level 0 strided by step * f with the level's centring ignored (the
    # survey grows its box by a margin, the z search only needs a consistent grid for both slices).
    return (lambda z0, z1: np.asarray(arr[z0:z1, ::step, ::step], dtype=np.float32)), fy * step, fx * step, False


def _survey(s: _Slice, max_pixels: int, group: int = 8) -> None:
    """Valid planes and data bounding box of a slice, from a coarse copy read a few planes at a time."""
    read, fy, fx, exact = _coarse_view(s.image, max_pixels)
    counts, footprint = [], None
    for z0 in range(0, s.n_planes, group):
        block = read(z0, min(z0 + group, s.n_planes)) > 0
        counts.extend(int(c) for c in block.reshape(block.shape[0], -1).sum(axis=1))
        footprint = block.any(axis=0) if footprint is None else footprint | block.any(axis=0)
    counts = np.asarray(counts)
    if counts.max(initial=0) == 0:
        raise ValueError(f"{s.path}: slice {s.sid} holds no data (all voxels are 0)")
    s.n_last = int(np.nonzero(counts)[0][-1]) + 1
    s.n_valid = int(np.nonzero(counts >= 0.5 * counts.max())[0][-1]) + 1
    rows, cols = np.nonzero(footprint.any(axis=1))[0], np.nonzero(footprint.any(axis=0))[0]
    _, ny, nx = s.level0.shape
    margin_y, margin_x = (0, 0) if exact else (math.ceil(fy), math.ceil(fx))
    s.bbox = (max(0, int(math.floor(rows[0] * fy)) - margin_y), min(ny, int(math.ceil((rows[-1] + 1) * fy)) + margin_y),
              max(0, int(math.floor(cols[0] * fx)) - margin_x), min(nx, int(math.ceil((cols[-1] + 1) * fx)) + margin_x))


def _open_slices(files: dict[int, Path], interpolated_dir) -> list[_Slice]:
    interp = Path(interpolated_dir).resolve() if interpolated_dir else None
    slices = []
    for sid, path in files.items():
        try:
            image = open_ome_zarr(path)
        except ValueError as err:
            raise ValueError(f"{path}: not an OME-Zarr slice ({err})") from None
        if image.levels[0].ndim != 3:
            raise ValueError(f"{path}: a slice is 3D (z, y, x), this image has shape {image.levels[0].shape}")
        soct = image.attributes.get("soct", {})
        stage_z = soct.get("stage_z_mm")
        interpolated = bool(soct.get("interpolated")) or (interp is not None and Path(path).resolve().parent == interp)
        slices.append(_Slice(sid, Path(path), image, interpolated,
                             n_planes=int(image.levels[0].shape[0]),
                             stage_z_mm=float(stage_z) if stage_z is not None else None))
    return slices


def _check_geometry(slices: list[_Slice]) -> tuple[tuple[float, float, float], tuple[int, int], tuple[float, float]]:
    """Common voxel size (um), canvas shape and canvas origin (mm); errors name the mismatching files."""
    first = slices[0]
    voxel = tuple(v * 1000.0 for v in first.image.scales_mm[0][-3:])
    canvas = tuple(first.level0.shape[1:])
    soct0 = first.image.attributes.get("soct", {})
    origin = soct0.get("canvas_origin_mm", soct0.get("origin_mm"))
    for s in slices[1:]:
        v = tuple(x * 1000.0 for x in s.image.scales_mm[0][-3:])
        if any(abs(a - b) > 1e-6 * max(abs(b), 1e-9) for a, b in zip(v, voxel)):
            raise ValueError(f"slices of different voxel sizes: {s.path.name} has {v} um, {first.path.name} has "
                             f"{voxel} um (z, y, x); stack slices from one common-space step")
        if tuple(s.level0.shape[1:]) != canvas:
            raise ValueError(f"slices on different canvases: {s.path.name} is {tuple(s.level0.shape[1:])} pixels "
                             f"(y, x), {first.path.name} is {canvas}; stack the output of the common-space step, "
                             "where every slice has the same canvas")
        soct = s.image.attributes.get("soct", {})
        o = soct.get("canvas_origin_mm", soct.get("origin_mm"))
        if origin is not None and o is not None and any(abs(a - b) > 1e-6 for a, b in zip(o, origin)):
            raise ValueError(f"slices on different canvases: {s.path.name} has canvas_origin_mm {list(o)}, "
                             f"{first.path.name} has {list(origin)}")
    return voxel, canvas, (tuple(float(v) for v in origin) if origin is not None else (0.0, 0.0))


def _thickness_um(slices: list[_Slice], params: StackParams) -> float:
    if params.slice_thickness_um > 0:
        return float(params.slice_thickness_um)
    per_slice = []
    for a, b in zip(slices, slices[1:]):
        # Interpolated slots carry a neighbour's stage position: not a measurement.
        if a.interpolated or b.interpolated:
            continue
        if a.stage_z_mm is not None and b.stage_z_mm is not None and b.sid != a.sid:
            per_slice.append(abs(b.stage_z_mm - a.stage_z_mm) * 1000.0 / (b.sid - a.sid))
    per_slice = [t for t in per_slice if t > 0]
    if not per_slice:
        raise ValueError("parameter 'slice_thickness_um': 0 means 'from the slices' stage_z_mm', but the slices "
                         "have no usable stage_z_mm attribute (or a single slice); give the cut thickness")
    return float(np.median(per_slice))


# ------------------------------------------------------------------------------------------------ registration
def _registration(registration_csv) -> tuple[dict[tuple[int, int], PairTransform], Path | None]:
    """Pair transforms by ``(fixed_id, moving_id)``; a manual row wins over an automatic one.

    ``registration_csv`` may be empty (``""``, ``"."``, ``None``, ``"none"``): motor-only placement. A folder is
    taken as holding ``pairwise_registration.csv``.
    """
    if registration_csv is None or str(registration_csv).strip().lower() in ("", ".", "none", "-"):
        return {}, None
    path = Path(registration_csv)
    if path.is_dir():
        path = path / "pairwise_registration.csv"
    if not path.is_file():
        raise FileNotFoundError(f"registration_csv {path}: no such file (give pairwise_registration.csv, or leave "
                                "it empty for motor-only placement)")
    pairs: dict[tuple[int, int], PairTransform] = {}
    for p in read_pairwise_registration(path):
        key = (p.fixed_id, p.moving_id)
        if key not in pairs or p.manual or not pairs[key].manual:
            pairs[key] = p
    return pairs, path


def _confidence(pair: PairTransform | None) -> float:
    if pair is None:
        return float("nan")
    return 1.0 if pair.manual else float(pair.confidence)


# ------------------------------------------------------------------------------------------------ z placement
def _ncc(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None, min_voxels: int = 64) -> float:
    """Zero-lag Pearson correlation over ``mask`` (default: where both have data)."""
    if mask is None:
        mask = (a > 0) & (b > 0)
    if mask.sum() < min_voxels:
        return float("nan")
    x, y = a[mask].astype(np.float64), b[mask].astype(np.float64)
    x -= x.mean()
    y -= y.mean()
    den = math.sqrt(float((x * x).sum()) * float((y * y).sum()))
    return float((x * y).sum() / den) if den > 0 else float("nan")


def _band_pass(planes: np.ndarray) -> np.ndarray:
    """Per plane, a Gaussian of ``BAND_PASS_SIGMAS[0]`` minus one of ``BAND_PASS_SIGMAS[1]`` pixels, both
    normalised by the data mask (no-data does not leak in). The slow variations (tissue outline, attenuation left
    over) change little from plane to plane; the structures that pin the depth are in between."""
    from scipy.ndimage import gaussian_filter

    mask = (planes > 0).astype(np.float32)
    out = np.zeros(planes.shape, np.float32)
    for sigma, sign in zip(BAND_PASS_SIGMAS, (1.0, -1.0)):
        weight = gaussian_filter(mask, (0, sigma, sigma))
        smooth = gaussian_filter(planes * mask, (0, sigma, sigma))
        np.divide(smooth, weight, out=smooth, where=weight > 1e-3)
        out += sign * smooth
    return out


def _overlap_score(f: np.ndarray, m: np.ndarray, f_valid: np.ndarray, m_valid: np.ndarray) -> float:
    """Mean over the overlapping planes of the per-plane NCC (insensitive to gain differences between depths)."""
    scores = [_ncc(a, b, va & vb, 16) for a, b, va, vb in zip(f, m, f_valid, m_valid)]
    scores = [s for s in scores if np.isfinite(s)]
    return float(np.mean(scores)) if scores else float("nan")


def _coarse_to_level0(f: float, pyramid: bool) -> np.ndarray:
    """3x3 on ``(x, y, 1)``: coarse pixel -> level-0 pixel (pyramid means are centred on their block)."""
    m = np.eye(3)
    m[0, 0] = m[1, 1] = f
    if pyramid:
        m[:2, 2] = (f - 1) / 2
    return m


def _residual_shift(fixed_mean: np.ndarray, moving: np.ndarray, placement: np.ndarray,
                    max_fraction: float = 0.1) -> np.ndarray:
    """Whole-pixel translation (3x3) registering the first planes of ``moving`` (placed by ``placement``) onto
    ``fixed_mean``; identity when the correlation is unsure (a shift beyond ``max_fraction`` of the plane)."""
    from skimage.registration import phase_cross_correlation

    box = (0, fixed_mean.shape[0], 0, fixed_mean.shape[1])
    top = np.mean([_place(p, (0, 0), placement, box)[0] for p in moving[:3]], axis=0)
    shift = np.eye(3)
    if (fixed_mean > 0).mean() < 0.05 or (top > 0).mean() < 0.05:
        return shift
    (dy, dx), _, _ = phase_cross_correlation(fixed_mean, top, upsample_factor=1, normalization=None)
    if abs(dy) <= max_fraction * fixed_mean.shape[0] and abs(dx) <= max_fraction * fixed_mean.shape[1]:
        shift[:2, 2] = (dx, dy)
    return shift


def _search_offset(fixed: _Slice, moving: _Slice, relative: np.ndarray, center: int, radius: int,
                   max_pixels: int) -> tuple[float, float]:
    """Offset ``d`` (plane of ``fixed`` matching plane 0 of ``moving``) maximising the overlap NCC, and that NCC.

    ``relative`` (3x3 on ``(x, y, 1)``) places moving canvas pixels on the fixed slice's canvas; the moving planes
    are resampled accordingly on the coarse grid before comparing.
    """
    lo, hi = max(1, center - radius), min(fixed.n_last - MIN_OVERLAP_PLANES, center + radius)
    if hi < lo:
        return float("nan"), float("nan")
    read_f, fy, fx, exact_f = _coarse_view(fixed.image, max_pixels)
    read_m, my, mx, exact_m = _coarse_view(moving.image, max_pixels)
    pyramid = exact_f and exact_m and fy > 1
    if (fy, fx) != (my, mx) or fy != fx:  # different pyramids: compare level 0 read with one stride
        step = max(1, math.ceil(math.sqrt(fixed.level0.shape[1] * fixed.level0.shape[2] / max_pixels)))
        read_f = lambda z0, z1: np.asarray(fixed.level0[z0:z1, ::step, ::step], np.float32)  # noqa: E731
        read_m = lambda z0, z1: np.asarray(moving.level0[z0:z1, ::step, ::step], np.float32)  # noqa: E731
        fy, pyramid = step, False
    f = read_f(lo, fixed.n_last)
    m = read_m(0, min(moving.n_last, fixed.n_last - lo))
    scale = _coarse_to_level0(float(fy), pyramid)
    coarse = np.linalg.inv(scale) @ relative @ scale
    if len(m) and len(f) > center - lo:
        # What XY offset is left (motor errors when there is no registration) would bias the z match: remove it
        # for the search, by a phase correlation of a few planes around the expected match.
        coarse = _residual_shift(f[center - lo:center - lo + 3].mean(axis=0), m, coarse) @ coarse
    if not np.allclose(coarse, np.eye(3), atol=1e-6):
        box = (0, f.shape[1], 0, f.shape[2])
        m = np.stack([_place(plane, (0, 0), coarse, box)[0] for plane in m]) if len(m) else f[:0]
    f_valid, m_valid = f > 0, m > 0
    f, m = _band_pass(f), _band_pass(m)
    best, best_d = -np.inf, float("nan")
    for d in range(lo, hi + 1):
        o = min(fixed.n_last - d, m.shape[0])
        if o < MIN_OVERLAP_PLANES:
            continue
        score = _overlap_score(f[d - lo:d - lo + o], m[:o], f_valid[d - lo:d - lo + o], m_valid[:o])
        if np.isfinite(score) and score > best:
            best, best_d = score, float(d)
    return best_d, (float(best) if np.isfinite(best) else float("nan"))


def _plan_z(slices, pairs, placements, t_planes, params, tracker, max_pixels) -> list[ZMatch]:
    matches = []
    for k, (a, b) in enumerate(zip(slices, slices[1:])):
        gap = b.sid - a.sid
        expected = gap * t_planes
        zm = ZMatch(a.sid, b.sid, expected=round(float(expected), 6))
        pair = pairs.get((a.sid, b.sid))
        if pair is not None and pair.status != "error" and pair.z_match_plane > 0:
            zm.found, zm.ncc, zm.source = float(pair.z_match_plane), float(pair.z_match_ncc), "registration"
        elif a.n_valid - round(expected) >= MIN_OVERLAP_PLANES:
            relative = np.linalg.inv(placements[k]) @ placements[k + 1]
            zm.found, zm.ncc = _search_offset(a, b, relative, int(round(expected)), params.z_search_planes,
                                              max_pixels)
            zm.source = "ncc" if np.isfinite(zm.found) else "expected"
        matches.append(zm)
        tracker.advance(1, f"z overlap {a.sid}-{b.sid}")

    measured = [i for i, zm in enumerate(matches) if np.isfinite(zm.found)]
    per_slice = [matches[i].found / (matches[i].moving_id - matches[i].fixed_id) for i in measured]
    median_offset = float(np.median(per_slice)) if len(per_slice) >= 3 else t_planes
    overlaps = [slices[i].n_valid - matches[i].found for i in measured]
    median_overlap = max(1.0, float(np.median(overlaps))) if overlaps else 1.0
    threshold = params.outlier_threshold_frac * median_overlap
    for i in measured:
        zm = matches[i]
        zm.outlier = abs(zm.found - (zm.moving_id - zm.fixed_id) * median_offset) > threshold
    for i, zm in enumerate(matches):
        gap = zm.moving_id - zm.fixed_id
        if not np.isfinite(zm.found):
            zm.used, zm.action = int(round(zm.expected)), "expected"
        elif not zm.outlier:
            zm.used, zm.action = int(round(zm.found)), "found"
        elif _confidence(pairs.get((zm.fixed_id, zm.moving_id))) >= params.confidence_full:
            zm.used, zm.action = int(round(zm.found)), "kept_high_confidence"
        else:
            near = [matches[j].found / (matches[j].moving_id - matches[j].fixed_id) for j in (i - 1, i + 1)
                    if 0 <= j < len(matches) and np.isfinite(matches[j].found) and not matches[j].outlier]
            zm.used = int(round(gap * (float(np.mean(near)) if near else median_offset)))
            zm.action = "replaced"
        zm.used = max(1, zm.used)
        zm.overlap_planes = slices[i].n_valid - zm.used
    return matches


# ------------------------------------------------------------------------------------------------ xy placement
def _rotation(theta_deg: float, cx: float, cy: float) -> np.ndarray:
    th = math.radians(theta_deg)
    r = np.array([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]])
    m = np.eye(3)
    m[:2, :2] = r
    m[:2, 2] = np.array([cx, cy]) - r @ np.array([cx, cy])
    return m


def _plan_xy(slices, pairs, params) -> tuple[list[np.ndarray], list[SliceDecision]]:
    """Placement of every slice (3x3 on ``(x, y, 1)``: slice canvas -> frame of the first slice) and decisions."""
    n = len(slices)
    decisions = [SliceDecision(s.sid, "interpolated" if s.interpolated else "common", planes=s.n_planes,
                               valid_planes=s.n_valid) for s in slices]
    rotations = [np.eye(3)]
    increments = [np.zeros(2)]
    for k in range(1, n):
        a, b = slices[k - 1], slices[k]
        d = decisions[k]
        d.fixed_id = a.sid
        pair = pairs.get((a.sid, b.sid))
        theta, t = 0.0, np.zeros(2)
        center = (0.0, 0.0)
        if pair is None:
            d.gate, d.reason = "skip", "no registration" if not pairs else "no pair in the registration"
        else:
            c = _confidence(pair)
            d.confidence, d.manual = c, bool(pair.manual)
            center = (pair.center_x_px, pair.center_y_px)
            if pair.status == "error":
                d.gate, d.reason = "skip", "registration status error"
            elif c >= params.confidence_full:
                d.gate, d.reason = "full", "manual" if pair.manual else "confidence >= confidence_full"
            elif c >= params.confidence_rotation:
                d.gate, d.reason = "rotation", "confidence >= confidence_rotation"
            else:
                d.gate, d.reason = "skip", "confidence < confidence_rotation"
            if d.gate in ("full", "rotation"):
                theta = float(np.clip(pair.rotation_deg, -params.max_rotation_deg, params.max_rotation_deg))
                if theta != pair.rotation_deg:
                    d.reason += f"; rotation clamped to {theta:g} deg"
            if d.gate == "full":
                if params.apply_rotation_only:
                    d.gate, d.reason = "rotation", "apply_rotation_only"
                else:
                    weight = c if params.confidence_weighted else 1.0
                    t = weight * np.array([pair.tx_px, pair.ty_px])
            if pair.status == "fallback_identity":
                d.reason += "; registration fell back to identity"
        d.rotation_deg, d.tx_px, d.ty_px = theta, float(t[0]), float(t[1])
        rotations.append(rotations[-1] @ _rotation(theta, *center))
        increments.append(rotations[-2][:2, :2] @ t)
    increments = np.asarray(increments)
    cumulative = np.cumsum(increments, axis=0) if params.accumulate_translations else increments.copy()
    if params.translation_smooth_sigma > 0 and n > 1:
        cumulative = gaussian_filter1d(cumulative, params.translation_smooth_sigma, axis=0, mode="nearest")
    placements = []
    for k in range(n):
        u = cumulative[k]
        norm = float(np.hypot(*u))
        if params.max_cumulative_drift_px > 0 and norm > params.max_cumulative_drift_px:
            u = u * (params.max_cumulative_drift_px / norm)
            decisions[k].capped = True
        m = rotations[k].copy()
        m[:2, 2] += u
        placements.append(m)
        decisions[k].cumulative_rotation_deg = float(math.degrees(math.atan2(m[1, 0], m[0, 0])))
        decisions[k].cumulative_tx_px, decisions[k].cumulative_ty_px = float(u[0]), float(u[1])
    return placements, decisions


def _is_integer_shift(m: np.ndarray) -> bool:
    return bool(np.allclose(m[:2, :2], np.eye(2), atol=1e-9) and np.allclose(m[:2, 2], np.round(m[:2, 2]), atol=1e-6))


def _placed_box(m: np.ndarray, bbox) -> tuple[int, int, int, int]:
    """Output-frame box (y0, y1, x0, x1) covering a slice's data box placed by ``m``."""
    y0, y1, x0, x1 = bbox
    if _is_integer_shift(m):
        tx, ty = (int(round(v)) for v in m[:2, 2])
        return y0 + ty, y1 + ty, x0 + tx, x1 + tx
    corners = np.array([[x, y, 1.0] for x in (x0 - 0.5, x1 - 0.5) for y in (y0 - 0.5, y1 - 0.5)]) @ m.T
    return (int(math.floor(corners[:, 1].min())), int(math.ceil(corners[:, 1].max())) + 1,
            int(math.floor(corners[:, 0].min())), int(math.ceil(corners[:, 0].max())) + 1)


def _place(plane: np.ndarray, src_origin: tuple[int, int], m: np.ndarray, box, out: np.ndarray | None = None,
           ) -> tuple[np.ndarray, np.ndarray | None]:
    """Resample one source plane (its pixel (0, 0) at canvas ``src_origin`` (y, x)) into output box ``box``.

    Returns the values on ``box`` (in ``out`` when given) and their validity mask, or None for a whole-pixel
    placement (there the data are copied as they are, so the mask is simply ``values > 0``). Otherwise linear
    interpolation of the values and of the data mask; the values are renormalised by the mask weight so that
    no-data (0) never darkens an edge.
    """
    y0, y1, x0, x1 = box
    shape = (y1 - y0, x1 - x0)
    values = np.empty(shape, np.float32) if out is None else out
    if plane.size == 0:
        values.fill(0.0)
        return values, None
    if _is_integer_shift(m):
        tx, ty = (int(round(v)) for v in m[:2, 2])
        values.fill(0.0)
        sy0, sx0 = y0 - ty - src_origin[0], x0 - tx - src_origin[1]
        a0, b0 = max(0, -sy0), max(0, -sx0)
        a1 = min(shape[0], plane.shape[0] - sy0)
        b1 = min(shape[1], plane.shape[1] - sx0)
        if a1 > a0 and b1 > b0:
            values[a0:a1, b0:b1] = plane[sy0 + a0:sy0 + a1, sx0 + b0:sx0 + b1]
        return values, None
    inverse = np.linalg.inv(m)
    # (row, col) = (y, x): source = L_yx @ (out + box origin) + c - src origin
    lin = inverse[:2, :2][::-1, ::-1]
    const = inverse[:2, 2][::-1]
    offset = lin @ np.array([y0, x0], float) + const - np.array(src_origin, float)
    affine_transform(plane, lin, offset=offset, output_shape=shape, order=1, cval=0.0, output=values)
    weight = affine_transform((plane > 0).astype(np.float32), lin, offset=offset, output_shape=shape, order=1,
                              cval=0.0, output=np.float32)
    valid = weight >= 0.5
    np.divide(values, weight, out=values, where=valid)
    values[~valid] = 0.0
    return values, valid


# ------------------------------------------------------------------------------------------------ blending weights
def _ramp(n: int, i: int, blend: str) -> float:
    """Weight of the lower slice at plane ``i`` of an ``n``-plane overlap."""
    if blend == "none":
        return 1.0
    if blend == "average" or n <= 1:
        return 0.5
    return 0.5 * (1.0 - math.cos(math.pi * i / (n - 1)))


def _weights(z0s: list[int], slices: list[_Slice], blend: str):
    """``weight(k, z)``: blending weight of slice ``k`` at output plane ``z``."""
    ends = [z0 + s.n_valid for z0, s in zip(z0s, slices)]

    def up(k: int, z: int) -> float:
        if k == 0 or z < z0s[k]:
            return 1.0
        n = ends[k - 1] - z0s[k]
        if n <= 0 or z >= ends[k - 1]:
            return 1.0
        return _ramp(n, z - z0s[k], blend)

    def weight(k: int, z: int) -> float:
        w = up(k, z)
        if k + 1 < len(slices) and z >= z0s[k + 1]:
            w *= 1.0 - up(k + 1, z)
        return w

    return weight


# ------------------------------------------------------------------------------------------------ refinement
def _refine(slices, placements, z0s, decisions, max_px, tracker) -> None:
    """Phase correlation of the z-averaged overlap of each pair; shifts of at most ``max_px`` move the lower
    slice and every slice below it."""
    from skimage.registration import phase_cross_correlation

    for k in range(1, len(slices)):
        a, b = slices[k - 1], slices[k]
        first, last = z0s[k], min(z0s[k - 1] + a.n_valid, z0s[k] + b.n_valid)
        tracker.check()
        if last <= first:
            continue
        boxes = [_placed_box(placements[k - 1], a.bbox), _placed_box(placements[k], b.bbox)]
        y0, y1 = max(boxes[0][0], boxes[1][0]), min(boxes[0][1], boxes[1][1])
        x0, x1 = max(boxes[0][2], boxes[1][2]), min(boxes[0][3], boxes[1][3])
        if y1 - y0 < 16 or x1 - x0 < 16:
            continue
        cy, cx, h, w = (y0 + y1) // 2, (x0 + x1) // 2, min(REFINE_SIDE, y1 - y0), min(REFINE_SIDE, x1 - x0)
        box = (cy - h // 2, cy - h // 2 + h, cx - w // 2, cx - w // 2 + w)
        planes = range(first, last) if last - first <= 8 else np.linspace(first, last - 1, 8).round().astype(int)
        means = []
        for s, m, z0 in ((a, placements[k - 1], z0s[k - 1]), (b, placements[k], z0s[k])):
            src = _source_box(m, box, s.level0.shape[1:])
            total = np.zeros((h, w), np.float64)
            count = np.zeros((h, w), np.float64)
            for z in planes:
                plane = np.asarray(s.level0[z - z0, src[0]:src[1], src[2]:src[3]], np.float32)
                values, valid = _place(plane, (src[0], src[2]), m, box)
                total += values
                count += values > 0 if valid is None else valid
            means.append(np.where(count > 0, total / np.maximum(count, 1), 0.0))
        if min((mm > 0).mean() for mm in means) < 0.25:
            continue
        shift, _, _ = phase_cross_correlation(means[0], means[1], upsample_factor=20)
        dy, dx = float(shift[0]), float(shift[1])
        if math.hypot(dy, dx) > max_px:
            decisions[k].reason += f"; refinement ({dx:.2f}, {dy:.2f}) px over the limit, not applied"
            continue
        decisions[k].refine_tx_px, decisions[k].refine_ty_px = dx, dy
        for j in range(k, len(slices)):
            placements[j] = placements[j].copy()
            placements[j][:2, 2] += (dx, dy)


def _source_box(m: np.ndarray, box, canvas) -> tuple[int, int, int, int]:
    """Canvas box (y0, y1, x0, x1) of the source pixels that output box ``box`` needs under placement ``m``."""
    inverse = np.linalg.inv(m)
    y0, y1, x0, x1 = box
    corners = np.array([[x, y, 1.0] for x in (x0 - 1, x1 + 1) for y in (y0 - 1, y1 + 1)]) @ inverse.T
    ny, nx = canvas
    return (max(0, int(math.floor(corners[:, 1].min())) - 1), min(ny, int(math.ceil(corners[:, 1].max())) + 2),
            max(0, int(math.floor(corners[:, 0].min())) - 1), min(nx, int(math.ceil(corners[:, 0].max())) + 2))


# ------------------------------------------------------------------------------------------------ tables
def _csv_text(columns, rows) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        out = []
        for c in columns:
            v = row[c]
            if isinstance(v, bool):
                out.append(int(v))
            elif isinstance(v, float):
                out.append("" if not math.isfinite(v) else f"{v:.6g}")
            else:
                out.append(v)
        writer.writerow(out)
    return buffer.getvalue()


def _write_text(path: Path, text: str) -> None:
    with atomic_output(path, "overwrite") as tmp:
        Path(tmp).write_text(text)


# ------------------------------------------------------------------------------------------------ memory plan
def _slab_plan(out_plane, src_area, covering, writer_factors, workers, budget, n_z, in_chunk_bytes):
    """Level-0 chunks and slab height (a multiple of the chunk depth) that fit the budget, and the bytes estimated.

    A slab is first read and blended (its sources: the data boxes of up to ``covering`` slices; the output slab;
    ``BLEND_PLANES_PER_THREAD`` planes per thread; the input chunks zarr decodes concurrently), then written
    (the output slab; the pyramid writer's working memory; the chunks zarr encodes concurrently). The writer's
    pending planes are held throughout.
    """
    import zarr

    concurrency = int(zarr.config.get("async.concurrency", 10) or 10)
    ny, nx = out_plane
    plane = ny * nx
    candidates = sorted(((cz, side) for side in (256, 128, 64) for cz in (16, 8, 4, 2, 1)),
                        key=lambda c: -c[0] * c[1] ** 2)
    smallest = None
    for chunk_z, side in candidates:
        chunk_z = min(chunk_z, n_z)
        out_chunk = 4 * chunk_z * min(side, ny) * min(side, nx)
        held = Pyramid3DWriter.persistent_bytes(out_plane, writer_factors, [chunk_z] * len(writer_factors),
                                                skip_zeros=True)
        # bytes = fixed + per_plane * slab, for the two phases
        read_fixed = workers * BLEND_PLANES_PER_THREAD * 4 * plane + 2 * concurrency * in_chunk_bytes
        read_per_plane = 4 * plane + 4 * covering * src_area
        write_fixed = (Pyramid3DWriter.append_bytes(out_plane, writer_factors, workers, 0, skip_zeros=True)
                       + 2 * concurrency * out_chunk)
        write_per_plane = 4 * plane + Pyramid3DWriter.append_bytes(out_plane, writer_factors, 0, 1, skip_zeros=True)

        def need(slab):
            return held + max(read_fixed + read_per_plane * slab, write_fixed + write_per_plane * slab)

        smallest = need(chunk_z) if smallest is None else min(smallest, need(chunk_z))
        if need(chunk_z) <= budget:
            fit = min((budget - held - read_fixed) // read_per_plane, (budget - held - write_fixed) // write_per_plane)
            slab = max(chunk_z, min(n_z, int(fit)) // chunk_z * chunk_z)
            return (chunk_z, side, side), slab, need(slab)
    raise ValueError(f"parameter 'memory_budget_gb': {budget / GIB:.4g} GiB does not hold one plane of the "
                     f"{ny} x {nx} canvas with its sources and buffers (about {smallest / GIB:.3g} GiB with "
                     f"{workers} worker(s)); raise it or lower workers")


# ------------------------------------------------------------------------------------------------ the step
def stack_slices(common_dir, registration_csv, out_dir, params: StackParams | None = None, *, interpolated_dir="",
                 slice_config="", progress=None, cancel=None) -> StackResult:
    """Stack common-space slices into ``{subject}.ome.zarr`` with a multi-resolution pyramid.

    Parameters
    ----------
    common_dir : path
        Folder of common-space slices (``slice_z{NN}_common.ome.zarr``, step 10).
    registration_csv : path or ""
        ``pairwise_registration.csv`` (step 12; a folder holding it is accepted). Empty: motor-only XY (the
        common canvas as it is) and z from the NCC search.
    out_dir : path
        Output folder (``14_stack``).
    params : StackParams, optional
    interpolated_dir : path, optional
        Filled slots of step 11; empty: ``params.interpolated_dir`` (empty: none).
    slice_config : path, optional
        ``slice_config.csv`` whose excluded slices (``use`` false or ``auto_excluded``) are left out; empty:
        ``params.slice_config`` (empty: none).
    progress : callable, optional
        ``progress(done, total, message)``.
    cancel : threading.Event, optional
        Set it to stop; the partial output is removed and ``Cancelled`` raised.

    Returns
    -------
    StackResult

    Raises
    ------
    ValueError
        Slices of different voxel sizes or canvases, no usable cut thickness, a memory budget too small for one
        plane, a bad subject name.
    """
    started = time.perf_counter()
    params = params or StackParams()
    validate_params(params)
    if params.confidence_rotation > params.confidence_full:
        raise ValueError(f"parameter 'confidence_rotation' ({params.confidence_rotation}) must not exceed "
                         f"'confidence_full' ({params.confidence_full})")
    subject = params.subject.strip()
    if not subject or any(c in subject for c in "/\\:") or subject.startswith("."):
        raise ValueError(f"parameter 'subject': {params.subject!r} is not a valid file name")
    resolutions = parse_resolutions_um(params.pyramid_resolutions_um)
    return_large_buffers_to_os()
    out_dir = Path(out_dir)
    out_path = out_dir / f"{subject}.ome.zarr"
    z_path, decisions_path = out_dir / "z_matches.csv", out_dir / "stacking_decisions.csv"
    metrics_path = out_dir / "stack_metrics.json"
    result = StackResult(out_path, z_path, decisions_path, metrics_path)
    if not check_can_write(out_path, params.if_exists):
        result.skipped, result.seconds = True, time.perf_counter() - started
        return result
    for p in (z_path, decisions_path):
        check_can_write(p, params.if_exists)
    budget = int(params.memory_budget_gb * GIB)
    workers = params.workers

    interpolated_dir = interpolated_dir or params.interpolated_dir
    slice_config = slice_config or params.slice_config
    if slice_config and not Path(slice_config).is_file():
        raise ValueError(f"parameter 'slice_config': {slice_config} is not a file")
    files = assembly_slices(common_dir, interpolated_dir, slice_config)
    if not files:
        raise ValueError(f"{common_dir}: no slice to stack (all excluded?)")
    slices = _open_slices(files, interpolated_dir)
    voxel_um, canvas, canvas_origin = _check_geometry(slices)
    max_nz = max(s.n_planes for s in slices)
    survey_pixels = max(256, min(SURVEY_PIXELS, budget // (16 * 8)))
    search_pixels = max(256, min(SEARCH_PIXELS, budget // (4 * 6 * 2 * max_nz)))
    pairs, registration_path = _registration(registration_csv)
    thickness = _thickness_um(slices, params) if len(slices) > 1 or params.slice_thickness_um > 0 else 0.0
    t_planes = thickness / voxel_um[0] if thickness else 0.0

    phases = {"survey": 0.0, "plan": 0.0, "read": 0.0, "blend": 0.0, "write": 0.0}
    clock = time.perf_counter()
    tracker = Progress(2 * len(slices), progress, cancel)
    for s in slices:
        _survey(s, survey_pixels)
        tracker.advance(1, f"survey slice {s.sid}")

    # --- z and xy plans
    phases["survey"] = time.perf_counter() - clock
    clock = time.perf_counter()
    placements, decisions = _plan_xy(slices, pairs, params)
    matches = _plan_z(slices, pairs, placements, t_planes, params, tracker, search_pixels)
    z0s = [0]
    for zm in matches:
        z0s.append(z0s[-1] + zm.used)
    if params.max_blend_refinement_px > 0:
        _refine(slices, placements, z0s, decisions, params.max_blend_refinement_px, tracker)
    phases["plan"] = time.perf_counter() - clock
    for d, z0 in zip(decisions, z0s):
        d.z0 = int(z0)

    # --- output geometry: the canvas, grown to hold every placed slice
    boxes = [_placed_box(m, s.bbox) for m, s in zip(placements, slices)]
    ymin = min(0, *(b[0] for b in boxes))
    xmin = min(0, *(b[2] for b in boxes))
    ymax = max(canvas[0], *(b[1] for b in boxes))
    xmax = max(canvas[1], *(b[3] for b in boxes))
    shift = np.eye(3)
    shift[:2, 2] = (-xmin, -ymin)
    placements = [shift @ m for m in placements]
    out_plane = (ymax - ymin, xmax - xmin)
    boxes = [(b[0] - ymin, b[1] - ymin, b[2] - xmin, b[3] - xmin) for b in boxes]
    boxes = [(max(0, b[0]), min(out_plane[0], b[1]), max(0, b[2]), min(out_plane[1], b[3])) for b in boxes]
    n_z = max(z0 + s.n_last for z0, s in zip(z0s, slices))
    shape = (n_z, *out_plane)
    origin_mm = (canvas_origin[0] + ymin * voxel_um[1] * 1e-3, canvas_origin[1] + xmin * voxel_um[2] * 1e-3)
    level_voxels = pyramid_voxel_sizes(voxel_um, shape, resolutions)
    factors = [tuple(a / b for a, b in zip(v, voxel_um)) for v in level_voxels]

    # --- memory: the slab height
    covering = max(sum(1 for z0, s in zip(z0s, slices) if z0 <= z < z0 + s.n_last) for z in range(n_z))
    src_area = max((b[1] - b[0]) * (b[3] - b[2]) for b in (s.bbox for s in slices))
    in_chunk = max(4 * math.prod(s.level0.chunks) for s in slices)
    chunks, slab, estimate = _slab_plan(out_plane, src_area, covering, factors, workers, budget, n_z, in_chunk)
    slabs = [(z, min(z + slab, n_z)) for z in range(0, n_z, slab)]
    tracker.total = tracker.done + len(slabs) + 1

    weight = _weights(z0s, slices, params.blend)
    section_planes = float(t_planes)
    attributes = {
        "section_thickness_planes": int(round(section_planes)) if abs(section_planes - round(section_planes)) < 1e-6
        else section_planes,
        "canvas_origin_mm": [float(v) for v in origin_mm],
        "slice_z0": {str(s.sid): int(z0) for s, z0 in zip(slices, z0s)},
        "voxel_size_um": [float(v) for v in voxel_um],
        "subject": subject,
        "soct": {"step": "stack", "subject": subject, "voxel_size_um": [float(v) for v in voxel_um],
                 "canvas_origin_mm": [float(v) for v in origin_mm], "origin_mm": [float(v) for v in origin_mm],
                 "slice_thickness_um": thickness, "section_thickness_planes": section_planes,
                 "slice_z0": {str(s.sid): int(z0) for s, z0 in zip(slices, z0s)},
                 "slice_ids": [s.sid for s in slices]},
    }

    scratch = threading.local()  # per-thread planes reused slab after slab (fresh large buffers cost page faults)

    def buffer(name: str, shape) -> np.ndarray:
        buf = getattr(scratch, name, None)
        if buf is None or buf.shape != tuple(shape):
            buf = np.empty(shape, np.float32)
            setattr(scratch, name, buf)
        return buf

    def blend_plane(z: int, sources: dict, out: np.ndarray) -> None:
        contributors = [(k, sources[k]) for k in sources if sources[k][0] <= z < sources[k][1]]
        out.fill(0.0)
        if len(contributors) == 1:
            k, (za, _, block, origin) = contributors[0]
            b = boxes[k]
            _place(block[z - za], origin, placements[k], b, out=out[b[0]:b[1], b[2]:b[3]])
            return
        if not contributors:
            return
        num, den = buffer("num", out_plane), buffer("den", out_plane)
        num.fill(0.0)
        den.fill(0.0)
        for k, (za, _, block, origin) in contributors:
            b = boxes[k]
            values, valid = _place(block[z - za], origin, placements[k], b,
                                   out=buffer(f"values{k % 2}", (b[1] - b[0], b[3] - b[2])))
            if valid is None:
                valid = values > 0
            # A slice with data where the others have none must show even at weight 0 (the ends of a ramp).
            w = np.float32(max(weight(k, z), MIN_WEIGHT))
            values *= w
            region = (slice(b[0], b[1]), slice(b[2], b[3]))
            num[region] += values
            np.add(den[region], w, out=den[region], where=valid)
            del values, valid
        np.divide(num, den, out=out, where=den > 0)

    def read_source(k: int, z_lo: int, z_hi: int):
        s, z0 = slices[k], z0s[k]
        a, b = max(z_lo, z0), min(z_hi, z0 + s.n_last)
        if _is_integer_shift(placements[k]):
            tx, ty = (int(round(v)) for v in placements[k][:2, 2])
            y0, y1, x0, x1 = boxes[k]
            src = (max(0, y0 - ty), min(canvas[0], y1 - ty), max(0, x0 - tx), min(canvas[1], x1 - tx))
        else:  # what the output box needs, within the data box (1 pixel more for the interpolation)
            need, have = _source_box(placements[k], boxes[k], canvas), s.bbox
            src = (max(need[0], have[0] - 1), min(need[1], have[1] + 1), max(need[2], have[2] - 1),
                   min(need[3], have[3] + 1))
        block = np.asarray(s.level0[a - z0:b - z0, src[0]:src[1], src[2]:src[3]], dtype=np.float32)
        return k, (a, b, block, (src[0], src[2]))

    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_output(out_path, params.if_exists) as tmp:
        writer = create_ome_zarr_pyramid3d(tmp, shape, level_voxels, chunks=chunks,
                                           compression=params.compression, name=subject, attributes=attributes,
                                           threads=workers, skip_zeros=True)  # 0 = canvas without data
        slab_buffer = np.empty((min(slab, n_z), *out_plane), np.float32)
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="soct-stack") as pool:
            for z_lo, z_hi in slabs:
                tracker.check()
                needed = [k for k, (z0, s) in enumerate(zip(z0s, slices)) if z0 < z_hi and z0 + s.n_last > z_lo]
                clock = time.perf_counter()
                sources = dict(pool.map(lambda k: read_source(k, z_lo, z_hi), needed))
                phases["read"] += time.perf_counter() - clock
                clock = time.perf_counter()
                out = slab_buffer[:z_hi - z_lo]
                list(pool.map(lambda z: blend_plane(z, sources, out[z - z_lo]), range(z_lo, z_hi)))
                phases["blend"] += time.perf_counter() - clock
                clock = time.perf_counter()
                del sources
                writer.append(out)
                phases["write"] += time.perf_counter() - clock
                del out
                tracker.advance(1, f"stacking planes {z_lo}-{z_hi} of {n_z}")
        clock = time.perf_counter()
        writer.close()
        phases["write"] += time.perf_counter() - clock

    result.shape = shape
    result.voxel_sizes_um = level_voxels
    result.canvas_origin_mm = origin_mm
    result.section_thickness_planes = section_planes
    result.slice_z0 = {s.sid: int(z0) for s, z0 in zip(slices, z0s)}
    result.z_matches = matches
    result.decisions = decisions
    result.slab_planes = slab
    _write_text(z_path, _csv_text(Z_MATCH_COLUMNS, [{"pair": m.pair, **asdict(m)} for m in matches]))
    _write_text(decisions_path, _csv_text(DECISION_COLUMNS, [asdict(d) for d in decisions]))
    result.seconds = time.perf_counter() - started
    metrics = {
        "step": "stack",
        "common_dir": str(Path(common_dir).resolve()),
        "registration_csv": str(registration_path) if registration_path else "",
        "interpolated_dir": str(interpolated_dir or ""),
        "slice_config": str(slice_config or ""),
        "params": asdict(params),
        "seconds": result.seconds,
        "shape": list(shape),
        "voxel_sizes_um": [list(v) for v in level_voxels],
        "canvas_origin_mm": list(origin_mm),
        "slice_thickness_um": thickness,
        "section_thickness_planes": section_planes,
        "seconds_by_phase": phases,
        "slab_planes": slab,
        "chunks": list(chunks),
        "memory_estimate_bytes": int(estimate),
        "slices": [{"slice_id": s.sid, "path": str(s.path), "planes": s.n_planes, "valid_planes": s.n_valid,
                    "last_plane_with_data": s.n_last, "bbox_yx": list(s.bbox), "z0": int(z0),
                    "interpolated": s.interpolated} for s, z0 in zip(slices, z0s)],
        "z_matches": [{"pair": m.pair, **asdict(m)} for m in matches],
        "decisions": [asdict(d) for d in decisions],
    }
    _write_text(metrics_path, json.dumps(metrics, indent=2, default=str, allow_nan=True))
    tracker.advance(1, "done")
    return result
