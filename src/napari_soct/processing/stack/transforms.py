"""Slice-to-slice transforms: ``pairwise_registration.csv`` (written by step 12, edited by hand in issue 9, read
by stacking).

Convention (canvas pixels, moving -> fixed): a point ``p = (x, y)`` of the moving slice lands at
``q = R(theta) (p - c) + c + t`` in the fixed slice, with ``R = [[cos, -sin], [sin, cos]]`` acting on ``(x, y)``,
``c = (center_x_px, center_y_px)`` and ``t = (tx_px, ty_px)``.
"""

from __future__ import annotations

import csv
import io
import math
import os
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from ..io.atomic import atomic_output
from ..io.tables import parse_bool

__all__ = ["PairTransform", "PAIR_COLUMNS", "STATUSES", "read_pairwise_registration", "write_pairwise_registration"]

STATUSES = ("ok", "fallback_identity", "error")


@dataclass
class PairTransform:
    """Registration of slice ``moving_id`` onto slice ``fixed_id`` (see the module docstring)."""

    fixed_id: int
    moving_id: int
    z_match_plane: int = 0
    z_match_ncc: float = float("nan")
    expected_z_plane: int = 0
    tx_px: float = 0.0
    ty_px: float = 0.0
    rotation_deg: float = 0.0
    center_y_px: float = 0.0
    center_x_px: float = 0.0
    ncc_before: float = float("nan")
    ncc_after: float = float("nan")
    confidence: float = 0.0
    status: str = "ok"
    manual: bool = False
    verified: bool = False

    def matrix(self) -> np.ndarray:
        """3x3 homogeneous matrix acting on ``(x, y, 1)`` (moving -> fixed)."""
        th = math.radians(self.rotation_deg)
        r = np.array([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]])
        c = np.array([self.center_x_px, self.center_y_px])
        m = np.eye(3)
        m[:2, :2] = r
        m[:2, 2] = c - r @ c + np.array([self.tx_px, self.ty_px])
        return m

    def apply(self, xy: np.ndarray) -> np.ndarray:
        """Map moving points ``(..., 2)`` given as ``(x, y)`` to fixed coordinates."""
        xy = np.asarray(xy, dtype=float)
        m = self.matrix()
        return xy @ m[:2, :2].T + m[:2, 2]

    @property
    def is_identity(self) -> bool:
        return self.tx_px == 0 and self.ty_px == 0 and self.rotation_deg == 0


PAIR_COLUMNS = tuple(f.name for f in fields(PairTransform))
_INT = {"fixed_id", "moving_id", "z_match_plane", "expected_z_plane"}
_BOOL = {"manual", "verified"}


def write_pairwise_registration(path: str | os.PathLike, pairs: list[PairTransform], if_exists: str = "error") -> None:
    """Write ``pairwise_registration.csv`` atomically (booleans as 0/1)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(PAIR_COLUMNS)
    for p in pairs:
        row = []
        for name in PAIR_COLUMNS:
            value = getattr(p, name)
            if name in _BOOL:
                row.append(int(bool(value)))
            elif isinstance(value, float):
                row.append(f"{value:.9g}")
            else:
                row.append(value)
        writer.writerow(row)
    with atomic_output(Path(path), if_exists) as tmp:
        Path(tmp).write_text(buffer.getvalue())


def read_pairwise_registration(path: str | os.PathLike) -> list[PairTransform]:
    """Read ``pairwise_registration.csv``; missing optional columns take their defaults."""
    path = Path(path)
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        missing = {"fixed_id", "moving_id"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(sorted(missing))}")
        out = []
        for line, raw in enumerate(reader, start=2):
            where = f"{path}, line {line}"
            values = {}
            for name in PAIR_COLUMNS:
                text = (raw.get(name) or "").strip()
                if not text:
                    continue
                try:
                    if name in _INT:
                        values[name] = int(float(text))
                    elif name in _BOOL:
                        values[name] = parse_bool(text, where=where)
                    elif name == "status":
                        if text not in STATUSES:
                            raise ValueError(f"status {text!r} is not one of {', '.join(STATUSES)}")
                        values[name] = text
                    else:
                        values[name] = float(text)
                except ValueError as err:
                    raise ValueError(f"{where}, column {name}: {err}") from None
            out.append(PairTransform(**values))
    return out
