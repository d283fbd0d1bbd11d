"""The lab's CSV tables: ``shifts_xy.csv`` and ``slice_config.csv`` (``soct-formats.md`` sections 3 and 4)."""

from __future__ import annotations

import csv
import io
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .atomic import atomic_output

__all__ = [
    "SliceShift",
    "SliceConfigRow",
    "SHIFTS_COLUMNS",
    "SLICE_CONFIG_COLUMNS",
    "read_shifts_xy",
    "write_shifts_xy",
    "read_slice_config",
    "write_slice_config",
    "parse_bool",
]

SHIFTS_COLUMNS = ("fixed_id", "moving_id", "x_shift", "y_shift", "x_shift_mm", "y_shift_mm", "reliable")
_TRUE = {"true", "1", "yes", "y", "t"}
_FALSE = {"false", "0", "no", "n", "f", ""}


def parse_bool(value: str | bool | None, *, where: str = "") -> bool:
    """Parse a CSV boolean (``true/1/yes``, ``false/0/no``, empty = false)."""
    if isinstance(value, bool):
        return value
    text = (value or "").strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"{where}: {value!r} is not a boolean (use true/false, 1/0 or yes/no)")


def _parse_id(value: str, where: str) -> int:
    """Slice ids are ints; existing files write them as floats (``0.0``)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: slice id {value!r} is not a number") from None
    if not number.is_integer() or number < 0:
        raise ValueError(f"{where}: slice id {value!r} is not a non-negative integer")
    return int(number)


@dataclass
class SliceShift:
    """Shift of slice ``moving_id`` relative to slice ``fixed_id`` (pixels at native tile resolution, and mm)."""

    fixed_id: int
    moving_id: int
    x_shift: float
    y_shift: float
    x_shift_mm: float
    y_shift_mm: float
    reliable: bool = True


def _write_csv(path: Path, header, rows, if_exists: str) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    with atomic_output(path, if_exists) as tmp:
        Path(tmp).write_text(buffer.getvalue())


def write_shifts_xy(path: str | os.PathLike, shifts: list[SliceShift], if_exists: str = "error") -> None:
    """Write ``shifts_xy.csv`` (ids as integers, ``reliable`` as 0/1)."""
    rows = [
        (s.fixed_id, s.moving_id, f"{s.x_shift:.6g}", f"{s.y_shift:.6g}", f"{s.x_shift_mm:.9g}",
         f"{s.y_shift_mm:.9g}", int(bool(s.reliable)))
        for s in shifts
    ]
    _write_csv(Path(path), SHIFTS_COLUMNS, rows, if_exists)


def read_shifts_xy(path: str | os.PathLike) -> list[SliceShift]:
    """Read ``shifts_xy.csv``; ids may be written as floats; a missing ``reliable`` column means reliable."""
    path = Path(path)
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        missing = {"fixed_id", "moving_id", "x_shift_mm", "y_shift_mm"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(sorted(missing))}")
        out = []
        for line, row in enumerate(reader, start=2):
            where = f"{path}, line {line}"
            try:
                out.append(
                    SliceShift(
                        fixed_id=_parse_id(row["fixed_id"], where),
                        moving_id=_parse_id(row["moving_id"], where),
                        x_shift=float(row.get("x_shift") or "nan"),
                        y_shift=float(row.get("y_shift") or "nan"),
                        x_shift_mm=float(row["x_shift_mm"]),
                        y_shift_mm=float(row["y_shift_mm"]),
                        reliable=parse_bool(row.get("reliable", "1") or "1", where=where),
                    )
                )
            except ValueError as err:
                raise ValueError(f"{where}: {err}") from None
    return out


@dataclass
class SliceConfigRow:
    """One row of ``slice_config.csv``: whether a slice is used, and what each step decided about it."""

    slice_id: int
    use: bool = True
    quality_score: float | None = None
    galvo_confidence: float | None = None
    galvo_fix: bool | None = None
    rehomed: bool | None = None
    rehoming_reliable: bool | None = None
    auto_excluded: bool | None = None
    auto_exclude_reason: str = ""
    interpolated: bool | None = None
    interpolation_failed: bool | None = None
    interpolation_method_used: str = ""
    interpolation_fallback_reason: str = ""
    notes: str = ""
    extra: dict = field(default_factory=dict, repr=False)

    def add_note(self, note: str) -> None:
        """Append a note (``;``-separated), once."""
        parts = [p for p in self.notes.split(";") if p]
        if note not in parts:
            parts.append(note)
        self.notes = ";".join(parts)


SLICE_CONFIG_COLUMNS = tuple(f.name for f in fields(SliceConfigRow) if f.name != "extra")
_BOOL_COLUMNS = {f.name for f in fields(SliceConfigRow) if "bool" in str(f.type)} - {"use"}
_FLOAT_COLUMNS = {f.name for f in fields(SliceConfigRow) if "float" in str(f.type)}


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def write_slice_config(path: str | os.PathLike, rows: list[SliceConfigRow], if_exists: str = "error") -> None:
    """Write ``slice_config.csv`` with every column (booleans as lowercase ``true``/``false``)."""
    extra_cols = sorted({k for r in rows for k in r.extra})
    out = []
    for r in rows:
        d = asdict(r)
        d.pop("extra")
        out.append([_cell(d[c]) for c in SLICE_CONFIG_COLUMNS] + [_cell(r.extra.get(c)) for c in extra_cols])
    _write_csv(Path(path), SLICE_CONFIG_COLUMNS + tuple(extra_cols), out, if_exists)


def read_slice_config(path: str | os.PathLike) -> list[SliceConfigRow]:
    """Read ``slice_config.csv``; a minimal ``slice_id,use[,notes]`` file is valid, missing columns default."""
    path = Path(path)
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        cols = set(reader.fieldnames or [])
        if not {"slice_id", "use"} <= cols:
            raise ValueError(f"{path}: needs at least the columns slice_id and use, found {sorted(cols)}")
        rows = []
        for line, raw in enumerate(reader, start=2):
            where = f"{path}, line {line}"
            row = SliceConfigRow(slice_id=_parse_id(raw["slice_id"], where), use=parse_bool(raw["use"], where=where))
            for col, value in raw.items():
                if col in ("slice_id", "use") or col is None:
                    continue
                value = (value or "").strip()
                if col in _BOOL_COLUMNS:
                    setattr(row, col, parse_bool(value, where=f"{where}, column {col}") if value else None)
                elif col in _FLOAT_COLUMNS:
                    try:
                        setattr(row, col, float(value) if value else None)
                    except ValueError:
                        raise ValueError(f"{where}, column {col}: {value!r} is not a number") from None
                elif col in SLICE_CONFIG_COLUMNS:
                    setattr(row, col, value)
                else:
                    row.extra[col] = value
            rows.append(row)
    return rows
