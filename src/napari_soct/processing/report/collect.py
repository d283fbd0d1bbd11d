"""Find every step's outputs in a reconstruction folder and read their metrics into plain tables.

A step is found by the files it writes (``stitch_metrics.json``, ``pairwise_registration.csv``, ...), in the
folder itself, its sub-folders and their sub-folders, so the numbered folders of ``napari-soct reconstruct``
(``04_stitch``, ``12_register``) and folders named otherwise are both found. A numbered folder of a step that
holds none of its files is reported as incomplete. Each step becomes a :class:`StepRecord` whose tables are
lists of dicts (one per slice, pair, tile or transition) with the raw metrics plus a few derived ones that the
checks (:mod:`.checks`) read by name; a file that cannot be read becomes a problem of its step, never an
exception, so one broken file does not hide the rest of the report.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..io.tables import read_shifts_xy, read_slice_config
from ..stack.transforms import read_pairwise_registration
from .hand import hand_note, mark_hand_decided

__all__ = ["StepSpec", "STEP_SPECS", "SLICE_STEPS", "StepRecord", "RunRecord", "collect_run", "find_mosaic_dir",
           "read_csv_rows", "z_columns"]

_READ_ERRORS = (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError)


@dataclass(frozen=True)
class StepSpec:
    """How a step's outputs are recognised.

    Attributes
    ----------
    key : str
        Step name (the registered step's name where there is one).
    number : int
        Position in the pipeline (0 = preprocessing).
    title : str
    markers : tuple of str
        File names that only this step writes; a folder holding one of them is the step's folder.
    aliases : tuple of str
        Folder names (after an optional ``NN_`` prefix) that belong to the step even without its files.
    """

    key: str
    number: int
    title: str
    markers: tuple[str, ...]
    aliases: tuple[str, ...] = ()


STEP_SPECS: tuple[StepSpec, ...] = (
    StepSpec("preprocess", 0, "Preprocessing", ("preprocess_metrics.json",), ("preprocess", "mosaic")),
    StepSpec("resample", 1, "Resample", ("resample_metrics.json",), ("resample",)),
    StepSpec("curvature", 2, "Focal curvature", ("curvature_metrics.json",), ("curvature",)),
    StepSpec("illumination", 3, "Illumination (BaSiC)", ("illumination_metrics.json",), ("illumination",)),
    StepSpec("stitch", 4, "Stitching", ("stitch_metrics.json",), ("stitch",)),
    StepSpec("beam", 5, "Beam profile", ("beam_metrics.json",), ("beam",)),
    StepSpec("crop", 6, "Interface crop", ("crop_metrics.json",), ("crop",)),
    StepSpec("normalize", 7, "Normalisation", ("normalize_metrics.json",), ("normalize", "normalise")),
    StepSpec("quality", 8, "Slice quality", ("quality_report.json",), ("quality",)),
    StepSpec("rehoming", 9, "Re-homing detection", ("rehoming_report.json", "shifts_xy_clean.csv"), ("rehoming",)),
    StepSpec("common-space", 10, "Common space", ("common_space.csv",), ("common", "common_space")),
    StepSpec("interpolate", 11, "Missing slice interpolation", ("slice_config_final.csv",),
             ("interpolate", "interpolation")),
    StepSpec("register", 12, "Pairwise registration", ("pairwise_registration.csv",), ("register", "registration")),
    StepSpec("auto-exclude", 13, "Auto-exclusion", ("auto_exclude_report.json",), ("exclude", "auto_exclude")),
    StepSpec("stack", 14, "Stacking", ("z_matches.csv", "stacking_decisions.csv"), ("stack", "stacking")),
    StepSpec("bias", 15, "Bias field (N4)", ("bias_metrics.json",), ("bias", "bias_field")),
    StepSpec("atlas", 16, "Atlas / RAS alignment", ("atlas_metrics.json",), ("atlas", "ras")),
)

#: Per-slice steps of the in-slice chain (``run_slice_step`` metrics files).
SLICE_STEPS = ("resample", "curvature", "illumination", "stitch", "beam", "crop", "normalize")


@dataclass
class StepRecord:
    """What one step left in the reconstruction folder.

    Attributes
    ----------
    spec : StepSpec
    ran : bool
        True when the step's folder or files were found.
    folder : Path or None
    metrics_path : Path or None
        The step's metrics file (``<step>_metrics.json`` or the step's report JSON).
    seconds : float or None
        Run time from the metrics file, when it records one.
    params : dict
        Parameters recorded in the metrics file.
    tables : dict
        ``{name: [row dict, ...]}``; names used: ``slices``, ``tiles``, ``pairs``, ``transitions``,
        ``zmatches``, ``decisions``, ``step`` (one row of step-wide values).
    files : dict
        Named paths the report shows or previews (``volume``, ``preview``, ``slices`` ...).
    raw : dict
        Other parsed content (JSON reports) shown as key/value lists.
    notes, problems : list of str
        Remarks shown in the step's section; problems (unreadable files) count as errors.
    incomplete : bool
        A folder named after the step exists but holds none of its files.
    hand_counts : dict
        Rows decided by hand in the Slice alignment widget, by kind (``{"set by hand": 2, "verified by hand": 1}``
        for the pairs of step 12, the slices placed by hand-set transforms for step 14; see :mod:`.hand`).
    """

    spec: StepSpec
    ran: bool = False
    folder: Path | None = None
    metrics_path: Path | None = None
    seconds: float | None = None
    params: dict = field(default_factory=dict)
    tables: dict[str, list[dict]] = field(default_factory=dict)
    files: dict = field(default_factory=dict)
    raw: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    incomplete: bool = False
    hand_counts: dict[str, int] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return self.spec.key

    @property
    def title(self) -> str:
        return self.spec.title


@dataclass
class RunRecord:
    """Every step of one reconstruction, in pipeline order (steps that did not run included)."""

    out_dir: Path
    mosaic_dir: Path | None
    steps: list[StepRecord]
    notes: list[str] = field(default_factory=list)

    def step(self, key: str) -> StepRecord:
        for record in self.steps:
            if record.key == key:
                return record
        raise KeyError(f"unknown step {key!r}")

    @property
    def ran(self) -> list[StepRecord]:
        return [s for s in self.steps if s.ran]

    @property
    def slice_ids(self) -> list[int]:
        ids = set()
        for record in self.steps:
            ids.update(int(r["slice_id"]) for r in record.tables.get("slices", []) if "slice_id" in r)
        return sorted(ids)


# ------------------------------------------------------------------------------------------------ small readers
def _read_json(path: Path) -> dict:
    with path.open() as fh:
        data = json.load(fh)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def read_csv_rows(path: str | os.PathLike) -> list[dict]:
    """A CSV file as a list of dicts (strings); numbers and booleans are converted by :func:`_typed`."""
    with Path(path).open(newline="") as fh:
        return [{k: _typed(v) for k, v in row.items() if k is not None} for row in csv.DictReader(fh)]


def _typed(text):
    """CSV cell to int, float, bool or str (empty -> None)."""
    if text is None:
        return None
    text = text.strip()
    if text == "":
        return None
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    try:
        number = float(text)
    except ValueError:
        return text
    if number.is_integer() and re.fullmatch(r"[+-]?\d+(\.0*)?", text):
        return int(number)
    return number


def _num(value) -> float | None:
    """A finite float, or None."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _first(row: dict, names) -> object:
    for name in names:
        if row.get(name) is not None:
            return row[name]
    return None


