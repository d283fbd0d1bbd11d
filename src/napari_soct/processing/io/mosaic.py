"""Mosaic grids as a data type: tiles of one slice side by side in an OME-Zarr, read and written tile-wise.

A mosaic grid (``soct-formats.md`` section 2) is an OME-Zarr image whose chunk shape is the tile shape; the
tile at grid position ``(x, y)`` occupies ``[:, y*ty:(y+1)*ty, x*tx:(x+1)*tx]``. Steps before stitching
(resampling, curvature, illumination) read and write this layout; :class:`MosaicGrid` gives them the tiles,
the geometry and the stage positions, and :func:`create_mosaic_grid_like` a new grid with the same layout.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr

from .omezarr import OmeZarrImage, create_ome_zarr_image, open_ome_zarr

__all__ = ["MosaicGrid", "open_mosaic_grid", "create_mosaic_grid_like", "slice_id_from_name"]


def slice_id_from_name(path: str | os.PathLike) -> int | None:
    """Slice id from a file name containing ``_z{NN}`` (``mosaic_grid_3d_z07.ome.zarr`` -> 7)."""
    import re

    match = re.search(r"_z(\d+)(?:_|\.|$)", Path(path).name)
    return int(match.group(1)) if match else None


@dataclass
class MosaicGrid:
    """An opened mosaic grid.

    Attributes
    ----------
    image : OmeZarrImage
    tile_shape : (int, int, int)
        ``(z, y, x)`` of one tile (the chunk shape).
    grid_shape : (int, int)
        Tiles along y and x.
    voxel_size_um : (float, float, float)
    stage_positions_mm : dict
        ``{(x, y): (stage_x_mm, stage_y_mm)}`` of the present tiles (empty when the file does not say).
    slice_id : int or None
    """

    image: OmeZarrImage
    tile_shape: tuple[int, int, int]
    grid_shape: tuple[int, int]
    voxel_size_um: tuple[float, float, float]
    stage_positions_mm: dict
    slice_id: int | None

    @property
    def path(self) -> Path:
        return self.image.path

    @property
    def array(self) -> zarr.Array:
        return self.image.levels[0]

    @property
    def attributes(self) -> dict:
        return self.image.attributes.get("soct", {})

    @property
    def overlap_fraction(self) -> float:
        return float(self.attributes.get("overlap_fraction", 0.2))

    @property
    def missing_tiles(self) -> set[tuple[int, int]]:
        """Grid positions without data (recorded by preprocessing; unknown positions are assumed present)."""
        return {tuple(m) for m in self.attributes.get("missing_tiles", [])}

    def tile_positions(self) -> list[tuple[int, int]]:
        """Present grid positions ``(x, y)``, row by row."""
        missing = self.missing_tiles
        ny, nx = self.grid_shape
        return [(x, y) for y in range(ny) for x in range(nx) if (x, y) not in missing]

    def tile_region(self, x: int, y: int) -> tuple[slice, slice, slice]:
        _, ty, tx = self.tile_shape
        return (slice(None), slice(y * ty, (y + 1) * ty), slice(x * tx, (x + 1) * tx))

    def read_tile(self, x: int, y: int, z: slice | None = None) -> np.ndarray:
        """Tile ``(x, y)`` as float32 ``(z, y, x)``; ``z`` selects depth samples."""
        region = self.tile_region(x, y)
        if z is not None:
            region = (z, *region[1:])
        return np.asarray(self.array[region], dtype=np.float32)


def open_mosaic_grid(path: str | os.PathLike) -> MosaicGrid:
    """Open a mosaic grid written by preprocessing (or by the lab pipeline: chunk = tile shape).

    Raises
    ------
    ValueError
        If the image is not 3D or its shape is not a whole number of tiles.
    """
    image = open_ome_zarr(path)
    arr = image.levels[0]
    if arr.ndim != 3:
        raise ValueError(f"{path}: a mosaic grid is 3D (z, y, x), this image has shape {arr.shape}")
    soct = image.attributes.get("soct", {})
    tile_shape = tuple(soct.get("tile_shape") or arr.chunks)
    if arr.shape[0] != tile_shape[0] or arr.shape[1] % tile_shape[1] or arr.shape[2] % tile_shape[2]:
        if "tile_shape" not in soct and "origin_mm" in soct:
            raise ValueError(
                f"{path}: a stitched slice, not a mosaic grid; the steps before stitching (resample, curvature, "
                "illumination, stitch) take mosaic grids: mosaic_grid_3d_z*.ome.zarr from the preprocessing, or "
                "what one of those steps wrote"
            )
        raise ValueError(
            f"{path}: shape {arr.shape} is not a whole number of tiles of shape {tile_shape} "
            "(a mosaic grid's chunk shape is its tile shape)"
        )
    grid_shape = (arr.shape[1] // tile_shape[1], arr.shape[2] // tile_shape[2])
    voxel = tuple(float(s) * 1e3 for s in image.scales_mm[0])
    positions = {(p["x"], p["y"]): (p["stage_x_mm"], p["stage_y_mm"]) for p in soct.get("stage_positions_mm", [])}
    sid = soct.get("slice_id", slice_id_from_name(path))
    return MosaicGrid(image, tile_shape, grid_shape, voxel, positions, sid)


def create_mosaic_grid_like(
    path: str | os.PathLike,
    source: MosaicGrid,
    *,
    tile_shape: tuple[int, int, int] | None = None,
    voxel_size_um: tuple[float, float, float] | None = None,
    compression: str = "blosc-lz4",
    extra_attributes: dict | None = None,
) -> zarr.Array:
    """Create an empty mosaic grid with the layout of ``source`` (or a new tile shape / voxel size).

    The ``soct`` attributes of the source are carried over (stage positions, missing tiles, slice id) and
    updated with the new geometry and ``extra_attributes``.
    """
    tile_shape = tuple(tile_shape or source.tile_shape)
    voxel = tuple(voxel_size_um or source.voxel_size_um)
    ny, nx = source.grid_shape
    shape = (tile_shape[0], ny * tile_shape[1], nx * tile_shape[2])
    attrs = dict(source.attributes)
    attrs.update(tile_shape=list(tile_shape), voxel_size_um=list(voxel), grid_shape=[ny, nx])
    attrs.update(extra_attributes or {})
    return create_ome_zarr_image(
        path, shape, tuple(v * 1e-3 for v in voxel), chunks=tile_shape, compression=compression,
        name=Path(path).name.split(".")[0], attributes={"soct": attrs},
    )
