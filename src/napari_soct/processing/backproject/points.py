"""Reading ordered path points (``z, y, x``) from arrays, ``.npy`` or CSV files (napari's points CSV included)."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np

__all__ = ["read_points", "as_points"]


def read_points(path: str | os.PathLike) -> np.ndarray:
    """Ordered points ``(N, 3)`` as ``(z, y, x)`` from a ``.npy`` or CSV file.

    CSV files may have a header: napari's export (``index, axis-0, axis-1, axis-2``) and ``z, y, x`` columns
    are recognised; without a header the last three columns are ``z, y, x``.

    Raises
    ------
    FileNotFoundError
    ValueError
        Naming the file, when it holds no (N, 3) numeric points.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such points file")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            points = np.load(path, allow_pickle=False)
        except ValueError as err:
            raise ValueError(f"{path}: cannot read as .npy ({err})") from None
    elif suffix in (".csv", ".txt"):
        points = _read_csv(path)
    else:
        raise ValueError(f"{path}: points must be a .csv or .npy file")
    return as_points(points, str(path))


def _read_csv(path: Path) -> np.ndarray:
    with open(path, newline="") as fh:
        rows = [row for row in csv.reader(fh) if row and any(cell.strip() for cell in row)]
    if not rows:
        raise ValueError(f"{path}: no points")
    header = [cell.strip().lower() for cell in rows[0]]
    try:
        [float(cell) for cell in rows[0]]
        has_header = False
    except ValueError:
        has_header = True
    body = rows[1:] if has_header else rows
    columns = None
    if has_header:
        for names in (("axis-0", "axis-1", "axis-2"), ("z", "y", "x")):
            if all(n in header for n in names):
                columns = [header.index(n) for n in names]
                break
    try:
        table = np.array([[float(cell) for cell in row] for row in body], dtype=np.float64)
    except ValueError as err:
        raise ValueError(f"{path}: points must be numbers ({err})") from None
    if table.ndim != 2 or table.shape[1] < 3:
        raise ValueError(f"{path}: need three columns (z, y, x), found {table.shape[-1] if table.ndim else 0}")
    return table[:, columns] if columns else table[:, -3:]


def as_points(points, where: str = "points") -> np.ndarray:
    """Check and convert to a float64 ``(N, 3)`` array, naming ``where`` in errors."""
    try:
        points = np.asarray(points, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: points must be an (N, 3) numeric array") from None
    if points.ndim != 2 or points.shape[1] != 3:
        raise ValueError(f"{where}: points must be (N, 3) as (z, y, x), got shape {points.shape}")
    if len(points) < 2:
        raise ValueError(f"{where}: a path needs at least two points, got {len(points)}")
    if not np.isfinite(points).all():
        raise ValueError(f"{where}: points contain NaN or infinite values")
    return points
