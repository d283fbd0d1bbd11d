"""Shifts between consecutive slices from the stage (motor) positions of their tiles."""

from __future__ import annotations

from ..io.rawtiles import RawAcquisition
from ..io.tables import SliceShift

__all__ = ["mosaic_bounds_mm", "shifts_from_stage_positions"]


def mosaic_bounds_mm(acq: RawAcquisition, slice_id: int) -> tuple[float, float, float, float]:
    """``(x_min, x_max, y_min, y_max)`` of a slice's mosaic in mm: tile stage positions -/+ half the FOV."""
    info = acq.tile_info
    half_x, half_y = info.width_um * 5e-4, info.height_um * 5e-4
    xs = [t.info.stage_x_mm for t in acq.tiles[slice_id].values()]
    ys = [t.info.stage_y_mm for t in acq.tiles[slice_id].values()]
    return (min(xs) - half_x, max(xs) + half_x, min(ys) - half_y, max(ys) + half_y)


def _smaller(a: float, b: float) -> float:
    return a if abs(a) <= abs(b) else b


def shifts_from_stage_positions(acq: RawAcquisition) -> list[SliceShift]:
    """One :class:`SliceShift` per consecutive pair of present slices.

    Per axis, the shift of the moving slice is measured on the minimum and on the maximum mosaic bound, and
    the smaller magnitude is kept (a tile row or column added on one side then does not move the slice).
    A pair is unreliable when the tile grid changed shape between the two slices.
    """
    info = acq.tile_info
    pixel_x_mm, pixel_y_mm = info.width_um / info.nx * 1e-3, info.height_um / info.ny * 1e-3
    ids = acq.slice_ids
    out = []
    for fixed, moving in zip(ids[:-1], ids[1:]):
        fx0, fx1, fy0, fy1 = mosaic_bounds_mm(acq, fixed)
        mx0, mx1, my0, my1 = mosaic_bounds_mm(acq, moving)
        dx = _smaller(mx0 - fx0, mx1 - fx1)
        dy = _smaller(my0 - fy0, my1 - fy1)
        out.append(
            SliceShift(
                fixed_id=fixed,
                moving_id=moving,
                x_shift=dx / pixel_x_mm,
                y_shift=dy / pixel_y_mm,
                x_shift_mm=dx,
                y_shift_mm=dy,
                reliable=acq.grid_shape(fixed) == acq.grid_shape(moving),
            )
        )
    return out
