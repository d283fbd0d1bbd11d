"""The step registry: each processing step declared once.

A :class:`Step` ties a processing function to its parameter dataclass (see
:mod:`napari_soct.processing.params`), its input paths and the images it produces. The command line
(:mod:`napari_soct.pipeline.cli`), the config file (:mod:`napari_soct.pipeline.config`) and the napari dock
widgets (:mod:`napari_soct.widgets`) are all generated from these declarations; adding a step means adding one
``register(Step(...))`` here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..processing.params import ParamInfo, param_infos
from ..processing.preprocess import PreprocessParams, PreprocessResult, preprocess_acquisition

__all__ = ["Input", "Step", "STEPS", "register", "get_step", "INPUT_MODES", "OPTIONAL_MODES"]

INPUT_MODES = ("dir", "file", "out_dir", "out_file", "image", "labels", "points")
#: Modes an optional input may have (see :attr:`Input.optional`).
OPTIONAL_MODES = ("dir", "file")


@dataclass(frozen=True)
class Input:
    """A path argument of a step.

    Attributes
    ----------
    name : str
        Argument name of the step function.
    help : str
    mode : {"dir", "file", "out_dir", "out_file", "image", "labels", "points"}
        Existing folder, existing file, folder or file to create; or an array input: the step receives an
        :class:`~napari_soct.processing.io.images.ImageData`, from a layer in napari or from a path
        (OME-Zarr, zarr, TIFF, .npy) on the command line; or ``"points"``: ordered points, an ``(N, 3)``
        array of physical ``(z, y, x)`` (``data * scale + translate``) from a Points layer (or a Shapes
        layer's first path) in napari, the path of a ``.csv`` / ``.npy`` file on the command line.
    optional : bool
        The step function accepts ``""`` for this input (an existing ``"dir"`` or ``"file"`` only): the widget
        may be left empty, the command line takes ``''`` or ``none``; the function then receives ``""``.
    empty : str
        What leaving an optional input empty means, shown as the widget's placeholder (``"none: motor-only"``).
    """

    name: str
    help: str
    mode: str = "dir"
    optional: bool = False
    empty: str = ""

    def __post_init__(self):
        if self.mode not in INPUT_MODES:
            raise ValueError(f"Input {self.name!r}: mode must be one of {INPUT_MODES}, got {self.mode!r}")
        # Only existing paths can be optional: an output must be named, a layer is always chosen.
        if self.optional and self.mode not in OPTIONAL_MODES:
            raise ValueError(f"Input {self.name!r}: only inputs of mode {' or '.join(OPTIONAL_MODES)} can be "
                             f"optional, not {self.mode!r}")
        if self.empty and not self.optional:
            raise ValueError(f"Input {self.name!r}: 'empty' describes an optional input; set optional=True")

    @property
    def placeholder(self) -> str:
        """Text shown in an empty optional input (``"(none: motor-only)"``)."""
        return f"({self.empty or 'none'})" if self.optional else ""

    @property
    def is_array(self) -> bool:
        """True for inputs given as layers in napari (image or labels)."""
        return self.mode in ("image", "labels")


@dataclass(frozen=True)
class Step:
    """One processing step, declared once.

    Attributes
    ----------
    name : str
        Identifier used for the CLI sub-command and the config section.
    title : str
        Human title (widget name).
    help : str
        One-paragraph description.
    function : callable
        ``function(*inputs, params, progress=None, cancel=None) -> result``.
    params : type
        Parameter dataclass (fields built with :func:`~napari_soct.processing.params.param`).
    inputs : tuple of Input
    outputs : callable
        ``outputs(result) -> list[(Path, kind)]``: OME-Zarr images to show after a run, ``kind`` being
        ``"image"`` or ``"labels"``; several of one kind are shown as one stack.
    summary : callable
        ``summary(result) -> str``: what was produced, for the CLI and the widget status line.
    before : callable, optional
        ``before(result) -> list[(Path, kind)]``: the images the step read, shown beside its outputs ("before"
        and "after") when the viewer does not show them yet.
    """

    name: str
    title: str
    help: str
    function: Callable
    params: type
    inputs: tuple[Input, ...]
    outputs: Callable[[object], list[tuple[Path, str]]]
    summary: Callable[[object], str]
    before: Callable[[object], list[tuple[Path, str]]] | None = None

    @property
    def param_infos(self) -> list[ParamInfo]:
        return param_infos(self.params)

    def run(self, *inputs, params=None, progress=None, cancel=None):
        """Call the step function."""
        return self.function(*inputs, params or self.params(), progress=progress, cancel=cancel)


STEPS: dict[str, Step] = {}


def register(step: Step) -> Step:
    """Add a step to the registry (names are unique)."""
    if step.name in STEPS:
        raise ValueError(f"step {step.name!r} is already registered")
    STEPS[step.name] = step
    return step


def get_step(name: str) -> Step:
    """Look a step up by name, with the known names in the error."""
    try:
        return STEPS[name]
    except KeyError:
        raise KeyError(f"unknown step {name!r}; known steps: {', '.join(STEPS)}") from None


def _preprocess_summary(result: PreprocessResult) -> str:
    written = [s for s in result.slices if not s.skipped]
    lines = [
        f"{len(written)} mosaic grid(s) written, {len(result.slices) - len(written)} kept, in "
        f"{result.seconds:.1f} s with {result.workers_used} worker(s), into {result.out_dir}"
    ]
    for s in result.slices:
        galvo = s.galvo or {}
        state = "kept" if s.skipped else (
            f"galvo confidence {galvo.get('confidence', 0):.2f} "
            f"({'fixed, shift ' + str(galvo.get('shift')) if galvo.get('applied') else 'not fixed'})"
        )
        notes = f", broken tiles: {', '.join(s.bad_tiles)}" if s.bad_tiles else ""
        lines.append(f"  slice {s.slice_id}: {Path(s.path).name} {state}{notes}")
    lines.append(f"  {result.shifts_path}")
    if result.slice_config_path:
        lines.append(f"  {result.slice_config_path}")
    lines.append(f"  {result.metrics_path}")
    return "\n".join(lines)


register(
    Step(
        name="preprocess",
        title="Preprocess raw tiles",
        help="Raw S-OCT tiles to per-slice mosaic grids (OME-Zarr), shifts_xy.csv, slice_config.csv and QC "
        "previews, with galvo band correction.",
        function=preprocess_acquisition,
        params=PreprocessParams,
        inputs=(
            Input("raw_dir", "Raw acquisition folder (tile_x*_y*_z* folders, flat or under z*/)", "dir"),
            Input("out_dir", "Output folder for mosaic grids and tables", "out_dir"),
        ),
        outputs=lambda result: [(p, "image") for p in result.mosaic_paths],
        summary=_preprocess_summary,
    )
)


# --- in-slice reconstruction (issue 3): per-slice steps built on processing.slices.run_slice_step ----------
from ..processing.correct.intensity import (  # noqa: E402
    BeamProfileParams,
    NormalizeParams,
    correct_beam_profile,
    normalize_slices,
)
from ..processing.correct.interface import (  # noqa: E402
    CurvatureParams,
    InterfaceCropParams,
    crop_interface,
    fix_focal_curvature,
)
from ..processing.correct.illumination import IlluminationParams, correct_illumination  # noqa: E402
from ..processing.correct.resample import ResampleParams, resample_mosaic_grids  # noqa: E402
from ..processing.stitch import StitchParams, stitch_slices  # noqa: E402
from ..processing.slices import SliceStepResult  # noqa: E402


def slice_step_summary(result: SliceStepResult) -> str:
    """One line per run of a per-slice step: what was written, kept, where, how fast."""
    written = len(result.outputs) - len(result.skipped)
    return (
        f"{result.step}: {written} slice(s) written, {len(result.skipped)} kept, in {result.seconds:.1f} s with "
        f"{result.workers_used} worker(s), into {result.out_dir} (metrics: {result.metrics_path.name})"
    )


def _slice_step(name, title, help, function, params, source_help):
    return register(
        Step(
            name=name,
            title=title,
            help=help,
            function=function,
            params=params,
            inputs=(Input("source", source_help, "dir"), Input("out_dir", "Output folder", "out_dir")),
            outputs=lambda result: [(p, "image") for p in result.paths],
            summary=slice_step_summary,
            before=lambda result: [(result.inputs[s], "image") for s in sorted(result.inputs)],
        )
    )


_MOSAICS = "Folder of mosaic grids (mosaic_grid_3d_z*.ome.zarr or slice_z*_<step>.ome.zarr), or one file"
_SLICES = "Folder of stitched slices (slice_z*_<step>.ome.zarr), or one file"
_slice_step("resample", "1. Resample", "Resample mosaic grids to an isotropic voxel size, tile by tile, "
            "anti-aliased.", resample_mosaic_grids, ResampleParams, _MOSAICS)
_slice_step("curvature", "2. Focal curvature", "Fit a smooth surface to the tissue interface and shift every "
            "A-line so it becomes flat.", fix_focal_curvature, CurvatureParams, _MOSAICS)
_slice_step("illumination", "3. Illumination (BaSiC)", "Estimate the flat-field (and optional dark-field) per "
            "depth plane across the tiles of each slice with BaSiC, and divide it out.", correct_illumination,
            IlluminationParams, _MOSAICS)
_slice_step("stitch", "4. Stitch", "Place the tiles of each slice (phase correlation, affine stage model, clamped "
            "residuals) and blend them into one slice.", stitch_slices, StitchParams, _MOSAICS)
_slice_step("beam", "5. Beam profile", "Divide out the depth envelope (focus, attenuation) measured on the "
            "tissue-averaged axial profile.", correct_beam_profile, BeamProfileParams, _SLICES)
_slice_step("crop", "6. Interface crop", "Detect the tissue surface and keep a physical depth below it, per "
            "slice or per pixel.", crop_interface, InterfaceCropParams, _SLICES)
_slice_step("normalize", "7. Normalise", "Rescale each slice so a tissue percentile matches across slices.",
            normalize_slices, NormalizeParams, _SLICES)



# --- volume assembly (issue 4) ---------------------------------------------------------------------------------
from ..processing.stack.rehoming import RehomingParams, RehomingResult, detect_rehoming  # noqa: E402


def _rehoming_summary(result: RehomingResult) -> str:
    glitches = ", ".join(f"{d.fixed_id}->{d.moving_id}" for d in result.glitches) or "none"
    jumps = ", ".join(f"{d.fixed_id}->{d.moving_id}" for d in result.rehomings) or "none"
    return f"rehoming: glitch steps corrected: {glitches}; re-homing kept: {jumps}; wrote {result.shifts_path}"


register(
    Step(
        name="rehoming",
        title="9. Re-homing detection",
        help="Correct encoder-glitch spikes in shifts_xy.csv, keep genuine re-homing jumps, stamp reliability.",
        function=detect_rehoming,
        params=RehomingParams,
        inputs=(Input("shifts_csv", "shifts_xy.csv from preprocessing", "file"),
                Input("out_dir", "Output folder for shifts_xy_clean.csv", "out_dir")),
        outputs=lambda result: [],
        summary=_rehoming_summary,
    )
)


from ..processing.stack.quality import QualityParams, QualityResult, assess_quality  # noqa: E402


def _quality_summary(result: QualityResult) -> str:
    scores = ", ".join(f"{sid}: {score:.2f}" for sid, score in sorted(result.scores.items()))
    return f"quality: scores {scores}; auto-excluded: {result.excluded or 'none'}; wrote {result.slice_config_path}"


register(
    Step(
        name="quality",
        title="8. Slice quality",
        help="Score every slice (coverage, contrast, sharpness against the median slice) and mark poor slices "
        "auto_excluded in slice_config.csv; manual exclusions are kept.",
        function=assess_quality,
        params=QualityParams,
        inputs=(Input("source", "Folder of normalised slices (slice_z*_normalize.ome.zarr)", "dir"),
                Input("slice_config", "slice_config.csv to start from (manual use=false kept); empty: a new "
                      "configuration of the scored slices", "file", optional=True, empty="none: a new configuration"),
                Input("out_dir", "Output folder for the stamped slice_config.csv", "out_dir")),
        outputs=lambda result: [],
        summary=_quality_summary,
    )
)

# --- label upscaling (issue 8) -------------------------------------------------------------------------------
from ..processing.upscale import UpscaleParams, UpscaleResult, upscale_labels  # noqa: E402


def _upscale_summary(result: UpscaleResult) -> str:
    if result.skipped:
        return f"upscale-labels: {result.path} exists, kept (if_exists=skip)"
    shape = "x".join(map(str, result.shape))
    return (
        f"upscale-labels: {shape} {result.dtype} labels ({result.uncompressed_bytes / 1e9:.2f} GB uncompressed, "
        f"{result.bytes_on_disk / 1e6:.1f} MB on disk, {len(result.level_shapes)} level(s)) in {result.seconds:.1f} s "
        f"({result.uncompressed_bytes / max(result.seconds, 1e-9) / 1e6:.0f} MB/s) with {result.workers_used} "
        f"worker(s), into {result.path}" + "".join(f"\n  note: {n}" for n in result.notes)
    )


register(
    Step(
        name="upscale-labels",
        title="Upscale labels",
        help="Resample a label volume (e.g. an atlas annotation) by factors, to a shape or to the grid of a "
        "reference image, keeping every label id exact (nearest or mode), block by block into sharded OME-Zarr "
        "with a label pyramid, or BigTIFF.",
        function=upscale_labels,
        params=UpscaleParams,
        inputs=(
            Input("labels", "Label volume (OME-Zarr, zarr, TIFF/BigTIFF, .npy; a Labels layer in napari)", "labels"),
            Input("out", "Output: a .ome.zarr folder, or a .tif BigTIFF file", "out_file"),
        ),
        outputs=lambda result: [(result.path, "labels")] if result.format == "ome-zarr" else [],
        summary=_upscale_summary,
    )
)


# --- straighten along a path and backproject (issue 6) -----------------------------------------------------
from ..processing.backproject import (  # noqa: E402
    BackprojectParams,
    BackprojectResult,
    StraightenParams,
    StraightenResult,
    backproject_volume,
    straighten_volume,
)


def _straighten_summary(result: StraightenResult) -> str:
    if result.skipped:
        return f"straighten: outputs in {result.out_dir} exist, kept (if_exists=skip)"
    n, h, w = result.shape
    return (f"straighten: {n} slices of {h} x {w} ({result.value_mode}) along a path of {result.path_length:.4g} "
            f"in {result.seconds:.1f} s\n  {result.tiff_path}\n  {result.zarr_path}\n  {result.config_path}")


def _backproject_summary(result: BackprojectResult) -> str:
    if result.skipped:
        return f"backproject: outputs in {result.out_dir} exist, kept (if_exists=skip)"
    z, y, x = result.offset_zyx
    lines = [f"backproject: {'x'.join(map(str, result.shape))} {result.kind} at offset x={x}, y={y}, z={z} "
             f"({result.voxels_swept} voxels swept) in {result.seconds:.1f} s", f"  {result.tiff_path}"]
    lines += [f"  {p}" for p in (result.zarr_path, result.config_path) if p is not None]
    lines += [f"  note: {n}" for n in result.notes]
    return "\n".join(lines)


register(
    Step(
        name="straighten",
        title="Straighten along a path",
        help="Cut slices perpendicular to a smooth path through ordered points (arc-length spacing, "
        "rotation-minimising frames) into a straightened volume (TIFF and OME-Zarr) with a "
        "<name>-configuration.json in Ouroboros's layout.",
        function=straighten_volume,
        params=StraightenParams,
        inputs=(
            Input("image", "Source volume (z, y, x); an Image or Labels layer's data in napari", "image"),
            Input("points", "Ordered path points (z, y, x), physical units: a Points layer, or a .csv/.npy file",
                  "points"),
            Input("out_dir", "Output folder", "out_dir"),
        ),
        outputs=lambda result: [] if result.skipped else [
            (result.zarr_path, "labels" if result.value_mode == "labels" else "image")],
        summary=_straighten_summary,
    )
)

register(
    Step(
        name="backproject",
        title="Backproject into the source",
        help="Put a straightened volume (e.g. its segmentation) back into the source volume's voxel space "
        "using the straightening's configuration (ours or Ouroboros's): labels stay exact, intensities are "
        "trilinear averages, no holes between slices.",
        function=backproject_volume,
        params=BackprojectParams,
        inputs=(
            Input("straightened", "Straightened volume (slices, rows, columns): a Labels or Image layer, or a "
                  "TIFF/OME-Zarr", "image"),
            Input("configuration", "<name>-configuration.json written by the straightening", "file"),
            Input("out_dir", "Output folder", "out_dir"),
        ),
        outputs=lambda result: [] if result.skipped or result.zarr_path is None else [
            (result.zarr_path, result.kind)],
        summary=_backproject_summary,
    )
)


# --- CT tomography (issue 7): radon, filtered back projection and SART on images and stacks of sinograms --------
from ..processing.tomography import (  # noqa: E402
    FbpParams,
    RadonParams,
    ReconstructParams,
    TomographyResult,
    fbp_stack,
    radon_stack,
    reconstruct_stack,
)


def _tomography_summary(result: TomographyResult) -> str:
    # First line short (the widget's status line); the path on the next.
    if result.skipped:
        return f"{result.step}: kept the existing output\n  {result.path}"
    return (
        f"{result.step}: {' x '.join(map(str, result.shape))} in {result.seconds:.1f} s ({result.n_slices} slice(s), "
        f"{result.workers_used} worker(s) x {result.threads_per_worker} thread(s), {result.backend})\n  {result.path}"
    )


_TOMO_OUT = "Output folder (the result is written there as an OME-Zarr image named after the input)"
_SINOGRAMS = ("Sinogram (detector, angle) or a stack (slice, detector, angle): an Image layer, or a "
              "TIFF/zarr/OME-Zarr/.npy")
for _name, _title, _help, _function, _params in (
    ("radon", "Radon (image -> sinogram)", "Sinograms (detector, angle) of an image or a stack, as "
     "skimage.transform.radon makes them.", radon_stack, RadonParams),
    ("fbp", "Filtered back projection", "Images from sinograms by filtered back projection, as "
     "skimage.transform.iradon.", fbp_stack, FbpParams),
    ("ct-reconstruct", "Reconstruct (sinogram -> image)", "Images from sinograms by filtered back projection "
     "or SART, as skimage.transform.iradon / iradon_sart.", reconstruct_stack, ReconstructParams),
):
    register(
        Step(
            name=_name,
            title=_title,
            help=_help,
            function=_function,
            params=_params,
            inputs=(
                Input("image", "Image (y, x) or stack (slice, y, x): an Image layer, or a TIFF/zarr/OME-Zarr/.npy",
                      "image") if _name == "radon" else Input("sinograms", _SINOGRAMS, "image"),
                Input("out_dir", _TOMO_OUT, "out_dir"),
            ),
            outputs=lambda result: [(result.path, "image")],
            summary=_tomography_summary,
        )
    )


# --- bias field correction (step 15) and atlas alignment (step 16), issue 4 -------------------------------------
from ..processing.stack.atlas import AtlasParams, AtlasResult, align_to_atlas  # noqa: E402
from ..processing.stack.bias import BiasFieldParams, BiasFieldResult, correct_bias_field  # noqa: E402


def _bias_summary(result: BiasFieldResult) -> str:
    if result.skipped:
        return f"bias: {result.path} exists, kept (if_exists=skip)"
    low, high = result.field_range
    return (f"bias ({result.mode}): field x{low:.2f} to x{high:.2f} removed (shrink {result.shrink_factors}) in "
            f"{result.seconds:.1f} s\n  {result.path}\n  {result.metrics_path}")


def _atlas_summary(result: AtlasResult) -> str:
    if result.skipped:
        return f"atlas: {result.path} exists, kept (if_exists=skip)"
    rx, ry, rz = result.rotation_deg
    return (f"atlas: NCC {result.ncc:.3f} with the template; rotation ({rx:.1f}, {ry:.1f}, {rz:.1f}) deg, level "
            f"{result.level} registered, in {result.seconds:.1f} s\n  {result.path}\n  {result.transform_path}\n"
            f"  {result.preview_path}")


register(
    Step(
        name="bias",
        title="15. Bias field (N4)",
        help="Remove a smooth multiplicative bias field with SimpleITK's N4, fitted on a shrunk copy (per thick "
        "section, globally, or both) and applied at full resolution block by block.",
        function=correct_bias_field,
        params=BiasFieldParams,
        inputs=(Input("volume_path", "Stacked volume (OME-Zarr)", "dir"),
                Input("out_dir", "Output folder for <name>_corrected.ome.zarr", "out_dir")),
        outputs=lambda result: [(result.path, "image")],
        summary=_bias_summary,
    )
)

register(
    Step(
        name="atlas",
        title="16. Atlas / RAS alignment",
        help="Reorient the volume from its orientation code, register it rigidly to an atlas template, and "
        "resample it into the template frame at every pyramid level (transform file and preview too).",
        function=align_to_atlas,
        params=AtlasParams,
        inputs=(Input("volume_path", "Volume to align (OME-Zarr)", "dir"),
                Input("template_path", "Atlas template (NRRD, NIfTI, MetaImage, TIFF, .npy or OME-Zarr)", "file"),
                Input("out_dir", "Output folder for <name>_ras.ome.zarr, the .tfm and the preview", "out_dir")),
        outputs=lambda result: [(result.path, "image")],
        summary=_atlas_summary,
    )
)


# --- common space and interpolation (issue 4, steps 10 and 11) ---
from ..processing.stack.common_space import CommonSpaceParams, CommonSpaceResult, bring_to_common_space  # noqa: E402
from ..processing.stack.interpolate import (  # noqa: E402
    InterpolationParams,
    InterpolationResult,
    interpolate_missing_slices,
)


def _common_space_summary(result: CommonSpaceResult) -> str:
    written = len(result.outputs) - len(result.skipped)
    sources = ", ".join(f"{sid}: {src}" for sid, src in sorted(result.position_sources.items()) if src != "motor")
    return (f"common-space: {written} slice(s) written, {len(result.skipped)} kept, on a {result.canvas_shape[0]} x "
            f"{result.canvas_shape[1]} canvas in {result.seconds:.1f} s; corrected positions: {sources or 'none'}\n"
            f"  {result.csv_path}\n  {result.metrics_path}")


def _interpolate_summary(result: InterpolationResult) -> str:
    if result.skipped:
        return f"interpolate: {result.slice_config_path} exists, kept (if_exists=skip)"
    filled = ", ".join(str(s) for s in result.outputs) or "none"
    failed = "; ".join(f"{s}: {result.decisions[s].reason}" for s in result.failed) or "none"
    return (f"interpolate: filled slot(s) {filled}; gates failed: {failed}; in {result.seconds:.1f} s\n"
            f"  {result.slice_config_path}\n  {result.metrics_path}")


register(
    Step(
        name="common-space",
        title="10. Common space",
        help="Place every slice on one canvas at its stitched stage position, moved only by the corrections of "
        "the shifts (re-homing cleaning, excluded-slice mode, optional image refinement of unreliable steps); "
        "integer placement, the fraction recorded.",
        function=bring_to_common_space,
        params=CommonSpaceParams,
        inputs=(Input("source", "Folder of normalised slices (slice_z*_normalize.ome.zarr)", "dir"),
                Input("shifts_csv", "Slice shifts: shifts_xy_clean.csv (step 9) or shifts_xy.csv", "file"),
                Input("out_dir", "Output folder (10_common)", "out_dir")),
        outputs=lambda result: [(p, "image") for p in result.paths],
        summary=_common_space_summary,
    )
)

register(
    Step(
        name="interpolate",
        title="11. Interpolate missing slices",
        help="Fill single-slice gaps and excluded slices by morphing between the two neighbours (zmorph: affine "
        "registration of the boundary planes, fractional powers); when a quality gate fails the slot stays a gap.",
        function=interpolate_missing_slices,
        params=InterpolationParams,
        inputs=(Input("common_dir", "Common-space folder (step 10: slice_z*_common.ome.zarr)", "dir"),
                Input("out_dir", "Output folder (11_interpolate)", "out_dir")),
        outputs=lambda result: [(p, "image") for p in result.paths],
        summary=_interpolate_summary,
    )
)


# --- quality report (issue 4) -----------------------------------------------------------------------------------
from ..processing.report import ReportParams, ReportResult, run_report  # noqa: E402


def _report_summary(result: ReportResult) -> str:
    if result.skipped:
        return f"report: {result.path} exists, kept (if_exists=skip)"
    ran = [s for s in result.steps if s.ran]
    warnings = sum(s.n_warnings for s in ran)
    errors = sum(s.n_errors for s in ran)
    lines = [f"report: {result.status} - {len(ran)} step(s) ran; {errors} error(s) and {warnings} warning(s) found; "
             f"{result.path}"]
    lines += [f"  {s.number:>2}. {s.title}: {s.status}" + (f" ({s.worst.message})" if s.worst else "")
              + (f"; decided by hand: {s.by_hand_text}" if s.hand_counts else "")
              for s in result.steps]
    return "\n".join(lines)


register(
    Step(
        name="report",
        title="Quality report",
        help="Gather every step's metrics of a reconstruction folder into one self-contained HTML page (or text): "
        "OK/warning/error per step, slice and pair with what to check, drift and registration plots, previews.",
        function=run_report,
        params=ReportParams,
        inputs=(Input("out_dir", "Reconstruction folder (01_resample ... 16_atlas, or any folder holding step "
                      "outputs)", "dir"),),
        outputs=lambda result: [],
        summary=_report_summary,
    )
)


# --- pairwise registration (step 12) and auto-exclusion (step 13), issue 4 ---
from ..processing.stack.exclusion import ExclusionParams, ExclusionResult, auto_exclude_slices  # noqa: E402
from ..processing.stack.register import RegistrationParams, RegistrationResult, register_pairwise  # noqa: E402


def _register_summary(result: RegistrationResult) -> str:
    if result.skipped:
        return f"register: {result.csv_path} exists, kept (if_exists=skip)"
    lines = [f"register: {len(result.pairs)} pair(s): {result.count('ok')} ok, {result.count('fallback_identity')} "
             f"identity fallback, {result.count('error')} error(s), in {result.seconds:.1f} s with "
             f"{result.workers_used} worker(s); {result.csv_path}"]
    lines += [f"  {p.fixed_id}->{p.moving_id}: {p.status}, confidence {p.confidence:.2f}, z plane {p.z_match_plane} "
              f"(expected {p.expected_z_plane}), rotation {p.rotation_deg:.2f} deg, shift ({p.tx_px:.2f}, "
              f"{p.ty_px:.2f}) px" for p in result.pairs]
    return "\n".join(lines)


def _exclusion_summary(result: ExclusionResult) -> str:
    if result.skipped:
        return f"auto-exclude: {result.slice_config_path} exists, kept (if_exists=skip)"
    clusters = "; ".join(c["reason"] for c in result.clusters) or "no cluster"
    return (f"auto-exclude: {len(result.poor)} poor pair(s); excluded: {result.excluded or 'none'} ({clusters}); "
            f"wrote {result.slice_config_path}")


register(
    Step(
        name="register",
        title="12. Pairwise registration",
        help="Find the plane of each slice that matches the top of the next one (z match by NCC), refine the 2D "
        "rigid alignment with SimpleITK (bounded, identity fallback) and rate each pair's confidence; writes "
        "pairwise_registration.csv.",
        function=register_pairwise,
        params=RegistrationParams,
        inputs=(Input("common_dir", "Folder of slices in common space (10_common)", "dir"),
                Input("out_dir", "Output folder for pairwise_registration.csv", "out_dir")),
        outputs=lambda result: [],
        summary=_register_summary,
    )
)

register(
    Step(
        name="auto-exclude",
        title="13. Auto-exclude clusters",
        help="Mark slices inside runs of consecutive poor registrations (DBSCAN on the registration metrics plus "
        "floors, at least min_consecutive pairs in a row) auto_excluded in slice_config.csv, with the reason.",
        function=auto_exclude_slices,
        params=ExclusionParams,
        inputs=(Input("registration_csv", "pairwise_registration.csv from step 12", "file"),
                Input("slice_config", "slice_config.csv to stamp; empty: a new configuration of the registered "
                      "slices", "file", optional=True, empty="none: a new configuration"),
                Input("out_dir", "Output folder for the stamped slice_config.csv", "out_dir")),
        outputs=lambda result: [],
        summary=_exclusion_summary,
    )
)


# --- stacking (step 14), issue 4 ---
from ..processing.stack.stacking import StackParams, StackResult, stack_slices  # noqa: E402


def _stack_summary(result: StackResult) -> str:
    if result.skipped:
        return f"stack: {result.path} exists, kept (if_exists=skip)"
    gates = ", ".join(f"{d.slice_id}: {d.gate}" for d in result.decisions[1:]) or "none"
    levels = ", ".join(f"{v[-1]:g}" for v in result.voxel_sizes_um)
    return (f"stack: {len(result.decisions)} slices into {result.shape[0]} x {result.shape[1]} x {result.shape[2]} "
            f"voxels, levels {levels} um, in {result.seconds:.1f} s; gates {gates}\n  {result.path}\n"
            f"  {result.z_matches_path}\n  {result.decisions_path}")


register(
    Step(
        name="stack",
        title="14. Stack slices",
        help="Stack the common-space slices into one volume: z overlaps by NCC (or the registration's match) with "
        "outlier correction, confidence-gated pairwise transforms composed along the stack, Hann cross-fade in "
        "the overlaps; a multi-resolution OME-Zarr pyramid (power-of-two and analysis resolutions).",
        function=stack_slices,
        params=StackParams,
        inputs=(Input("common_dir", "Folder of slices in common space (10_common)", "dir"),
                Input("registration_csv", "pairwise_registration.csv from step 12; empty: motor-only XY placement "
                      "(the common canvas as it is) and z overlaps from the NCC search", "file", optional=True,
                      empty="none: motor-only"),
                Input("out_dir", "Output folder (14_stack) for <subject>.ome.zarr and the tables", "out_dir")),
        outputs=lambda result: [(result.path, "image")],
        summary=_stack_summary,
    )
)


# --- manual slice alignment (issue 9): alignment package export / import for aligning on another machine ---
from ..processing.stack.manual import (  # noqa: E402
    ImportParams,
    ImportResult,
    PackageParams,
    PackageResult,
    export_alignment_package,
    import_alignment_transforms,
)


def _package_summary(result: PackageResult) -> str:
    if result.skipped:
        return f"alignment-package: {result.path} exists, kept (if_exists=skip)"
    return (f"alignment-package: {result.n_slices} slice AIP(s) (1/{result.factor:g} of the canvas) and "
            f"{result.n_pairs} pair(s), {result.bytes / 1e6:.1f} MB: {result.path}")


def _import_summary(result: ImportResult) -> str:
    pairs = ", ".join(f"{a}->{b}" for a, b in result.imported) or "none"
    note = f"; noted in {result.slice_config}" if result.slice_config else ""
    return f"alignment-import: pair(s) {pairs} written into {result.table}{note}; restack to use them"


register(
    Step(
        name="alignment-package",
        title="Export an alignment package",
        help="Write each slice's AIP, the pairwise transforms and a manifest (a folder, or a .zip by the suffix) "
        "so the slices can be aligned by hand in napari on another machine; only the table comes back.",
        function=export_alignment_package,
        params=PackageParams,
        inputs=(Input("reconstruction", "Reconstruction folder (with 10_common and 12_register)", "dir"),
                Input("out_path", "Package to write (.zip, or a folder)", "out_file")),
        outputs=lambda result: [],
        summary=_package_summary,
    )
)

register(
    Step(
        name="alignment-import",
        title="Import aligned transforms",
        help="Merge the pairs set or verified by hand in a returned alignment table into the reconstruction's "
        "12_register/pairwise_registration.csv (automatic results kept in auto_* columns) and note them in the "
        "slice configuration; restack afterwards.",
        function=import_alignment_transforms,
        params=ImportParams,
        inputs=(Input("table", "The pairwise_registration.csv aligned elsewhere", "file"),
                Input("reconstruction", "Reconstruction folder (with 10_common and 12_register)", "dir")),
        outputs=lambda result: [],
        summary=_import_summary,
    )
)
