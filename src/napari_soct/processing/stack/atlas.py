"""Step 16: atlas / RAS alignment of the reconstructed volume.

The stacked volume has whatever orientation the sample was mounted in. It is first **reoriented** from its
3-letter orientation code to the template's (an axis permutation and flips, exact, no resampling), then
**registered rigidly** (Euler3D: rotation + translation) to an atlas template with SimpleITK: moments
initialisation (centres of mass), then regular-step gradient descent on normalised correlation (or Mattes mutual
information) over a multi-resolution pyramid. The volume is finally **resampled into the template's frame** at the
voxel size of every pyramid level of the input, block by block.

Orientation codes
-----------------
Three letters, one from each pair R/L, A/P, S/I, for the axes x, y, z of the image in SimpleITK's index order,
which are the numpy axes 2, 1, 0 of a ``(z, y, x)`` array. Each letter names the direction in which that index
*increases* ("RAS": x increases towards the right, y towards anterior, z towards superior). This is the
convention of nibabel's axis codes and of SimpleITK's ``DICOMOrient``; in it the Allen CCF
``average_template_25.nrrd`` read by SimpleITK is "PIR".

Frames
------
- Template frame: template voxel ``i`` (per axis, numpy order) at ``i * spacing``, origin 0; the template file's
  own origin and direction cosines are not used (its orientation is ``template_orientation``).
- Reoriented subject frame: the input's level 0 permuted and flipped; voxel ``r`` of level ``k`` lies at
  ``r * s_k`` along an unflipped axis and at ``L - (n_k - 1 - r) * s_k`` along a flipped one, where
  ``L = (n_0 - 1) * s_0`` is the extent of level 0, so all levels share one frame.
- The transform (``.tfm``, ITK convention) maps template-frame points to reoriented-subject points. The metrics
  also hold ``template_to_input_xyz``: the 4x4 matrix from template-frame points to points of the input volume
  as stored (x, y, z in millimetres, voxel ``i`` at ``i * scale``).

Outputs in ``out_dir``: ``<name>_ras.ome.zarr`` (level ``k`` = the template's field of view sampled at the voxel size
of input level ``k``, float32, trilinear), ``<name>_ras_transform.tfm``, ``<name>_ras_preview.png`` (three
orthogonal planes through the template centre, template in magenta, aligned subject in green) and
``atlas_metrics.json``.

Memory bound: the registration holds the chosen input level and the template in memory, about
``REGISTRATION_BYTES_PER_VOXEL`` bytes per voxel of each (numpy copies, SimpleITK images, the registration's
shrunk and smoothed pyramids); a level that does not fit ``memory_budget_gb`` is refused (or, with ``level = -1``,
a coarser one is chosen). Resampling streams: each output block reads only the bounding box of its preimage
in the input level.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import SimpleITK as sitk
import zarr
from scipy.ndimage import zoom

from ..io.atomic import atomic_output, check_can_write
from ..io.images import open_image
from ..io.omezarr import COMPRESSION_CHOICES, compressors_for, create_ome_zarr_image, is_ome_zarr
from ..memory import return_large_buffers_to_os
from ..params import param, validate_params
from ..slices import SliceRunParams
from ..preprocess.previews import to_uint8
from ..progress import Progress
from .bias import open_volume, plan_block

__all__ = [
    "AtlasParams",
    "AtlasResult",
    "align_to_atlas",
    "parse_orientation",
    "orientation_transform",
    "reorient",
    "ReorientedVolume",
    "read_template",
    "resample_to_grid",
]

GIB = 1024**3
#: Bytes per voxel of the registered level and of the template during registration: float32 numpy copies,
#: float32 SimpleITK images, the shrunk and smoothed images of the multi-resolution pyramid, resampled preview.
REGISTRATION_BYTES_PER_VOXEL = 24
#: Bytes per output voxel while resampling a block, before accounting for the preimage's bounding box.
RESAMPLE_BYTES_PER_VOXEL = 12

_LETTERS = {"R": (0, 1), "L": (0, -1), "A": (1, 1), "P": (1, -1), "S": (2, 1), "I": (2, -1)}
#: Unit vector of each letter in SimpleITK's LPS world (x to the left, y posterior, z superior).
_LPS_VECTOR = {"L": (1, 0, 0), "R": (-1, 0, 0), "P": (0, 1, 0), "A": (0, -1, 0), "S": (0, 0, 1), "I": (0, 0, -1)}


# ---------------------------------------------------------------------------------------- orientation codes
def parse_orientation(code: str, name: str = "orientation") -> str:
    """Validate a 3-letter orientation code (see the module notes); returns it in capitals.

    Raises
    ------
    ValueError
        Naming ``name`` when the code is not three letters, one from each pair R/L, A/P, S/I.
    """
    text = str(code).strip().upper()
    if len(text) != 3 or any(c not in _LETTERS for c in text):
        raise ValueError(f"parameter '{name}': {code!r} is not a 3-letter orientation code of R/L, A/P, S/I "
                         "(e.g. 'RAS', 'LPI', 'PIR')")
    if sorted(_LETTERS[c][0] for c in text) != [0, 1, 2]:
        raise ValueError(f"parameter '{name}': {code!r} names one anatomical axis twice; use one letter of each "
                         "pair R/L, A/P, S/I")
    return text


def orientation_transform(source: str, target: str) -> tuple[tuple[int, int, int], tuple[bool, bool, bool]]:
    """Axis permutation and flips that take a ``(z, y, x)`` array from orientation ``source`` to ``target``.

    Returns
    -------
    perm : tuple of int
        Output numpy axis ``a`` is input numpy axis ``perm[a]``.
    flips : tuple of bool
        Output axis ``a`` is reversed.
    """
    source, target = parse_orientation(source, "source orientation"), parse_orientation(target, "target orientation")
    perm, flips = [], []
    for a in range(3):
        anatomy, sign = _LETTERS[target[2 - a]]  # numpy axis a is index axis 2 - a
        j = next(i for i, c in enumerate(source) if _LETTERS[c][0] == anatomy)
        perm.append(2 - j)
        flips.append(_LETTERS[source[j]][1] != sign)
    return tuple(perm), tuple(flips)


def reorient(array, source: str, target: str) -> np.ndarray:
    """``array`` ``(z, y, x)`` in orientation ``source`` as seen in orientation ``target`` (a view when possible)."""
    perm, flips = orientation_transform(source, target)
    out = np.transpose(np.asarray(array), perm)
    return np.flip(out, [a for a in range(3) if flips[a]]) if any(flips) else out


def direction_for(code: str) -> tuple[float, ...]:
    """SimpleITK direction cosines (row-major) of an image whose axes follow ``code`` in the LPS world."""
    columns = [_LPS_VECTOR[c] for c in parse_orientation(code)]
    return tuple(float(columns[j][i]) for i in range(3) for j in range(3))


# ----------------------------------------------------------------------------------------------- template
def _spacing_to_mm(spacing, voxel_um: float, known_mm: bool, path) -> tuple[float, ...]:
    if voxel_um > 0:
        return (voxel_um * 1e-3,) * 3
    if known_mm:
        return tuple(float(s) for s in spacing)
    if all(s == 1.0 for s in spacing):
        raise ValueError(f"template {path}: the file gives no voxel size; set parameter 'template_voxel_um'")
    # Lab rule for unit-less files: values below 1 are millimetres, otherwise micrometres (NRRD atlases: 25).
    return tuple(float(s) if spacing[-1] < 1 else float(s) * 1e-3 for s in spacing)


def read_template(path, voxel_um: float = 0.0) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Read an atlas template fully: ``(array (z, y, x) float32, spacing_mm (z, y, x))``.

    OME-Zarr (level 0, scales in mm), plain zarr, TIFF and ``.npy`` go through our readers; any other file
    (NRRD, NIfTI, MetaImage...) through SimpleITK. ``voxel_um > 0`` overrides the file's voxel size.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"template {path}: no such file or folder")
    if path.is_dir() or path.suffix.lower() in (".tif", ".tiff", ".btf", ".npy"):
        image = open_image(path)
        if image.ndim != 3:
            raise ValueError(f"template {path}: a template is 3D (z, y, x), this one has shape {image.shape}")
        known = path.is_dir() and is_ome_zarr(path)
        spacing = _spacing_to_mm(image.scale, voxel_um, known, path)
        return np.asarray(image.data, dtype=np.float32), spacing
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as err:
        raise ValueError(f"template {path}: SimpleITK cannot read it ({str(err).strip().splitlines()[-1]})") from None
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(f"template {path}: a template is a 3D scalar image, this one has "
                         f"{image.GetDimension()} dimensions and {image.GetNumberOfComponentsPerPixel()} components")
    spacing = _spacing_to_mm(tuple(image.GetSpacing())[::-1], voxel_um, False, path)
    return sitk.GetArrayFromImage(image).astype(np.float32, copy=False), spacing


# ---------------------------------------------------------------------------------------------- parameters
@dataclass
class AtlasParams(SliceRunParams):
    """Reorientation and rigid registration of the volume to an atlas template."""

    input_orientation: str = param("RAS", "Orientation code of the volume: for its x, y, z axes (numpy axes 2, 1, "
                                   "0), the direction each index increases towards (e.g. RAS, LPI, PIR)")
    template_orientation: str = param("RAS", "Orientation code of the template array, same convention (the Allen "
                                      "CCF NRRD read by SimpleITK is PIR)")
    template_voxel_um: float = param(0.0, "Template voxel size; 0 = from the file (unit-less values >= 1 are "
                                     "micrometres, below 1 millimetres)", min=0.0, unit="um")
    level: int = param(-1, "Pyramid level of the volume registered (-1: the one nearest the template's voxel size "
                       "that fits the memory budget)", min=-1)
    metric: str = param("correlation", "Similarity: normalised correlation, or Mattes mutual information for "
                        "different contrasts", choices=("correlation", "mattes"))
    max_iterations: int = param(200, "Optimizer iterations per resolution", min=1, max=10000)
    n_resolutions: int = param(3, "Registration pyramid levels (shrink 2^(n-1) ... 1)", min=1, max=6, advanced=True)
    sampling_fraction: float = param(0.25, "Fraction of template voxels sampled by the metric", min=0.001, max=1.0,
                                     advanced=True)
    step_voxels: float = param(2.0, "Initial optimizer step, as the largest shift of a voxel in template voxels "
                               "(halved whenever the direction reverses)", min=1e-3, advanced=True)
    compression: str = param("blosc-lz4", "Compression of the output", choices=COMPRESSION_CHOICES, advanced=True)
    workers: int = param(2, "Threads SimpleITK uses", min=1, max=256, advanced=True)


@dataclass
class AtlasResult:
    """Outputs of :func:`align_to_atlas`.

    Attributes
    ----------
    path : Path
        ``<name>_ras.ome.zarr``, the volume in the template frame at every input pyramid level.
    transform_path, preview_path, metrics_path : Path
    rotation_deg : tuple of float
        Euler angles (about x, y, z) of the registered transform, degrees.
    translation_mm : tuple of float
        Its translation (x, y, z), millimetres.
    ncc : float
        Normalised correlation of the aligned volume with the template (template grid, registered level).
    """

    path: Path
    transform_path: Path
    preview_path: Path
    metrics_path: Path
    rotation_deg: tuple[float, float, float] = (0.0, 0.0, 0.0)
    translation_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    ncc: float = float("nan")
    level: int = 0
    seconds: float = 0.0
    skipped: bool = False
    report: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------- geometry
@dataclass
class ReorientedVolume:
    """The input volume's levels seen in the template orientation (see "Frames" in the module notes)."""

    perm: tuple[int, int, int]
    flips: tuple[bool, bool, bool]
    shapes: list[tuple[int, int, int]]  # input level shapes, input axes
    scales: list[tuple[float, float, float]]  # input level voxel sizes (mm), input axes

    def shape(self, k: int) -> tuple[int, ...]:
        return tuple(self.shapes[k][p] for p in self.perm)

    def scale(self, k: int) -> tuple[float, ...]:
        return tuple(self.scales[k][p] for p in self.perm)

    def origin(self, k: int) -> tuple[float, ...]:
        """Physical position (numpy order) of voxel 0 of reoriented level ``k``."""
        out = []
        for a, p in enumerate(self.perm):
            extent = (self.shapes[0][p] - 1) * self.scales[0][p]
            out.append(extent - (self.shapes[k][p] - 1) * self.scales[k][p] if self.flips[a] else 0.0)
        return tuple(out)

    def read(self, level_array, k: int, box) -> np.ndarray:
        """Reoriented voxels ``box`` (tuple of (start, stop), numpy order of the reoriented level) of level ``k``."""
        n = self.shapes[k]
        region = [None] * 3
        for a, p in enumerate(self.perm):
            lo, hi = box[a]
            region[p] = slice(n[p] - hi, n[p] - lo) if self.flips[a] else slice(lo, hi)
        block = np.asarray(level_array[tuple(region)], dtype=np.float32)
        block = np.transpose(block, self.perm)
        return np.flip(block, [a for a in range(3) if self.flips[a]]) if any(self.flips) else block

    def to_input_matrix(self) -> np.ndarray:
        """4x4 (x, y, z) matrix from reoriented-frame points to input-volume points (voxel i at i * scale)."""
        m = np.zeros((4, 4))
        m[3, 3] = 1
        for a, p in enumerate(self.perm):
            row, col = 2 - p, 2 - a  # xyz index of the input axis p and of the reoriented axis a
            if self.flips[a]:
                m[row, col] = -1
                m[row, 3] = (self.shapes[0][p] - 1) * self.scales[0][p]
            else:
                m[row, col] = 1
        return m


