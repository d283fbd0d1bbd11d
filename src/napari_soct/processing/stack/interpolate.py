"""Step 11: fill a missing or excluded slice by morphing between its neighbours (zmorph).

Slots
-----
A *slot* ``k`` is filled when both neighbours ``k - 1`` and ``k + 1`` are present in the common-space folder
and usable (not excluded in ``slice_config``), and ``k`` is either a single-slice gap in the slice ids or an
excluded slice. Longer gaps are left alone (recorded in ``slice_config_final.csv``, nothing written).

Geometry of a filled slot
-------------------------
With ``T`` the cut thickness (``slice_thickness_um``, 0: the median stage-z step of the slices) and ``dz`` the
plane spacing, ``t = T / dz`` planes per cut. A slice's plane ``p`` lies at block depth ``k T + p dz``, so the
slot gets as many planes as its deeper neighbour, plane ``p`` at block depth ``k T + p dz``, and per pixel:

1. where slice ``k - 1`` imaged that depth (its plane ``p + t`` is valid, i.e. nonzero): that real plane;
2. else where slice ``k + 1`` imaged it (its plane ``p - t``, from plane ``s = surface_planes`` on: the
   surface plane mixes tissue and medium): that real plane;
3. else, for the depths between the two *boundary planes* - ``B_before``, the deepest valid plane ``v`` of
   slice ``k - 1`` (valid over at least ``valid_fraction`` of its best-covered plane; slot plane ``v - t``),
   and ``B_after``, plane ``s`` of slice ``k + 1`` (slot plane ``t + s``) - the morph at
   ``alpha = (p - (v - t)) / ((t + s) - (v - t))``, for ``0 < alpha < 1``;
4. else 0 (no data): nothing is invented outside the morphed depths.

The morph
---------
``B_after`` is registered onto ``B_before`` with a SimpleITK 2-D affine (NCC metric on the pixels valid in
both, multi-resolution, at a pyramid level no larger than ``registration_max_size_px``), giving ``T``: a point
``x`` of ``B_before`` is at ``T x`` in ``B_after``. The morphed plane is

    P_alpha(x) = (1 - alpha) B_before(T^(-alpha) x) + alpha B_after(T^(1 - alpha) x)

(the cross-fade weights renormalised where only one warped boundary has data), so that content at ``u`` in
``B_before`` and at ``T u`` in ``B_after`` sits at ``T^alpha u``. The fractional powers are taken of the 3 x 3
homogeneous matrix with :func:`scipy.linalg.fractional_matrix_power`: for ``T = [[M, t], [0, 1]]`` this is
``[[M^a, (M^a - I)(M - I)^(-1) t], [0, 1]]`` where ``I - M`` is invertible and the exact ``a t`` for a pure
translation, without a special case. The real part is kept; the largest relative imaginary part is recorded.

Quality gates (a failed gate writes nothing: the slot stays a gap, the reason goes into
``slice_config_final.csv``): NCC of the two boundary planes before registration below
``min_overlap_correlation``; NCC gain of the registration below ``min_ncc_improvement``; ``det(M) <= 0``;
a registration error.

Outputs (``out_dir``)
---------------------
``slice_z{NN}_interpolated.ome.zarr`` per filled slot (the common canvas, pyramid, ``soct`` attributes of
the upper neighbour with ``slice_id``, ``interpolated: true``, ``position_source: "interpolated"`` and an
``interpolation`` record), ``slice_config_final.csv`` (every slice; ``interpolated``,
``interpolation_failed``, ``interpolation_method_used``, ``interpolation_fallback_reason``) and
``interpolate_metrics.json``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..io.atomic import atomic_output, check_can_write
from ..io.omezarr import COMPRESSION_CHOICES, create_ome_zarr_pyramid, open_ome_zarr
from ..io.tables import SliceConfigRow, read_slice_config, write_slice_config
from ..memory import return_large_buffers_to_os
from ..params import param, validate_params
from ..progress import Progress
from ..slices import SliceRunParams, find_slice_files
from .common_space import slice_thickness_from_stage, valid_depth

__all__ = ["InterpolationParams", "InterpolationResult", "SlotDecision", "interpolate_missing_slices",
           "fractional_affine", "FINAL_CONFIG"]

FINAL_CONFIG = "slice_config_final.csv"
METHOD = "zmorph"
FLOAT_BYTES = 4


@dataclass
class InterpolationParams(SliceRunParams):
    """Missing-slice interpolation by z-aware morphing (see :mod:`napari_soct.processing.stack.interpolate`)."""

    slice_config: str = param(
        "", "slice_config.csv: excluded slices (use=false or auto_excluded) are slots to fill, and are not used "
        "as neighbours (empty: only gaps in the slice ids)")
    min_overlap_correlation: float = param(
        0.3, "Gate: the two boundary planes must correlate (NCC) at least this much before registration",
        min=-1.0, max=1.01)
    min_ncc_improvement: float = param(
        -0.02, "Gate: the registration may change the boundary planes' NCC by no less than this", min=-2.0,
        max=2.0)
    slice_thickness_um: float = param(0.0, "Cut thickness (0: from the slices' stage_z_mm)", min=0.0, unit="um")
    surface_planes: int = param(1, "Planes below the cut surface of the lower neighbour not used (the surface "
                                "plane mixes tissue and medium)", min=0, advanced=True)
    valid_fraction: float = param(0.5, "A plane is valid when it holds data over this fraction of the "
                                  "best-covered plane (deepest valid plane = before-boundary)", min=0.01, max=1.0,
                                  advanced=True)
    registration_max_size_px: int = param(1024, "Registration at the finest pyramid level no larger than this",
                                          min=32, unit="px", advanced=True)
    registration_iterations: int = param(200, "Optimizer iterations per resolution level", min=1, advanced=True)
    registration_shrink_factors: str = param(
        "2,1", "Multi-resolution shrink factors of the registration (the neighbours are already aligned in common "
        "space: coarse levels only add noise on fine texture)", advanced=True)
    registration_learning_rate: float = param(0.3, "Largest optimizer step, in pixels of the registration level",
                                              min=1e-6, advanced=True)
    compression: str = param("blosc-lz4", "Compression of the interpolated slices", choices=COMPRESSION_CHOICES,
                             advanced=True)


@dataclass
class SlotDecision:
    """What happened to one slot (or to a gap that is not a slot)."""

    slice_id: int
    kind: str  # "gap", "excluded" (slots), "not_fillable" (a longer gap, an excluded slice without neighbours)
    interpolated: bool = False
    failed: bool = False
    reason: str = ""
    path: Path | None = None
    metrics: dict = field(default_factory=dict)


@dataclass
class InterpolationResult:
    """Outputs of :func:`interpolate_missing_slices`."""

    out_dir: Path
    slice_config_path: Path
    metrics_path: Path
    decisions: dict[int, SlotDecision] = field(default_factory=dict)
    seconds: float = 0.0
    skipped: bool = False

    @property
    def outputs(self) -> dict[int, Path]:
        return {s: d.path for s, d in sorted(self.decisions.items()) if d.interpolated and d.path is not None}

    @property
    def paths(self) -> list[Path]:
        return list(self.outputs.values())

    @property
    def failed(self) -> list[int]:
        return sorted(s for s, d in self.decisions.items() if d.failed)


# ---------------------------------------------------------------------------------------------- transforms
def fractional_affine(matrix: np.ndarray, power: float) -> tuple[np.ndarray, float]:
    """``matrix ** power`` of a 3 x 3 homogeneous affine (real part) and the largest relative imaginary part."""
    from scipy.linalg import fractional_matrix_power

    if power == 0:
        return np.eye(3), 0.0
    if power == 1:
        return np.array(matrix, float), 0.0
    value = np.asarray(fractional_matrix_power(np.asarray(matrix, float), power))
    imag = float(np.abs(value.imag).max() / max(np.abs(value.real).max(), 1e-12)) if np.iscomplexobj(value) else 0.0
    out = np.real(value).astype(float)
    out[2] = (0.0, 0.0, 1.0)
    return out, imag


def _ncc_masked(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    if mask.sum() < 16:
        return float("nan")
    x = a[mask].astype(np.float64)
    y = b[mask].astype(np.float64)
    x -= x.mean()
    y -= y.mean()
    den = math.sqrt(float((x * x).sum() * (y * y).sum()))
    return float((x * y).sum() / den) if den > 0 else float("nan")


def _warp(image: np.ndarray, matrix_rc: np.ndarray, out_shape, out_origin=(0, 0), in_origin=(0, 0),
          order: int = 1) -> np.ndarray:
    """``out[o] = image[matrix_rc @ (o + out_origin) - in_origin]`` (row/col homogeneous matrix), 0 outside."""
    from scipy.ndimage import affine_transform

    a = matrix_rc[:2, :2]
    offset = a @ np.asarray(out_origin, float) + matrix_rc[:2, 2] - np.asarray(in_origin, float)
    return affine_transform(image, a, offset=offset, output_shape=tuple(out_shape), order=order, mode="constant",
                            cval=0.0)


def _register(before: np.ndarray, after: np.ndarray, params: InterpolationParams) -> np.ndarray:
    """SimpleITK affine of ``after`` onto ``before``; returns the row/col homogeneous matrix (before -> after)."""
    import SimpleITK as sitk

    fixed = sitk.GetImageFromArray(before.astype(np.float32))
    moving = sitk.GetImageFromArray(after.astype(np.float32))
    fixed_mask = sitk.GetImageFromArray((before > 0).astype(np.uint8))
    moving_mask = sitk.GetImageFromArray((after > 0).astype(np.uint8))
    transform = sitk.AffineTransform(2)
    transform.SetCenter([(before.shape[1] - 1) / 2.0, (before.shape[0] - 1) / 2.0])
    shrink = [int(v) for v in params.registration_shrink_factors.replace(" ", "").split(",") if v]
    smallest = min(before.shape)
    shrink = [f for f in shrink if smallest // f >= 16] or [1]
    reg = sitk.ImageRegistrationMethod()
    reg.SetNumberOfThreads(int(params.workers))  # SimpleITK ignores OMP_NUM_THREADS: say it explicitly
    reg.SetMetricAsCorrelation()
    reg.SetMetricFixedMask(fixed_mask)
    reg.SetMetricMovingMask(moving_mask)
    if before.size > 512 * 512:
        reg.SetMetricSamplingStrategy(reg.REGULAR)
        reg.SetMetricSamplingPercentage(max(0.05, (512 * 512) / before.size))
    else:
        reg.SetMetricSamplingStrategy(reg.NONE)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=params.registration_learning_rate, minStep=1e-4,
                                                 numberOfIterations=params.registration_iterations,
                                                 gradientMagnitudeTolerance=1e-8)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel(shrink)
    reg.SetSmoothingSigmasPerLevel([max(0.0, (f - 1) / 2.0) for f in shrink])
    reg.SetInitialTransform(transform, inPlace=True)
    reg.Execute(fixed, moving)
    m = np.array(transform.GetMatrix(), float).reshape(2, 2)  # acting on (x, y)
    c = np.array(transform.GetCenter(), float)
    t = np.array(transform.GetTranslation(), float)
    xy = np.eye(3)
    xy[:2, :2] = m
    xy[:2, 2] = c + t - m @ c
    swap = np.array([[0, 1, 0], [1, 0, 0], [0, 0, 1]], float)
    return swap @ xy @ swap


# ---------------------------------------------------------------------------------------------- slots
def _find_slots(present: list[int], excluded: set[int]) -> tuple[dict[int, str], dict[int, str]]:
    """Slots to fill ``{sid: "gap" | "excluded"}`` and ids left alone ``{sid: reason}``."""
    usable = {s for s in present if s not in excluded}
    slots, left = {}, {}
    if not present:
        return slots, left
    lo, hi = min(present), max(present)
    missing = [s for s in range(lo, hi + 1) if s not in present]
    runs: list[list[int]] = []
    for s in missing:
        if runs and runs[-1][-1] == s - 1:
            runs[-1].append(s)
        else:
            runs.append([s])
    for run in runs:
        if len(run) == 1:
            s = run[0]
            if s - 1 in usable and s + 1 in usable:
                slots[s] = "gap"
            else:
                left[s] = "a neighbour is excluded"
        else:
            for s in run:
                left[s] = (f"gap of {len(run)} consecutive slices ({run[0]}-{run[-1]}); only single-slice gaps are "
                           "filled")
    for s in sorted(excluded & set(present)):
        if s - 1 in usable and s + 1 in usable:
            slots[s] = "excluded"
        else:
            left[s] = "excluded slice without two usable neighbours"
    return dict(sorted(slots.items())), left


@dataclass
class _Neighbour:
    path: Path
    image: object
    nz: int
    n_valid: int


def _open(path: Path, valid_fraction: float) -> _Neighbour:
    image = open_ome_zarr(path)
    if image.levels[0].ndim != 3:
        raise ValueError(f"{path}: a slice is 3D (z, y, x), this image has shape {image.levels[0].shape}")
    return _Neighbour(path, image, image.levels[0].shape[0], valid_depth(image, valid_fraction))


def _check_canvas(files: dict[int, Path]) -> dict:
    """All slices on one canvas: same (Y, X), voxel size and canvas origin (errors name the file)."""
    ref = None
    for path in files.values():
        image = open_ome_zarr(path)
        soct = image.attributes.get("soct", {})
        info = {"yx": tuple(image.levels[0].shape[1:]), "scale": tuple(image.scales_mm[0]),
                "origin": soct.get("canvas_origin_mm"), "path": path}
        if info["origin"] is None:
            raise ValueError(f"{path}: no canvas_origin_mm attribute; give the common-space folder (step 10 output)")
        if ref is None:
            ref = info
            continue
        if info["yx"] != ref["yx"]:
            raise ValueError(f"{path.name} has a {info['yx']} canvas, {ref['path'].name} {ref['yx']}: not one common "
                             "space")
        if not np.allclose(info["scale"], ref["scale"], rtol=1e-6):
            raise ValueError(f"voxel sizes differ: {path.name} {info['scale']} mm, {ref['path'].name} "
                             f"{ref['scale']} mm")
        if not np.allclose(info["origin"], ref["origin"], atol=1e-9):
            raise ValueError(f"{path.name} has canvas origin {info['origin']}, {ref['path'].name} {ref['origin']}")
    return ref


def _registration_level(image, max_size: int) -> int:
    for level, arr in enumerate(image.levels):
        if max(arr.shape[1:]) <= max_size:
            return level
    return len(image.levels) - 1


def _fill_slot(sid: int, up: _Neighbour, low: _Neighbour, t: int, out_tmp: Path, params: InterpolationParams,
               budget: int, tracker: Progress) -> dict:
    """Register the boundary planes, check the gates, and (when they pass) write the slot at ``out_tmp``.

    Returns the metrics; ``metrics["failed"]`` holds the reason when a gate fails (nothing written then).
    """
    s = params.surface_planes
    v = up.n_valid - 1
    metrics: dict = {"method": METHOD, "neighbours": [sid - 1, sid + 1], "slice_thickness_planes": t,
                     "before_plane": v, "after_plane": s}
    if v < 0 or low.n_valid <= s:
        return {**metrics, "failed": "a neighbour has no valid plane"}
    level = min(_registration_level(up.image, params.registration_max_size_px), len(low.image.levels) - 1)
    plane_shape = up.image.levels[level].shape[1:]
    if 16 * FLOAT_BYTES * int(np.prod(plane_shape)) > budget:
        raise ValueError(f"memory_budget_gb={params.memory_budget_gb} is below what the registration of slot {sid} "
                         f"at pyramid level {level} ({plane_shape}) needs; raise memory_budget_gb or lower "
                         "registration_max_size_px")
    before_l = _read_plane(up.image.levels[level], v)
    after_l = _read_plane(low.image.levels[level], s)
    both = (before_l > 0) & (after_l > 0)
    ncc_before = _ncc_masked(before_l, after_l, both)
    metrics.update({"registration_level": level, "ncc_before": ncc_before})
    if not np.isfinite(ncc_before) or ncc_before < params.min_overlap_correlation:
        return {**metrics, "failed": f"boundary planes NCC {ncc_before:.3f} < min_overlap_correlation "
                                     f"{params.min_overlap_correlation}"}
    try:
        matrix_l = _register(before_l, after_l, params)
    except Exception as err:  # SimpleITK raises RuntimeError with its own message
        return {**metrics, "failed": f"registration error: {str(err).strip().splitlines()[-1][:200]}"}
    det = float(np.linalg.det(matrix_l[:2, :2]))
    warped = _warp(after_l, matrix_l, after_l.shape)
    warped_valid = _warp((after_l > 0).astype(np.float32), matrix_l, after_l.shape) > 0.999
    ncc_after = _ncc_masked(before_l, warped, (before_l > 0) & warped_valid)
    f = 2**level
    scale = np.array([[f, 0, (f - 1) / 2], [0, f, (f - 1) / 2], [0, 0, 1]], float)
    matrix = scale @ matrix_l @ np.linalg.inv(scale)  # level-0 row/col, before -> after
    metrics.update({"ncc_after": ncc_after, "det": det, "transform_rc": matrix.tolist()})
    if det <= 0:
        return {**metrics, "failed": f"registration gave det(M) = {det:.3g} <= 0 (reflection or degenerate)"}
    if not np.isfinite(ncc_after) or ncc_after - ncc_before < params.min_ncc_improvement:
        return {**metrics, "failed": f"registration changed the NCC by {ncc_after - ncc_before:+.3f} < "
                                     f"min_ncc_improvement {params.min_ncc_improvement}"}
    tracker.check()

    nz = max(up.nz, low.nz)
    first, last = v - t, t + s  # slot planes of the two boundaries
    plan = []
    for p in range(nz):
        alpha = (p - first) / (last - first) if last > first else 1.0
        plan.append({"plane": p, "from_before": p + t if p + t < up.nz else None,
                     "from_after": p - t if s <= p - t < low.nz else None,
                     "alpha": float(alpha) if 0 < alpha < 1 else None})
    powers, imag = {}, 0.0
    for item in plan:
        if item["alpha"] is not None:
            a = item["alpha"]
            w_before, i1 = fractional_affine(matrix, -a)
            w_after, i2 = fractional_affine(matrix, 1 - a)
            powers[item["plane"]] = (w_before, w_after)
            imag = max(imag, i1, i2)
    if imag > 1e-3:
        warnings.warn(f"slot {sid}: fractional affine powers have a relative imaginary part of {imag:.2g}",
                      RuntimeWarning, stacklevel=2)
    metrics.update({"morph_planes": sorted(powers), "alphas": [plan[p]["alpha"] for p in sorted(powers)],
                    "max_relative_imaginary": imag,
                    "planes_from_before": [i["plane"] for i in plan if i["from_before"] is not None],
                    "planes_from_after": [i["plane"] for i in plan if i["from_after"] is not None]})

    soct = dict(up.image.attributes.get("soct", {}))
    soct.update({"slice_id": sid, "step": "interpolate", "interpolated": True, "position_source": "interpolated",
                 "source": [str(up.path), str(low.path)], "offset_px": [0, 0], "offset_residual_px": [0.0, 0.0],
                 "interpolation": {k: metrics[k] for k in ("method", "neighbours", "slice_thickness_planes",
                                                           "before_plane", "after_plane", "morph_planes", "alphas",
                                                           "transform_rc", "ncc_before", "ncc_after")}})
    z_low = low.image.attributes.get("soct", {}).get("stage_z_mm")
    if soct.get("stage_z_mm") is not None and z_low is not None:
        soct["stage_z_mm"] = (float(soct["stage_z_mm"]) + float(z_low)) / 2
    soct.pop("tile_positions_px", None)
    _, ny, nx = up.image.levels[0].shape
    in_chunks = up.image.levels[0].chunks
    chunk = min(in_chunks[1], in_chunks[2])
    n_levels = min(len(up.image.levels), int(math.log2(max(chunk, 1))) + 1)
    while chunk % 2 ** (n_levels - 1):
        n_levels -= 1
    side, depth = _block_shape(nz, (ny, nx), in_chunks, min(nz, 16), budget)
    writer = create_ome_zarr_pyramid(out_tmp, (nz, ny, nx), up.image.scales_mm[0], chunks=(min(nz, 16), chunk, chunk),
                                     n_levels=n_levels, compression=params.compression,
                                     name=f"slice_z{sid:02d}_interpolated", attributes={"soct": soct})
    counts = {"real_before": 0, "real_after": 0, "morphed": 0}
    band = [p for p in range(nz) if plan[p]["alpha"] is not None]
    with _boundary_cache(out_tmp, up.image.levels[0], v, low.image.levels[0], s, bool(band)) as (b_plane, a_plane):
        for z0 in range(0, nz, depth):
            z1 = min(nz, z0 + depth)
            for y0 in range(0, ny, side):
                y1 = min(ny, y0 + side)
                for x0 in range(0, nx, side):
                    x1 = min(nx, x0 + side)
                    block = np.zeros((z1 - z0, y1 - y0, x1 - x0), np.float32)
                    done = np.zeros(block.shape, bool)
                    q0, q1 = z0 + t, min(z1 + t, up.nz)  # planes of the upper neighbour at these depths
                    if q1 > q0:
                        real = np.asarray(up.image.levels[0][q0:q1, y0:y1, x0:x1], np.float32)
                        ok = real > 0
                        block[:q1 - q0][ok] = real[ok]
                        done[:q1 - q0] = ok
                        counts["real_before"] += int(ok.sum())
                        del real, ok
                    r0, r1 = max(z0 - t, s), min(z1 - t, low.nz)  # planes of the lower neighbour
                    if r1 > r0:
                        real = np.asarray(low.image.levels[0][r0:r1, y0:y1, x0:x1], np.float32)
                        part = slice(r0 + t - z0, r1 + t - z0)
                        ok = (real > 0) & ~done[part]
                        block[part][ok] = real[ok]
                        done[part] |= ok
                        counts["real_after"] += int(ok.sum())
                        del real, ok
                    for p in band:
                        if z0 <= p < z1 and not done[p - z0].all():
                            morphed = _morph_block(b_plane, a_plane, powers[p], plan[p]["alpha"], (y0, y1, x0, x1))
                            ok = (morphed > 0) & ~done[p - z0]
                            block[p - z0][ok] = morphed[ok]
                            counts["morphed"] += int(ok.sum())
                    writer.write((slice(z0, z1), slice(y0, y1), slice(x0, x1)), block)
                    tracker.check()
    metrics["pixels"] = counts
    return metrics


def _plane_tiles(array, z: int):
    """``((y0, y1, x0, x1), tile)`` of plane ``z`` of a 3-D zarr array, one chunk at a time (reading a whole
    plane at once would decode every chunk of its row of chunks in one go)."""
    _, ny, nx = array.shape
    cy, cx = array.chunks[1:]
    for y0 in range(0, ny, cy):
        for x0 in range(0, nx, cx):
            y1, x1 = min(ny, y0 + cy), min(nx, x0 + cx)
            yield (y0, y1, x0, x1), np.asarray(array[z, y0:y1, x0:x1], np.float32)


def _read_plane(array, z: int) -> np.ndarray:
    out = np.empty(array.shape[1:], np.float32)
    for (y0, y1, x0, x1), tile in _plane_tiles(array, z):
        out[y0:y1, x0:x1] = tile
    return out


@contextlib.contextmanager
def _boundary_cache(out_tmp: Path, up_array, v: int, low_array, s: int, needed: bool):
    """The two boundary planes copied into 2-D zarr arrays beside the output (removed afterwards): the morph
    then reads small windows of them without decoding chunks of many planes."""
    if not needed:
        yield None, None
        return
    import zarr

    folder = out_tmp.with_name(out_tmp.name + ".boundary")
    try:
        planes = []
        for name, array, z in (("before", up_array, v), ("after", low_array, s)):
            plane = zarr.open_array(str(folder / name), mode="w", shape=array.shape[1:], chunks=array.chunks[1:],
                                    dtype=np.float32, fill_value=0.0, zarr_format=3)
            for (y0, y1, x0, x1), tile in _plane_tiles(array, z):
                plane[y0:y1, x0:x1] = tile
            planes.append(plane)
        yield tuple(planes)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _block_shape(nz: int, yx, in_chunks, out_z: int, budget: int) -> tuple[int, int]:
    """Block side (a multiple of the input chunk) and depth (preferably whole output chunks) such that the
    block's working copies fit the budget: the block, its mask, a neighbour's read and a morphed plane, plus
    what zarr holds while decoding the input chunks a read touches (one more in z, as the neighbours' planes
    are offset by a cut) and while encoding the output chunks (measured: about 1.7 and 2.5 times their size)."""
    cz, cy, cx = in_chunks

    def need(depth, side):
        tiles = math.ceil(side / cy) * math.ceil(side / cx) * cy * cx
        touched_in = (math.ceil(depth / cz) + 1) * cz * tiles
        touched_out = math.ceil(depth / out_z) * out_z * side * side
        return FLOAT_BYTES * (3.25 * depth * side * side + 2 * touched_in + 3 * touched_out)

    side = min(cy, cx)
    depths = [nz] + [k * out_z for k in range(math.ceil(nz / out_z) - 1, 0, -1)]
    depths += [d for d in (out_z // 2, out_z // 4, out_z // 8, 1) if 0 < d < out_z]
    depth = next((d for d in depths if need(d, side) <= budget), depths[-1])
    while side < max(yx) and need(depth, 2 * side) <= budget:
        side *= 2
    if need(depth, side) > budget:
        raise ValueError(f"memory_budget_gb={budget / 2**30:.3g} is below the {need(depth, side) / 2**30:.3g} GiB "
                         f"one block of {depth} x {side} x {side} needs (input chunks {tuple(in_chunks)}); raise "
                         "memory_budget_gb")
    return side, depth


def _morph_block(before_plane, after_plane, powers, alpha: float, box) -> np.ndarray:
    """The morphed plane over ``box = (y0, y1, x0, x1)``, reading only the windows of the 2-D boundary planes
    it needs."""
    y0, y1, x0, x1 = box
    shape = (y1 - y0, x1 - x0)
    corners = np.array([[y0, x0, 1], [y0, x1 - 1, 1], [y1 - 1, x0, 1], [y1 - 1, x1 - 1, 1]], float).T
    parts, weights = [], []
    for plane, w, weight in ((before_plane, powers[0], 1 - alpha), (after_plane, powers[1], alpha)):
        src = w @ corners
        ny, nx = plane.shape
        r0 = int(max(0, math.floor(src[0].min()) - 2))
        r1 = int(min(ny, math.ceil(src[0].max()) + 3))
        c0 = int(max(0, math.floor(src[1].min()) - 2))
        c1 = int(min(nx, math.ceil(src[1].max()) + 3))
        if r1 <= r0 or c1 <= c0:
            parts.append(np.zeros(shape, np.float32))
            weights.append(np.zeros(shape, np.float32))
            continue
        data = np.asarray(plane[r0:r1, c0:c1], np.float32)
        warped = _warp(data, w, shape, (y0, x0), (r0, c0))
        valid = _warp((data > 0).astype(np.float32), w, shape, (y0, x0), (r0, c0)) > 0.999
        parts.append(np.where(valid, warped, 0).astype(np.float32))
        weights.append(valid * np.float32(weight))
    total = weights[0] + weights[1]
    out = np.zeros(shape, np.float32)
    good = total > 0
    out[good] = ((parts[0] * weights[0] + parts[1] * weights[1])[good] / total[good]).astype(np.float32)
    return out


# ---------------------------------------------------------------------------------------------- the step
def interpolate_missing_slices(common_dir, out_dir, params: InterpolationParams | None = None, *,
                               slice_config: str | os.PathLike = "", progress=None,
                               cancel=None) -> InterpolationResult:
    """Step 11: fill single-slice gaps and excluded slices of the common space by zmorph.

    Parameters
    ----------
    common_dir : path
        The common-space folder (step 10: ``slice_z*_common.ome.zarr``).
    out_dir : path
        Output folder (``11_interpolate``).
    params : InterpolationParams
    slice_config : path, optional
        ``slice_config.csv`` (excluded slices); overrides ``params.slice_config`` when given.

    Returns
    -------
    InterpolationResult
        One :class:`SlotDecision` per slot, per excluded slice and per id of a longer gap.

    Raises
    ------
    ValueError
        If the slices are not on one canvas, the cut thickness is unknown or not a whole number of planes
        (within 10 %), or the memory budget is too small.
    """
    params = params or InterpolationParams()
    validate_params(params)
    return_large_buffers_to_os()
    started = time.perf_counter()
    common_dir, out_dir = Path(common_dir), Path(out_dir)
    config = str(slice_config or params.slice_config or "")
    if config and not Path(config).is_file():
        raise FileNotFoundError(f"slice_config: {config} does not exist")
    final_path = out_dir / FINAL_CONFIG
    metrics_path = out_dir / "interpolate_metrics.json"
    result = InterpolationResult(out_dir, final_path, metrics_path)
    if not check_can_write(final_path, params.if_exists):
        result.skipped = True
        for row in read_slice_config(final_path):
            if row.interpolated or row.interpolation_failed:
                path = out_dir / f"slice_z{row.slice_id:02d}_interpolated.ome.zarr"
                result.decisions[row.slice_id] = SlotDecision(
                    row.slice_id, "kept", bool(row.interpolated), bool(row.interpolation_failed),
                    row.interpolation_fallback_reason, path if path.exists() else None)
        return result
    files = find_slice_files(common_dir)
    canvas = _check_canvas(files)
    rows = {r.slice_id: r for r in read_slice_config(config)} if config else {}
    excluded = {s for s, r in rows.items() if not r.use or r.auto_excluded}
    slots, left = _find_slots(sorted(files), excluded)

    neighbours = {}
    for sid in slots:
        for n in (sid - 1, sid + 1):
            if n not in neighbours:
                neighbours[n] = _open(files[n], params.valid_fraction)
    t = 0
    if slots:
        thickness = params.slice_thickness_um or slice_thickness_from_stage(
            {s: open_ome_zarr(p).attributes.get("soct", {}).get("stage_z_mm") for s, p in files.items()})
        if not thickness:
            raise ValueError("the cut thickness is unknown (no stage_z_mm in the slices): set slice_thickness_um")
        dz_um = canvas["scale"][0] * 1000.0
        t = int(round(thickness / dz_um))
        if t < 1 or abs(thickness / dz_um - t) > 0.1:
            raise ValueError(f"slice thickness {thickness:.4g} um is not a whole number of {dz_um:.4g} um planes; "
                             "resample the slices or set slice_thickness_um")
    budget = int(params.memory_budget_gb * 2**30)
    tracker = Progress(max(1, len(slots)), progress, cancel)
    tracker.check()
    mode = "overwrite" if params.if_exists == "overwrite" else "error"
    for sid, kind in slots.items():
        target = out_dir / f"slice_z{sid:02d}_interpolated.ome.zarr"
        decision = SlotDecision(sid, kind)
        if not check_can_write(target, params.if_exists):
            decision.interpolated, decision.path, decision.reason = True, target, ""
            decision.metrics = {"kept": True}
        else:
            metrics = {}
            try:
                with atomic_output(target, mode) as tmp:
                    metrics = _fill_slot(sid, neighbours[sid - 1], neighbours[sid + 1], t, tmp, params, budget, tracker)
                    if "failed" in metrics:
                        raise _GateFailed(metrics["failed"])
                decision.interpolated, decision.path = True, target
            except _GateFailed as failed:
                decision.failed, decision.reason = True, str(failed)
                if target.exists() and params.if_exists == "overwrite":
                    _remove_stale(target)  # a slot filled by an earlier run must not look filled now
            decision.metrics = metrics
        result.decisions[sid] = decision
        tracker.advance(1, f"slot z{sid:02d}: {'filled' if decision.interpolated else 'left empty'}")
    for sid, reason in left.items():
        result.decisions[sid] = SlotDecision(sid, "not_fillable", reason=reason)

    final_rows = dict(rows)
    for sid in files:
        final_rows.setdefault(sid, SliceConfigRow(slice_id=sid))
    for sid, d in result.decisions.items():
        row = final_rows.setdefault(sid, SliceConfigRow(slice_id=sid, use=False, notes="missing"))
        if d.kind in ("gap", "excluded", "kept"):
            row.interpolated = d.interpolated
            row.interpolation_failed = d.failed
            row.interpolation_method_used = METHOD
        else:
            row.interpolated = False
        row.interpolation_fallback_reason = d.reason
    out_dir.mkdir(parents=True, exist_ok=True)
    write_slice_config(final_path, [final_rows[s] for s in sorted(final_rows)], if_exists="overwrite")
    result.seconds = time.perf_counter() - started
    record = {"step": "interpolate", "common_dir": str(common_dir.resolve()), "slice_config": config,
              "params": asdict(params), "seconds": result.seconds, "slice_thickness_planes": t,
              "slots": {str(s): {"kind": d.kind, "interpolated": d.interpolated, "failed": d.failed,
                                 "reason": d.reason, "path": str(d.path) if d.path else None, **d.metrics}
                        for s, d in sorted(result.decisions.items())}}
    with atomic_output(metrics_path, "overwrite") as tmp:
        Path(tmp).write_text(json.dumps(record, indent=2, default=str))
    return result


class _GateFailed(Exception):
    """A quality gate failed: the slot stays a gap (the temporary output is discarded)."""


def _remove_stale(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
