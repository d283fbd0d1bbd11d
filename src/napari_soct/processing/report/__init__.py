"""Quality report: every step's metrics of a reconstruction gathered into one HTML page (or text).

``generate_report(out_dir)`` finds the outputs of every step under a reconstruction folder (the numbered folders
``01_resample`` ... ``16_atlas`` of ``napari-soct reconstruct``, or folders named otherwise, recognised by the
files each step writes; the preprocessing folder as recorded by the chain or as a sibling), evaluates the
thresholds of :data:`~napari_soct.processing.report.checks.CHECKS` (OK / warning / error per slice, pair, tile
and step) and writes one self-contained page: a summary table (each step: ran?, status with its worst check,
seconds), the warnings and errors with what to check, a table of slices (exclusions with their reasons), then one
section per step with its tables, inline SVG plots (stage drift raw against cleaned with glitches marked,
registration metrics per pair, z-overlaps, scores) and PNG previews (slice AIPs at a coarse pyramid level,
orthogonal sections of the stacked volume), and the thresholds used. Steps that did not run are listed as
"not run", which is not a problem. Pairs aligned or verified by hand in the Slice alignment widget are the user's
decision: the checks of the automatic registration list them as OK with a note and the summary counts them
apart (see :mod:`.hand`).

Modules: :mod:`.collect` (find and read), :mod:`.checks` (the thresholds), :mod:`.hand` (pairs decided by hand),
:mod:`.plots` (SVG), :mod:`.previews` (PNG), :mod:`.html` (rendering).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from ..io.atomic import IF_EXISTS_CHOICES, atomic_output, check_can_write
from ..io.omezarr import open_ome_zarr
from ..params import param, validate_params
from ..progress import Progress
from .checks import CHECKS, LEVELS, Check, Finding, apply_overrides, evaluate, parse_overrides
from .collect import SLICE_STEPS, STEP_SPECS, RunRecord, StepRecord, collect_run
from .hand import hand_summary
from .html import ReportContext, render_html, render_text
from .previews import png_bytes, png_file_preview, slice_aip, volume_sections

__all__ = ["ReportParams", "ReportResult", "StepSummary", "generate_report", "run_report", "CHECKS", "Check",
           "Finding", "STEP_SPECS", "collect_run"]

GIB = 1024**3
FORMATS = ("html", "text")


@dataclass
class ReportParams:
    """What the quality report includes and where it goes."""

    output: str = param("", "Report file (empty: report.html, or report.txt for the text format, in the "
                        "reconstruction folder)")
    format: str = param("html", "html: one self-contained page with tables, plots and previews; text: the summary "
                        "and the findings", choices=FORMATS)
    mosaic_dir: str = param("", "Preprocessing folder (preprocess_metrics.json, shifts_xy.csv, previews); empty: "
                            "the one the chain recorded, or a sibling folder holding preprocess_metrics.json")
    thresholds: str = param("", "Threshold overrides: 'check=warn:error', 'check=off' or 'flag_check=error', "
                            "separated by ';' (check ids in the report's thresholds table)")
    previews: bool = param(True, "Embed previews: slice AIPs, orthogonal sections of the stacked volume, QC images")
    preview_size_px: int = param(256, "Longest side of a preview image", min=32, max=2048, unit="px", advanced=True)
    verbose: bool = param(False, "List every tile in the tile QC tables, not only the flagged ones", advanced=True)
    memory_budget_gb: float = param(1.0, "Peak memory for reading previews, in GiB", min=1e-3, unit="GiB",
                                    advanced=True)
    if_exists: str = param("error", "Existing report: 'error' refuses, 'skip' keeps it, 'overwrite' replaces it",
                           choices=IF_EXISTS_CHOICES, advanced=True)


@dataclass
class StepSummary:
    """One line of the summary table.

    Attributes
    ----------
    key, title : str
    number : int
    ran : bool
    status : {"ok", "warning", "error", "not run"}
    worst : Finding or None
        The most severe finding of the step.
    seconds : float or None
    folder : Path or None
    n_warnings, n_errors : int
    n_by_hand : int
        Failing values of the automatic registration's checks on rows decided by hand (OK, not counted above).
    hand_counts : dict
        Rows decided by hand (``{"set by hand": 2, "verified by hand": 1}``), see :mod:`.hand`.
    """

    key: str
    number: int
    title: str
    ran: bool
    status: str
    worst: Finding | None = None
    seconds: float | None = None
    folder: Path | None = None
    n_warnings: int = 0
    n_errors: int = 0
    n_by_hand: int = 0
    hand_counts: dict = field(default_factory=dict)

    @property
    def by_hand_text(self) -> str:
        """``"2 pairs set by hand, 1 pair verified by hand"`` (``""`` when none)."""
        return hand_summary(self.hand_counts)


@dataclass
class ReportResult:
    """What :func:`generate_report` wrote and found.

    Attributes
    ----------
    path : Path
        The report file.
    format : str
    status : {"ok", "warning", "error"}
        Worst status over the steps that ran.
    steps : list of StepSummary
        Every step of the pipeline, in order (``status == "not run"`` for those without outputs).
    findings : list of Finding
        The warnings and errors.
    by_hand : list of Finding
        Failing values of the automatic registration's checks on pairs decided by hand: level ``"ok"``, with
        their note (``"set by hand"``, ``"verified by hand"``).
    mosaic_dir : Path or None
    seconds : float
    skipped : bool
        True when an existing report was kept (``if_exists="skip"``).
    """

    path: Path
    format: str = "html"
    status: str = "ok"
    steps: list[StepSummary] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    mosaic_dir: Path | None = None
    seconds: float = 0.0
    skipped: bool = False
    by_hand: list[Finding] = field(default_factory=list)

    @property
    def report_path(self) -> Path:
        """Same as :attr:`path`."""
        return self.path

    def step(self, key: str) -> StepSummary:
        """The summary of step ``key``."""
        for s in self.steps:
            if s.key == key:
                return s
        raise KeyError(f"unknown step {key!r}; known: {', '.join(s.key for s in self.steps)}")


def _summaries(run: RunRecord, findings: list[Finding], by_hand: list[Finding]) -> list[StepSummary]:
    out = []
    for record in run.steps:
        mine = [f for f in findings if f.step == record.key]
        status = "not run"
        worst = None
        if record.ran:
            status = "ok"
            for f in mine:
                if LEVELS.index(f.level) > LEVELS.index(status):
                    status, worst = f.level, f
            if worst is None and mine:
                worst = mine[0]
        out.append(StepSummary(record.key, record.spec.number, record.title, record.ran, status, worst,
                               record.seconds, record.folder, sum(f.level == "warning" for f in mine),
                               sum(f.level == "error" for f in mine),
                               sum(f.step == record.key for f in by_hand), dict(record.hand_counts)))
    return out


def _volume_info(path: Path) -> str:
    image = open_ome_zarr(path)
    soct = {**(image.attributes.get("soct") or {}), **{k: v for k, v in image.attributes.items() if k != "soct"}}
    scale_um = ", ".join(f"{s * 1000:.3g}" for s in image.scales_mm[0][-3:])
    text = (f"{path.name}: {' x '.join(map(str, image.shape))} voxels of ({scale_um}) um, {len(image.levels)} "
            f"pyramid level(s)")
    for key in ("section_thickness_planes", "canvas_origin_mm"):
        if key in soct:
            text += f"; {key.replace('_', ' ')} {soct[key]}"
    if isinstance(soct.get("slice_z0"), dict):
        text += f"; {len(soct['slice_z0'])} slices stacked"
    return text


def _preview_jobs(run: RunRecord, params: ReportParams) -> list[tuple]:
    """(kind, step, name, path) of every preview to make."""
    if params.format != "html" or not params.previews:
        return []
    jobs = []
    pre = run.step("preprocess")
    for path in pre.files.get("previews", []) if pre.ran else []:
        jobs.append(("file", "preprocess", path.name, path))
    last_slice_step = next((run.step(k) for k in reversed(SLICE_STEPS) if run.step(k).ran and
                            run.step(k).files.get("slices")), None)
    for record in (last_slice_step, run.step("common-space"), run.step("interpolate")):
        if record is not None and record.ran:
            jobs += [("aip", record.key, sid, path) for sid, path in sorted(record.files.get("slices", {}).items())]
    for key in ("stack", "bias"):
        record = run.step(key)
        if record.ran and record.files.get("volume"):
            jobs.append(("volume", key, record.files["volume"].name, record.files["volume"]))
    atlas = run.step("atlas")
    if atlas.ran and atlas.files.get("preview"):
        jobs.append(("file", "atlas", atlas.files["preview"].name, atlas.files["preview"]))
    return jobs


def _make_previews(jobs, ctx: ReportContext, params: ReportParams, tracker: Progress,
                   records: dict[str, StepRecord]) -> None:
    budget = int(params.memory_budget_gb * GIB)
    size = params.preview_size_px
    for kind, step, name, path in jobs:
        try:
            if kind == "file":  # QC images made by the steps (the atlas preview has three panels side by side)
                image = png_file_preview(path, size * (3 if step == "atlas" else 1))
                ctx.file_previews.setdefault(step, []).append((name, png_bytes(image)))
            elif kind == "aip":
                ctx.slice_aips.setdefault(step, []).append((name, png_bytes(slice_aip(path, size, budget))))
            else:
                ctx.volume_info[step] = _volume_info(path)
                views = volume_sections(path, size, budget)
                ctx.volume_views[step] = {view: png_bytes(image) for view, image in views.items()}
        except (OSError, ValueError, KeyError, IndexError) as err:
            records[step].notes.append(f"no preview of {Path(path).name}: {type(err).__name__}: {err}")
        tracker.advance(1, f"report: preview {Path(path).name}")


def generate_report(out_dir, report_path=None, params: ReportParams | None = None, *, progress=None,
                    cancel=None) -> ReportResult:
    """Gather every step's metrics of a reconstruction into one report file.

    Parameters
    ----------
    out_dir : path-like
        The reconstruction folder (``napari-soct reconstruct``'s output, or any folder holding step outputs).
    report_path : path-like, optional
        The report file; default ``params.output``, else ``out_dir/report.html`` (``report.txt`` for text).
    params : ReportParams, optional
    progress : callable, optional
        ``progress(done, total, message)``.
    cancel : object with ``is_set()``, optional

    Returns
    -------
    ReportResult

    Raises
    ------
    FileNotFoundError
        If ``out_dir`` is not a folder or holds no output of any step.
    ValueError
        For bad parameters (e.g. an unknown check in ``thresholds``).
    OutputExistsError
        If the report exists and ``if_exists == "error"``.
    """
    start = time.perf_counter()
    params = params or ReportParams()
    validate_params(params)
    checks, changed = apply_overrides(CHECKS, parse_overrides(params.thresholds))
    out_dir = Path(out_dir)
    default_name = "report.html" if params.format == "html" else "report.txt"
    path = Path(report_path or params.output or out_dir / default_name)
    tracker = Progress(2, progress, cancel)
    tracker.check()
    run = collect_run(out_dir, params.mosaic_dir or None)
    if not run.ran:
        raise FileNotFoundError(
            f"{out_dir}: no pipeline outputs found (expected step folders such as 07_normalize/normalize_metrics.json, "
            "08_quality/quality_report.json, 12_register/pairwise_registration.csv, or preprocess_metrics.json)")
    if not check_can_write(path, params.if_exists):
        return ReportResult(path, params.format, mosaic_dir=run.mosaic_dir, skipped=True,
                            seconds=time.perf_counter() - start)
    evaluated = evaluate(run, checks, include_by_hand=True)
    findings = [f for f in evaluated if f.level != "ok"]
    by_hand = [f for f in evaluated if f.level == "ok"]  # the user decided these pairs: listed, not counted
    summaries = _summaries(run, findings, by_hand)
    overall = "ok"
    for s in summaries:
        if s.ran and LEVELS.index(s.status) > LEVELS.index(overall):
            overall = s.status
    ctx = ReportContext(findings, checks, CHECKS, changed, overall, time.strftime("%Y-%m-%d %H:%M:%S"),
                        verbose=params.verbose, by_hand=by_hand)
    jobs = _preview_jobs(run, params)
    tracker.total += len(jobs)
    tracker.advance(1, "report: metrics read")
    _make_previews(jobs, ctx, params, tracker, {r.key: r for r in run.steps})
    text = render_html(run, summaries, ctx) if params.format == "html" else render_text(run, summaries, ctx)
    tracker.check()
    with atomic_output(path, "overwrite" if params.if_exists == "overwrite" else "error") as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
    tracker.advance(1, "report: written")
    return ReportResult(path, params.format, overall, summaries, findings, run.mosaic_dir,
                        time.perf_counter() - start, by_hand=by_hand)


def run_report(out_dir, params: ReportParams | None = None, *, progress=None, cancel=None) -> ReportResult:
    """The ``report`` step: :func:`generate_report` with the output path taken from ``params.output``."""
    return generate_report(out_dir, None, params, progress=progress, cancel=cancel)