# ---------------------------------------------------------------------------------------------------- discovery
def _candidate_folders(root: Path, depth: int = 2) -> list[tuple[int, Path]]:
    """``root`` and its sub-folders up to ``depth`` levels down (OME-Zarr images and hidden entries skipped)."""
    out = [(0, root)]
    frontier = [root]
    for level in range(1, depth + 1):
        nxt = []
        for folder in frontier:
            try:
                entries = sorted(folder.iterdir())
            except OSError:
                continue
            for entry in entries:
                if entry.name.startswith(".") or entry.name.endswith(".zarr") or not entry.is_dir():
                    continue
                out.append((level, entry))
                nxt.append(entry)
        frontier = nxt
    return out


_NUMBERED = re.compile(r"^(\d+)_(.+)$")


def _folder_matches(folder: Path, spec: StepSpec) -> bool:
    """A folder named ``NN_<alias>`` (or ``<alias>``) for the step."""
    match = _NUMBERED.match(folder.name)
    name = match.group(2) if match else folder.name
    if match and int(match.group(1)) != spec.number:
        return False
    return name.lower() in spec.aliases


def _locate(spec: StepSpec, candidates: list[tuple[int, Path]]) -> tuple[Path | None, list[Path], bool]:
    """The step's folder (by its marker files), other folders that also hold them, and whether only a
    named-but-empty folder was found."""
    holding = [(depth, f) for depth, f in candidates if any((f / m).is_file() for m in spec.markers)]
    if holding:
        # A folder named for the step wins, then the shallowest, then the most recently written.
        holding.sort(key=lambda df: (not _folder_matches(df[1], spec), df[0], -_mtime(df[1], spec)))
        return holding[0][1], [f for _, f in holding[1:]], False
    named = [f for depth, f in candidates if depth > 0 and _folder_matches(f, spec) and _NUMBERED.match(f.name)]
    if named:
        return named[0], [], True
    return None, [], False


