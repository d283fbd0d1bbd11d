"""The in-slice reconstruction chain: mosaic grids -> resample -> curvature -> illumination -> stitch -> beam
profile -> interface crop -> normalise, each step the registered one, each into its own folder.

Every step keeps its own parameters (its config-file section); the chain only says which optional steps run
and how (workers, memory, existing outputs), so ``if_exists="skip"`` resumes an interrupted chain.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from ..processing.params import param
from ..processing.slices import SliceRunParams, SliceStepResult
from .steps import STEPS, Input, Step, register

__all__ = ["CHAIN", "ReconstructParams", "ReconstructResult", "reconstruct"]

# (step name, folder, optional switch in ReconstructParams or None when always run)
CHAIN = (
    ("resample", "01_resample", "resample"),
    ("curvature", "02_curvature", "fix_curvature"),
    ("illumination", "03_illumination", "fix_illumination"),
    ("stitch", "04_stitch", None),
    ("beam", "05_beam", None),
    ("crop", "06_crop", None),
    ("normalize", "07_normalize", None),
)


@dataclass
class ReconstructParams(SliceRunParams):
    """Which optional steps of the in-slice chain run; each step's own parameters come from its config section."""

    resample: bool = param(False, "Run step 1, resampling (its resolution_um is in the [resample] section)")
    fix_curvature: bool = param(False, "Run step 2, focal curvature correction")
    fix_illumination: bool = param(True, "Run step 3, illumination correction (BaSiC)")
    config_file: str = param("", "TOML config file whose step sections set each step's parameters (empty: defaults)")


@dataclass
class ReconstructResult:
    """Results of every step of the chain, in order, and the final slices."""

    out_dir: Path
    steps: list[SliceStepResult] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def final(self) -> SliceStepResult:
        return self.steps[-1]

    @property
    def paths(self) -> list[Path]:
        return self.final.paths


def _enabled(params: ReconstructParams, switch: str | None) -> bool:
    return switch is None or bool(getattr(params, switch))


def reconstruct(mosaic_dir, out_dir, params: ReconstructParams | None = None, *, step_params: dict | None = None,
                progress=None, cancel=None) -> ReconstructResult:
    """Run the in-slice chain on a folder of mosaic grids.

    Parameters
    ----------
    mosaic_dir : path
        Folder of ``mosaic_grid_3d_z*.ome.zarr`` (the preprocessing output).
    out_dir : path
        One sub-folder per step (``04_stitch/slice_z07_stitch.ome.zarr`` ...).
    step_params : dict, optional
        ``{step name: params dataclass}``; overrides the config file named in ``params.config_file``.
    progress : callable, optional
        ``progress(done, total, message)`` with one unit per step and slice.
    """
    from .config import load_config

    params = params or ReconstructParams()
    started = time.perf_counter()
    configured = load_config(params.config_file) if params.config_file else {}
    configured.update(step_params or {})
    run_options = {f.name: getattr(params, f.name) for f in fields(SliceRunParams)}
    chain = [(name, folder) for name, folder, switch in CHAIN if _enabled(params, switch)]
    missing = [name for name, _ in chain if name not in STEPS]
    if missing:
        raise ValueError(f"step(s) {', '.join(missing)} are not available in this installation")
    out_dir = Path(out_dir)
    result = ReconstructResult(out_dir)
    source = Path(mosaic_dir)
    for index, (name, folder) in enumerate(chain):
        step = STEPS[name]
        step_params_ = replace(configured.get(name, step.params()), **run_options)

        def sub_progress(done, total, message, _i=index, _n=name):
            if progress is not None:
                progress(_i * 1000 + int(1000 * done / max(total, 1)), len(chain) * 1000, f"{_n}: {message}")

        step_result = step.run(source, out_dir / folder, params=step_params_, progress=sub_progress, cancel=cancel)
        result.steps.append(step_result)
        source = out_dir / folder
    result.seconds = time.perf_counter() - started
    return result


def _summary(result: ReconstructResult) -> str:
    lines = [f"reconstruct: {len(result.steps)} step(s) in {result.seconds:.1f} s into {result.out_dir}"]
    lines += [f"  {STEPS[r.step].summary(r)}" for r in result.steps]
    return "\n".join(lines)


register(
    Step(
        name="reconstruct",
        title="Reconstruct slices (steps 1-7)",
        help="Run the in-slice chain on mosaic grids: resample, focal curvature, illumination, stitching, beam "
        "profile, interface crop and normalisation, each step into its own folder.",
        function=reconstruct,
        params=ReconstructParams,
        inputs=(
            Input("mosaic_dir", "Folder of mosaic grids (the preprocess output)", "dir"),
            Input("out_dir", "Output folder (one sub-folder per step)", "out_dir"),
        ),
        outputs=lambda result: [(p, "image") for p in result.paths],
        summary=_summary,
    )
)
