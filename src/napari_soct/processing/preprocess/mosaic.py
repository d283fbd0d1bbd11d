"""Mosaic grids: the tiles of one slice pasted side by side (no overlap removed) in an OME-Zarr.

``mosaic_grid_3d_z{NN}.ome.zarr`` (``soct-formats.md`` section 2): NGFF 0.5 on zarr v3, array ``0``, float32,
shape ``(Z, n_tiles_y * tile_y, n_tiles_x * tile_x)``, chunk = tile shape, missing tiles zero, scale in mm.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import dask.array as da
import numpy as np

from ..correct.resample import resample_tile, resampled_tile_shape
from ..io.rawtiles import RawAcquisition, RawFormatError, RawTile, read_raw_frames
from .galvo import GalvoDecision, decide_galvo_shift, detect_galvo_band

__all__ = [
    "SliceGeometry",
    "slice_geometry",
    "galvo_decision_for_slice",
    "central_tiles",
    "read_corrected_tile",
    "lazy_raw_mosaic",
    "mosaic_grid_name",
]

N_GALVO_SAMPLE_TILES = 5
GALVO_SAMPLE_BSCANS = 40


def mosaic_grid_name(slice_id: int) -> str:
    """``mosaic_grid_3d_z{NN}.ome.zarr`` (two digits at least, wider ids kept whole)."""
    return f"mosaic_grid_3d_z{slice_id:02d}.ome.zarr"


@dataclass(frozen=True)
class SliceGeometry:
    """Where the tiles of a slice go in its mosaic grid and at which voxel size.

    Attributes
    ----------
    grid_shape : (int, int)
        Tiles along y and x.
    tile_shape : (int, int, int)
        ``(z, y, x)`` of a tile in the mosaic (after orientation and resampling).
    voxel_size_um : (float, float, float)
        Voxel size of the mosaic.
    """

    grid_shape: tuple[int, int]
    tile_shape: tuple[int, int, int]
    voxel_size_um: tuple[float, float, float]
    native_voxel_size_um: tuple[float, float, float]
    tile_shape_native: tuple[int, int, int]
    stage_positions_mm: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        z, ty, tx = self.tile_shape
        return (z, self.grid_shape[0] * ty, self.grid_shape[1] * tx)

    @property
    def resampled(self) -> bool:
        return self.voxel_size_um != self.native_voxel_size_um

    def tile_slices(self, x: int, y: int) -> tuple[slice, slice, slice]:
        """Array region of grid position ``(x, y)``."""
        _, ty, tx = self.tile_shape
        return (slice(None), slice(y * ty, (y + 1) * ty), slice(x * tx, (x + 1) * tx))

    def overlap_fraction(self, default: float) -> float:
        """Tile overlap from the stage positions (median step between grid neighbours), else ``default``."""
        pos = self.stage_positions_mm
        fov_x = self.native_voxel_size_um[2] * self.tile_shape_native[2] * 1e-3
        fov_y = self.native_voxel_size_um[1] * self.tile_shape_native[1] * 1e-3
        steps = []
        for (x, y), (px, py) in pos.items():
            if (x + 1, y) in pos:
                steps.append(abs(pos[(x + 1, y)][0] - px) / fov_x)
            if (x, y + 1) in pos:
                steps.append(abs(pos[(x, y + 1)][1] - py) / fov_y)
        if not steps:
            return default
        return float(round(1.0 - float(np.median(steps)), 4))


def slice_geometry(
    acq: RawAcquisition, slice_id: int, resolution_um: float = -1, legacy_orientation: bool = False
) -> SliceGeometry:
    """Mosaic geometry of one slice; ``resolution_um > 0`` resamples to that isotropic voxel size."""
    native = acq.voxel_size_um
    shape = acq.tile_shape
    if legacy_orientation:
        shape = (shape[0], shape[2], shape[1])
        native = (native[0], native[2], native[1])
    out_shape = resampled_tile_shape(shape, native, resolution_um)
    voxel = (float(resolution_um),) * 3 if resolution_um is not None and resolution_um > 0 else native
    positions = {
        key: (t.info.stage_x_mm, t.info.stage_y_mm) for key, t in acq.tiles.get(slice_id, {}).items()
    }
    return SliceGeometry(
        grid_shape=acq.grid_shape(slice_id),
        tile_shape=tuple(out_shape),
        voxel_size_um=tuple(voxel),
        native_voxel_size_um=tuple(native),
        stage_positions_mm=positions,
        tile_shape_native=tuple(shape),
    )


def central_tiles(acq: RawAcquisition, slice_id: int, n: int = N_GALVO_SAMPLE_TILES) -> list[RawTile]:
    """The ``n`` present tiles closest to the centre of the slice's grid (most likely to hold tissue)."""
    tiles = acq.tiles.get(slice_id, {})
    ny, nx = acq.grid_shape(slice_id)
    cy, cx = (ny - 1) / 2, (nx - 1) / 2
    order = sorted(tiles, key=lambda k: ((k[0] - cx) ** 2 + (k[1] - cy) ** 2, k[1], k[0]))
    return [tiles[k] for k in order[:n]]