def _mtime(folder: Path, spec: StepSpec) -> float:
    times = [(folder / m).stat().st_mtime for m in spec.markers if (folder / m).is_file()]
    return max(times, default=0.0)


def find_mosaic_dir(out_dir: Path, records: dict[str, StepRecord] | None = None,
                    notes: list[str] | None = None) -> Path | None:
    """The preprocessing folder of a reconstruction.

    The ``source`` recorded in the metrics of the chain's first step when it holds the preprocessing outputs;
    else the one folder next to ``out_dir`` (or next to its parent) that holds ``preprocess_metrics.json``.
    Several such folders are ambiguous (another subject's, perhaps): none is taken and ``notes`` says so.
    """
    for key in SLICE_STEPS:
        record = (records or {}).get(key)
        if record is None or not record.ran or record.folder is None:
            continue
        try:
            source = _read_json(record.folder / f"{key}_metrics.json").get("source")
        except _READ_ERRORS:
            source = None
        if source:
            source = Path(source)
            folder = source if source.is_dir() else source.parent
            if (folder / "preprocess_metrics.json").is_file() or (folder / "shifts_xy.csv").is_file():
                return folder
        break
    out_dir = out_dir.resolve()
    for base in (out_dir.parent, out_dir.parent.parent):
        try:
            found = sorted(p for p in base.iterdir() if p.is_dir() and p != out_dir and
                           (p / "preprocess_metrics.json").is_file())
        except OSError:
            continue
        if len(found) == 1:
            return found[0]
        if found:
            if notes is not None:
                notes.append(f"several preprocessing folders next to {out_dir} ({', '.join(p.name for p in found)}); "
                             "none used: give the parameter mosaic_dir")
            return None
    return None


# ----------------------------------------------------------------------------------------------- step readers


def _load_metrics(record: StepRecord, name: str) -> dict:
    """A step's metrics file ``name`` in its folder: recorded as its metrics path, with its time and parameters."""
    path = record.folder / name
    record.metrics_path = path
    data = _read_json(path)
    record.seconds = _num(data.get("seconds"))
    record.params = data.get("params") or {}
    return data


def _read_slice_step(record: StepRecord) -> None:
    """Steps 1-7: ``<step>_metrics.json`` written by ``run_slice_step``."""
    data = _load_metrics(record, f"{record.key}_metrics.json")
    if data.get("skipped"):
        record.notes.append(f"slice(s) {', '.join(map(str, data['skipped']))} kept from an earlier run "
                            "(if_exists=skip); their metrics are those of that run")
    slices, tiles = [], []
    for sid_text, metrics in sorted((data.get("slices") or {}).items(), key=lambda kv: int(kv[0])):
        sid = int(sid_text)
        row = {"slice_id": sid}
        row.update({k: v for k, v in metrics.items() if not isinstance(v, dict | list)})
        for tile in metrics.get("tiles") or []:
            tiles.append({"slice_id": sid, **{k: v for k, v in tile.items() if not isinstance(v, dict | list)}})
        _derive_slice_metrics(record, row, metrics)
        if isinstance(metrics.get("profile"), list):
            record.raw.setdefault("profiles", []).append((sid, metrics["profile"]))
        slices.append(row)
    record.tables["slices"] = slices
    if tiles:
        record.tables["tiles"] = tiles
    record.files["slices"] = _slice_files(record.folder)


def _slice_files(folder: Path) -> dict[int, Path]:
    from ..slices import find_slice_files

    try:
        return find_slice_files(folder)
    except (FileNotFoundError, ValueError):
        return {}


