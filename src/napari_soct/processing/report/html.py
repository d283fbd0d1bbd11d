"""The report as one self-contained HTML page (inline CSS, inline SVG plots, base64 PNG previews, no script and
no network reference) or as plain text."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from html import escape

from .checks import LEVELS, Check, Finding, row_identity
from .collect import RunRecord, StepRecord, z_columns
from .hand import hand_summary
from .plots import Series, line_plot
from .previews import data_uri

__all__ = ["ReportContext", "render_html", "render_text", "cumulative_positions"]

STATUS_LABEL = {"ok": "OK", "warning": "warning", "error": "error", "not run": "not run"}

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:1.5em auto;max-width:1150px;color:#222;
padding:0 1em}
h1{margin-bottom:.2em} h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.8em}
h3{margin-bottom:.3em}
table{border-collapse:collapse;margin:.5em 0 1em;font-size:13px}
th,td{border:1px solid #ddd;padding:3px 7px;text-align:left;vertical-align:top}
th{background:#f3f3f3} td.num{text-align:right;font-variant-numeric:tabular-nums}
.badge{display:inline-block;padding:1px 8px;border-radius:9px;font-size:12px;font-weight:600;color:#fff}
.st-ok{background:#2e7d32} .st-warning{background:#e0a800;color:#222} .st-error{background:#c62828}
.st-notrun{background:#9e9e9e}
tr.row-warning td{background:#fff8e1} tr.row-error td{background:#ffebee} tr.row-notrun td{color:#888}
.hint{color:#555;font-size:12px} .note{color:#555}
figure{display:inline-block;margin:4px 8px 8px 0;text-align:center;font-size:12px;vertical-align:top}
figure img{border:1px solid #ccc;background:#000}
details{margin:.5em 0} summary{cursor:pointer;color:#0b5394}
pre{background:#f7f7f7;padding:.5em;overflow:auto;font-size:12px;max-height:320px}
nav a{margin-right:.8em}
svg.plot{display:block;margin:.3em 0 .8em}
"""


@dataclass
class ReportContext:
    """Everything the renderers need besides the run: findings, checks, previews and options."""

    findings: list[Finding]
    checks_active: tuple[Check, ...]
    checks_all: tuple[Check, ...]
    changed: set[str]
    overall: str
    generated: str
    verbose: bool = False
    by_hand: list = field(default_factory=list)  # OK findings on pairs decided by hand (see .hand)
    slice_aips: dict = field(default_factory=dict)  # {step: [(slice_id, png bytes)]}
    volume_views: dict = field(default_factory=dict)  # {step: {view: png bytes}}
    volume_info: dict = field(default_factory=dict)  # {step: text}
    file_previews: dict = field(default_factory=dict)  # {step: [(file name, png bytes)]}

    def __post_init__(self):
        self.status = _RowStatus(self.findings)
        self.checks = {c.id: c for c in self.checks_active}


# ---------------------------------------------------------------------------------------------------- formatting
def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return "nan" if math.isnan(value) else str(value)
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.3e}"
        return f"{value:.{digits}g}"
    if isinstance(value, list | tuple):
        return ", ".join(_fmt(v, digits) for v in value)
    return str(value)


def _badge(status: str) -> str:
    cls = "st-notrun" if status == "not run" else f"st-{status}"
    return f'<span class="badge {cls}">{escape(STATUS_LABEL.get(status, status))}</span>'


def _row_key(row: dict) -> tuple:
    return tuple(sorted(row_identity(row).items()))


class _RowStatus:
    """Worst finding level of each row of each step, from the findings."""

    def __init__(self, findings: list[Finding]):
        self._levels: dict[tuple, str] = {}
        for f in findings:
            if f.row:
                key = (f.step, tuple(sorted(f.row.items())))
                old = self._levels.get(key, "ok")
                self._levels[key] = f.level if LEVELS.index(f.level) > LEVELS.index(old) else old

    def __call__(self, step: str, row: dict) -> str:
        return self._levels.get((step, _row_key(row)), "ok")