def galvo_decision_for_slice(
    acq: RawAcquisition, slice_id: int, threshold: float = 0.6, n_tiles: int = N_GALVO_SAMPLE_TILES
) -> GalvoDecision:
    """Detect the galvo band on a few central tiles of a slice and decide one shift for the whole slice."""
    detections = []
    for tile in central_tiles(acq, slice_id, n_tiles):
        # A few dozen B-scans spread over the tile show the band as well as all of them, at a fraction of the I/O.
        bscans = np.unique(np.linspace(0, tile.info.ny - 1, min(tile.info.ny, GALVO_SAMPLE_BSCANS)).astype(int))
        try:
            frames = read_raw_frames(tile, bscans)
        except RawFormatError:
            continue  # a broken tile says nothing about the band; it is reported when the slice is written
        aip = frames.mean(axis=2)  # (ny, n_alines): mean over depth
        if not np.isfinite(aip).all():
            continue
        detections.append(detect_galvo_band(aip, tile.info.nx, tile.info.n_extra))
    return decide_galvo_shift(detections, threshold)


def read_corrected_tile(
    tile: RawTile,
    geometry: SliceGeometry,
    galvo_shift: int = 0,
    *,
    camera_shift: bool = False,
    legacy_orientation: bool = False,
) -> np.ndarray:
    """Read one tile with galvo fix, orientation and optional anti-aliased resampling to the mosaic grid."""
    data = tile.read(galvo_shift, camera_shift=camera_shift, legacy_orientation=legacy_orientation)
    return resample_tile(data, geometry.tile_shape)


def lazy_raw_mosaic(
    acq: RawAcquisition,
    slice_id: int,
    *,
    fix_galvo: bool = True,
    galvo_threshold: float = 0.6,
    camera_shift: bool = False,
    legacy_orientation: bool = False,
) -> da.Array:
    """A slice's mosaic grid as a lazy dask array (one chunk per tile, missing or broken tiles zero).

    Nothing is read until a chunk is computed; the galvo decision of the slice is made once, on first use.
    """
    geometry = slice_geometry(acq, slice_id, -1, legacy_orientation)

    @lru_cache(maxsize=1)
    def shift() -> int:
        if not fix_galvo:
            return 0
        return galvo_decision_for_slice(acq, slice_id, galvo_threshold).shift

    def load(block_id=None):
        _, by, bx = block_id
        tile = acq.tile(slice_id, bx, by)
        if tile is None:
            return np.zeros(geometry.tile_shape, np.float32)
        try:
            return read_corrected_tile(
                tile, geometry, shift(), camera_shift=camera_shift, legacy_orientation=legacy_orientation
            )
        except RawFormatError:
            return np.zeros(geometry.tile_shape, np.float32)

    z, ty, tx = geometry.tile_shape
    ny, nx = geometry.grid_shape
    chunks = ((z,), (ty,) * ny, (tx,) * nx)
    return da.map_blocks(
        load, chunks=chunks, dtype=np.float32, meta=np.empty((0, 0, 0), np.float32),
        name=f"raw-mosaic-{acq.root.name}-z{slice_id}-{id(acq):x}",
    )