def _derive_slice_metrics(record: StepRecord, row: dict, metrics: dict) -> None:
    """Derived values the checks read (see :mod:`.checks`)."""
    if record.key == "stitch":
        total, used = _num(metrics.get("pairs_total")), _num(metrics.get("pairs_used"))
        if total:
            row["pairs_used_fraction"] = used / total if used is not None else None
        shape = metrics.get("canvas_shape") or []
        if len(shape) >= 2 and metrics.get("uncovered_pixels") is not None:
            row["uncovered_fraction"] = float(metrics["uncovered_pixels"]) / max(1, shape[-1] * shape[-2])
        affine = metrics.get("affine") or {}
        for name in ("rotation_deg", "shear_deg", "scale_x", "scale_y"):
            if name in affine:
                row[f"affine_{name}"] = affine[name]
        tiles = metrics.get("tiles") or []
        nccs = [t["overlap_ncc"] for t in tiles if _num(t.get("overlap_ncc")) is not None]
        residuals = [t["residual_px"] for t in tiles if _num(t.get("residual_px")) is not None]
        if nccs:
            row["tile_ncc_min"] = min(nccs)
        if residuals:
            row["tile_residual_max_px"] = max(residuals)
    elif record.key == "beam":
        cap = _num(record.params.get("max_gain"))
        gain = _num(metrics.get("max_gain_applied"))
        if cap and gain is not None:
            row["gain_capped"] = gain >= 0.999 * cap
    elif record.key == "normalize":
        scale = _num(metrics.get("scale"))
        if scale and scale > 0:
            row["scale_deviation"] = max(scale, 1 / scale)
            low, high = _num(record.params.get("min_scale")), _num(record.params.get("max_scale"))
            row["scale_clipped"] = bool((low and scale <= low * 1.0001) or (high and scale >= high * 0.9999))


def _finish_crop(record: StepRecord) -> None:
    depths = [r["interface_depth_um"] for r in record.tables.get("slices", [])
              if _num(r.get("interface_depth_um")) is not None]
    if depths:
        median = float(np.median(depths))
        for r in record.tables["slices"]:
            if _num(r.get("interface_depth_um")) is not None:
                r["interface_deviation_um"] = abs(r["interface_depth_um"] - median)


def _read_preprocess(record: StepRecord) -> None:
    data = _load_metrics(record, "preprocess_metrics.json")
    rows = []
    for s in data.get("slices") or []:
        galvo = s.get("galvo") or {}
        grid = s.get("grid_shape") or []
        n_grid = int(np.prod(grid)) if grid else None
        missing = s.get("missing_tiles") or []
        bad = s.get("bad_tiles") or {}
        rows.append({
            "slice_id": int(s["slice_id"]), "n_tiles": s.get("n_tiles"),
            "grid": "x".join(map(str, grid)) if grid else None, "missing_tiles": len(missing),
            "missing_fraction": len(missing) / n_grid if n_grid else None,
            "missing_list": ", ".join(f"({m[0]}, {m[1]})" for m in missing) if missing else "",
            "_missing_reason": "tile(s) (x, y) " + ", ".join(f"({m[0]}, {m[1]})" for m in missing) if missing else "",
            "bad_tiles": len(bad), "bad_list": "; ".join(f"{k}: {v}" for k, v in bad.items()) if bad else "",
            "galvo_shift": galvo.get("shift"), "galvo_confidence": galvo.get("confidence"),
            "galvo_applied": galvo.get("applied"), "seconds": s.get("seconds"), "skipped": s.get("skipped"),
        })
    record.tables["slices"] = sorted(rows, key=lambda r: r["slice_id"])
    previews = record.folder / "previews"
    if previews.is_dir():
        record.files["previews"] = sorted(previews.glob("aip_z*.png"))
    if (record.folder / "shifts_xy.csv").is_file():
        record.files["shifts"] = record.folder / "shifts_xy.csv"
    if (record.folder / "slice_config.csv").is_file():
        record.files["slice_config"] = record.folder / "slice_config.csv"
        config = {r["slice_id"]: r for r in _slice_config_rows(record.folder / "slice_config.csv")}
        for row in record.tables["slices"]:
            if row["slice_id"] in config:
                row["use"] = config[row["slice_id"]]["use"]
                row["notes"] = config[row["slice_id"]]["notes"]


def _slice_config_rows(path: Path) -> list[dict]:
    rows = []
    for r in read_slice_config(path):
        rows.append({
            "slice_id": r.slice_id, "use": r.use, "quality_score": r.quality_score,
            "galvo_confidence": r.galvo_confidence, "rehomed": r.rehomed, "rehoming_reliable": r.rehoming_reliable,
            "auto_excluded": bool(r.auto_excluded), "auto_exclude_reason": r.auto_exclude_reason,
            "interpolated": bool(r.interpolated), "interpolation_failed": bool(r.interpolation_failed),
            "interpolation_method_used": r.interpolation_method_used,
            "interpolation_fallback_reason": r.interpolation_fallback_reason, "notes": r.notes,
            "manually_excluded": not r.use,
        })
    return rows


