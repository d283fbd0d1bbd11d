"""The reconstruction chain: mosaic grids -> resample -> curvature -> illumination -> stitch -> beam profile ->
interface crop -> normalise (steps 1-7, per slice), then the volume assembly: quality -> re-homing -> common
space -> interpolation -> pairwise registration -> auto-exclusion -> stacking -> bias field -> atlas -> report
(steps 8-16), each step the registered one, each into its own numbered folder.

Every step keeps its own parameters (its config-file section); the chain only says which optional steps run
and how (workers, memory). :mod:`napari_soct.pipeline.chain` keeps a record per finished step, so a re-run
(also after ``kill -9``) resumes where the last one stopped and recomputes what changed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields
from pathlib import Path

from ..processing.params import param
from ..processing.slices import SliceRunParams, SliceStepResult
from .chain import ChainState, Stage, StageOutcome, folder_fingerprint, run_stages
from .steps import STEPS, Input, Step, register

__all__ = ["SLICE_STAGES", "ASSEMBLY_STAGES", "ReconstructParams", "ReconstructResult", "reconstruct",
           "enabled_stages"]



# ------------------------------------------------------------------------------------------ stage wiring
def _slice_stage(step: Step, state: ChainState, where: Path, run: dict):
    source = state.slices_dir or state.mosaic_dir
    result = step.function(source, where, **run)
    state.slices_dir = where
    return result, result.paths


def _quality(step, state, where, run):
    r = step.function(state.slices_dir, str(state.slice_config or ""), where, **run)
    state.slice_config = r.slice_config_path
    return r, [r.slice_config_path, r.report_path]


def _rehoming(step, state, where, run):
    r = step.function(state.shifts, where, slice_config=state.slice_config, **run)
    state.shifts = r.shifts_path
    state.slice_config = r.slice_config_path or state.slice_config
    return r, [r.shifts_path, r.report_path]


def _common_space(step, state, where, run):
    r = step.function(state.slices_dir, state.shifts, where, slice_config=str(state.slice_config or ""), **run)
    state.common = where
    return r, [where / "common_space.csv"]


def _interpolate(step, state, where, run):
    r = step.function(state.common, where, slice_config=str(state.slice_config or ""), **run)
    state.interpolated = where
    final = where / "slice_config_final.csv"
    state.slice_config = final if final.is_file() else state.slice_config
    return r, [final]


def _register(step, state, where, run):
    r = step.function(state.common, where, interpolated_dir=str(state.interpolated or ""),
                      slice_config=str(state.slice_config or ""), **run)
    state.registration = where / "pairwise_registration.csv"
    return r, [state.registration]


def _auto_exclude(step, state, where, run):
    r = step.function(state.registration, state.slice_config, where, **run)
    state.slice_config = where / "slice_config.csv"
    return r, [state.slice_config]


def _stack(step, state, where, run):
    r = step.function(state.common, state.registration or "", where, interpolated_dir=str(state.interpolated or ""),
                      slice_config=str(state.slice_config or ""), **run)
    state.volume = Path(r.volume_path)
    return r, [state.volume]


def _bias(step, state, where, run):
    r = step.function(state.volume, where, **run)
    state.volume = Path(r.path)
    return r, [state.volume]


def _atlas(step, state, where, run):
    r = step.function(state.volume, Path(state.atlas_template), where, **run)
    return r, [Path(r.path)]


def _report(step, state, where, run):
    r = step.function(state.out_dir, **run)
    state.report = Path(r.report_path)
    return r, [state.report]


#: The per-slice steps 1-7 (switch: the ReconstructParams field that enables an optional step).
SLICE_STAGES = (
    Stage("resample", "01_resample", "resample", _slice_stage),
    Stage("curvature", "02_curvature", "fix_curvature", _slice_stage),
    Stage("illumination", "03_illumination", "fix_illumination", _slice_stage),
    Stage("stitch", "04_stitch", None, _slice_stage),
    Stage("beam", "05_beam", None, _slice_stage),
    Stage("crop", "06_crop", None, _slice_stage),
    Stage("normalize", "07_normalize", None, _slice_stage),
)

#: The volume assembly, steps 8-16, and the report.
ASSEMBLY_STAGES = (
    Stage("quality", "08_quality", "assess_quality", _quality),
    Stage("rehoming", "09_rehoming", "detect_rehoming", _rehoming),
    Stage("common-space", "10_common", None, _common_space),
    Stage("interpolate", "11_interpolate", "interpolate_missing", _interpolate),
    Stage("register", "12_register", None, _register),
    Stage("auto-exclude", "13_exclude", "auto_exclude", _auto_exclude),
    Stage("stack", "14_stack", None, _stack),
    Stage("bias", "15_bias", "correct_bias", _bias),
    Stage("atlas", "16_atlas", "atlas_template", _atlas),
    Stage("report", ".", "report", _report),
)


@dataclass
class ReconstructParams(SliceRunParams):
    """Which optional steps of the chain run; each step's own parameters come from its config section."""

    resample: bool = param(False, "Run step 1, resampling (its resolution_um is in the [resample] section)")
    fix_curvature: bool = param(False, "Run step 2, focal curvature correction")
    fix_illumination: bool = param(True, "Run step 3, illumination correction (BaSiC)")
    assemble: bool = param(True, "Continue with the volume assembly (steps 8-16) into one stacked volume")
    assess_quality: bool = param(True, "Run step 8, slice quality scoring and auto-exclusion")
    detect_rehoming: bool = param(True, "Run step 9, encoder-glitch / re-homing detection on shifts_xy.csv")
    interpolate_missing: bool = param(True, "Run step 11, fill single missing slices (zmorph)")
    auto_exclude: bool = param(True, "Run step 13, exclude clusters of poorly registered slices")
    correct_bias: bool = param(False, "Run step 15, N4 bias field correction of the stacked volume")
    atlas_template: str = param("", "Atlas template file for step 16 (empty: no atlas alignment)")
    report: bool = param(True, "Write report.html in the output folder at the end")
    config_file: str = param("", "TOML config file whose step sections set each step's parameters (empty: defaults)")


