"""Projection angles: parsing the user's text, validating lists, ordering them for SART."""

from __future__ import annotations

import math

import numpy as np

__all__ = ["parse_angles", "default_angles", "check_angles", "golden_ratio_order", "uniform_step"]


def default_angles(n: int) -> np.ndarray:
    """``n`` angles evenly spaced over [0, 180) degrees (scikit-image's default for a sinogram of ``n``
    columns)."""
    return np.linspace(0.0, 180.0, n, endpoint=False)


def _number(text: str, what: str, spec: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"angles {spec!r}: {what} {text.strip()!r} is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"angles {spec!r}: {what} {text.strip()!r} is not finite")
    return value


def parse_angles(spec: str, n_expected: int | None = None) -> np.ndarray:
    """Projection angles in degrees from text.

    Parameters
    ----------
    spec : str
        ``"start:stop:count"``: ``count`` angles from ``start`` to ``stop``, ``stop`` excluded (``"0:180:180"``
        is 0, 1, ..., 179); or a comma-separated list ``"0,1.5,3"``; or ``""``/``"auto"``: ``n_expected``
        angles over [0, 180).
    n_expected : int, optional
        Number of projections of the sinogram; the angles must match it.

    Returns
    -------
    numpy.ndarray of float64

    Raises
    ------
    ValueError
        Naming the part of ``spec`` that is wrong, or the count that does not match.
    """
    text = (spec or "").strip()
    if text.lower() in ("", "auto"):
        if n_expected is None:
            raise ValueError("angles: give 'start:stop:count' or a list; 'auto' needs the sinogram's angle count")
        return default_angles(n_expected)
    if ":" in text:
        parts = text.split(":")
        if len(parts) != 3:
            raise ValueError(f"angles {spec!r}: a range is 'start:stop:count' (three numbers), e.g. '0:180:180'")
        start = _number(parts[0], "start", spec)
        stop = _number(parts[1], "stop", spec)
        count = _number(parts[2], "count", spec)
        if not count.is_integer() or count < 1:
            raise ValueError(f"angles {spec!r}: count must be a positive whole number, got {parts[2].strip()!r}")
        if stop == start:
            raise ValueError(f"angles {spec!r}: start and stop are equal")
        angles = np.linspace(start, stop, int(count), endpoint=False)
    else:
        items = [p for p in text.replace(";", ",").split(",")]
        if any(not p.strip() for p in items):
            raise ValueError(f"angles {spec!r}: empty item in the list (two commas in a row or a trailing comma)")
        angles = np.array([_number(p, "item", spec) for p in items])
    return check_angles(angles, n_expected, spec)


def check_angles(angles, n_expected: int | None = None, spec: str | None = None) -> np.ndarray:
    """Angles as a 1-D float64 array, finite, matching ``n_expected`` projections."""
    label = f"angles {spec!r}" if spec is not None else "angles"
    angles = np.atleast_1d(np.asarray(angles, dtype=np.float64))
    if angles.ndim != 1 or angles.size == 0:
        raise ValueError(f"{label}: need a non-empty list of angles")
    if not np.all(np.isfinite(angles)):
        raise ValueError(f"{label}: angles must be finite")
    if n_expected is not None and angles.size != n_expected:
        raise ValueError(
            f"{label}: {angles.size} angle(s) given but the sinogram has {n_expected} projection(s) "
            f"(for evenly spaced angles over 180 degrees use '0:180:{n_expected}')"
        )
    return angles


def uniform_step(angles) -> float | None:
    """The step of evenly spaced, increasing angles (to 1e-6 degree), else None."""
    angles = np.asarray(angles, dtype=np.float64)
    if angles.size < 2:
        return None
    steps = np.diff(angles)
    step = float(steps.mean())
    return step if step > 0 and np.allclose(steps, step, rtol=0, atol=1e-6) else None


def golden_ratio_order(theta) -> list[int]:
    """Indices of ``theta`` in the golden-ratio order of Kohler (2004), the order SART visits projections.

    Starting from the smallest angle, each next angle is the remaining one nearest to the previous plus
    ``180 / phi**2`` degrees (modulo 180). Distances are compared as scikit-image's ``iradon_sart`` does (the
    difference of angle values reduced modulo -180, below wins only when strictly nearer), so both visit
    the projections in the same order.
    """
    theta = np.asarray(theta, dtype=np.float64)
    remaining = [int(i) for i in np.argsort(theta, kind="stable")]
    order = [remaining.pop(0)]
    angle = theta[order[0]]
    increment = 180.0 / ((1.0 + math.sqrt(5.0)) / 2.0) ** 2
    while remaining:
        angle = (angle + increment) % 180.0
        values = theta[remaining]
        above = int(np.searchsorted(values, angle))
        below = above - 1
        above %= len(remaining)
        near_below = abs(angle - values[below]) % -180.0
        near_above = abs(angle - values[above]) % -180.0
        order.append(remaining.pop(below if near_below < near_above else above))
    return order