def _read_quality(record: StepRecord) -> None:
    data = _load_metrics(record, "quality_report.json")
    config = {}
    if (record.folder / "slice_config.csv").is_file():
        record.files["slice_config"] = record.folder / "slice_config.csv"
        config = {r["slice_id"]: r for r in _slice_config_rows(record.folder / "slice_config.csv")}
    rows = []
    for sid_text, m in sorted((data.get("slices") or {}).items(), key=lambda kv: int(kv[0])):
        sid = int(sid_text)
        cfg = config.get(sid, {})
        rows.append({
            "slice_id": sid, "use": cfg.get("use", True), "coverage": m.get("coverage"),
            "contrast": m.get("contrast"), "sharpness": m.get("sharpness"), "quality_score": m.get("score"),
            "auto_excluded": bool(m.get("auto_excluded")), "auto_exclude_reason": cfg.get("auto_exclude_reason", ""),
            "manually_excluded": not cfg.get("use", True),
        })
    record.tables["slices"] = rows
    record.raw["medians"] = data.get("medians") or {}


def _read_rehoming(record: StepRecord, mosaic_dir: Path | None) -> None:
    report = record.folder / "rehoming_report.json"
    transitions = []
    if report.is_file():
        record.metrics_path = report
        data = _read_json(report)
        record.params = data.get("params") or {}
        record.seconds = _num(data.get("seconds"))
        for d in data.get("steps") or []:
            original, cleaned = d.get("original_mm") or [None, None], d.get("cleaned_mm") or [None, None]
            transitions.append({
                "fixed_id": int(d["fixed_id"]), "moving_id": int(d["moving_id"]), "kind": d.get("kind", ""),
                "raw_x_mm": original[0], "raw_y_mm": original[1], "clean_x_mm": cleaned[0],
                "clean_y_mm": cleaned[1], "reliable": bool(d.get("reliable", True)),
            })
    clean_csv = record.folder / "shifts_xy_clean.csv"
    if clean_csv.is_file():
        record.files["shifts_clean"] = clean_csv
        if not transitions:
            # Only the cleaned table: the raw steps come from the preprocessing's shifts_xy.csv.
            raw = {}
            if mosaic_dir is not None and (mosaic_dir / "shifts_xy.csv").is_file():
                raw = {(s.fixed_id, s.moving_id): s for s in read_shifts_xy(mosaic_dir / "shifts_xy.csv")}
            for s in read_shifts_xy(clean_csv):
                r = raw.get((s.fixed_id, s.moving_id), s)
                moved = abs(r.x_shift_mm - s.x_shift_mm) + abs(r.y_shift_mm - s.y_shift_mm) > 1e-9
                transitions.append({
                    "fixed_id": s.fixed_id, "moving_id": s.moving_id, "kind": "glitch" if moved else "",
                    "raw_x_mm": r.x_shift_mm, "raw_y_mm": r.y_shift_mm, "clean_x_mm": s.x_shift_mm,
                    "clean_y_mm": s.y_shift_mm, "reliable": s.reliable,
                })
    for t in transitions:
        t["glitch"] = t["kind"] == "glitch"
        t["rehoming"] = t["kind"] in ("rehoming", "fov_jump")
        t["unreliable"] = not t["reliable"] and not t["glitch"] and not t["rehoming"]
        t["correction_mm"] = math.hypot((t["clean_x_mm"] or 0) - (t["raw_x_mm"] or 0),
                                        (t["clean_y_mm"] or 0) - (t["raw_y_mm"] or 0))
    record.tables["transitions"] = transitions
    if (record.folder / "slice_config.csv").is_file():
        record.files["slice_config"] = record.folder / "slice_config.csv"


def _metrics_json(record: StepRecord) -> dict:
    """A step's ``*_metrics.json`` (the contract's ``<step>_metrics.json``; its name is not fixed)."""
    found = sorted(record.folder.glob("*_metrics.json"))
    if not found:
        return {}
    record.metrics_path = found[0]
    data = _read_json(found[0])
    record.seconds = _num(data.get("seconds"))
    record.params = data.get("params") or {}
    return data


def _read_common(record: StepRecord) -> None:
    _metrics_json(record)
    path = record.folder / "common_space.csv"
    record.files["table"] = path
    rows = read_csv_rows(path)
    for r in rows:
        if r.get("slice_id") is None:
            raise ValueError(f"{path}: a row has no slice_id")
        r["slice_id"] = int(r["slice_id"])
        r["_estimated"] = str(r.get("position_source") or "") in ("local_median", "median", "zero")
        res = [_num(r.get("residual_y_px")), _num(r.get("residual_x_px"))]
        if all(v is not None for v in res):
            r["residual_px"] = math.hypot(*res)
    record.tables["slices"] = sorted(rows, key=lambda r: r["slice_id"])
    record.files["slices"] = _slice_files(record.folder)