def enabled_stages(params: ReconstructParams) -> list[Stage]:
    """The stages ``params`` switches on, in order (per-slice, then assembly when ``params.assemble``)."""
    stages = list(SLICE_STAGES) + (list(ASSEMBLY_STAGES) if params.assemble else [])
    chosen = [s for s in stages if s.switch is None or bool(getattr(params, s.switch))]
    missing = [s.step for s in chosen if s.step not in STEPS]
    if missing:
        raise ValueError(f"step(s) {', '.join(missing)} are not available in this installation")
    return chosen


@dataclass
class ReconstructResult:
    """What every stage did, and the final products."""

    out_dir: Path
    outcomes: list[StageOutcome] = field(default_factory=list)
    volume: Path | None = None  # the final volume (stacked, bias-corrected when run)
    report: Path | None = None
    slices_dir: Path | None = None
    seconds: float = 0.0

    @property
    def steps(self) -> list[SliceStepResult]:
        """Results of the per-slice steps that ran in this call."""
        return [o.result for o in self.outcomes if isinstance(o.result, SliceStepResult)]

    def outcome(self, step: str) -> StageOutcome:
        return next(o for o in self.outcomes if o.step == step)

    @property
    def paths(self) -> list[Path]:
        """The final per-slice outputs (normalised slices)."""
        from ..processing.slices import find_slice_files

        return list(find_slice_files(self.slices_dir).values()) if self.slices_dir else []


def run_options(params) -> dict:
    return {f.name: getattr(params, f.name) for f in fields(SliceRunParams)}