def _sitk_image(array: np.ndarray, spacing_zyx, origin_zyx=(0.0, 0.0, 0.0)) -> sitk.Image:
    image = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.float32))
    image.SetSpacing([float(s) for s in spacing_zyx[::-1]])
    image.SetOrigin([float(o) for o in origin_zyx[::-1]])
    return image


def _affine_parts(transform: sitk.Transform) -> tuple[np.ndarray, np.ndarray]:
    """``(A, b)`` with ``T(p) = A p + b`` (xyz) of an affine-like SimpleITK transform."""
    origin = transform.TransformPoint((0.0, 0.0, 0.0))
    columns = [np.subtract(transform.TransformPoint(tuple(e)), origin) for e in np.eye(3)]
    return np.column_stack(columns), np.asarray(origin)


def _bbox_growth(transform: sitk.Transform) -> float:
    """How much bigger than a block the bounding box of its preimage is, at most (volume ratio)."""
    a, _ = _affine_parts(transform)
    return float(np.prod(np.abs(a).sum(axis=1)))


def resample_to_grid(level_array, geometry: ReorientedVolume, k: int, transform: sitk.Transform, out_shape,
                     out_spacing, write, *, max_block_voxels: int, workers: int = 1, tracker: Progress | None = None,
                     chunk: int = 64) -> int:
    """Resample reoriented level ``k`` onto a grid (voxel ``i`` at ``i * out_spacing``) through ``transform``.

    Works block by block: for each output block the preimage's bounding box is read from ``level_array`` (the
    input level as stored), reoriented, and resampled trilinearly by SimpleITK; ``write(region, block)`` receives
    each block. Blocks whose preimage misses the volume are not written (they stay at the fill value 0).
    ``max_block_voxels`` bounds the output voxels of a block; the caller counts the preimage box in it (see
    :func:`_per_voxel`).

    Returns
    -------
    int
        Number of blocks written.
    """
    in_shape, in_spacing, in_origin = geometry.shape(k), np.asarray(geometry.scale(k)), np.asarray(geometry.origin(k))
    out_spacing = np.asarray(out_spacing, float)
    block = _block_shape(out_shape, max_block_voxels, chunk)
    resampler = sitk.ResampleImageFilter()
    resampler.SetNumberOfThreads(workers)
    resampler.SetInterpolator(sitk.sitkLinear)
    resampler.SetTransform(transform)
    resampler.SetDefaultPixelValue(0.0)
    resampler.SetOutputPixelType(sitk.sitkFloat32)
    resampler.SetOutputSpacing([float(s) for s in out_spacing[::-1]])
    written = 0
    for zs in range(0, out_shape[0], block[0]):
        for ys in range(0, out_shape[1], block[1]):
            for xs in range(0, out_shape[2], block[2]):
                starts = (zs, ys, xs)
                stops = tuple(min(s + b, n) for s, b, n in zip(starts, block, out_shape))
                # The preimage of a box under an affine map lies in the bounding box of its corners' images.
                corners = np.array(list(itertools.product(*[(s, e - 1) for s, e in zip(starts, stops)]))) * out_spacing
                moved = np.array([transform.TransformPoint(tuple(map(float, p[::-1]))) for p in corners])[:, ::-1]
                index = (moved - in_origin) / in_spacing
                lo = np.maximum(np.floor(index.min(axis=0)).astype(int) - 1, 0)
                hi = np.minimum(np.ceil(index.max(axis=0)).astype(int) + 2, in_shape)
                if tracker is not None:
                    tracker.advance(1, f"atlas: resampling level {k}")
                if np.any(hi <= lo):
                    continue
                source = geometry.read(level_array, k, tuple(zip(lo.tolist(), hi.tolist())))
                moving = _sitk_image(source, in_spacing, in_origin + lo * in_spacing)
                del source
                resampler.SetOutputOrigin([float(s * sp) for s, sp in zip(starts[::-1], out_spacing[::-1])])
                resampler.SetSize([int(e - s) for s, e in zip(starts[::-1], stops[::-1])])
                out = sitk.GetArrayFromImage(resampler.Execute(moving))
                write(tuple(slice(s, e) for s, e in zip(starts, stops)), out)
                written += 1
    return written


