"""Step 10: bring every slice into one common space (one canvas, integer placement).

Positions
---------
Stitching places each slice at its stage position: ``origin_mm`` is the stage position of its pixel (0, 0), so
slices placed at their ``origin_mm`` are aligned up to stage errors. Step 10 only applies *corrections* to
that: with the consecutive-slice steps ``raw_i`` (the stage steps the slices were stitched with,
``shifts_xy.csv``) and ``used_i`` (the steps to use: the cleaned file of step 9, then the excluded-slice mode
and the optional image refinement below), slice ``k`` goes to

    P_k = origin_mm(k) + sum_{i <= k} (used_i - raw_i) - A

where the sum runs over the chain of steps from the first slice of the shifts file to ``k``, and ``A`` is the
same sum for the *anchor* slice (the first used slice, or the middle used slice with ``anchor="middle"``), a
constant that keeps the anchor at its stitched origin (a constant does not change any relative placement;
with ``"middle"`` corrections spread both ways from the middle, as the lab centres the drift on the middle
slice). Steps are ``(x, y)`` in the CSV files; positions here are ``(y, x)``.

The canvas is the bounding box of all placed slices, on the pixel lattice of the slices:
``canvas_origin_mm = floor(min_k P_k / px) * px``. A slice is painted at the integer offset
``round((P_k - canvas_origin_mm) / px)``; the fraction not applied is recorded (``offset_residual_px``), so
registration can take it up. Every output has the canvas's ``(Y, X)`` and its own number of planes.

Excluded slices (``use=false`` or ``auto_excluded`` in ``slice_config``)
------------------------------------------------------------------------
Every step into or out of an excluded slice is replaced before integration (``excluded_slice_mode``):

- ``keep``: the step as given (trust the motors);
- ``local_median``: per axis, the median of the nearest ``median_window`` usable steps before and after it
  (usable: touching no excluded slice); all usable steps when there are none nearby; zero when none at all;
- ``median``: the median of all usable steps;
- ``zero``: no motion.

Image refinement of unreliable transitions (``refine_unreliable``)
------------------------------------------------------------------
A step flagged ``reliable=0`` (step 9: a corrected glitch, a re-homing) between two present, non-excluded
slices is re-estimated from the images: the two slices' average intensity projections over the depths they
share (planes ``t + 1 ... t + m - 1`` of the upper slice against planes ``1 ... m - 1`` of the lower one,
``t = T / dz`` planes per cut; plane 0, the cut surface, is left out; all valid planes of both when the
thickness is unknown or they share no depth) are put side by side at the positions the current step gives,
cropped to their common footprint, and their residual displacement is measured by 2-D cross-correlation in
Fourier space (:func:`skimage.registration.phase_cross_correlation` without spectral whitening, which is the
more precise on speckled projections; Tukey window; sub-pixel). The image-based step (current step plus
the residual) is used only when the NCC of the two projections after the shift is at least
``refine_min_correlation`` and it differs from the current (motor) step by at most ``refine_max_discrepancy_px``.

Outputs (``out_dir``)
---------------------
``slice_z{NN}_common.ome.zarr`` per slice (pyramid, written block by block under ``memory_budget_gb``) with
the input's ``soct`` attributes plus ``canvas_origin_mm`` (also written as ``origin_mm``), ``offset_px``,
``offset_residual_px`` and ``position_source`` (``motor``, ``local_median``, ``median``, ``zero`` or
``refined``: how the step linking the slice towards the anchor was obtained - the step into it after the
anchor, out of it before); ``tile_positions_px`` are moved with the slice.
``common_space.csv`` (``slice_id, offset_y_px, offset_x_px, residual_y_px, residual_x_px, position_source``)
and ``common_space_metrics.json`` (parameters, canvas, every step's raw/motor/used value and refinement,
per-slice placement).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..io.atomic import atomic_output, check_can_write
from ..io.omezarr import COMPRESSION_CHOICES, create_ome_zarr_pyramid, open_ome_zarr, pyramid_level_count
from ..io.tables import read_shifts_xy
from ..params import param, validate_params
from ..progress import Progress
from ..slices import SliceRunParams, find_slice_files, run_slice_step
from .slots import excluded_slice_ids

__all__ = [
    "CommonSpaceParams",
    "CommonSpaceResult",
    "StepPlan",
    "bring_to_common_space",
    "read_common_space_csv",
    "slice_thickness_from_stage",
    "valid_depth",
    "COMMON_SPACE_CSV",
]

COMMON_SPACE_CSV = "common_space.csv"
STEP_FILE = "common"  # slice_z{NN}_common.ome.zarr
METRICS_STEP = "common_space"  # common_space_metrics.json
EXCLUDED_MODES = ("keep", "local_median", "median", "zero")
FLOAT_BYTES = 4
_VOXEL_RTOL = 1e-6


@dataclass
class CommonSpaceParams(SliceRunParams):
    """Placement of all slices on one canvas (see :mod:`napari_soct.processing.stack.common_space`)."""

    slice_config: str = param(
        "", "slice_config.csv whose excluded slices (use=false or auto_excluded) get the excluded-slice mode "
        "(empty: no slice is excluded)")
    excluded_slice_mode: str = param(
        "local_median", "Steps into and out of an excluded slice: keep them, or replace them by the median of "
        "the nearby usable steps, of all usable steps, or by zero", choices=EXCLUDED_MODES)
    median_window: int = param(2, "Usable steps on each side whose median replaces a step (local_median)", min=1,
                               advanced=True)
    refine_unreliable: bool = param(
        True, "Re-estimate steps flagged reliable=0 from the images (2-D phase correlation of the overlapping "
        "depths of the two slices)")
    refine_min_correlation: float = param(
        0.5, "Image estimate used only when the NCC of the two projections after alignment reaches this",
        min=-1.0, max=1.0)
    refine_max_discrepancy_px: float = param(
        10.0, "Image estimate used only when it differs from the motor step by at most this", min=0.0,
        unit="px")
    refine_level: int = param(0, "Pyramid level of the slices used for the refinement (0: full resolution)",
                              min=0, advanced=True)
    raw_shifts_csv: str = param(
        "", "The uncorrected shifts_xy.csv the slices were stitched with (empty: the original steps recorded in "
        "rehoming_report.json beside the shifts file, or the shifts file itself)", advanced=True)
    slice_thickness_um: float = param(
        0.0, "Cut thickness, for the depths two slices share (0: from the slices' stage_z_mm)", min=0.0,
        unit="um", advanced=True)
    anchor: str = param("first", "Slice that keeps its stitched origin: the first or the middle used slice",
                        choices=("first", "middle"), advanced=True)
    compression: str = param("blosc-lz4", "Compression of the common-space slices", choices=COMPRESSION_CHOICES,
                             advanced=True)


@dataclass
class StepPlan:
    """One consecutive-slice step: what the files say and what is used (``(x, y)`` mm)."""

    fixed_id: int
    moving_id: int
    raw_mm: tuple[float, float]
    motor_mm: tuple[float, float]
    used_mm: tuple[float, float]
    reliable: bool
    source: str = "motor"
    refinement: dict | None = None


@dataclass
class CommonSpaceResult:
    """Outputs of :func:`bring_to_common_space`.

    Attributes
    ----------
    outputs : dict
        ``{slice_id: Path}`` of every common-space slice (written now or kept).
    canvas_shape : tuple
        ``(Y, X)`` of the canvas.
    canvas_origin_mm : tuple
        Stage ``(y, x)`` mm of canvas pixel (0, 0).
    offsets_px, residuals_px : dict
        ``{slice_id: (y, x)}`` integer offsets applied and fractions not applied.
    position_sources : dict
        ``{slice_id: str}``.
    steps : list of StepPlan
    """

    out_dir: Path
    outputs: dict[int, Path]
    canvas_shape: tuple[int, int]
    canvas_origin_mm: tuple[float, float]
    offsets_px: dict[int, tuple[int, int]]
    residuals_px: dict[int, tuple[float, float]]
    position_sources: dict[int, str]
    steps: list[StepPlan]
    csv_path: Path
    metrics_path: Path
    seconds: float = 0.0
    skipped: list[int] = field(default_factory=list)

    @property
    def paths(self) -> list[Path]:
        return [self.outputs[s] for s in sorted(self.outputs)]

    @property
    def refined(self) -> list[StepPlan]:
        return [s for s in self.steps if s.source == "refined"]


@dataclass
class _Slice:
    sid: int
    path: Path
    shape: tuple[int, int, int]
    voxel_size_um: tuple[float, float, float]
    origin_mm: tuple[float, float]
    stage_z_mm: float | None
    attributes: dict


# ---------------------------------------------------------------------------------------------- inputs
def _open_slices(source) -> dict[int, _Slice]:
    slices = {}
    for sid, path in find_slice_files(source).items():
        image = open_ome_zarr(path)
        if image.levels[0].ndim != 3:
            raise ValueError(f"{path}: a slice is 3D (z, y, x), this image has shape {image.levels[0].shape}")
        soct = image.attributes.get("soct", {})
        missing = [k for k in ("origin_mm", "voxel_size_um") if soct.get(k) is None]
        if missing:
            raise ValueError(f"{path}: no {' or '.join(missing)} in its 'soct' attributes (not a stitched slice?)")
        stage_z = soct.get("stage_z_mm")
        slices[sid] = _Slice(sid, Path(path), tuple(image.levels[0].shape),
                             tuple(float(v) for v in soct["voxel_size_um"]),
                             (float(soct["origin_mm"][0]), float(soct["origin_mm"][1])),
                             None if stage_z is None else float(stage_z), soct)
    first = next(iter(slices.values()))
    for s in slices.values():
        if not np.allclose(s.voxel_size_um, first.voxel_size_um, rtol=_VOXEL_RTOL, atol=0):
            raise ValueError(
                f"voxel sizes differ: {s.path.name} has {list(s.voxel_size_um)} um, {first.path.name} has "
                f"{list(first.voxel_size_um)} um; resample the slices to one voxel size first")
    return slices


def slice_thickness_from_stage(stage_z_mm: dict[int, float | None]) -> float | None:
    """Cut thickness (um) from the slices' stage z: the median difference per slice id, or None when unknown."""
    known = sorted((sid, z) for sid, z in stage_z_mm.items() if z is not None)
    diffs = [abs(z1 - z0) / (s1 - s0) for (s0, z0), (s1, z1) in zip(known[:-1], known[1:], strict=True) if s1 > s0]
    diffs = [d for d in diffs if d > 0]
    return float(np.median(diffs) * 1000.0) if diffs else None


