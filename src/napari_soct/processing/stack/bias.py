"""Step 15: bias field correction of the stacked volume with SimpleITK's N4.

Slow multiplicative intensity variations (depth attenuation left within each thick section, illumination that
drifts across sections) are modelled as a smooth field ``B``: ``observed = B * true``. N4 (Tustison et al.,
2010, as implemented in ITK) estimates ``log B`` as a B-spline that sharpens the histogram of the log
intensities.

Never the full-resolution volume in memory:

1. **Shrink while reading.** Level 0 is read block by block and each block is averaged over groups of
   ``(sz, s, s)`` voxels (``s = shrink_factor`` in y and x; ``sz`` makes the shrunk voxels about as deep as they are
   wide). Groups never straddle a section boundary, so every shrunk plane belongs to one section. The shrunk copy
   is what N4 sees; the shrink grows automatically when it would hold more than ``max_fit_voxels`` voxels or not
   fit the memory budget.
2. **Estimate** ``log B`` on the shrunk grid (``GetLogBiasFieldAsImage``) in one of three modes:

   - ``per_section``: one N4 run per thick section (``section_thickness_planes`` planes along z), since each
     physical section carries its own field and the fields jump at the cuts;
   - ``global``: one run on the whole shrunk volume (a field smooth across sections);
   - ``two_pass``: per section, then one global run on the per-section-corrected shrunk volume; the two log
     fields add up.

3. **Apply at full resolution** block by block: the shrunk log field is interpolated (trilinear, separable; a
   per-section field only between planes of the same section) to each block's voxels and the block is
   multiplied by ``exp(-strength * log B)``. ``strength = 0`` copies the input unchanged (and N4 is not run).

Outputs in ``out_dir``: ``<name>_corrected.ome.zarr`` (float32, multiscale, y/x halved per level),
``<name>_bias_field.ome.zarr`` (the applied multiplicative field ``exp(strength * log B)`` on the shrunk grid)
and ``bias_metrics.json`` (parameters, shrink factors, field range, tissue coefficient of variation before and
after on the shrunk grid, per-section and global N4 details).

Memory: the shrunk copy and N4's working images (``N4_BYTES_PER_VOXEL`` bytes per shrunk voxel, measured) must fit
half of ``memory_budget_gb``; full-resolution blocks are sized so their float32 copies fit the rest.
SimpleITK runs with ``workers`` threads (it ignores ``OMP_NUM_THREADS``). N4 cannot be interrupted inside a run:
cancelling takes effect between runs and between blocks.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from skimage.filters import threshold_otsu

from ..io.atomic import atomic_output, check_can_write
from ..io.omezarr import (
    COMPRESSION_CHOICES,
    OmeZarrImage,
    create_ome_zarr_image,
    create_ome_zarr_pyramid,
    open_ome_zarr,
    pyramid_level_count,
)
from ..memory import return_large_buffers_to_os
from ..params import param, validate_params
from ..slices import SliceRunParams
from ..progress import Progress

__all__ = ["BiasFieldParams", "BiasFieldResult", "correct_bias_field", "BIAS_MODES"]

GIB = 1024**3
BIAS_MODES = ("per_section", "global", "two_pass")
#: Resident bytes per voxel of the image N4 fits: ITK's working images and the point set of the B-spline fit
#: (peak RSS growth of about 70 B per voxel, measured on a 343k-voxel run) plus our float32 copies, with margin.
N4_BYTES_PER_VOXEL = 160
#: Bytes per full-resolution voxel while applying the field: the block read as float32, the interpolated field,
#: one interpolation temporary, the pyramid's downsampled copies and zarr's chunk buffers.
APPLY_BYTES_PER_VOXEL = 24


@dataclass
class BiasFieldParams(SliceRunParams):
    """N4 bias field correction of a stacked volume (estimated on a shrunk copy, applied at full resolution)."""

    mode: str = param("per_section", "per_section: N4 per thick section; global: one pass on the whole volume; "
                      "two_pass: per section, then global", choices=BIAS_MODES)
    strength: float = param(1.0, "Fraction of the estimated log field removed (0 = passthrough, 1 = full)", min=0.0,
                            max=1.0)
    section_thickness_planes: int = param(
        0, "Planes per thick section along z, for per_section and two_pass (0: the input's "
        "'section_thickness_planes' attribute)", min=0, unit="planes")
    shrink_factor: int = param(4, "Downsampling in y and x of the copy N4 fits (z alike in physical size)", min=1,
                               max=64)
    n_iterations: int = param(50, "N4 iterations per fitting level", min=1, max=1000)
    n_fitting_levels: int = param(3, "N4 fitting levels (each doubles the B-spline resolution)", min=1, max=8)
    control_points: int = param(4, "B-spline control points per axis at the first level (at least 4)", min=4,
                                max=32, advanced=True)
    convergence_threshold: float = param(1e-3, "N4 stops a level when the field changes less than this", min=0.0,
                                         advanced=True)
    mask: str = param("nonzero", "Voxels N4 fits: 'nonzero' (tissue and agarose; zero = outside the data) or "
                      "'otsu' (above Otsu's threshold of the shrunk copy)", choices=("nonzero", "otsu"),
                      advanced=True)
    max_fit_voxels: int = param(250_000, "The shrink grows until the copy N4 fits has at most this many voxels "
                                "(N4 costs about 10 us per voxel and iteration)", min=1000, advanced=True)
    compression: str = param("blosc-lz4", "Compression of the output", choices=COMPRESSION_CHOICES, advanced=True)
    workers: int = param(2, "Threads SimpleITK uses", min=1, max=256, advanced=True)


@dataclass
class BiasFieldResult:
    """Outputs of :func:`correct_bias_field`.

    Attributes
    ----------
    path : Path
        The corrected volume ``<name>_corrected.ome.zarr``.
    field_path : Path or None
        The applied multiplicative field on the shrunk grid (None when ``strength == 0``).
    metrics_path : Path
    mode : str
    shrink_factors : tuple of int
        ``(z, y, x)`` shrink of the grid N4 fitted.
    field_range : tuple of float
        Smallest and largest applied multiplicative field (``exp(strength * log B)``) over the fitted voxels.
    report : dict
        Everything written to the metrics file.
    """

    path: Path
    field_path: Path | None
    metrics_path: Path
    mode: str
    shrink_factors: tuple[int, int, int] = (1, 1, 1)
    field_range: tuple[float, float] = (1.0, 1.0)
    seconds: float = 0.0
    skipped: bool = False
    report: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------- blocks and shrinking
def plan_block(shape, unit, max_voxels: int) -> tuple[int, ...] | None:
    """Largest block made of whole ``unit`` s per axis (or the full extent) with at most ``max_voxels`` voxels.

    The block grows along x first, then y, then z (rows of a C-ordered array stay contiguous). None when even
    one unit does not fit.
    """
    block = [min(u, n) for u, n in zip(unit, shape)]
    if math.prod(block) > max_voxels:
        return None
    for axis in range(len(shape) - 1, -1, -1):
        other = math.prod(block) // block[axis]
        units = max_voxels // (other * unit[axis])
        block[axis] = min(shape[axis], max(block[axis], units * unit[axis]))
        if block[axis] < shape[axis]:
            break
    return tuple(block)


def iter_regions(shape, block, z_ranges=None):
    """Regions (tuples of slices) covering ``shape`` in blocks; z blocks restart at each of ``z_ranges``."""
    for z0, z1 in z_ranges or [(0, shape[0])]:
        for zs in range(z0, z1, block[0]):
            for ys in range(0, shape[1], block[1]):
                for xs in range(0, shape[2], block[2]):
                    yield (slice(zs, min(zs + block[0], z1)), slice(ys, min(ys + block[1], shape[1])),
                           slice(xs, min(xs + block[2], shape[2])))


def _group_sums(block: np.ndarray, factors) -> np.ndarray:
    """Sums over consecutive groups of ``factors`` voxels per axis (a short last group where it does not divide)."""
    out = block
    for axis, f in enumerate(factors):
        if f > 1:
            out = np.add.reduceat(out, np.arange(0, out.shape[axis], f), axis=axis, dtype=np.float64)
    return out.astype(np.float64, copy=False)


def _groups(start: int, stop: int, factor: int) -> list[tuple[int, int]]:
    return [(a, min(a + factor, stop)) for a in range(start, stop, factor)]


@dataclass
class ShrunkGrid:
    """Where each shrunk voxel comes from: groups of full-resolution planes, rows and columns.

    ``z_groups`` never straddle a section boundary; ``plane_section[i]`` is the section of shrunk plane ``i``.
    """

    shape: tuple[int, int, int]
    factors: tuple[int, int, int]
    sections: list[tuple[int, int]]
    z_groups: list[tuple[int, int]]
    y_groups: list[tuple[int, int]]
    x_groups: list[tuple[int, int]]
    plane_section: np.ndarray

    @classmethod
    def build(cls, shape, factors, sections) -> ShrunkGrid:
        z_groups, owner = [], []
        for k, (z0, z1) in enumerate(sections):
            groups = _groups(z0, z1, factors[0])
            z_groups += groups
            owner += [k] * len(groups)
        return cls(tuple(shape), tuple(factors), list(sections), z_groups, _groups(0, shape[1], factors[1]),
                   _groups(0, shape[2], factors[2]), np.array(owner))

    @property
    def shrunk_shape(self) -> tuple[int, int, int]:
        return len(self.z_groups), len(self.y_groups), len(self.x_groups)

    def section_planes(self, k: int) -> np.ndarray:
        """Indices of the shrunk planes of section ``k``."""
        return np.flatnonzero(self.plane_section == k)

    @staticmethod
    def centres(groups) -> np.ndarray:
        return np.array([(a + b - 1) / 2 for a, b in groups])


def _linear_weights(coords: np.ndarray, centres: np.ndarray, indices: np.ndarray):
    """Neighbouring samples and weight for linear interpolation at ``coords`` of samples at ``centres``.

    Outside the first/last centre the end sample is repeated (the field is extended flat).
    """
    pos = np.interp(coords, centres, indices.astype(np.float64))
    i0 = np.floor(pos).astype(np.intp)
    i1 = np.minimum(i0 + 1, indices[-1])
    return i0, i1, (pos - i0).astype(np.float32)


class FieldInterpolator:
    """Trilinear interpolation of a shrunk-grid log field at full-resolution voxels, separably per axis.

    With ``by_section`` the z interpolation only mixes planes of one section (the field of a section ends at
    its cut); otherwise it runs across sections.
    """

    def __init__(self, field_: np.ndarray, grid: ShrunkGrid, by_section: bool):
        self.field = field_.astype(np.float32, copy=False)
        nz = grid.shape[0]
        zc = grid.centres(grid.z_groups)
        if by_section:
            i0, i1, w = np.zeros(nz, np.intp), np.zeros(nz, np.intp), np.zeros(nz, np.float32)
            for k, (z0, z1) in enumerate(grid.sections):
                planes = grid.section_planes(k)
                sl = slice(z0, z1)
                i0[sl], i1[sl], w[sl] = _linear_weights(np.arange(z0, z1), zc[planes], planes)
            self.z = (i0, i1, w)
        else:
            self.z = _linear_weights(np.arange(nz), zc, np.arange(len(zc)))
        self.y = _linear_weights(np.arange(grid.shape[1]), grid.centres(grid.y_groups), np.arange(len(grid.y_groups)))
        self.x = _linear_weights(np.arange(grid.shape[2]), grid.centres(grid.x_groups), np.arange(len(grid.x_groups)))

    def __call__(self, region) -> np.ndarray:
        """The field at the voxels of ``region`` (tuple of 3 slices), float32."""
        (z0, z1, w_z), (y0, y1, w_y), (x0, x1, w_x) = (
            tuple(a[r] for a in axis) for axis, r in zip((self.z, self.y, self.x), region))
        ylo, yhi, xlo, xhi = y0.min(), y1.max() + 1, x0.min(), x1.max() + 1
        sub = self.field[:, ylo:yhi, xlo:xhi]
        a = sub[z0] * (1 - w_z)[:, None, None] + sub[z1] * w_z[:, None, None]
        a = a[:, y0 - ylo] * (1 - w_y)[None, :, None] + a[:, y1 - ylo] * w_y[None, :, None]
        out = a[:, :, x0 - xlo]
        out *= 1 - w_x
        tmp = a[:, :, x1 - xlo]
        tmp *= w_x
        out += tmp
        return out


# ------------------------------------------------------------------------------------------------------ N4
def _n4_log_field(volume: np.ndarray, mask: np.ndarray, spacing_zyx, params: BiasFieldParams) -> tuple[np.ndarray,
                                                                                                       dict]:
    """Run N4 on a (shrunk) volume and return its log bias field on the same grid, and run details.

    A volume one plane deep is fitted as a 2D image (the field is then constant along z).
    """
    flat = volume.shape[0] == 1
    arr, msk, spacing = (volume[0], mask[0], spacing_zyx[1:]) if flat else (volume, mask, spacing_zyx)
    if int(msk.sum()) < 2 ** arr.ndim * 4:
        # Too few voxels to fit a field: leave this part uncorrected and say so.
        return np.zeros(volume.shape, np.float32), {"fitted": False, "reason": "too few voxels in the mask"}
    image = sitk.GetImageFromArray(np.ascontiguousarray(arr, dtype=np.float32))
    image.SetSpacing([float(s) for s in spacing[::-1]])
    mask_image = sitk.GetImageFromArray(np.ascontiguousarray(msk, dtype=np.uint8))
    mask_image.CopyInformation(image)
    n4 = sitk.N4BiasFieldCorrectionImageFilter()
    n4.SetNumberOfThreads(params.workers)
    n4.SetMaximumNumberOfIterations([params.n_iterations] * params.n_fitting_levels)
    n4.SetNumberOfControlPoints([params.control_points] * arr.ndim)
    n4.SetConvergenceThreshold(params.convergence_threshold)
    n4.Execute(image, mask_image)
    log_field = sitk.GetArrayFromImage(n4.GetLogBiasFieldAsImage(image)).astype(np.float32)
    info = {"fitted": True, "last_level_iterations": int(n4.GetElapsedIterations()),
            "last_convergence": float(n4.GetCurrentConvergenceMeasurement()), "dimensions": arr.ndim}
    return log_field.reshape(volume.shape), info


def _field_stats(log_field: np.ndarray, mask: np.ndarray) -> dict:
    values = log_field[mask] if mask.any() else log_field.ravel()
    return {"log_min": float(values.min()), "log_max": float(values.max()), "log_std": float(values.std()),
            "factor_min": float(np.exp(values.min())), "factor_max": float(np.exp(values.max()))}


def _coefficient_of_variation(values: np.ndarray) -> float:
    mean = float(values.mean()) if values.size else 0.0
    return float(values.std() / mean) if mean > 0 else 0.0


# ------------------------------------------------------------------------------------------------------ step
def _volume_name(path: Path) -> str:
    name = path.name
    for suffix in (".ome.zarr", ".zarr"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def open_volume(path, what: str = "volume") -> OmeZarrImage:
    """Open a 3D ``(z, y, x)`` OME-Zarr volume, with errors naming the path."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} {path}: no such file or folder")
    try:
        image = open_ome_zarr(path)
    except ValueError as err:
        raise ValueError(f"{what} {path}: not an OME-Zarr image ({err})") from None
    if image.levels[0].ndim != 3:
        raise ValueError(f"{what} {path}: a volume is 3D (z, y, x), this image has shape {image.shape}")
    return image