def _read_interpolate(record: StepRecord) -> None:
    _metrics_json(record)
    path = record.folder / "slice_config_final.csv"
    record.files["slice_config"] = path
    record.tables["slices"] = _slice_config_rows(path)
    record.files["slices"] = _slice_files(record.folder)


def _read_register(record: StepRecord) -> None:
    data = _metrics_json(record)
    if isinstance(data.get("slices"), dict):  # the slices registered (common space and filled slots)
        record.files["registered_slices"] = {int(k): Path(v) for k, v in data["slices"].items()}
    path = record.folder / "pairwise_registration.csv"
    record.files["table"] = path
    rows = []
    for p in read_pairwise_registration(path):
        row = {name: getattr(p, name) for name in (
            "fixed_id", "moving_id", "z_match_plane", "expected_z_plane", "z_match_ncc", "ncc_before", "ncc_after",
            "tx_px", "ty_px", "rotation_deg", "confidence", "status", "manual", "verified")}
        row["_by_hand"] = hand_note(p.manual, p.verified)
        row["translation_px"] = math.hypot(p.tx_px, p.ty_px)
        row["abs_rotation_deg"] = abs(p.rotation_deg)
        row["z_deviation_planes"] = abs(p.z_match_plane - p.expected_z_plane)
        if _num(p.ncc_before) is not None and _num(p.ncc_after) is not None:
            row["ncc_gain"] = p.ncc_after - p.ncc_before
        row["fallback"] = p.status == "fallback_identity"
        row["failed"] = p.status == "error"
        rows.append(row)
    record.tables["pairs"] = rows


def _read_exclude(record: StepRecord) -> None:
    _metrics_json(record)
    path = record.folder / "auto_exclude_report.json"
    record.metrics_path = record.metrics_path or path
    data = _read_json(path)
    record.raw["report"] = data
    if record.seconds is None:
        record.seconds = _num(data.get("seconds"))
    if not record.params:
        record.params = data.get("params") or {}
    config = record.folder / "slice_config.csv"
    if config.is_file():
        record.files["slice_config"] = config
        record.tables["slices"] = _slice_config_rows(config)


#: (value, expected) column pairs tried, in order, for the z-overlap of a pair in ``z_matches.csv``: step 14
#: writes ``expected`` (plane of the fixed slice where the moving slice's plane 0 is expected), ``found`` (by NCC)
#: and ``used`` (after outlier correction).
Z_COLUMN_PAIRS = (("found", "expected"), ("used", "expected"), ("z_match_plane", "expected_z_plane"),
                  ("overlap_planes", "expected_overlap_planes"), ("overlap", "expected_overlap"))
Z_NCC_COLUMNS = ("ncc", "overlap_ncc", "z_match_ncc", "correlation")
Z_CORRECTED_COLUMNS = ("outlier", "corrected", "outlier_corrected", "is_outlier")
#: How a slice's registration transform was applied (step 14: ``gate`` = reference, full, rotation, skip).
DECISION_COLUMNS = ("gate", "decision", "transform_applied", "mode", "action")
CAPPED_COLUMNS = ("capped", "drift_capped")


def z_columns(rows: list[dict]) -> tuple[str, str] | tuple[None, None]:
    """The (value, expected) columns of a ``z_matches.csv``, or (None, None)."""
    names = set().union(*(r.keys() for r in rows)) if rows else set()
    return next(((v, e) for v, e in Z_COLUMN_PAIRS if v in names and e in names), (None, None))