def _read_steps(shifts_csv: Path, params: CommonSpaceParams) -> tuple[list, dict, str]:
    """Steps to use (rows of the shifts file) and the raw steps ``{(fixed, moving): (x_mm, y_mm)}``."""
    used = read_shifts_xy(shifts_csv)
    if not used:
        raise ValueError(f"{shifts_csv}: no steps (an empty shifts file)")
    report = shifts_csv.parent / "rehoming_report.json"
    if params.raw_shifts_csv:
        raw_path = Path(params.raw_shifts_csv)
        if not raw_path.is_file():
            raise FileNotFoundError(f"parameter 'raw_shifts_csv': {raw_path} does not exist")
        raw = {(s.fixed_id, s.moving_id): (s.x_shift_mm, s.y_shift_mm) for s in read_shifts_xy(raw_path)}
        origin = str(raw_path)
    elif report.is_file():
        steps = json.loads(report.read_text()).get("steps", [])
        raw = {(int(d["fixed_id"]), int(d["moving_id"])): tuple(map(float, d["original_mm"])) for d in steps}
        origin = str(report)
    elif "clean" in shifts_csv.name:
        raise ValueError(
            f"{shifts_csv}: a cleaned shifts file without rehoming_report.json beside it; give the uncorrected "
            "shifts_xy.csv the slices were stitched with as parameter 'raw_shifts_csv'")
    else:
        raw = {(s.fixed_id, s.moving_id): (s.x_shift_mm, s.y_shift_mm) for s in used}
        origin = str(shifts_csv)
    for s in used:
        if (s.fixed_id, s.moving_id) not in raw:
            raise ValueError(f"{origin}: no raw step {s.fixed_id} -> {s.moving_id} (it is in {shifts_csv})")
    return used, raw, origin