def _table(rows: list[dict], columns: list[tuple[str, str]], status=None, step: str = "",
           css: str = "") -> str:
    """An HTML table of ``rows`` with ``columns`` = [(key, header)], plus a status column when ``status`` is
    given (a :class:`_RowStatus`)."""
    if not rows:
        return '<p class="note">(empty)</p>'
    head = "".join(f"<th>{escape(h)}</th>" for _, h in columns)
    if status is not None:
        head += "<th>status</th>"
    body = []
    for row in rows:
        level = status(step, row) if status is not None else "ok"
        if row.get("missing"):
            level = "error"
        cells = []
        for key, _ in columns:
            value = row.get(key)
            cls = ' class="num"' if isinstance(value, int | float) and not isinstance(value, bool) else ""
            cells.append(f"<td{cls}>{escape(_fmt(value))}</td>")
        if status is not None:
            cells.append(f"<td>{_badge(level)}</td>")
        body.append(f'<tr class="row-{level}">{"".join(cells)}</tr>')
    cls = f' class="{css}"' if css else ""
    return f'<table{cls}><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _generic_columns(rows: list[dict], skip=()) -> list[tuple[str, str]]:
    """Every scalar column of the rows, in order of first appearance (derived ``_`` columns left out)."""
    seen = []
    for row in rows:
        for key, value in row.items():
            if key.startswith("_") or key in skip or key in seen or isinstance(value, dict | list):
                continue
            seen.append(key)
    return [(k, k.replace("_", " ")) for k in seen]