def _read_stack(record: StepRecord) -> None:
    data = _metrics_json(record)
    if "registration_csv" in data:  # "" = motor-only: no registration (and no hand-set transform) was used
        record.raw["registration_csv"] = str(data["registration_csv"] or "")
    zpath, dpath = record.folder / "z_matches.csv", record.folder / "stacking_decisions.csv"
    if zpath.is_file():
        record.files["z_matches"] = zpath
        rows = read_csv_rows(zpath)
        value_col, expected_col = z_columns(rows)
        for r in rows:
            if value_col is not None:
                value, expected = _num(r.get(value_col)), _num(r.get(expected_col))
                if value is not None and expected is not None:
                    r["_z_deviation_planes"] = abs(value - expected)
                    r["_z_signed_deviation"] = value - expected
            ncc = _num(_first(r, Z_NCC_COLUMNS))
            if ncc is not None:
                r["_z_ncc"] = ncc
            corrected = _first(r, Z_CORRECTED_COLUMNS)
            r["_z_corrected"] = bool(corrected) if isinstance(corrected, bool | int | float) else False
            if r["_z_corrected"] and str(r.get("action") or "") == "kept_high_confidence":
                r["_z_corrected"] = False  # an outlier that step 14 kept (high confidence) was not replaced
        record.tables["zmatches"] = rows
        z_spread(record)
    if dpath.is_file():
        record.files["decisions"] = dpath
        rows = read_csv_rows(dpath)
        for r in rows:
            decision = str(_first(r, DECISION_COLUMNS) or "").lower()
            r["_skipped_transform"] = decision in ("skip", "skipped")
            capped = _first(r, CAPPED_COLUMNS)
            r["_drift_capped"] = bool(capped) if isinstance(capped, bool | int | float) else False
            r["_reason"] = r.get("reason") or ""
        record.tables["decisions"] = rows
    volumes = sorted(p for p in record.folder.glob("*.ome.zarr") if not p.name.startswith("."))
    if volumes:
        record.files["volume"] = volumes[0]
        if len(volumes) > 1:
            record.notes.append(f"several volumes in {record.folder.name}: previewing {volumes[0].name}")


def z_spread(record: StepRecord) -> None:
    """The step row of step 14: spread (std) of the z-matches around the expected plane, over the pairs whose
    z-match was not decided by hand (their ``_by_hand`` note; see :mod:`.hand`)."""
    values = [r["_z_signed_deviation"] for r in record.tables.get("zmatches", [])
              if "_z_signed_deviation" in r and not r.get("_by_hand")]
    left_out = sum(1 for r in record.tables.get("zmatches", []) if "_z_signed_deviation" in r and r.get("_by_hand"))
    record.tables.pop("step", None)
    if len(values) > 1:
        row = {"z_overlap_std_planes": float(np.std(values))}
        if left_out:
            row["pairs_decided_by_hand_left_out"] = left_out
        record.tables["step"] = [row]


def _read_bias(record: StepRecord) -> None:
    data = _load_metrics(record, "bias_metrics.json")
    row = {"mode": (data.get("params") or {}).get("mode"), "passthrough": data.get("passthrough")}
    before, after = _num(data.get("tissue_cv_before")), _num(data.get("tissue_cv_after"))
    row.update({"tissue_cv_before": before, "tissue_cv_after": after})
    if before and after is not None:
        row["cv_ratio"] = after / before
    field_range = data.get("field_range")
    if field_range and _num(field_range[0]):
        row["field_min"], row["field_max"] = field_range
        row["field_ratio"] = field_range[1] / field_range[0]
    if data.get("shrink_factors"):
        row["shrink_factors"] = "x".join(map(str, data["shrink_factors"]))
    record.tables["step"] = [row]
    output = Path(data["output"]) if data.get("output") else None
    if output is None or not output.exists():
        found = sorted(record.folder.glob("*_corrected.ome.zarr"))
        output = found[0] if found else None
    if output is not None and output.exists():
        record.files["volume"] = output


def _read_atlas(record: StepRecord) -> None:
    data = _load_metrics(record, "atlas_metrics.json")
    rotation = data.get("rotation_deg") or []
    translation = data.get("translation_mm") or []
    record.tables["step"] = [{
        "ncc": data.get("ncc"), "registered_level": data.get("registered_level"),
        "rotation_deg": ", ".join(f"{v:.2f}" for v in rotation), "translation_mm": ", ".join(f"{v:.3f}" for v in
                                                                                             translation),
        "template": Path(data["template"]).name if data.get("template") else None,
    }]
    previews = sorted(record.folder.glob("*_ras_preview.png"))
    if previews:
        record.files["preview"] = previews[0]


_READERS = {
    "preprocess": _read_preprocess, "quality": _read_quality, "common-space": _read_common,
    "interpolate": _read_interpolate, "register": _read_register, "auto-exclude": _read_exclude, "stack": _read_stack,
    "bias": _read_bias, "atlas": _read_atlas,
}


def _mark_missing_slices(records: list[StepRecord]) -> None:
    """Slices that an earlier per-slice step produced but a later one lacks (a failed slice)."""
    expected: set[int] = set()
    for record in records:
        if not record.ran or record.key not in ("preprocess", *SLICE_STEPS):
            continue
        rows = record.tables.get("slices", [])
        present = {r["slice_id"] for r in rows}
        for sid in sorted(expected - present):
            rows.append({"slice_id": sid, "missing": True})
        rows.sort(key=lambda r: r["slice_id"])
        expected |= present