def _block_shape(out_shape, max_block_voxels: int, chunk: int) -> tuple[int, int, int]:
    """Output blocks: about cubic (a rotated cube's preimage box grows least), whole chunks, at most
    ``max_block_voxels`` voxels (at least one chunk)."""
    unit = tuple(min(chunk, n) for n in out_shape)
    side = max(chunk, int(max_block_voxels ** (1 / 3)) // chunk * chunk)
    return plan_block(tuple(min(side, n) for n in out_shape), unit, max_block_voxels) or unit


def count_blocks(out_shape, max_block_voxels: int, chunk: int = 64) -> int:
    """Blocks :func:`resample_to_grid` visits (for progress)."""
    block = _block_shape(out_shape, max_block_voxels, chunk)
    return math.prod(-(-n // b) for n, b in zip(out_shape, block))


# ----------------------------------------------------------------------------------------- registration
def _choose_level(scales, shapes, template_spacing, n_template: int, params: AtlasParams, budget: int) -> int:
    fits = [k for k in range(len(shapes))
            if (math.prod(shapes[k]) + n_template) * REGISTRATION_BYTES_PER_VOXEL <= budget]
    if params.level >= 0:
        if params.level >= len(shapes):
            raise ValueError(f"parameter 'level': {params.level} but the volume has {len(shapes)} level(s)")
        if params.level not in fits:
            need = (math.prod(shapes[params.level]) + n_template) * REGISTRATION_BYTES_PER_VOXEL / GIB
            raise MemoryError(f"parameter 'level': registering level {params.level} needs about {need:.2f} GiB with "
                              f"the template, over memory_budget_gb={params.memory_budget_gb}; choose a coarser "
                              "level or raise the budget")
        return params.level
    if not fits:
        raise MemoryError(f"parameter 'memory_budget_gb': {params.memory_budget_gb} GiB cannot hold the template "
                          "and the coarsest level of the volume for registration")
    target = math.log(float(np.prod(template_spacing)))
    return min(fits, key=lambda k: abs(math.log(float(np.prod(scales[k]))) - target))


def _register(fixed: sitk.Image, moving: sitk.Image, params: AtlasParams, tracker: Progress, cancel=None,
              progress=None):
    init = sitk.CenteredTransformInitializer(fixed, moving, sitk.Euler3DTransform(),
                                             sitk.CenteredTransformInitializerFilter.MOMENTS)
    reg = sitk.ImageRegistrationMethod()
    reg.SetNumberOfThreads(params.workers)
    if params.metric == "mattes":
        reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=50)
    else:
        reg.SetMetricAsCorrelation()
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(params.sampling_fraction, seed=1)
    reg.SetMetricUseFixedImageGradientFilter(False)
    reg.SetMetricUseMovingImageGradientFilter(False)
    reg.SetInterpolator(sitk.sitkLinear)
    # With scales from physical shift a unit step moves voxels by about 1 mm: express steps in template voxels.
    voxel = min(fixed.GetSpacing())
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=params.step_voxels * voxel, minStep=1e-3 * voxel,
                                                 numberOfIterations=params.max_iterations,
                                                 relaxationFactor=0.5, gradientMagnitudeTolerance=1e-8)
    reg.SetOptimizerScalesFromPhysicalShift()
    shrink = [2**i for i in range(params.n_resolutions - 1, -1, -1)]
    reg.SetShrinkFactorsPerLevel(shrink)
    reg.SetSmoothingSigmasPerLevel([s / 2 if s > 1 else 0 for s in shrink])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    reg.SetInitialTransform(init, inPlace=False)
    iterations = [0]

    def on_iteration():
        iterations[0] += 1
        if progress is not None and iterations[0] % 10 == 0:
            progress(0, 1, f"atlas: registration, iteration {iterations[0]}, metric {reg.GetMetricValue():.4f}")
        if cancel is not None and cancel.is_set():
            reg.Abort()

    reg.AddCommand(sitk.sitkIterationEvent, on_iteration)
    initial_value = _metric_value(fixed, moving, init, params)
    try:
        result = reg.Execute(fixed, moving)
    except RuntimeError:
        tracker.check()  # an abort on cancel surfaces as a RuntimeError: report it as a cancellation
        raise
    tracker.check()
    final = result
    if isinstance(result, sitk.CompositeTransform) or result.GetName() == "CompositeTransform":
        composite = sitk.CompositeTransform(result)
        final = composite.GetNthTransform(composite.GetNumberOfTransforms() - 1)
    euler = sitk.Euler3DTransform()
    euler.SetCenter(init.GetCenter())
    euler.SetParameters(final.GetParameters())
    info = {"initial_metric": initial_value, "final_metric": float(reg.GetMetricValue()),
            "stop_condition": reg.GetOptimizerStopConditionDescription(), "iterations": iterations[0],
            "moments_initial_translation_mm": list(init.GetTranslation())}
    return euler, info


def _metric_value(fixed, moving, transform, params: AtlasParams) -> float:
    reg = sitk.ImageRegistrationMethod()
    reg.SetNumberOfThreads(params.workers)
    if params.metric == "mattes":
        reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=50)
    else:
        reg.SetMetricAsCorrelation()
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetInitialTransform(transform)
    return float(reg.MetricEvaluate(fixed, moving))