def _sections(nz: int, params: BiasFieldParams, image: OmeZarrImage) -> list[tuple[int, int]]:
    if params.mode == "global":
        return [(0, nz)]
    thickness = params.section_thickness_planes or int(image.attributes.get("section_thickness_planes", 0) or 0)
    if thickness <= 0:
        raise ValueError(
            f"parameter 'section_thickness_planes': mode {params.mode!r} needs the section thickness in planes "
            f"(the input {image.path.name} has no 'section_thickness_planes' attribute); give it, or use "
            "mode='global'")
    return [(z0, min(z0 + thickness, nz)) for z0 in range(0, nz, thickness)]


def _shrink_factors(shape, scale, sections, params: BiasFieldParams, budget: int) -> tuple[int, int, int]:
    """``(sz, s, s)``: the requested shrink, grown until the copy fits ``max_fit_voxels`` and the budget."""
    thickness = sections[0][1] - sections[0][0]  # the nominal thickness (the last section may be shorter)
    s = params.shrink_factor
    while True:
        sz = max(1, round(s * scale[1] / scale[0]))
        if len(sections) > 1:
            sz = min(sz, max(1, thickness // 2))  # keep at least two shrunk planes per full section
        n = sum(-(-(b - a) // sz) for a, b in sections) * -(-shape[1] // s) * -(-shape[2] // s)
        if (n <= params.max_fit_voxels and n * N4_BYTES_PER_VOXEL <= budget // 2) or s >= max(shape[1:]):
            break
        s += 1
    if n * N4_BYTES_PER_VOXEL > budget // 2:
        raise MemoryError(f"parameter 'memory_budget_gb': {params.memory_budget_gb} GiB cannot hold N4's fit even "
                          f"at the coarsest shrink ({n} voxels)")
    return sz, s, s


def _read_block(grid: ShrunkGrid, dtype, budget: int) -> tuple[int, int, int]:
    """Blocks of the shrinking read: whole groups, a quarter of the budget (the block as read, as float32, and
    the float64 partial sums after the first reduction)."""
    per_voxel = 4 + np.dtype(dtype).itemsize + 16 / grid.factors[0]
    block = plan_block(grid.shape, grid.factors, int(budget / 4 / per_voxel))
    if block is None:
        raise MemoryError("parameter 'memory_budget_gb': too small to read one group of voxels of the volume")
    return block


def _read_shrunk(data, grid: ShrunkGrid, budget: int, tracker: Progress) -> np.ndarray:
    """Block means of level 0 over the grid's groups, read block by block (blocks aligned to the groups)."""
    _, fy, fx = grid.factors
    block = _read_block(grid, data.dtype, budget)
    out = np.zeros(grid.shrunk_shape, np.float32)
    z_index = {a: i for i, (a, _) in enumerate(grid.z_groups)}
    for region in iter_regions(grid.shape, block, grid.sections):
        values = np.asarray(data[region], dtype=np.float32)
        sums = _group_sums(values, grid.factors)
        counts = [np.diff(np.append(np.arange(0, n, f), n)) for n, f in zip(values.shape, grid.factors)]
        means = sums / (counts[0][:, None, None] * counts[1][None, :, None] * counts[2][None, None, :])
        iz, iy, ix = z_index[region[0].start], region[1].start // fy, region[2].start // fx
        out[iz:iz + means.shape[0], iy:iy + means.shape[1], ix:ix + means.shape[2]] = means
        tracker.advance(1, "bias: reading a shrunk copy")
    return out


def _fit_mask(shrunk: np.ndarray, params: BiasFieldParams) -> tuple[np.ndarray, float]:
    positive = shrunk > 0
    if not positive.any():
        raise ValueError("bias: the volume has no positive voxels; nothing to correct")
    if params.mask == "otsu":
        values = shrunk[positive]
        threshold = float(threshold_otsu(values)) if np.ptp(values) > 0 else 0.0
        return shrunk > threshold, threshold
    return positive, 0.0


def _estimate(shrunk, mask, grid: ShrunkGrid, spacing, params: BiasFieldParams, tracker: Progress):
    """Log fields ``[(field, by_section)]`` on the shrunk grid and the per-mode details."""
    details: dict = {}
    fields = []
    current = shrunk
    if params.mode in ("per_section", "two_pass"):
        per_section = np.zeros_like(shrunk)
        rows = []
        for k, (z0, z1) in enumerate(grid.sections):
            planes = grid.section_planes(k)
            sl = slice(planes[0], planes[-1] + 1)
            log_field, info = _n4_log_field(shrunk[sl], mask[sl], spacing, params)
            per_section[sl] = log_field
            rows.append({"section": k, "z_planes": [z0, z1], "shrunk_planes": len(planes), **info,
                         **_field_stats(log_field, mask[sl])})
            tracker.advance(1, f"bias: N4 on section {k + 1}/{len(grid.sections)}")
        fields.append((per_section, True))
        details["sections"] = rows
        current = shrunk * np.exp(-per_section)
    if params.mode in ("global", "two_pass"):
        log_field, info = _n4_log_field(current, mask, spacing, params)
        fields.append((log_field, False))
        details["global"] = {**info, **_field_stats(log_field, mask)}
        tracker.advance(1, "bias: N4 on the whole volume")
    return fields, details


def correct_bias_field(volume_path, out_dir, params: BiasFieldParams | None = None, *, progress=None,
                       cancel=None) -> BiasFieldResult:
    """Step 15: remove a smooth multiplicative bias field from a stacked volume with N4 (see the module notes).

    Parameters
    ----------
    volume_path : path-like
        The stacked volume, an OME-Zarr ``(z, y, x)`` (level 0 is corrected).
    out_dir : path-like
        Folder for ``<name>_corrected.ome.zarr``, ``<name>_bias_field.ome.zarr`` and ``bias_metrics.json``.
    params : BiasFieldParams, optional
    progress : callable, optional
        ``progress(done, total, message)``.
    cancel : object with ``is_set()``, optional
        Checked between blocks and N4 runs; outputs are then removed.

    Returns
    -------
    BiasFieldResult
    """
    start = time.perf_counter()
    params = params or BiasFieldParams()
    validate_params(params)
    return_large_buffers_to_os()
    volume_path, out_dir = Path(volume_path), Path(out_dir)
    image = open_volume(volume_path)
    name = _volume_name(volume_path)
    out_path = out_dir / f"{name}_corrected.ome.zarr"
    field_path = out_dir / f"{name}_bias_field.ome.zarr"
    metrics_path = out_dir / "bias_metrics.json"
    if not check_can_write(out_path, params.if_exists):
        return BiasFieldResult(out_path, field_path if field_path.exists() else None, metrics_path, params.mode,
                               skipped=True, seconds=time.perf_counter() - start)
    data = image.levels[0]
    shape, scale = tuple(data.shape), tuple(image.scales_mm[0])
    budget = int(params.memory_budget_gb * GIB)
    passthrough = params.strength == 0

    # Output geometry and the full-resolution blocks (aligned to the pyramid and to the output chunks).
    n_levels = pyramid_level_count(shape[1:])
    align = 2 ** (n_levels - 1)
    apply_budget = budget // 2 if not passthrough else budget
    # Output chunks small enough that a partly written chunk (read, updated, rewritten) stays well in budget.
    cy, cx = min(shape[1], 256), min(shape[2], 256)
    chunks = (max(1, min(shape[0], 32, apply_budget // (16 * 4 * cy * cx))), cy, cx)
    unit = (chunks[0], math.lcm(chunks[1], align), math.lcm(chunks[2], align))
    block = plan_block(shape, unit, apply_budget // (APPLY_BYTES_PER_VOXEL + np.dtype(data.dtype).itemsize))
    if block is None:
        block = plan_block(shape, (1, align, align), apply_budget // (APPLY_BYTES_PER_VOXEL + 4))
    if block is None:
        raise MemoryError(f"parameter 'memory_budget_gb': {params.memory_budget_gb} GiB cannot hold one "
                          f"{align}x{align} block of the volume")

    grid = None
    if not passthrough:
        sections = _sections(shape[0], params, image)
        factors = _shrink_factors(shape, scale, sections, params, budget)
        grid = ShrunkGrid.build(shape, factors, sections)
    # Progress units: shrunk-copy blocks, N4 runs, full-resolution blocks.
    n_apply = sum(1 for _ in iter_regions(shape, block))
    n_read = sum(1 for _ in iter_regions(shape, _read_block(grid, data.dtype, budget), grid.sections)) if grid else 0
    n_runs = 0 if passthrough else {"per_section": len(grid.sections), "global": 1,
                                    "two_pass": len(grid.sections) + 1}[params.mode]
    tracker = Progress(n_read + n_runs + n_apply, progress, cancel)
    tracker.check()

    report: dict = {"input": str(volume_path), "output": str(out_path), "params": asdict(params),
                    "shape": list(shape), "scale_mm": list(scale), "passthrough": passthrough}
    interpolators, field_range = [], (1.0, 1.0)
    if grid is not None:
        t0 = time.perf_counter()
        shrunk = _read_shrunk(data, grid, budget, tracker)
        mask, threshold = _fit_mask(shrunk, params)
        spacing = tuple(f * s for f, s in zip(grid.factors, scale))
        t1 = time.perf_counter()
        fields, details = _estimate(shrunk, mask, grid, spacing, params, tracker)
        t2 = time.perf_counter()
        total_log = sum(f for f, _ in fields)
        applied = np.exp(params.strength * total_log).astype(np.float32)
        corrected = shrunk / applied
        values = applied[mask]
        field_range = (float(values.min()), float(values.max()))
        report.update({
            "shrink_factors": list(grid.factors), "shrunk_shape": list(grid.shrunk_shape),
            "sections": [list(s) for s in grid.sections], "mask": params.mask, "mask_threshold": threshold,
            "fitted_fraction": float(mask.mean()), "field_range": list(field_range),
            "applied_log_field": _field_stats(params.strength * total_log, mask),
            "tissue_cv_before": _coefficient_of_variation(shrunk[mask]),
            "tissue_cv_after": _coefficient_of_variation(corrected[mask]),
            "mode_details": details, "seconds_shrink": t1 - t0, "seconds_n4": t2 - t1,
        })
        interpolators = [FieldInterpolator(f, grid, by_section) for f, by_section in fields]
        del shrunk, corrected

    t3 = time.perf_counter()
    with atomic_output(out_path, "overwrite" if params.if_exists == "overwrite" else "error") as tmp:
        writer = create_ome_zarr_pyramid(
            tmp, shape, scale, chunks=chunks, n_levels=n_levels, compression=params.compression,
            name=f"{name}_corrected",
            attributes={**image.attributes, "soct_bias": {"mode": params.mode, "strength": params.strength,
                                                          "passthrough": passthrough}})
        for region in iter_regions(shape, block):
            values = np.asarray(data[region], dtype=np.float32)
            if interpolators:
                log_field = interpolators[0](region)
                for extra in interpolators[1:]:
                    log_field += extra(region)
                log_field *= -params.strength
                np.exp(log_field, out=log_field)
                values *= log_field
                del log_field
            writer.write(region, values)
            tracker.advance(1, "bias: applying the field")
        if grid is not None:
            with atomic_output(field_path, "overwrite") as field_tmp:
                arr = create_ome_zarr_image(field_tmp, applied.shape, spacing, chunks=applied.shape,
                                            name=f"{name}_bias_field", compression=params.compression)
                arr[...] = applied
    report["seconds_apply"] = time.perf_counter() - t3
    report["seconds"] = time.perf_counter() - start
    report["n_levels"] = n_levels
    report["block"] = list(block)
    with atomic_output(metrics_path, "overwrite") as tmp:
        Path(tmp).write_text(json.dumps(report, indent=2, default=str))
    return BiasFieldResult(out_path, field_path if grid is not None else None, metrics_path, params.mode,
                           tuple(grid.factors) if grid else (1, 1, 1), field_range, report["seconds"], False, report)