# ---------------------------------------------------------------------------------------------- step plan
def _excluded_replacements(plans: list[StepPlan], excluded: set[int], params: CommonSpaceParams) -> None:
    if params.excluded_slice_mode == "keep" or not excluded:
        return
    touched = [i for i, p in enumerate(plans) if p.fixed_id in excluded or p.moving_id in excluded]
    usable = [i for i, p in enumerate(plans) if i not in touched]
    values = np.array([p.motor_mm for p in plans], float).reshape(-1, 2)
    for i in touched:
        mode = params.excluded_slice_mode
        if mode == "zero" or not usable:
            replacement, source = np.zeros(2), "zero"
        elif mode == "median":
            replacement, source = np.median(values[usable], axis=0), "median"
        else:
            w = params.median_window
            near = [j for j in usable if j < i][-w:] + [j for j in usable if j > i][:w]
            replacement, source = np.median(values[near or usable], axis=0), "local_median"
        plans[i].used_mm = (float(replacement[0]), float(replacement[1]))
        plans[i].source = source


def _chain_corrections(plans: list[StepPlan], slice_ids, shifts_csv: Path) -> dict[int, np.ndarray]:
    """Cumulative ``sum (used - raw)`` per slice along the chain of steps, as ``(y, x)`` mm."""
    correction: dict[int, np.ndarray] = {plans[0].fixed_id: np.zeros(2)}
    for p in sorted(plans, key=lambda p: p.moving_id):
        if p.fixed_id not in correction:
            raise ValueError(f"{shifts_csv}: the steps do not form a chain: step {p.fixed_id} -> {p.moving_id} "
                             f"starts at a slice no earlier step reaches")
        delta = np.array(p.used_mm) - np.array(p.raw_mm)
        correction[p.moving_id] = correction[p.fixed_id] + delta[::-1]
    missing = [sid for sid in slice_ids if sid not in correction]
    if missing:
        raise ValueError(f"{shifts_csv}: no shift for slice(s) {', '.join(map(str, missing))} (no step into them); "
                         "the shifts file must cover every slice to place")
    return correction