def _ncc(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    x, y = a[mask].astype(np.float64), b[mask].astype(np.float64)
    x -= x.mean()
    y -= y.mean()
    denom = math.sqrt(float((x * x).sum() * (y * y).sum()))
    return float((x * y).sum() / denom) if denom > 0 else float("nan")


# ------------------------------------------------------------------------------------------------ preview
def _panel(atlas_plane: np.ndarray, subject_plane: np.ndarray, row_mm: float, col_mm: float) -> np.ndarray:
    factor = row_mm / col_mm
    if abs(factor - 1) > 1e-3:
        atlas_plane, subject_plane = (zoom(p, (factor, 1.0), order=1) for p in (atlas_plane, subject_plane))
    a, s = to_uint8(atlas_plane), to_uint8(subject_plane)
    return np.stack([a, s, a], axis=-1)  # template magenta, subject green: grey where they agree


def preview_image(atlas: np.ndarray, subject: np.ndarray, spacing_zyx, min_size: int = 256) -> np.ndarray:
    """Three orthogonal planes through the template centre, side by side (template magenta, subject green), RGB."""
    cz, cy, cx = (n // 2 for n in atlas.shape)
    sz, sy, sx = spacing_zyx
    panels = [_panel(atlas[cz], subject[cz], sy, sx), _panel(atlas[:, cy], subject[:, cy], sz, sx),
              _panel(atlas[:, :, cx], subject[:, :, cx], sz, sy)]
    height = max(p.shape[0] for p in panels)
    scale = max(1, math.ceil(min_size / height))
    panels = [np.repeat(np.repeat(p, scale, axis=0), scale, axis=1) for p in panels]
    height = max(p.shape[0] for p in panels)
    gap = np.zeros((height, 4, 3), np.uint8)
    row = []
    for p in panels:
        pad = np.zeros((height - p.shape[0], p.shape[1], 3), np.uint8)
        row += [np.concatenate([p, pad], axis=0), gap]
    return np.concatenate(row[:-1], axis=1)


# --------------------------------------------------------------------------------------------------- step
def _create_levels(path: Path, shapes, spacings, name: str, compression: str, attributes: dict) -> list:
    """A multiscale NGFF 0.5 image with one array per (shape, spacing), levels in the given order."""
    first = create_ome_zarr_image(path, shapes[0], spacings[0], chunks=tuple(min(64, n) for n in shapes[0]),
                                  compression=compression, name=name, attributes=attributes)
    group = zarr.open_group(str(path), mode="r+", zarr_format=3)
    arrays = [first]
    for k, (shape, _) in enumerate(zip(shapes[1:], spacings[1:]), start=1):
        arrays.append(group.create_array(str(k), shape=shape, chunks=tuple(min(64, n) for n in shape),
                                         dtype=np.float32, compressors=compressors_for(compression), fill_value=0,
                                         dimension_names=["z", "y", "x"]))
    ome = dict(group.attrs["ome"])
    multiscale = dict(ome["multiscales"][0])
    multiscale["datasets"] = [{"path": str(k), "coordinateTransformations": [
        {"type": "scale", "scale": [float(s) for s in spacing]}]} for k, spacing in enumerate(spacings)]
    ome["multiscales"] = [multiscale]
    group.attrs["ome"] = ome
    return arrays


def align_to_atlas(volume_path, template_path, out_dir, params: AtlasParams | None = None, *, progress=None,
                   cancel=None) -> AtlasResult:
    """Step 16: reorient the volume to the template's orientation, register it rigidly, resample it into the
    template frame at every pyramid level (see the module notes).

    Parameters
    ----------
    volume_path : path-like
        The volume, a multiscale OME-Zarr ``(z, y, x)``.
    template_path : path-like
        The atlas template: NRRD/NIfTI/MetaImage (SimpleITK), OME-Zarr, TIFF or ``.npy``.
    out_dir : path-like
    params : AtlasParams, optional
    progress, cancel
        Progress callback and cancellation (checked between blocks and at every optimizer iteration).

    Returns
    -------
    AtlasResult
    """
    start = time.perf_counter()
    params = params or AtlasParams()
    validate_params(params)
    return_large_buffers_to_os()
    input_code = parse_orientation(params.input_orientation, "input_orientation")
    template_code = parse_orientation(params.template_orientation, "template_orientation")
    volume_path, template_path, out_dir = Path(volume_path), Path(template_path), Path(out_dir)
    image = open_volume(volume_path)
    name = volume_path.name.removesuffix(".ome.zarr").removesuffix(".zarr")
    out_path = out_dir / f"{name}_ras.ome.zarr"
    transform_path = out_dir / f"{name}_ras_transform.tfm"
    preview_path = out_dir / f"{name}_ras_preview.png"
    metrics_path = out_dir / "atlas_metrics.json"
    if not check_can_write(out_path, params.if_exists):
        return AtlasResult(out_path, transform_path, preview_path, metrics_path, skipped=True,
                           seconds=time.perf_counter() - start)
    budget = int(params.memory_budget_gb * GIB)

    template, template_spacing = read_template(template_path, params.template_voxel_um)
    perm, flips = orientation_transform(input_code, template_code)
    shapes = [tuple(level.shape) for level in image.levels]
    scales = [tuple(s[-3:]) for s in image.scales_mm]
    geometry = ReorientedVolume(perm, flips, shapes, scales)
    level = _choose_level([geometry.scale(k) for k in range(len(shapes))], shapes, template_spacing, template.size,
                          params, budget)

    extent = [n * s for n, s in zip(template.shape, template_spacing)]
    out_spacings = [geometry.scale(k) for k in range(len(shapes))]
    out_shapes = [tuple(max(1, math.ceil(e / s - 1e-6)) for e, s in zip(extent, sp)) for sp in out_spacings]
    resample_budget = budget // 2
    tracker = Progress(1, progress, cancel)
    tracker.check()

    # Registration on the chosen level (held in memory; see the memory bound in the module notes).
    t0 = time.perf_counter()
    full = tuple((0, n) for n in geometry.shape(level))
    moving_array = geometry.read(image.levels[level], level, full)
    fixed = _sitk_image(template, template_spacing)
    moving = _sitk_image(moving_array, geometry.scale(level), geometry.origin(level))
    del moving_array
    euler, info = _register(fixed, moving, params, tracker, cancel, progress)
    t1 = time.perf_counter()

    # Quality on the template grid and the preview.
    resampler = sitk.ResampleImageFilter()
    resampler.SetNumberOfThreads(params.workers)
    resampler.SetReferenceImage(fixed)
    resampler.SetInterpolator(sitk.sitkLinear)
    resampler.SetDefaultPixelValue(0.0)
    resampler.SetTransform(euler)
    aligned = sitk.GetArrayFromImage(resampler.Execute(moving))
    del moving, fixed
    overlap = (aligned != 0) | (template != 0)
    ncc = _ncc(template, aligned, overlap)
    preview = preview_image(template, aligned, template_spacing)
    template_shape = template.shape
    del aligned, overlap, template  # resampling below holds blocks only

    n_blocks = [count_blocks(out_shapes[k], resample_budget // _per_voxel(euler)) for k in range(len(shapes))]
    tracker.total = sum(n_blocks) + 1
    attrs = {"soct_atlas": {"input_orientation": input_code, "template_orientation": template_code,
                            "template": str(template_path), "transform": transform_path.name}}
    t2 = time.perf_counter()
    with atomic_output(out_path, "overwrite" if params.if_exists == "overwrite" else "error") as tmp:
        arrays = _create_levels(tmp, out_shapes, out_spacings, f"{name}_ras", params.compression, attrs)
        for k, array in enumerate(arrays):
            def write(region, block, array=array):
                array[region] = block

            resample_to_grid(image.levels[k], geometry, k, euler, out_shapes[k], out_spacings[k], write,
                             max_block_voxels=resample_budget // _per_voxel(euler), workers=params.workers,
                             tracker=tracker)
        with atomic_output(transform_path, "overwrite") as tfm_tmp:
            named = tfm_tmp.with_name(tfm_tmp.name + ".tfm")  # SimpleITK picks the writer by the extension
            try:
                sitk.WriteTransform(euler, str(named))
                os.replace(named, tfm_tmp)
            finally:
                named.unlink(missing_ok=True)
        with atomic_output(preview_path, "overwrite") as png_tmp:
            iio.imwrite(png_tmp, preview, extension=".png")
    tracker.advance(1, "atlas: done")

    a, b = _affine_parts(euler)
    to_input = geometry.to_input_matrix() @ np.block([[a, b[:, None]], [np.zeros((1, 3)), np.ones((1, 1))]])
    report = {
        "input": str(volume_path), "template": str(template_path), "output": str(out_path),
        "params": asdict(params), "permutation": list(perm), "flips": list(flips),
        "template_shape": list(template_shape), "template_spacing_mm": list(template_spacing),
        "registered_level": level, "registered_level_spacing_mm": list(geometry.scale(level)),
        "output_shapes": [list(s) for s in out_shapes], "output_spacings_mm": [list(s) for s in out_spacings],
        "rotation_deg": [math.degrees(v) for v in euler.GetParameters()[:3]],
        "translation_mm": list(euler.GetParameters()[3:]), "center_mm": list(euler.GetCenter()),
        "template_to_input_xyz": to_input.tolist(), "ncc": ncc, **info,
        "seconds_registration": t1 - t0, "seconds_resampling": time.perf_counter() - t2,
    }
    report["seconds"] = time.perf_counter() - start
    with atomic_output(metrics_path, "overwrite") as tmp:
        Path(tmp).write_text(json.dumps(report, indent=2, default=str))
    return AtlasResult(out_path, transform_path, preview_path, metrics_path,
                       tuple(report["rotation_deg"]), tuple(report["translation_mm"]), ncc, level, report["seconds"],
                       False, report)


def _per_voxel(transform) -> int:
    """Bytes per output voxel of a resampling block: the block, SimpleITK's output, the preimage box twice."""
    return int(RESAMPLE_BYTES_PER_VOXEL + 8 * max(_bbox_growth(transform), 1.0))