def reconstruct(mosaic_dir, out_dir, params: ReconstructParams | None = None, *, step_params: dict | None = None,
                rerun_from: str | None = None, until: str | None = None, progress=None,
                cancel=None) -> ReconstructResult:
    """Run the chain on a folder of mosaic grids: steps 1-7 per slice, then (``params.assemble``) 8-16.

    Parameters
    ----------
    mosaic_dir : path
        Folder of ``mosaic_grid_3d_z*.ome.zarr`` with ``shifts_xy.csv`` and ``slice_config.csv`` (the
        preprocessing output).
    out_dir : path
        One sub-folder per step (``04_stitch/slice_z07_stitch.ome.zarr`` ...), the report, and the run records
        in ``.soct/``. Re-running into the same folder keeps what is finished and unchanged.
    step_params : dict, optional
        ``{step name: params dataclass}``; overrides the config file named in ``params.config_file``.
    rerun_from, until : str, optional
        Recompute from this step on / stop after this step.
    progress : callable, optional
        ``progress(done, total, message)``, 1000 units per step.
    """
    from .config import load_config

    params = params or ReconstructParams()
    started = time.perf_counter()
    configured = load_config(params.config_file) if params.config_file else {}
    configured.update(step_params or {})
    mosaic_dir, out_dir = Path(mosaic_dir), Path(out_dir)
    if not mosaic_dir.is_dir():
        raise FileNotFoundError(f"mosaic_dir: {mosaic_dir} is not a folder")
    state = ChainState(out_dir, mosaic_dir=mosaic_dir, shifts=_existing(mosaic_dir / "shifts_xy.csv"),
                       slice_config=_existing(mosaic_dir / "slice_config.csv"))
    state.atlas_template = params.atlas_template
    if params.assemble and state.shifts is None:
        raise FileNotFoundError(f"{mosaic_dir}: no shifts_xy.csv (the preprocessing output); the volume assembly "
                                "needs it (or run with assemble=False)")
    outcomes = run_stages(enabled_stages(params), state, configured=configured, options=run_options(params),
                          origin=folder_fingerprint(mosaic_dir), rerun_from=rerun_from, until=until,
                          progress=progress, cancel=cancel)
    return ReconstructResult(out_dir, outcomes, state.volume, state.report, state.slices_dir,
                             time.perf_counter() - started)


def _existing(path: Path) -> Path | None:
    return path if path.is_file() else None


def _summary(result: ReconstructResult) -> str:
    lines = [f"reconstruct: {len(result.outcomes)} step(s) in {result.seconds:.1f} s into {result.out_dir}"]
    for o in result.outcomes:
        if o.action == "kept":
            lines.append(f"  {o.step}: kept from an earlier run (same inputs and parameters)")
        else:
            lines.append(f"  {STEPS[o.step].summary(o.result)}" + (" (resumed)" if o.action == "resumed" else ""))
    if result.volume is not None:
        lines.append(f"  volume: {result.volume}")
    if result.report is not None:
        lines.append(f"  report: {result.report}")
    return "\n".join(lines)


def _outputs(result: ReconstructResult) -> list[tuple[Path, str]]:
    if result.volume is not None:
        return [(result.volume, "image")]
    return [(p, "image") for p in result.paths]


register(
    Step(
        name="reconstruct",
        title="Reconstruct (steps 1-16)",
        help="Run the chain on mosaic grids: resample, focal curvature, illumination, stitching, beam profile, "
        "interface crop and normalisation per slice, then quality, re-homing, common space, interpolation, "
        "registration, auto-exclusion, stacking, bias field and atlas alignment into one volume, and the report; "
        "each step into its own numbered folder.",
        function=reconstruct,
        params=ReconstructParams,
        inputs=(
            Input("mosaic_dir", "Folder of mosaic grids (the preprocess output)", "dir"),
            Input("out_dir", "Output folder (one sub-folder per step)", "out_dir"),
        ),
        outputs=_outputs,
        summary=_summary,
    )
)