# ---------------------------------------------------------------------------------------------- refinement
def valid_depth(image, min_fraction: float = 0.5) -> int:
    """Number of leading planes of a slice holding data (nonzero) over at least ``min_fraction`` of the
    best-covered plane, read from the coarsest pyramid level."""
    level = image.levels[-1]
    nz, ny, nx = level.shape
    cz, cy, cx = level.chunks
    counts = np.zeros(nz, np.int64)
    for z0 in range(0, nz, cz):  # one chunk at a time: the coarsest level can still be large
        for y0 in range(0, ny, cy):
            for x0 in range(0, nx, cx):
                counts[z0:z0 + cz] += np.count_nonzero(np.asarray(level[z0:z0 + cz, y0:y0 + cy, x0:x0 + cx]),
                                                       axis=(1, 2))
    if counts.max() == 0:
        return 0
    good = np.nonzero(counts >= min_fraction * counts.max())[0]
    return int(good[-1]) + 1


def _projection(array, planes: range, budget_bytes: int) -> np.ndarray:
    """Mean over the nonzero values of ``planes`` per pixel (0 where none), read in bands of rows."""
    nz, ny, nx = array.shape
    depth = max(1, len(planes))
    rows = max(1, min(ny, budget_bytes // max(1, 3 * FLOAT_BYTES * depth * nx)))
    out = np.zeros((ny, nx), np.float32)
    for y0 in range(0, ny, rows):
        block = np.asarray(array[planes.start:planes.stop, y0:y0 + rows], dtype=np.float32)
        count = np.count_nonzero(block, axis=0)
        total = block.sum(axis=0)
        out[y0:y0 + rows] = np.where(count > 0, total / np.maximum(count, 1), 0)
    return out


def _prepare(image: np.ndarray, valid: np.ndarray) -> np.ndarray:
    from skimage.filters import window

    filled = np.where(valid, image, image[valid].mean() if valid.any() else 0.0).astype(np.float64)
    filled -= filled.mean()
    # A Tukey window: the edges (where the two crops differ by the shift) fade out, the centre is kept whole.
    return filled * window(("tukey", 0.3), filled.shape)


def _ncc(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean()
    b = b - b.mean()
    den = math.sqrt(float((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / den) if den > 0 else float("nan")


def _refine_step(upper: _Slice, lower: _Slice, plan: StepPlan, params: CommonSpaceParams, thickness_um,
                 budget_bytes: int) -> dict:
    """Measure the residual displacement of ``lower`` relative to ``upper`` placed by the current step."""
    from scipy.ndimage import shift as nd_shift
    from skimage.registration import phase_cross_correlation

    up_img, low_img = open_ome_zarr(upper.path), open_ome_zarr(lower.path)
    level = min(params.refine_level, len(up_img.levels) - 1, len(low_img.levels) - 1)
    factor = 2**level
    up_arr, low_arr = up_img.levels[level], low_img.levels[level]
    need = 12 * FLOAT_BYTES * (up_arr.shape[1] * up_arr.shape[2] + low_arr.shape[1] * low_arr.shape[2])
    if need > budget_bytes:
        raise ValueError(f"memory_budget_gb={params.memory_budget_gb} is below the {need / 2**30:.2f} GiB the "
                         f"refinement of {plan.fixed_id} -> {plan.moving_id} needs at pyramid level {level}; raise "
                         "memory_budget_gb or refine_level")
    n_up, n_low = valid_depth(up_img), valid_depth(low_img)
    t = int(round(thickness_um / upper.voxel_size_um[0])) if thickness_um else 0
    shared = min(n_up - t, n_low) if t > 0 else 0
    if shared >= 2:
        up_planes, low_planes, depths = range(t + 1, t + shared), range(1, shared), "shared"
    else:
        up_planes, low_planes, depths = range(0, max(n_up, 1)), range(0, max(n_low, 1)), "all"
    ref = _projection(up_arr, up_planes, budget_bytes // 2)
    mov = _projection(low_arr, low_planes, budget_bytes // 2)

    px = np.array(upper.voxel_size_um[1:]) * 1e-3 * factor  # (y, x) mm per pixel at this level
    step_delta = (np.array(plan.used_mm) - np.array(plan.raw_mm))[::-1]  # (y, x) mm
    rel = (np.array(lower.origin_mm) - np.array(upper.origin_mm) + step_delta) / px
    irel = np.round(rel).astype(int)
    frac = rel - irel
    y0, x0 = max(0, irel[0]), max(0, irel[1])
    y1, x1 = min(ref.shape[0], irel[0] + mov.shape[0]), min(ref.shape[1], irel[1] + mov.shape[1])
    record = {"level": level, "depths": depths, "planes_upper": [up_planes.start, up_planes.stop],
              "planes_lower": [low_planes.start, low_planes.stop], "accepted": False}
    if y1 - y0 < 16 or x1 - x0 < 16:
        return {**record, "reason": f"overlap of {max(y1 - y0, 0)} x {max(x1 - x0, 0)} px is too small"}
    a = ref[y0:y1, x0:x1]
    b = mov[y0 - irel[0]:y1 - irel[0], x0 - irel[1]:x1 - irel[1]]
    valid_a, valid_b = a > 0, b > 0
    if valid_a.mean() < 0.25 or valid_b.mean() < 0.25:
        return {**record, "reason": "too little data in the overlap"}
    shift, _, _ = phase_cross_correlation(_prepare(a, valid_a), _prepare(b, valid_b), upsample_factor=20,
                                          normalization=None)
    moved = nd_shift(b, shift, order=1, cval=0.0)
    moved_valid = nd_shift(valid_b.astype(np.float32), shift, order=0, cval=0.0) > 0.5
    margin = int(np.ceil(np.abs(shift).max())) + 1
    both = valid_a & moved_valid
    both[:margin] = both[-margin:] = False
    both[:, :margin] = both[:, -margin:] = False
    ncc = _ncc(a[both], moved[both]) if both.sum() > 64 else float("nan")
    residual_px = (shift - frac) * factor  # level-0 px the lower slice must move, (y, x)
    image_step = np.array(plan.used_mm) + (residual_px * px / factor)[::-1]  # (x, y) mm
    discrepancy = float(np.hypot(*residual_px))
    record.update({"shift_px": [float(v) for v in residual_px], "ncc": ncc, "discrepancy_px": discrepancy,
                   "image_step_mm": [float(v) for v in image_step]})
    if not np.isfinite(ncc) or ncc < params.refine_min_correlation:
        record["reason"] = f"NCC {ncc:.3f} < refine_min_correlation {params.refine_min_correlation}"
    elif discrepancy > params.refine_max_discrepancy_px:
        record["reason"] = (f"differs from the motor step by {discrepancy:.1f} px > refine_max_discrepancy_px "
                            f"{params.refine_max_discrepancy_px}")
    else:
        record["accepted"] = True
        record["reason"] = ""
    return record


# ---------------------------------------------------------------------------------------------- painting
def _paint_need(depth: int, side: int, z_chunk: int, in_chunks) -> int:
    """Bytes one painting block holds: the block and the source window read into it, plus what zarr holds
    while decoding the source chunks the window touches (it is offset: one more chunk per lateral axis) and
    while encoding the output chunks (measured: about 1.7 and 2.5 times their size)."""
    cz, cy, cx = in_chunks
    touched_in = math.ceil(depth / cz) * cz * (math.ceil(side / cy) + 1) * cy * (math.ceil(side / cx) + 1) * cx
    touched_out = math.ceil(depth / z_chunk) * z_chunk * side * side
    return int(FLOAT_BYTES * (2 * depth * side * side + 1.7 * touched_in + 2.5 * touched_out))


def _paint_plan(nz: int, canvas: tuple[int, int], in_chunks, budget_bytes: int) -> tuple[int, int, int, int] | None:
    """``(chunk_yx, z_chunk, block_side, block_depth)`` of the largest blocks whose working memory fits the
    budget (None when even the smallest does not)."""
    z_chunk = min(nz, 16)
    largest = max(16, 1 << (max(canvas) - 1).bit_length())
    for chunk in (c for c in (256, 128, 64, 32, 16) if c <= largest):
        for depth in dict.fromkeys((nz, z_chunk, max(1, z_chunk // 2), max(1, z_chunk // 4), 1)):
            if _paint_need(depth, chunk, z_chunk, in_chunks) <= budget_bytes:
                side = chunk
                while side < max(canvas) and _paint_need(depth, 2 * side, z_chunk, in_chunks) <= budget_bytes:
                    side *= 2
                return chunk, z_chunk, side, depth
    return None


def _write_csv(path: Path, rows, if_exists: str) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(("slice_id", "offset_y_px", "offset_x_px", "residual_y_px", "residual_x_px", "position_source"))
    writer.writerows(rows)
    with atomic_output(path, if_exists) as tmp:
        Path(tmp).write_text(buffer.getvalue())


def read_common_space_csv(path) -> dict[int, dict]:
    """``common_space.csv`` as ``{slice_id: {offset_px: (y, x), residual_px: (y, x), position_source}}``."""
    out = {}
    with Path(path).open(newline="") as fh:
        for row in csv.DictReader(fh):
            out[int(row["slice_id"])] = {
                "offset_px": (int(row["offset_y_px"]), int(row["offset_x_px"])),
                "residual_px": (float(row["residual_y_px"]), float(row["residual_x_px"])),
                "position_source": row["position_source"],
            }
    return out


# ---------------------------------------------------------------------------------------------- the step
def bring_to_common_space(source, shifts_csv, out_dir, params: CommonSpaceParams | None = None, *,
                          slice_config: str | os.PathLike = "", progress=None, cancel=None) -> CommonSpaceResult:
    """Step 10: place every slice of ``source`` on one canvas (see the module docstring).

    Parameters
    ----------
    source : path
        Folder of stitched slices (``slice_z*_normalize.ome.zarr``), or one file.
    shifts_csv : path
        Consecutive-slice steps to use: ``shifts_xy_clean.csv`` of step 9, or ``shifts_xy.csv``.
    out_dir : path
        Output folder (``10_common``).
    params : CommonSpaceParams
    slice_config : path, optional
        ``slice_config.csv`` giving the excluded slices; overrides ``params.slice_config`` when given.
    progress, cancel
        Progress callback ``(done, total, message)`` and cancel flag (``is_set()``).

    Returns
    -------
    CommonSpaceResult

    Raises
    ------
    ValueError
        If the slices' voxel sizes differ, a slice has no step in the shifts file, the steps do not form a
        chain, or the memory budget is too small for one block.
    """
    params = params or CommonSpaceParams()
    validate_params(params)
    started = time.perf_counter()
    source, shifts_csv, out_dir = Path(source), Path(shifts_csv), Path(out_dir)
    if not shifts_csv.is_file():
        raise FileNotFoundError(f"shifts_csv: {shifts_csv} does not exist")
    config = str(slice_config or params.slice_config or "")
    if config and not Path(config).is_file():
        raise FileNotFoundError(f"slice_config: {config} does not exist")
    csv_path = out_dir / COMMON_SPACE_CSV
    write_csv = check_can_write(csv_path, params.if_exists)
    slices = _open_slices(source)
    excluded = excluded_slice_ids(config) if config else set()
    used_rows, raw, raw_origin = _read_steps(shifts_csv, params)

    plans = [StepPlan(s.fixed_id, s.moving_id, raw[(s.fixed_id, s.moving_id)], (s.x_shift_mm, s.y_shift_mm),
                      (s.x_shift_mm, s.y_shift_mm), bool(s.reliable)) for s in used_rows]
    plans.sort(key=lambda p: p.moving_id)
    _excluded_replacements(plans, excluded, params)

    tracker = Progress(1, None, cancel)
    tracker.check()
    first = next(iter(slices.values()))
    thickness = params.slice_thickness_um or slice_thickness_from_stage({s: v.stage_z_mm for s, v in slices.items()})
    budget = int(params.memory_budget_gb * 2**30)
    if params.refine_unreliable:
        candidates = [p for p in plans if not p.reliable and p.source == "motor"
                      and p.fixed_id in slices and p.moving_id in slices]
        for i, p in enumerate(candidates):
            if progress is not None:
                progress(i, len(candidates), f"refining step {p.fixed_id} -> {p.moving_id}")
            p.refinement = _refine_step(slices[p.fixed_id], slices[p.moving_id], p, params, thickness, budget)
            if p.refinement["accepted"]:
                p.used_mm = tuple(p.refinement["image_step_mm"])
                p.source = "refined"
            tracker.check()

    correction = _chain_corrections(plans, slices, shifts_csv)
    used_ids = [sid for sid in slices if sid not in excluded] or list(slices)
    anchor = used_ids[0] if params.anchor == "first" else used_ids[len(used_ids) // 2]
    px = np.array(first.voxel_size_um[1:]) * 1e-3  # (y, x) mm
    position_px = {sid: (np.array(s.origin_mm) + correction[sid] - correction[anchor]) / px
                   for sid, s in slices.items()}
    canvas_origin_px = np.floor(np.min(np.array(list(position_px.values())), axis=0) + 1e-9)
    offsets, residuals = {}, {}
    for sid, p in position_px.items():
        rel = p - canvas_origin_px
        offsets[sid] = tuple(int(v) for v in np.round(rel))
        residuals[sid] = tuple(float(v) for v in rel - np.round(rel))
    canvas = tuple(int(max(offsets[s][a] + slices[s].shape[1 + a] for s in slices)) for a in (0, 1))
    canvas_origin_mm = tuple(float(v) for v in canvas_origin_px * px)
    # A slice's position source is how the step linking it towards the anchor was obtained: the step into it
    # for slices after the anchor, the step out of it for slices before.
    into = {p.moving_id: p for p in plans}
    out_of = {p.fixed_id: p for p in plans}
    sources = {}
    for sid in slices:
        link = into.get(sid) if sid > anchor else out_of.get(sid) if sid < anchor else None
        sources[sid] = link.source if link is not None else "motor"

    # Painting: one block at a time; the worker count and block size follow the budget.
    chunks_in = {sid: open_ome_zarr(s.path).levels[0].chunks for sid, s in slices.items()}
    plans_paint = {}
    for n_workers in range(max(1, min(params.workers, len(slices))), 0, -1):
        found = {sid: _paint_plan(s.shape[0], canvas, chunks_in[sid], budget // n_workers) for sid, s in slices.items()}
        if all(found.values()):
            plans_paint = {sid: (found[sid], chunks_in[sid]) for sid in slices}
            break
    if not plans_paint:
        smallest = max(_paint_need(1, 16, min(s.shape[0], 16), chunks_in[sid]) for sid, s in slices.items())
        raise ValueError(f"memory_budget_gb={params.memory_budget_gb} is below the {smallest / 2**30:.3g} GiB the "
                         "smallest painting block needs (the source chunks are decoded whole); raise memory_budget_gb")

    def units(path: Path) -> int:
        sid = next(k for k, v in slices.items() if v.path == path)
        (_, _, side, depth), _ = plans_paint[sid]
        return _block_count(slices[sid], offsets[sid], side, depth)

    def need(path: Path) -> int:
        sid = next(k for k, v in slices.items() if v.path == path)
        (_, z_chunk, side, depth), in_chunks = plans_paint[sid]
        return _paint_need(depth, side, z_chunk, in_chunks)

    def process_slice(in_path: Path, out_tmp: Path, tracker: Progress) -> dict:
        t0 = time.perf_counter()
        sid = next(k for k, v in slices.items() if v.path == in_path)
        s = slices[sid]
        (chunk, z_chunk, side, depth), _ = plans_paint[sid]
        extra = {
            "step": "common_space", "source": str(in_path), "canvas_origin_mm": list(canvas_origin_mm),
            "origin_mm": list(canvas_origin_mm), "origin_px": [float(v) for v in canvas_origin_px],
            "stitched_origin_mm": list(s.origin_mm), "offset_px": list(offsets[sid]),
            "offset_residual_px": list(residuals[sid]), "position_source": sources[sid],
            "canvas_shape": list(canvas),
        }
        if isinstance(s.attributes.get("tile_positions_px"), list):
            extra["tile_positions_px"] = [
                {**t, "y_px": float(t["y_px"]) + offsets[sid][0], "x_px": float(t["x_px"]) + offsets[sid][1]}
                for t in s.attributes["tile_positions_px"] if "y_px" in t and "x_px" in t]
        attrs = {"soct": {**s.attributes, **extra}}
        n_levels = min(pyramid_level_count(canvas), int(math.log2(chunk)) + 1)
        writer = create_ome_zarr_pyramid(
            out_tmp, (s.shape[0], *canvas), tuple(v * 1e-3 for v in s.voxel_size_um), chunks=(z_chunk, chunk, chunk),
            n_levels=n_levels, compression=params.compression, name=f"slice_z{sid:02d}_{STEP_FILE}", attributes=attrs)
        blocks = _paint(open_ome_zarr(in_path).levels[0], writer, offsets[sid], canvas, side, depth,
                        lambda: tracker.advance(1, f"common space z{sid:02d}"))
        return {"offset_px": list(offsets[sid]), "offset_residual_px": list(residuals[sid]),
                "position_source": sources[sid], "position_mm": [float(v) for v in position_px[sid] * px],
                "excluded": sid in excluded, "shape": [s.shape[0], *canvas], "pyramid_levels": n_levels,
                "blocks": blocks, "block_side_px": side, "block_depth": depth, "seconds": time.perf_counter() - t0}

    run = run_slice_step(METRICS_STEP, source, out_dir, process_slice, params, progress=progress, cancel=cancel,
                         units_per_slice=units, memory_per_slice_bytes=need,
                         output_name=lambda sid: f"slice_z{sid:02d}_{STEP_FILE}.ome.zarr")
    rows = [(sid, *offsets[sid], f"{residuals[sid][0]:.4f}", f"{residuals[sid][1]:.4f}", sources[sid])
            for sid in sorted(slices)]
    if write_csv:
        _write_csv(csv_path, rows, "overwrite")
    if run.metrics:
        record = json.loads(run.metrics_path.read_text())
        record.update({
            "shifts_csv": str(shifts_csv.resolve()), "raw_steps_from": raw_origin, "slice_config": config,
            "excluded": sorted(excluded), "anchor_slice": anchor, "slice_thickness_um": thickness,
            "canvas": {"shape_yx": list(canvas), "origin_mm": list(canvas_origin_mm)},
            "steps": [asdict(p) for p in plans],
        })
        with atomic_output(run.metrics_path, "overwrite") as tmp:
            Path(tmp).write_text(json.dumps(record, indent=2, default=str))
    return CommonSpaceResult(out_dir, run.outputs, canvas, canvas_origin_mm, offsets, residuals, sources, plans,
                             csv_path, run.metrics_path, time.perf_counter() - started, run.skipped)


def _block_count(s: _Slice, offset, side: int, depth: int) -> int:
    nz, ny, nx = s.shape
    by = len(range((offset[0] // side) * side, offset[0] + ny, side))
    bx = len(range((offset[1] // side) * side, offset[1] + nx, side))
    return by * bx * math.ceil(nz / depth)


def _paint(source, writer, offset, canvas, side: int, depth: int, on_block) -> int:
    """Copy ``source`` into the canvas at ``offset`` block by block (blocks on the canvas grid)."""
    nz, ny, nx = source.shape
    oy, ox = offset
    count = 0
    for z0 in range(0, nz, depth):
        z1 = min(nz, z0 + depth)
        for y0 in range((oy // side) * side, oy + ny, side):
            y1 = min(y0 + side, canvas[0])
            for x0 in range((ox // side) * side, ox + nx, side):
                x1 = min(x0 + side, canvas[1])
                block = np.zeros((z1 - z0, y1 - y0, x1 - x0), np.float32)
                sy0, sy1 = max(y0, oy), min(y1, oy + ny)
                sx0, sx1 = max(x0, ox), min(x1, ox + nx)
                block[:, sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = source[z0:z1, sy0 - oy:sy1 - oy, sx0 - ox:sx1 - ox]
                writer.write((slice(z0, z1), slice(y0, y1), slice(x0, x1)), block)
                count += 1
                on_block()
    return count

