"""Step 9: re-homing detection on ``shifts_xy.csv``.

Two kinds of large step between consecutive slices appear in stage metadata:

- an **encoder glitch**: one slice's reported position is wrong, so its step in is undone by its step out
  (the two steps nearly cancel); the glitch is corrected;
- a **re-homing**: the stage really moved to a new origin; the jump stays and later steps are small again; it is
  kept (and, with ``tile_fov_mm``, a jump that is a whole number of tile fields of view - a mosaic that grew by
  a tile column - is taken out of position space).

A step ``s_i`` larger than ``max_shift_mm`` is a glitch when a neighbour ``s_j`` (j = i-1 or i+1) brings it
back: ``|s_i + s_j| < return_fraction * |s_i|``. A glitch shows as such a pair (into the wrong position and
out of it): both steps are replaced by their mean, which keeps their sum, so every later slice keeps its exact
metadata position and only the glitched slice is placed halfway (**ours**; the lab replaces each by the median of
the ordinary steps around it, which shifts all later slices by the error of that median). A glitch step
without its pair (the last slice) gets that median.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from ..io.atomic import IF_EXISTS_CHOICES, atomic_output, check_can_write
from ..io.tables import SliceShift, read_shifts_xy, read_slice_config, write_shifts_xy, write_slice_config
from ..params import param, validate_params

__all__ = ["RehomingParams", "RehomingResult", "classify_steps", "clean_shifts", "detect_rehoming"]


@dataclass
class RehomingParams:
    """Re-homing detection and encoder-glitch correction on the slice shifts."""

    max_shift_mm: float = param(0.1, "Steps larger than this are examined (glitch or re-homing)", min=0.0, unit="mm")
    return_fraction: float = param(
        0.4, "A large step is a glitch when a neighbouring step cancels it to within this fraction", min=0.0, max=1.0
    )
    median_window: int = param(2, "Ordinary steps on each side whose median replaces a glitch", min=1)
    tile_fov_mm: float = param(
        0.0, "Tile field of view; when > 0, jumps that are whole multiples of it are removed (legacy data)",
        min=0.0, unit="mm",
    )
    fov_tolerance_mm: float = param(0.02, "How close to a multiple of tile_fov_mm a jump must be", min=0.0,
                                    unit="mm", advanced=True)
    if_exists: str = param(
        "error", "Existing outputs: 'error' refuses, 'skip' keeps them, 'overwrite' replaces them",
        choices=IF_EXISTS_CHOICES, advanced=True,
    )


@dataclass
class StepDecision:
    """What was decided for one pairwise step."""

    fixed_id: int
    moving_id: int
    kind: str  # "ordinary", "glitch", "rehoming", "fov_jump"
    original_mm: tuple[float, float]
    cleaned_mm: tuple[float, float]
    reliable: bool


@dataclass
class RehomingResult:
    """Outputs of :func:`detect_rehoming`."""

    shifts_path: Path
    report_path: Path
    slice_config_path: Path | None
    decisions: list[StepDecision] = field(default_factory=list)

    @property
    def glitches(self) -> list[StepDecision]:
        return [d for d in self.decisions if d.kind == "glitch"]

    @property
    def rehomings(self) -> list[StepDecision]:
        return [d for d in self.decisions if d.kind in ("rehoming", "fov_jump")]


def classify_steps(steps_mm: np.ndarray, params: RehomingParams) -> list[str]:
    """Kind of each step (rows of ``(n, 2)`` x/y mm): ordinary, glitch, rehoming or fov_jump."""
    norms = np.linalg.norm(steps_mm, axis=1)
    kinds = []
    for i, step in enumerate(steps_mm):
        if norms[i] <= params.max_shift_mm:
            kinds.append("ordinary")
            continue
        cancelled = any(
            0 <= j < len(steps_mm) and np.linalg.norm(step + steps_mm[j]) < params.return_fraction * norms[i]
            for j in (i - 1, i + 1)
        )
        if cancelled:
            kinds.append("glitch")
        elif params.tile_fov_mm > 0 and _fov_multiple(step, params) is not None:
            kinds.append("fov_jump")
        else:
            kinds.append("rehoming")
    return kinds


def _fov_multiple(step: np.ndarray, params: RehomingParams) -> np.ndarray | None:
    multiples = np.round(step / params.tile_fov_mm)
    if not multiples.any():
        return None
    if np.all(np.abs(step - multiples * params.tile_fov_mm) <= params.fov_tolerance_mm):
        return multiples
    return None


def clean_shifts(shifts: list[SliceShift], params: RehomingParams) -> list[StepDecision]:
    """Classify every step and compute its cleaned value (see the module docstring)."""
    steps = np.array([[s.x_shift_mm, s.y_shift_mm] for s in shifts], float).reshape(-1, 2)
    kinds = classify_steps(steps, params)
    ordinary = [i for i, k in enumerate(kinds) if k == "ordinary"]
    decisions = []
    for i, (shift, kind) in enumerate(zip(shifts, kinds)):
        cleaned = steps[i].copy()
        if kind == "glitch":
            partner = next((j for j in (i - 1, i + 1) if 0 <= j < len(kinds) and kinds[j] == "glitch" and
                            np.linalg.norm(steps[i] + steps[j]) < params.return_fraction * np.linalg.norm(steps[i])),
                           None)
            if partner is not None:
                cleaned = 0.5 * (steps[i] + steps[partner])
            else:
                near = [j for j in ordinary if abs(j - i) <= params.median_window] or ordinary
                cleaned = np.median(steps[near], axis=0) if near else np.zeros(2)
        elif kind == "fov_jump":
            cleaned = steps[i] - _fov_multiple(steps[i], params) * params.tile_fov_mm
        reliable = bool(shift.reliable) and kind == "ordinary"
        decisions.append(StepDecision(shift.fixed_id, shift.moving_id, kind, tuple(map(float, steps[i])),
                                      tuple(map(float, cleaned)), reliable))
    return decisions


def detect_rehoming(shifts_csv, out_dir, params: RehomingParams | None = None, *, slice_config=None,
                    progress=None, cancel=None) -> RehomingResult:
    """Step 9: write ``shifts_xy_clean.csv`` (glitches corrected, ``reliable`` stamped) and
    ``rehoming_report.json``; a copy of ``slice_config`` (default: the ``slice_config.csv`` next to the shifts,
    when there is one) with ``rehomed`` and ``rehoming_reliable`` stamped (manual choices kept) is written too.
    """
    params = params or RehomingParams()
    validate_params(params)
    shifts_csv, out_dir = Path(shifts_csv), Path(out_dir)
    shifts = read_shifts_xy(shifts_csv)
    decisions = clean_shifts(shifts, params)
    shifts_out = out_dir / "shifts_xy_clean.csv"
    report = out_dir / "rehoming_report.json"
    config_in = Path(slice_config) if slice_config else shifts_csv.parent / "slice_config.csv"
    if slice_config and not config_in.is_file():
        raise FileNotFoundError(f"slice_config: {config_in} does not exist")
    config_out = out_dir / "slice_config.csv" if config_in.exists() else None
    write_now = check_can_write(shifts_out, params.if_exists)
    if write_now:
        pixel = [abs(s.x_shift_mm / s.x_shift) if s.x_shift else None for s in shifts]
        pixel_y = [abs(s.y_shift_mm / s.y_shift) if s.y_shift else None for s in shifts]
        px = next((p for p in pixel if p), None)
        py = next((p for p in pixel_y if p), None)
        cleaned = [
            replace(s, x_shift_mm=d.cleaned_mm[0], y_shift_mm=d.cleaned_mm[1],
                    x_shift=d.cleaned_mm[0] / px if px else s.x_shift, y_shift=d.cleaned_mm[1] / py if py else s.y_shift,
                    reliable=d.reliable)
            for s, d in zip(shifts, decisions)
        ]
        out_dir.mkdir(parents=True, exist_ok=True)
        write_shifts_xy(shifts_out, cleaned, if_exists="overwrite")
        with atomic_output(report, "overwrite") as tmp:
            Path(tmp).write_text(json.dumps({"params": asdict(params), "steps": [asdict(d) for d in decisions]},
                                            indent=2))
        if config_out is not None:
            rows = read_slice_config(config_in)
            by_moving = {d.moving_id: d for d in decisions}
            for row in rows:
                d = by_moving.get(row.slice_id)
                if d is None:
                    continue
                row.rehomed = d.kind in ("rehoming", "fov_jump")
                row.rehoming_reliable = d.reliable
                if d.kind == "glitch":
                    row.add_note("encoder_glitch_corrected")
            write_slice_config(config_out, rows, if_exists="overwrite")
    return RehomingResult(shifts_out, report, config_out, decisions)