def _mark_estimated_positions(records: dict[str, StepRecord]) -> None:
    """A slice placed by an estimate (not the stage) matters when the slice is used; an excluded slice is
    placed so by design."""
    excluded = set()
    for key in ("preprocess", "quality"):
        for r in records[key].tables.get("slices", []):
            if r.get("use") is False or r.get("auto_excluded"):
                excluded.add(r["slice_id"])
    for r in records["common-space"].tables.get("slices", []):
        r["estimated_position"] = bool(r.pop("_estimated", False)) and r["slice_id"] not in excluded
        if r["slice_id"] in excluded:
            r["excluded"] = True


def collect_run(out_dir: str | os.PathLike, mosaic_dir: str | os.PathLike | None = None) -> RunRecord:
    """Find and read every step's outputs under ``out_dir`` (and the preprocessing in ``mosaic_dir``).

    Parameters
    ----------
    out_dir : path-like
        The reconstruction folder (numbered step folders, or any folder holding step outputs).
    mosaic_dir : path-like, optional
        The preprocessing output folder; found when not given (see :func:`find_mosaic_dir`).

    Returns
    -------
    RunRecord
        One :class:`StepRecord` per step of :data:`STEP_SPECS`, ran or not.

    Raises
    ------
    FileNotFoundError
        If ``out_dir`` is not a folder.
    """
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise FileNotFoundError(f"{out_dir}: no such folder (expected a reconstruction folder)")
    candidates = _candidate_folders(out_dir)
    records = {spec.key: StepRecord(spec) for spec in STEP_SPECS}
    run_notes = []
    for spec in STEP_SPECS:
        if spec.key == "preprocess":
            continue
        folder, others, incomplete = _locate(spec, candidates)
        record = records[spec.key]
        if folder is None:
            continue
        record.ran, record.folder, record.incomplete = True, folder, incomplete
        if others:
            record.notes.append(f"outputs of this step also in {', '.join(str(o) for o in others)}; "
                                f"reporting {folder}")
    if mosaic_dir:
        mosaic = Path(mosaic_dir)
        if not mosaic.is_dir():
            raise ValueError(f"parameter 'mosaic_dir': {mosaic} is not a folder")
    else:
        inside, _, _ = _locate(STEP_SPECS[0], candidates)
        mosaic = inside or find_mosaic_dir(out_dir, records, run_notes)
        if mosaic is not None:
            run_notes.append(f"preprocessing outputs found in {mosaic}")
    pre = records["preprocess"]
    if mosaic is not None and (mosaic / "preprocess_metrics.json").is_file():
        pre.ran, pre.folder = True, mosaic
    elif mosaic is not None:
        run_notes.append(f"{mosaic} holds no preprocess_metrics.json")

    for spec in STEP_SPECS:
        record = records[spec.key]
        if not record.ran or record.incomplete:
            continue
        try:
            if spec.key in SLICE_STEPS:
                _read_slice_step(record)
                if spec.key == "crop":
                    _finish_crop(record)
            elif spec.key == "rehoming":
                _read_rehoming(record, mosaic)
            else:
                _READERS[spec.key](record)
        except _READ_ERRORS as err:
            if isinstance(err, json.JSONDecodeError):
                err = ValueError(f"not valid JSON: {err}")
            record.problems.append(f"cannot read the outputs in {record.folder}: {type(err).__name__}: {err}")
    if not records["rehoming"].ran and mosaic is not None and (mosaic / "shifts_xy.csv").is_file():
        # No re-homing step: the raw stage steps still make the drift plot (in the preprocessing section).
        try:
            pre.tables["transitions"] = [{
                "fixed_id": s.fixed_id, "moving_id": s.moving_id, "kind": "", "raw_x_mm": s.x_shift_mm,
                "raw_y_mm": s.y_shift_mm, "clean_x_mm": None, "clean_y_mm": None, "reliable": s.reliable,
            } for s in read_shifts_xy(mosaic / "shifts_xy.csv")]
        except _READ_ERRORS as err:
            pre.problems.append(f"cannot read {mosaic / 'shifts_xy.csv'}: {err}")
    ordered = [records[spec.key] for spec in STEP_SPECS]
    _mark_missing_slices(ordered)
    _mark_estimated_positions(records)
    mark_hand_decided(records)
    return RunRecord(out_dir, mosaic, ordered, run_notes)