def _present(rows: list[dict], columns: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The columns at least one row has a value for."""
    return [(k, h) for k, h in columns if any(r.get(k) is not None for r in rows)]


def cumulative_positions(transitions: list[dict], which: str) -> dict[int, tuple[float, float]]:
    """Stage position (x, y mm) of every slice from its consecutive steps, the first slice at (0, 0).

    ``which`` is ``"raw"`` or ``"clean"`` (the ``<which>_x_mm`` / ``<which>_y_mm`` columns).
    """
    positions: dict[int, tuple[float, float]] = {}
    for t in sorted(transitions, key=lambda t: t["moving_id"]):
        dx, dy = t.get(f"{which}_x_mm"), t.get(f"{which}_y_mm")
        if dx is None or dy is None:
            return {}
        start = positions.setdefault(t["fixed_id"], (0.0, 0.0))
        positions[t["moving_id"]] = (start[0] + dx, start[1] + dy)
    return positions


# ------------------------------------------------------------------------------------------------------- plots
def _drift_plots(transitions: list[dict]) -> str:
    raw, clean = cumulative_positions(transitions, "raw"), cumulative_positions(transitions, "clean")
    if not raw:
        return ""
    # The glitched slice is the one between the two steps of a round trip (or the last one, unpaired).
    glitch_from = {t["fixed_id"] for t in transitions if t.get("glitch")}
    glitch_to = {t["moving_id"] for t in transitions if t.get("glitch")}
    marks_by_slice = {}
    for t in transitions:
        if t.get("glitch") and (t["moving_id"] in glitch_from or t["fixed_id"] not in glitch_to):
            marks_by_slice[t["moving_id"]] = "glitch"
        elif t.get("rehoming"):
            marks_by_slice[t["moving_id"]] = "rehoming"
    out = []
    for axis, label in ((0, "x"), (1, "y")):
        ids = sorted(raw)
        series = [Series("raw (stage metadata)", ids, [raw[i][axis] for i in ids], color="#888", dashed=True,
                         marks={k: marks_by_slice[s] for k, s in enumerate(ids) if s in marks_by_slice})]
        if clean:
            cids = sorted(clean)
            series.append(Series("cleaned (re-homing detection)", cids, [clean[i][axis] for i in cids],
                                 color="#1f77b4"))
        out.append(line_plot(series, title=f"Cumulative stage position {label} per slice", ylabel=f"{label} (mm)"))
    legend = ""
    if marks_by_slice:
        legend = ('<p class="hint">Marked on the raw positions: circles (red) are slices whose encoder glitch was '
                  'corrected, squares (orange) re-homing jumps kept; the first slice is at 0.</p>')
    return "".join(out) + legend


def _threshold_lines(checks: dict[str, Check], check_id: str) -> list[tuple[float, str, str]]:
    check = checks.get(check_id)
    if check is None or check.kind == "flag":
        return []
    lines = []
    if check.warn is not None:
        lines.append((check.warn, f"warning {_fmt(check.warn)}", "#e0a800"))
    if check.error is not None:
        lines.append((check.error, f"error {_fmt(check.error)}", "#c62828"))
    return lines


def _slice_plot(rows: list[dict], key: str, title: str, ylabel: str, checks: dict, check_id: str = "",
                status=None, step: str = "", transform=None) -> str:
    rows = [r for r in rows if isinstance(r.get(key), int | float) and not isinstance(r.get(key), bool)]
    if len(rows) < 1:
        return ""
    ids = [r["slice_id"] for r in rows]
    values = [transform(r[key]) if transform else r[key] for r in rows]
    marks = {}
    if status is not None:
        for k, r in enumerate(rows):
            level = status(step, r)
            if level != "ok":
                marks[k] = level
            elif r.get("auto_excluded") or r.get("manually_excluded"):
                marks[k] = "excluded"
    return line_plot([Series(ylabel, ids, values, marks=marks)], title=title, ylabel=ylabel,
                     hlines=_threshold_lines(checks, check_id) if check_id else [])


def _pair_plots(pairs: list[dict], checks: dict, status) -> str:
    if not pairs:
        return ""
    ids = [p["moving_id"] for p in pairs]
    marks = {k: status("register", p) for k, p in enumerate(pairs) if status("register", p) != "ok"}
    out = [line_plot([Series("NCC before", ids, [p.get("ncc_before") for p in pairs], color="#888", dashed=True),
                      Series("NCC after", ids, [p.get("ncc_after") for p in pairs], marks=marks)],
                     title="Pairwise registration: NCC per pair (x = moving slice)", ylabel="NCC",
                     hlines=_threshold_lines(checks, "pair_ncc_after")),
           line_plot([Series("translation (px)", ids, [p.get("translation_px") for p in pairs], marks=marks)],
                     title="Translation per pair", ylabel="px", hlines=_threshold_lines(checks, "pair_translation")),
           line_plot([Series("rotation (deg)", ids, [p.get("rotation_deg") for p in pairs], marks=marks)],
                     title="Rotation per pair", ylabel="deg"),
           line_plot([Series("confidence", ids, [p.get("confidence") for p in pairs], marks=marks)],
                     title="Registration confidence per pair", ylabel="confidence",
                     hlines=_threshold_lines(checks, "pair_confidence"))]
    return "".join(out)


def _figure(png: bytes, caption: str, **data) -> str:
    attrs = " ".join(f'data-{k.replace("_", "-")}="{escape(str(v))}"' for k, v in data.items())
    return (f'<figure><img src="{data_uri(png)}" alt="{escape(caption)}" {attrs}>'
            f"<figcaption>{escape(caption)}</figcaption></figure>")


# ------------------------------------------------------------------------------------------------ step sections
_SLICE_COLUMNS = {
    "illumination": [("slice_id", "slice"), ("backend", "backend"), ("planes_fitted", "planes fitted"),
                     ("planes_skipped", "skipped"), ("planes_interpolated", "interpolated"),
                     ("converged_fraction", "converged"), ("iterations_mean", "iterations (mean)"),
                     ("flatfield_min", "flat-field min"), ("flatfield_max", "flat-field max"),
                     ("residual_median", "residual (median)"), ("seconds_fit", "fit s")],
    "stitch": [("slice_id", "slice"), ("method", "placement"), ("canvas_shape", "canvas (z, y, x)"),
               ("pairs_used", "pairs used"), ("pairs_total", "pairs"), ("rms_residual_px", "RMS residual px"),
               ("n_clamped", "clamped"), ("tile_ncc_min", "min tile NCC"),
               ("tile_residual_max_px", "max tile residual px"), ("uncovered_fraction", "uncovered"),
               ("affine_rotation_deg", "stage rotation deg"), ("affine_scale_x", "scale x"),
               ("affine_scale_y", "scale y"), ("seconds", "s")],
    "beam": [("slice_id", "slice"), ("surface_depth_samples", "surface depth"),
             ("peak_depth_samples", "peak depth"), ("max_gain_applied", "max gain"), ("gain_capped", "capped")],
    "crop": [("slice_id", "slice"), ("interface_depth_um", "interface depth um"),
             ("interface_deviation_um", "from median um"), ("surface_range_samples", "surface range"),
             ("tissue_fraction", "tissue fraction"), ("kept_samples", "kept samples")],
    "normalize": [("slice_id", "slice"), ("level", "tissue level"), ("smoothed_level", "smoothed"),
                  ("target_level", "target"), ("scale", "scale"), ("scale_clipped", "clipped")],
}


def _slice_step_body(record: StepRecord, ctx) -> list[str]:
    rows = record.tables.get("slices", [])
    columns = _SLICE_COLUMNS.get(record.key) or _generic_columns(rows, skip=("flatfield_path",))
    if record.key in _SLICE_COLUMNS:
        columns = _present(rows, columns) or columns[:1]
    parts = ["<h3>Per slice</h3>", _table(rows, columns, ctx.status, record.key)]
    tiles = record.tables.get("tiles", [])
    if record.key == "stitch" and tiles:
        flagged = [t for t in tiles if ctx.status("stitch", t) != "ok"]
        shown = tiles if ctx.verbose else flagged
        tile_cols = _present(tiles, [("slice_id", "slice"), ("x", "tile x"), ("y", "tile y"),
                                     ("overlap_ncc", "overlap NCC"), ("residual_px", "residual px"),
                                     ("pairs_used", "pairs"), ("y0_px", "y0 px"), ("x0_px", "x0 px")])
        title = "Tile QC (all tiles)" if ctx.verbose else f"Tile QC: {len(flagged)} flagged of {len(tiles)} tiles"
        parts += [f"<h3>{title}</h3>", _table(shown, tile_cols, ctx.status, "stitch") if shown else
                  '<p class="note">every tile within the thresholds</p>']
    if record.key == "beam":
        profiles = record.raw.get("profiles")
        if profiles:
            series = [Series(f"slice {sid}", list(range(len(p))), p) for sid, p in profiles[:12]]
            parts.append(line_plot(series, title="Depth profiles (tissue-averaged)", xlabel="depth sample",
                                   ylabel="mean intensity", integer_x=False))
    if record.key == "crop":
        parts.append(_slice_plot(rows, "interface_depth_um", "Interface depth per slice", "depth (um)", ctx.checks,
                                 status=ctx.status, step="crop"))
    if record.key == "normalize":
        parts.append(_slice_plot(rows, "scale", "Normalisation scale per slice", "scale", ctx.checks,
                                 status=ctx.status, step="normalize"))
    if record.key == "stitch":
        parts.append(_slice_plot(rows, "rms_residual_px", "Stitching RMS residual per slice", "px", ctx.checks,
                                 "stitch_residual", ctx.status, "stitch"))
    return parts


def _body(record: StepRecord, ctx) -> list[str]:
    key, rows = record.key, record.tables.get("slices", [])
    if key in _SLICE_COLUMNS or key in ("resample", "curvature"):
        return _slice_step_body(record, ctx)
    parts: list[str] = []
    if key == "preprocess":
        cols = [("slice_id", "slice"), ("use", "use"), ("notes", "notes"), ("grid", "grid"), ("n_tiles", "tiles"),
                ("missing_tiles", "missing"),
                ("missing_list", "missing (x, y)"), ("bad_tiles", "unreadable"), ("galvo_shift", "galvo shift"),
                ("galvo_confidence", "galvo confidence"), ("galvo_applied", "galvo fixed"), ("seconds", "s")]
        parts += ["<h3>Per slice</h3>", _table(rows, _present(rows, cols), ctx.status, key)]
        if record.tables.get("transitions"):
            parts += ["<h3>Stage drift (shifts_xy.csv, no re-homing step)</h3>",
                      _drift_plots(record.tables["transitions"])]
    elif key == "quality":
        cols = [("slice_id", "slice"), ("use", "use"), ("coverage", "coverage"), ("contrast", "contrast"),
                ("sharpness", "sharpness"), ("quality_score", "score"), ("auto_excluded", "auto-excluded"),
                ("auto_exclude_reason", "reason")]
        min_quality = record.params.get("min_quality")
        parts += ["<h3>Per slice</h3>", _table(rows, cols, ctx.status, key),
                  _slice_plot(rows, "quality_score", "Quality score per slice", "score", ctx.checks,
                              "quality_score", ctx.status, key)]
        if min_quality is not None:
            parts.append(f'<p class="note">min_quality = {_fmt(min_quality)} (slices below are auto-excluded)</p>')
    elif key == "rehoming":
        trans = record.tables.get("transitions", [])
        cols = [("fixed_id", "fixed"), ("moving_id", "moving"), ("kind", "kind"), ("raw_x_mm", "raw x mm"),
                ("raw_y_mm", "raw y mm"), ("clean_x_mm", "cleaned x mm"), ("clean_y_mm", "cleaned y mm"),
                ("correction_mm", "correction mm"), ("reliable", "reliable")]
        parts += ["<h3>Shift / drift</h3>", _drift_plots(trans), "<h3>Consecutive-slice steps</h3>",
                  _table(trans, cols, ctx.status, key)]
    elif key == "common-space":
        cols = _generic_columns(rows, skip=("estimated_position", "residual_px"))
        parts += ["<h3>Placement on the common canvas</h3>", _table(rows, cols, ctx.status, key)]
        ids = [r["slice_id"] for r in rows]
        series = [Series(name, ids, [r.get(col) for r in rows]) for col, name in
                  (("offset_y_px", "offset y (px)"), ("offset_x_px", "offset x (px)")) if any(r.get(col) is not None
                                                                                          for r in rows)]
        if series:
            parts.append(line_plot(series, title="Canvas offset per slice", ylabel="px"))
    elif key == "interpolate":
        cols = [("slice_id", "slice"), ("use", "use"), ("auto_excluded", "auto-excluded"),
                ("interpolated", "interpolated"), ("interpolation_failed", "failed"),
                ("interpolation_method_used", "method"), ("interpolation_fallback_reason", "reason")]
        parts += ["<h3>Slots</h3>", _table(rows, cols, ctx.status, key)]
    elif key == "register":
        pairs = record.tables.get("pairs", [])
        cols = [("fixed_id", "fixed"), ("moving_id", "moving"), ("z_match_plane", "z match"),
                ("expected_z_plane", "expected z"), ("z_match_ncc", "z NCC"), ("ncc_before", "NCC before"),
                ("ncc_after", "NCC after"), ("tx_px", "tx px"), ("ty_px", "ty px"), ("rotation_deg", "rotation deg"),
                ("confidence", "confidence"), ("status", "status"), ("manual", "set by hand"), ("verified", "verified")]
        # Hand-set pairs: both transforms measured again on the widget's overlap view (see .hand).
        cols += _present(pairs, [("auto_status", "automatic status"), ("auto_confidence", "automatic confidence"),
                                 ("auto_view_ncc", "automatic NCC (overlap view)"),
                                 ("hand_view_ncc", "hand-set NCC (overlap view)")])
        parts += ["<h3>Per pair</h3>", _table(pairs, cols, ctx.status, key), _pair_plots(pairs, ctx.checks,
                                                                                          ctx.status)]
        if record.hand_counts:
            parts.append(f'<p class="note">Decided by hand in the Slice alignment widget: '
                         f'{escape(hand_summary(record.hand_counts))}. Their automatic metrics are listed as OK; '
                         "the NCC columns compare the hand-set and the automatic transform on the widget's overlap "
                         "view.</p>")
    elif key == "auto-exclude":
        if rows:
            excluded = [r for r in rows if r.get("auto_excluded") or not r.get("use", True)]
            cols = [("slice_id", "slice"), ("use", "use"), ("auto_excluded", "auto-excluded"),
                    ("auto_exclude_reason", "reason")]
            parts += [f"<h3>Excluded slices ({len(excluded)} of {len(rows)})</h3>",
                      _table(excluded, cols, ctx.status, key) if excluded else '<p class="note">none</p>']
        if record.raw.get("report"):
            text = json.dumps(record.raw["report"], indent=1, default=str)
            parts.append(f"<details><summary>auto_exclude_report.json</summary><pre>{escape(text[:20000])}</pre>"
                         "</details>")
    elif key == "stack":
        for name, title in (("zmatches", "Z-overlaps (z_matches.csv)"),
                            ("decisions", "Stacking decisions (stacking_decisions.csv)")):
            table = record.tables.get(name, [])
            if table:
                parts += [f"<h3>{title}</h3>", _table(table, _generic_columns(table), ctx.status, key)]
        zm = [r for r in record.tables.get("zmatches", []) if r.get("moving_id") is not None]
        value_col, expected_col = z_columns(zm)
        if zm and value_col is not None:
            ids = [r["moving_id"] for r in zm]
            marks = {k: ctx.status(key, r) for k, r in enumerate(zm) if ctx.status(key, r) != "ok"}
            series = [Series(f"{value_col}", ids, [r.get(value_col) for r in zm], marks=marks),
                      Series(f"{expected_col}", ids, [r.get(expected_col) for r in zm], color="#888", dashed=True)]
            if value_col == "found" and any(r.get("used") is not None for r in zm):
                series.append(Series("used", ids, [r.get("used") for r in zm], color="#2ca02c"))
            parts += [line_plot(series, title="Z-match per pair (x = moving slice)", ylabel="plane of the fixed slice"),
                      '<p class="hint">The plane of the fixed slice where the moving slice\'s first plane lies: '
                      'expected from the cut thickness, found by NCC, used after outlier correction.</p>']
        decisions = [r for r in record.tables.get("decisions", []) if r.get("slice_id") is not None]
        drift = [(c, n) for c, n in (("cumulative_tx_px", "accumulated tx (px)"),
                                     ("cumulative_ty_px", "accumulated ty (px)")) if any(r.get(c) is not None
                                                                                        for r in decisions)]
        if drift:
            ids = [r["slice_id"] for r in decisions]
            parts.append(line_plot([Series(n, ids, [r.get(c) for r in decisions]) for c, n in drift],
                                   title="Accumulated registration translation per slice (drift steering)",
                                   ylabel="px"))
        for row in record.tables.get("step", []):
            parts.append(f'<p class="note">spread of the z-matches around the expected plane (std): '
                         f'{_fmt(row.get("z_overlap_std_planes"))} planes</p>')
    elif key in ("bias", "atlas"):
        parts += ["<h3>Metrics</h3>", _table(record.tables.get("step", []),
                                             _generic_columns(record.tables.get("step", [])), ctx.status, key)]
    return parts


def _volume_block(record: StepRecord, ctx) -> list[str]:
    parts = []
    info = ctx.volume_info.get(record.key)
    if info:
        parts.append(f'<p class="note">{escape(info)}</p>')
    views = ctx.volume_views.get(record.key)
    if views:
        parts.append("<h3>Orthogonal views (centre sections)</h3>")
        parts += [_figure(png, f"{view} section", kind="ortho", view=view, step=record.key) for view, png in
                  views.items()]
    for name, png in ctx.file_previews.get(record.key, []):
        parts.append(_figure(png, name, kind="file", file=name, step=record.key))
    aips = ctx.slice_aips.get(record.key)
    if aips:
        parts.append(f"<h3>Average intensity projections ({len(aips)} slices)</h3>")
        parts += [_figure(png, f"slice {sid}", kind="aip", slice=sid, step=record.key) for sid, png in aips]
    return parts


def _step_section(record: StepRecord, summary, ctx) -> str:
    number = f"{record.spec.number}. " if record.spec.number else ""
    head = (f'<section id="step-{record.key}"><h2>{number}{escape(record.title)} {_badge(summary.status)}</h2>'
            f'<p class="note">folder: <code>{escape(str(record.folder))}</code>'
            + (f"; {summary.seconds:.1f} s" if summary.seconds is not None else "") + "</p>")
    parts = [head]
    for note in record.notes:
        parts.append(f'<p class="note">{escape(note)}</p>')
    mine = [f for f in ctx.findings + ctx.by_hand if f.step == record.key]
    if mine:
        parts.append("<h3>Findings</h3><ul>")
        for f in mine:
            hint = f'<br><span class="hint">{escape(f.hint)}</span>' if f.hint else ""
            parts.append(f"<li>{_badge(f.level)} {escape(f.message)}{hint}</li>")
        parts.append("</ul>")
    if not record.incomplete:
        parts += _body(record, ctx)
        parts += _volume_block(record, ctx)
    if record.params:
        text = json.dumps(record.params, indent=1, default=str)
        parts.append(f"<details><summary>parameters</summary><pre>{escape(text)}</pre></details>")
    parts.append("</section>")
    return "".join(p for p in parts if p)


def _slices_overview(run: RunRecord, ctx) -> str:
    """One row per slice: use, exclusions with reasons, interpolation, key metrics, worst status."""
    ids = run.slice_ids
    if not ids:
        return ""
    by_step = {r.key: {row["slice_id"]: row for row in r.tables.get("slices", []) if "slice_id" in row}
               for r in run.steps if r.ran}
    def use_of(sid):
        for key in ("auto-exclude", "interpolate", "quality", "preprocess"):
            value = by_step.get(key, {}).get(sid, {}).get("use")
            if value is not None:
                return bool(value)
        return True

    worst: dict[int, str] = {}
    for f in ctx.findings:
        sid = (f.row or {}).get("slice_id", (f.row or {}).get("moving_id"))
        if sid is not None:
            old = worst.get(sid, "ok")
            worst[sid] = f.level if LEVELS.index(f.level) > LEVELS.index(old) else old
    rows = []
    for sid in ids:
        reasons = []
        if not use_of(sid):
            reasons.append("excluded by hand (use=false)")
        for key, label in (("quality", "quality"), ("auto-exclude", "registration")):
            row = by_step.get(key, {}).get(sid, {})
            if row.get("auto_excluded"):
                reasons.append(f"auto-excluded ({label}): {row.get('auto_exclude_reason') or 'no reason given'}")
        interp = by_step.get("interpolate", {}).get(sid, {})
        rows.append({
            "slice_id": sid,
            "galvo_confidence": by_step.get("preprocess", {}).get(sid, {}).get("galvo_confidence"),
            "quality_score": by_step.get("quality", {}).get(sid, {}).get("quality_score"),
            "scale": by_step.get("normalize", {}).get(sid, {}).get("scale"),
            "excluded": "; ".join(reasons),
            "interpolation": ("filled" if interp.get("interpolated") else
                              f"failed: {interp.get('interpolation_fallback_reason') or ''}"
                              if interp.get("interpolation_failed") else ""),
            "_status": worst.get(sid, "ok"),
        })
    cols = [("slice_id", "slice"), ("galvo_confidence", "galvo confidence"), ("quality_score", "quality"),
            ("scale", "normalisation scale"), ("excluded", "exclusion"), ("interpolation", "interpolation")]
    cols = [c for c in cols if c[0] == "slice_id" or any(r.get(c[0]) not in (None, "") for r in rows)]
    return "<h2 id=\"slices\">Slices</h2>" + _table(rows, cols, lambda _s, r: r["_status"], "")


def _thresholds_table(checks: tuple[Check, ...], all_checks: tuple[Check, ...], changed: set[str]) -> str:
    active = {c.id: c for c in checks}
    rows = []
    for c in all_checks:
        current = active.get(c.id)
        rows.append({"id": c.id, "step": c.step, "what": c.label,
                     "thresholds": current.describe() if current else "off",
                     "overridden": "yes" if c.id in changed else ""})
    cols = [("id", "check"), ("step", "step"), ("what", "metric"), ("thresholds", "thresholds"),
            ("overridden", "overridden")]
    return ('<h2 id="thresholds">Thresholds</h2><p class="note">Override with the report parameter '
            "<code>thresholds</code>, e.g. <code>pair_ncc_after=0.6:0.4; tile_overlap_ncc=off</code>.</p>"
            + _table(rows, cols))


def render_html(run: RunRecord, summaries: list, ctx, title: str = "S-OCT reconstruction report") -> str:
    """The whole page (see the module docstring); ``ctx`` carries findings, checks, previews and options."""
    overall = ctx.overall
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>{escape(title)}</title><style>{CSS}</style></head><body>",
             f"<h1>{escape(title)} {_badge(overall)}</h1>",
             f'<p class="note">reconstruction folder: <code>{escape(str(run.out_dir.resolve()))}</code><br>'
             f"preprocessing folder: <code>{escape(str(run.mosaic_dir) if run.mosaic_dir else 'not found')}"
             f"</code><br>generated {escape(ctx.generated)}</p>"]
    for note in run.notes:
        parts.append(f'<p class="note">{escape(note)}</p>')
    nav = ['<nav><a href="#summary">summary</a><a href="#findings">findings</a><a href="#slices">slices</a>']
    nav += [f'<a href="#step-{s.key}">{escape(s.key)}</a>' for s in summaries if s.ran]
    nav.append('<a href="#thresholds">thresholds</a></nav>')
    parts.append("".join(nav))

    counts = {level: sum(1 for s in summaries if s.status == level) for level in (*LEVELS, "not run")}
    hand = _hand_text(summaries)
    parts.append('<h2 id="summary">Summary</h2><p>' + ", ".join(f"{n} {STATUS_LABEL[k]}" for k, n in counts.items())
                 + " step(s)" + (f'</p><p data-by-hand="{sum(s.n_by_hand for s in summaries)}">Decided by hand: '
                                 f"{escape(hand)}" if hand else "") + "</p>")
    head = "<tr><th>#</th><th>step</th><th>ran</th><th>status</th><th>worst check</th><th>seconds</th></tr>"
    body = []
    for s in summaries:
        cls = "notrun" if s.status == "not run" else s.status
        link = f'<a href="#step-{s.key}">{escape(s.title)}</a>' if s.ran else escape(s.title)
        body.append(f'<tr class="row-{cls}" data-step="{s.key}" data-status="{escape(s.status)}"><td>{s.number}</td>'
                    f"<td>{link}</td><td>{'yes' if s.ran else 'no'}</td><td>{_badge(s.status)}</td>"
                    f"<td>{escape(_worst_text(s))}</td>"
                    f'<td class="num">{"" if s.seconds is None else f"{s.seconds:.1f}"}</td></tr>')
    parts.append(f"<table><thead>{head}</thead><tbody>{''.join(body)}</tbody></table>")

    parts.append('<h2 id="findings">Warnings and errors</h2>')
    if not ctx.findings:
        parts.append("<p>None: every check passed" + (" (values decided by hand listed as OK below)" if ctx.by_hand
                                                       else "") + ".</p>")
    if ctx.findings or ctx.by_hand:
        rows = []
        # Problems first, worst first; then the values decided by hand (OK, with their note).
        for f in sorted(ctx.findings, key=lambda f: -LEVELS.index(f.level)) + ctx.by_hand:
            rows.append(f'<tr class="row-{f.level}" data-check="{escape(f.check)}" data-step="{escape(f.step)}" '
                        f'data-level="{escape(f.level)}" data-note="{escape(f.note)}">'
                        f"<td>{_badge(f.level)}</td><td>{escape(f.step)}</td><td>{escape(f.message)}</td>"
                        f'<td class="hint">{escape(f.hint)}</td></tr>')
        parts.append("<table><thead><tr><th>level</th><th>step</th><th>what</th><th>what to check</th></tr></thead>"
                     f"<tbody>{''.join(rows)}</tbody></table>")
    parts.append(_slices_overview(run, ctx))
    by_key = {s.key: s for s in summaries}
    for record in run.steps:
        if record.ran:
            parts.append(_step_section(record, by_key[record.key], ctx))
    not_run = [s.title for s in summaries if not s.ran]
    if not_run:
        parts.append(f'<p class="note">Not run (no outputs found): {escape(", ".join(not_run))}.</p>')
    parts.append(_thresholds_table(ctx.checks_active, ctx.checks_all, ctx.changed))
    parts.append("</body></html>")
    return "\n".join(p for p in parts if p)


def _hand_text(summaries: list) -> str:
    """``"register: 2 pairs set by hand; stack: 2 slice(s) placed by a hand-set transform"``."""
    return "; ".join(f"{s.key}: {s.by_hand_text}" for s in summaries if s.ran and s.by_hand_text)


def _worst_text(summary) -> str:
    """The summary table's last column: the worst finding, and what the user decided by hand."""
    parts = [summary.worst.message] if summary.worst else []
    if summary.ran and summary.by_hand_text:
        parts.append(summary.by_hand_text + (f" ({summary.n_by_hand} automatic check(s) OK by hand)"
                                        if summary.n_by_hand else ""))
    return "; ".join(parts)


def render_text(run: RunRecord, summaries: list, ctx) -> str:
    """The summary and the findings as plain text (for logs and terminals)."""
    lines = ["S-OCT reconstruction report", f"reconstruction folder: {run.out_dir.resolve()}",
             f"preprocessing folder: {run.mosaic_dir or 'not found'}", f"generated {ctx.generated}",
             f"overall status: {STATUS_LABEL[ctx.overall]}", "", "Summary"]
    width = max(len(s.title) for s in summaries) + 2
    lines.append(f"{'#':>3}  {'step':<{width}}{'status':<10}{'seconds':>8}  worst check")
    for s in summaries:
        seconds = "" if s.seconds is None else f"{s.seconds:.1f}"
        lines.append(f"{s.number:>3}  {s.title:<{width}}{STATUS_LABEL[s.status]:<10}{seconds:>8}  "
                     f"{_worst_text(s)}")
    hand = _hand_text(summaries)
    if hand:
        lines.append(f"Decided by hand: {hand}")
    lines += ["", "Warnings and errors"]
    if not ctx.findings:
        lines.append("  none: every check passed")
    for f in ctx.findings:
        lines.append(f"  [{f.level}] {f.step}: {f.message}")
        if f.hint:
            lines.append(f"      hint: {f.hint}")
    if ctx.by_hand:
        lines += ["", "Decided by hand (OK)"]
        lines += [f"  [OK] {f.step}: {f.message}" for f in ctx.by_hand]
    lines.append("")
    return "\n".join(lines)
