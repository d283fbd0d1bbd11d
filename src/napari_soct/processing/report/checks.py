"""Quality thresholds: one declarative table of checks, evaluated on the tables of :mod:`.collect`.

Each :class:`Check` reads one metric of one table of one step (``slices``, ``tiles``, ``pairs``, ``transitions``,
``zmatches``, ``decisions`` or ``step``) and says when it is a warning and when an error:

- ``kind="low"``: a value below ``warn`` is a warning, below ``error`` an error;
- ``kind="high"``: above ``warn`` a warning, above ``error`` an error;
- ``kind="flag"``: a true value is a finding of level ``level`` (its reason from the row's ``reason`` column).

Rows without the metric are not checked (older or partial outputs), so a check never fails for lack of data.
Thresholds can be overridden with a text such as ``"pair_ncc_after=0.6:0.4; tile_overlap_ncc=off;
glitch=error"`` (see :func:`parse_overrides`), e.g. from ``ReportParams.thresholds``.

Checks of the automatic registration (``by_hand=True``) do not count as problems on a row the user decided in the
Slice alignment widget (a pair set or verified by hand, see :mod:`.hand`): :func:`evaluate` then gives an ``"ok"``
finding with a note (``"set by hand"``) instead of a warning or an error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

__all__ = ["Check", "CHECKS", "Finding", "LEVELS", "worse", "parse_overrides", "apply_overrides", "evaluate",
           "subject_of", "row_identity"]

#: Status levels, best first; "not run" is outside this order (a step that did not run is not a problem).
LEVELS = ("ok", "warning", "error")

# Hints from the seed's "Troubleshooting" and "Interpreting the report" sections, shown next to failing checks.
_HINT_REGISTRATION = ("High registration error: check the slice alignment (pairwise overlay in napari); on "
                      "registration failures try another pairwise transform or metric; a damaged or excluded "
                      "neighbouring slice also shows up here")
_HINT_DRIFT = ("High translation: significant sample drift between slices. Against a curved ('boomerang') "
               "volume: keep re-homing detection on (for legacy shifts files set tile_fov_mm), refine unreliable "
               "transitions from the images in the common-space step, and prefer rotation-only transforms with "
               "tight confidence gating (conservative profile)")
_HINT_Z = ("Large z-offset variance: inconsistent slice thickness or registration problems; check "
           "slice_thickness_um and the stage z positions")
_HINT_BANDING = ("Shadowing/banding between slices: check the agarose mask of the normalisation, enable the "
                 "illumination correction and stack blending")
_HINT_COVERAGE = "Low mask coverage: segmentation issues or sparse tissue"
_HINT_GLITCH = ("Encoder glitch: a stage position that its next step undoes was corrected; check the drift plot "
                "(raw against cleaned)")
_HINT_REHOMING = ("Re-homing kept: the stage moved to a new origin; for legacy shifts files set tile_fov_mm so "
                  "mosaic-expansion jumps are taken out")
_HINT_EXCLUDED = ("Excluded slices are filled by interpolation when the gap is one slice, else left as gaps; set "
                  "use=true in slice_config.csv to keep a slice")
_HINT_HAND = ("Decided by hand in the Slice alignment widget: the automatic metric is shown for reference, the "
              "user's transform is used")
_HINT_STITCH = ("Tiles matched poorly: check the overlap fraction, the illumination correction and the tile "
                "previews; residuals above max_residual_px are clamped to the stage model")


@dataclass(frozen=True)
class Check:
    """One threshold (see the module docstring).

    Attributes
    ----------
    id : str
        Name used in overrides and shown in the report.
    step : str
        Step key (see :data:`~napari_soct.processing.report.collect.STEP_SPECS`).
    table : str
        Table of the step whose rows are checked.
    metric : str
        Column read.
    label : str
        What the value is, in words.
    kind : {"low", "high", "flag"}
    warn, error : float or None
        Thresholds of ``low``/``high`` checks (None: no such level).
    level : {"warning", "error"}
        Level of a ``flag`` check.
    unit : str
    reason : str
        Column whose text explains a flag (e.g. ``auto_exclude_reason``).
    hint : str
        What to do about it (shown next to the finding).
    by_hand : bool
        The check judges the automatic registration: on a row decided by hand (its ``_by_hand`` note, see
        :mod:`.hand`) a failing value is listed as OK with that note, not as a problem.
    """

    id: str
    step: str
    table: str
    metric: str
    label: str
    kind: str = "high"
    warn: float | None = None
    error: float | None = None
    level: str = "warning"
    unit: str = ""
    reason: str = ""
    hint: str = ""
    by_hand: bool = False

    def describe(self) -> str:
        """The thresholds in words (``< 0.5 warning, < 0.3 error``)."""
        if self.kind == "flag":
            return f"true: {self.level}"
        op = "<" if self.kind == "low" else ">"
        parts = [f"{op} {_fmt(v)}{self.unit} {name}" for name, v in (("warning", self.warn), ("error", self.error))
                 if v is not None]
        return ", ".join(parts) or "off"


CHECKS: tuple[Check, ...] = (
    # 0 preprocessing
    Check("galvo_confidence", "preprocess", "slices", "galvo_confidence", "galvo detection confidence", "low", 0.6,
          0.3, hint="Galvo band detection uncertain: look at the slice preview; tune galvo_confidence_threshold"),
    Check("missing_tiles", "preprocess", "slices", "missing_fraction", "fraction of tiles missing", "high", 0.0,
          0.25, reason="_missing_reason", hint="Missing tiles leave holes: check the raw acquisition; exclude the "
          "slice (use=false in slice_config.csv) if the hole matters"),
    Check("bad_tiles", "preprocess", "slices", "bad_tiles", "unreadable tiles", "high", 0.0, None,
          reason="bad_list", hint="Unreadable tiles were replaced by zeros: check the raw files"),
    # 1-7 in-slice chain
    Check("slice_missing", "*", "slices", "missing", "slice missing from this step's outputs", "flag",
          level="error", hint="The slice went through the earlier steps but not this one: rerun the step"),
    Check("illumination_converged", "illumination", "slices", "converged_fraction", "fraction of planes converged",
          "low", 0.9, 0.5, hint="BaSiC did not converge on some planes: raise max_iterations or working_size"),
    Check("stitch_residual", "stitch", "slices", "rms_residual_px", "RMS tile residual", "high", 1.0, 2.0, unit=" px",
          hint=_HINT_STITCH),
    Check("stitch_clamped", "stitch", "slices", "n_clamped", "tiles clamped to the stage model", "high", 0.0, None,
          hint=_HINT_STITCH),
    Check("stitch_pairs_used", "stitch", "slices", "pairs_used_fraction", "fraction of tile pairs used", "low", 0.8,
          0.5, hint=_HINT_STITCH),
    Check("stitch_uncovered", "stitch", "slices", "uncovered_fraction", "fraction of the canvas without a tile",
          "high", 0.05, 0.25, hint="Holes in the stitched slice: missing tiles or a too small overlap"),
    Check("tile_overlap_ncc", "stitch", "tiles", "overlap_ncc", "tile overlap NCC", "low", 0.5, 0.2,
          hint=_HINT_STITCH),
    Check("tile_residual", "stitch", "tiles", "residual_px", "tile placement residual", "high", 1.0, 2.0,
          unit=" px", hint=_HINT_STITCH),
    Check("beam_gain_capped", "beam", "slices", "gain_capped", "depth gain reached max_gain", "flag",
          hint="The beam profile needed more gain than max_gain allows at depth: little signal there"),
    Check("crop_tissue_fraction", "crop", "slices", "tissue_fraction", "tissue fraction", "low", 0.2, 0.05,
          hint=_HINT_COVERAGE),
    Check("crop_interface_deviation", "crop", "slices", "interface_deviation_um",
          "interface depth away from the median slice", "high", 100.0, 250.0, unit=" um",
          hint="The tissue surface of this slice is far from the others': check the interface detection"),
    Check("normalize_scale", "normalize", "slices", "scale_deviation", "normalisation factor (x or 1/x)", "high",
          2.0, 4.0, hint=_HINT_BANDING),
    Check("normalize_clipped", "normalize", "slices", "scale_clipped", "normalisation scale at min/max_scale",
          "flag", hint=_HINT_BANDING),
    # 8 quality
    Check("quality_score", "quality", "slices", "quality_score", "slice quality score", "low", 0.7, 0.3,
          reason="auto_exclude_reason", hint="A low score means an empty, washed-out or blurred slice"),
    Check("quality_auto_excluded", "quality", "slices", "auto_excluded", "slice auto-excluded", "flag",
          reason="auto_exclude_reason", hint=_HINT_EXCLUDED),
    # 9 re-homing
    Check("glitch", "rehoming", "transitions", "glitch", "encoder glitch corrected", "flag", hint=_HINT_GLITCH),
    Check("rehoming", "rehoming", "transitions", "rehoming", "re-homing jump kept", "flag", hint=_HINT_REHOMING),
    Check("unreliable_shift", "rehoming", "transitions", "unreliable", "stage step marked unreliable", "flag",
          hint="Unreliable stage step: enable the image-based refinement of the common-space step"),
    # 10 common space
    Check("estimated_position", "common-space", "slices", "estimated_position", "used slice placed by an estimate, "
          "not the stage", "flag", reason="position_source",
          hint="The shift into this slice was replaced (excluded neighbour or unreliable step): check its placement"),
    # 11 interpolation
    Check("interpolation_failed", "interpolate", "slices", "interpolation_failed", "interpolation failed, gap left",
          "flag", reason="interpolation_fallback_reason",
          hint="A quality gate failed: the gap stays a gap (nothing fabricated)"),
    # 12 registration (pairs set or verified by hand pass these with a note, see .hand)
    Check("pair_ncc_after", "register", "pairs", "ncc_after", "NCC after registration", "low", 0.5, 0.3,
          hint=_HINT_REGISTRATION, by_hand=True),
    Check("pair_ncc_gain", "register", "pairs", "ncc_gain", "NCC gain of the registration", "low", -0.02, None,
          hint="Registration made the match worse: it should have fallen back to identity", by_hand=True),
    Check("pair_confidence", "register", "pairs", "confidence", "registration confidence", "low", 0.5, 0.2,
          hint=_HINT_REGISTRATION, by_hand=True),
    Check("pair_translation", "register", "pairs", "translation_px", "translation", "high", 10.0, 30.0, unit=" px",
          hint=_HINT_DRIFT, by_hand=True),
    Check("pair_rotation", "register", "pairs", "abs_rotation_deg", "rotation", "high", 2.0, 5.0, unit=" deg",
          hint=_HINT_DRIFT, by_hand=True),
    Check("pair_z_match", "register", "pairs", "z_deviation_planes", "z-match away from the expected plane",
          "high", 2.0, 5.0, unit=" planes", hint=_HINT_Z, by_hand=True),
    Check("pair_z_ncc", "register", "pairs", "z_match_ncc", "z-match NCC", "low", 0.5, 0.3, hint=_HINT_Z,
          by_hand=True),
    Check("pair_fallback", "register", "pairs", "fallback", "fell back to identity", "flag",
          hint=_HINT_REGISTRATION, by_hand=True),
    Check("pair_failed", "register", "pairs", "failed", "registration failed", "flag", level="error",
          hint=_HINT_REGISTRATION, by_hand=True),
    Check("hand_ncc_loss", "register", "pairs", "hand_ncc_loss", "overlap NCC lost by the hand-set transform "
          "against the automatic one (same view)", "high", 0.1, None,
          hint="The transform set by hand matches the overlap clearly worse than the automatic one did: look at "
          "the pair again in the Slice alignment widget (a slipped nudge, the wrong z?); if it is right (the NCC "
          "also weighs the tissue outline), mark it verified"),
    # 13 auto-exclusion
    Check("auto_excluded", "auto-exclude", "slices", "auto_excluded", "slice auto-excluded", "flag",
          reason="auto_exclude_reason", hint=_HINT_EXCLUDED),
    # 14 stacking
    Check("z_overlap", "stack", "zmatches", "_z_deviation_planes", "z-match away from the expected plane", "high",
          2.0, 5.0, unit=" planes", hint=_HINT_Z, by_hand=True),
    Check("z_overlap_ncc", "stack", "zmatches", "_z_ncc", "z-overlap NCC", "low", 0.5, 0.3, hint=_HINT_Z,
          by_hand=True),
    Check("z_overlap_corrected", "stack", "zmatches", "_z_corrected", "z-match replaced as an outlier", "flag",
          hint=_HINT_Z, by_hand=True),
    Check("z_overlap_spread", "stack", "step", "z_overlap_std_planes", "spread of the z-matches around the expected",
          "high", 2.0,
          5.0, unit=" planes", hint=_HINT_Z),
    Check("transform_skipped", "stack", "decisions", "_skipped_transform", "registration transform not applied",
          "flag", reason="_reason", hint="Low registration confidence: the slice was placed by the stage only",
          by_hand=True),
    Check("hand_not_applied", "stack", "decisions", "_hand_not_applied", "transform set by hand not fully applied",
          "flag", reason="_reason", hint="The volume does not show the transform set by hand: stacking changed it "
          "(apply_rotation_only drops its translation, max_rotation_deg clamps its rotation; change those stack "
          "parameters), or the pair was set or reset by hand after stacking; restack"),
    Check("drift_capped", "stack", "decisions", "_drift_capped", "accumulated drift capped", "flag",
          hint=_HINT_DRIFT),
    # 15 bias field, 16 atlas
    Check("bias_cv_ratio", "bias", "step", "cv_ratio", "tissue variation after / before N4", "high", 1.0, 1.5,
          hint="N4 made the tissue less uniform: lower the strength or change the mode"),
    Check("bias_field_ratio", "bias", "step", "field_ratio", "largest / smallest bias field", "high", 4.0, None,
          hint="A strong field was removed: check the corrected volume for flattened anatomy"),
    Check("atlas_ncc", "atlas", "step", "ncc", "NCC with the atlas template", "low", 0.5, 0.3,
          hint="Poor atlas fit: check input_orientation and the template"),
)


@dataclass
class Finding:
    """One check that failed on one row.

    Attributes
    ----------
    check : str
        Check id (``"read"`` for an unreadable file, ``"incomplete"`` for a step folder without outputs).
    step : str
    level : {"warning", "error"}
    subject : str
        What failed (``"slice 3"``, ``"pair 2 -> 3"``, ``""`` for the whole step).
    message : str
        ``"slice 3: quality score 0.45 < 0.7 (warning)"`` with the reason when there is one.
    value : float or None
    hint : str
    row : dict
        The checked row's identity (``slice_id``, ``fixed_id``/``moving_id``, tile ``x``/``y``).
    note : str
        Why a failing value is no problem (level ``"ok"``): ``"set by hand"``, ``"verified by hand"`` or ``"set
        and verified by hand"`` (checks with ``by_hand``).
    """

    check: str
    step: str
    level: str
    subject: str
    message: str
    value: float | None = None
    hint: str = ""
    row: dict | None = None
    note: str = ""

    @property
    def by_hand(self) -> bool:
        """A failing value on a row decided by hand (level ``"ok"``, see :attr:`note`)."""
        return bool(self.note) and self.level == "ok"


def worse(a: str, b: str) -> str:
    """The more severe of two levels."""
    return a if LEVELS.index(a) >= LEVELS.index(b) else b


def _fmt(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def subject_of(table: str, row: dict) -> str:
    """What a row is about, for messages."""
    if table == "step":
        return ""
    if table == "tiles":
        return f"slice {row.get('slice_id')} tile (x {row.get('x')}, y {row.get('y')})"
    if row.get("fixed_id") is not None and row.get("moving_id") is not None:
        return f"pair {row['fixed_id']} -> {row['moving_id']}"
    for name in ("slice_id", "moving_id", "slice"):
        if row.get(name) is not None:
            return f"slice {row[name]}"
    return "row"


def row_identity(row: dict) -> dict:
    """The keys that name a row (slice, pair, tile), for matching findings to table rows."""
    return {k: row[k] for k in ("slice_id", "fixed_id", "moving_id", "x", "y") if row.get(k) is not None}


def parse_overrides(text: str) -> dict[str, tuple]:
    """Parse threshold overrides.

    ``"id=W:E"`` sets the warning and error thresholds of a low/high check (either may be empty: no such
    level); ``"id=off"`` disables any check; ``"id=warning"`` / ``"id=error"`` sets the level of a flag check.
    Entries are separated by ``;`` or ``,``.

    Raises
    ------
    ValueError
        Naming parameter ``thresholds``, the entry and the known check ids.
    """
    known = {c.id: c for c in CHECKS}
    out: dict[str, tuple] = {}
    for entry in (e.strip() for e in text.replace(",", ";").split(";")):
        if not entry:
            continue
        name, sep, value = (p.strip() for p in entry.partition("="))
        where = f"parameter 'thresholds': {entry!r}"
        if not sep:
            raise ValueError(f"{where}: write check=warn:error, check=off or check=warning|error")
        if name not in known:
            raise ValueError(f"{where}: unknown check {name!r}; known checks: {', '.join(sorted(known))}")
        check = known[name]
        if value.lower() == "off":
            out[name] = ("off",)
        elif check.kind == "flag":
            if value.lower() not in ("warning", "error"):
                raise ValueError(f"{where}: {name} is a flag check; give warning, error or off")
            out[name] = ("level", value.lower())
        else:
            warn_text, colon, error_text = value.partition(":")
            try:
                warn = float(warn_text) if warn_text.strip() else None
                error = float(error_text) if error_text.strip() else None
            except ValueError:
                raise ValueError(f"{where}: thresholds must be numbers (check=warn:error)") from None
            if not colon:
                error = check.error
            out[name] = ("thresholds", warn, error)
    return out


def apply_overrides(checks: tuple[Check, ...], overrides: dict[str, tuple]) -> tuple[tuple[Check, ...], set[str]]:
    """Checks with overrides applied (disabled ones left out) and the ids changed."""
    out, changed = [], set()
    for check in checks:
        override = overrides.get(check.id)
        if override is None:
            out.append(check)
            continue
        changed.add(check.id)
        if override[0] == "off":
            continue
        if override[0] == "level":
            out.append(replace(check, level=override[1]))
        else:
            out.append(replace(check, warn=override[1], error=override[2]))
    return tuple(out), changed


def _level(check: Check, value) -> tuple[str, float | None]:
    """Level of a value (``"ok"`` when fine) and the threshold it crossed."""
    if check.kind == "flag":
        return (check.level, None) if value is True else ("ok", None)
    try:
        number = float(value)
    except (TypeError, ValueError):
        return "ok", None
    if not math.isfinite(number):
        return "ok", None
    below = check.kind == "low"
    for level, threshold in (("error", check.error), ("warning", check.warn)):
        if threshold is not None and (number < threshold if below else number > threshold):
            return level, threshold
    return "ok", None


def evaluate(run, checks: tuple[Check, ...] = CHECKS, *, include_by_hand: bool = False) -> list[Finding]:
    """Every failing check of every step that ran, plus unreadable files and incomplete step folders.

    Parameters
    ----------
    run : RunRecord
        From :func:`~napari_soct.processing.report.collect.collect_run`.
    checks : tuple of Check
        The thresholds (:data:`CHECKS` with overrides applied).
    include_by_hand : bool
        Also return the failing values of ``by_hand`` checks on rows decided by hand, as findings of level
        ``"ok"`` with their :attr:`Finding.note` (left out by default: they are no problems).

    Returns
    -------
    list of Finding
        In pipeline order, then check order, then row order.
    """
    findings = []
    for record in run.steps:
        if not record.ran:
            continue
        for problem in record.problems:
            findings.append(Finding("read", record.key, "error", "", problem,
                                    hint="The file is damaged or from another version; rerun the step"))
        if record.incomplete:
            findings.append(Finding("incomplete", record.key, "warning", "",
                                    f"folder {record.folder.name} holds none of "
                                    f"{', '.join(record.spec.markers)} (interrupted run?)",
                                    hint="Rerun the step (if_exists=skip resumes)"))
        for check in checks:
            if check.step not in (record.key, "*"):
                continue
            for row in record.tables.get(check.table, []):
                if check.metric not in row:
                    continue
                value = row[check.metric]
                level, threshold = _level(check, value)
                if level == "ok":
                    continue
                note = str(row.get("_by_hand") or "") if check.by_hand else ""
                if note:
                    if not include_by_hand:
                        continue
                    level = "ok"  # the user decided this pair; the automatic metric is kept for reference
                subject = subject_of(check.table, row)
                if check.kind == "flag":
                    text = check.label
                else:
                    op = "<" if check.kind == "low" else ">"
                    text = f"{check.label} {_fmt(float(value))}{check.unit} {op} {_fmt(threshold)}{check.unit}"
                reason = row.get(check.reason) if check.reason else None
                if reason not in (None, "", False):
                    text += f" - {reason}"
                if note:
                    text += f" (OK: {note})"
                message = f"{subject}: {text}" if subject else text
                findings.append(Finding(check.id, record.key, level, subject, message,
                                        None if check.kind == "flag" else float(value),
                                        _HINT_HAND if note else check.hint, row_identity(row), note))
    return findings
