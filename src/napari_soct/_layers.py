"""napari layer data (``(data, kwargs, type)`` tuples) for S-OCT acquisitions and OME-Zarr images.

Shared by the reader, the sample data and the widgets. Data stay lazy (dask); contrast limits are computed
from one tile or the coarsest level so napari never scans a whole volume.
"""

from __future__ import annotations

from pathlib import Path

import dask.array as da
import numpy as np

from .processing.io.omezarr import open_ome_zarr
from .processing.io.rawtiles import RawAcquisition, open_raw_acquisition
from .processing.preprocess.mosaic import central_tiles, lazy_raw_mosaic, slice_geometry

__all__ = ["raw_acquisition_layers", "ome_zarr_layers", "tiff_planes_layers", "contrast_limits_of"]

MAX_CONTRAST_SAMPLE = 16_000_000


def contrast_limits_of(sample: np.ndarray) -> list[float]:
    """Robust display range (0.5 and 99.8 percentiles of non-zero values) of a small sample."""
    values = np.asarray(sample, dtype=np.float32)
    values = values[np.isfinite(values) & (values != 0)]
    if values.size == 0:
        return [0.0, 1.0]
    lo, hi = np.percentile(values, [0.5, 99.8])
    return [float(lo), float(hi if hi > lo else lo + 1)]


def _stack_padded(arrays: list[da.Array]) -> da.Array:
    """Stack along a new first axis; smaller arrays (a slice with a smaller tile grid) are zero-padded at the
    end, lazily, so the stack has one shape."""
    full = tuple(max(a.shape[i] for a in arrays) for i in range(arrays[0].ndim))
    return da.stack([
        a if a.shape == full else da.pad(a, [(0, f - s) for f, s in zip(full, a.shape)], mode="constant")
        for a in arrays
    ])


def _tile_grid_layer(acq: RawAcquisition, tile_shape, voxel_size_um, name: str):
    """The tile grid as rectangles (one per grid position present in any slice), stage positions as features."""
    _, ty, tx = tile_shape
    positions: dict[tuple[int, int], list] = {}
    for sid in acq.slice_ids:
        for (x, y), tile in acq.tiles[sid].items():
            positions.setdefault((x, y), []).append((tile.info.stage_x_mm, tile.info.stage_y_mm))
    keys = sorted(positions, key=lambda k: (k[1], k[0]))
    rects = [np.array([[y * ty, x * tx], [(y + 1) * ty - 1, (x + 1) * tx - 1]], float) for x, y in keys]
    n_slices = len(acq.slice_ids)
    features = {
        "grid_x": np.array([k[0] for k in keys]),
        "grid_y": np.array([k[1] for k in keys]),
        "stage_x_mm": np.array([np.mean([p[0] for p in positions[k]]) for k in keys]),
        "stage_y_mm": np.array([np.mean([p[1] for p in positions[k]]) for k in keys]),
        "slices_present": np.array([len(positions[k]) for k in keys]),
    }
    complete = features["slices_present"] == n_slices
    kwargs = {
        "name": name,
        "shape_type": "rectangle",
        "features": features,
        "edge_color": np.where(complete[:, None], [[1.0, 1.0, 0.0, 1.0]], [[1.0, 0.2, 0.2, 1.0]]),
        "face_color": "transparent",
        "edge_width": max(1.0, 0.01 * tx),
        "scale": (voxel_size_um[1] * 1e-3, voxel_size_um[2] * 1e-3),
        "units": ("mm", "mm"),
        "text": {"string": "x{grid_x} y{grid_y}", "size": 8, "color": "yellow"},
        "metadata": {"source": str(acq.root)},
    }
    return (rects, kwargs, "shapes")


def raw_acquisition_layers(path, acq: RawAcquisition | None = None, *, fix_galvo: bool = True) -> list[tuple]:
    """Layers for a raw acquisition: the mosaic grids of all slices as one lazy 4D image ``(slice, z, y, x)``
    and the tile grid as a shapes layer.
    """
    acq = acq or open_raw_acquisition(path)
    ids = acq.slice_ids
    geometry = slice_geometry(acq, ids[0])
    stack = _stack_padded([lazy_raw_mosaic(acq, sid, fix_galvo=fix_galvo) for sid in ids])
    vz, vy, vx = geometry.voxel_size_um
    sample = central_tiles(acq, ids[0], 1)[0].read(check_finite=False)
    name = Path(acq.root).name
    image = (
        stack,
        {
            "name": f"{name} (raw mosaic)",
            "scale": (1.0, vz * 1e-3, vy * 1e-3, vx * 1e-3),
            "units": ("pixel", "mm", "mm", "mm"),
            "axis_labels": ("slice", "z", "y", "x"),
            "contrast_limits": contrast_limits_of(sample),
            "colormap": "gray",
            "metadata": {
                "source": str(acq.root),
                "slice_ids": ids,
                "voxel_size_um": geometry.voxel_size_um,
                "tile_shape": geometry.tile_shape,
                "bad_tiles": {str(k): {f"{x},{y}": m for (x, y), m in v.items()} for k, v in acq.bad_tiles.items()},
            },
        },
        "image",
    )
    return [image, _tile_grid_layer(acq, geometry.tile_shape, geometry.voxel_size_um, f"{name} (tile grid)")]


def _contrast_sample(levels) -> np.ndarray:
    coarsest = levels[-1]
    if coarsest.size <= MAX_CONTRAST_SAMPLE:
        return np.asarray(coarsest[...])
    # Too big to scan: take the central chunk.
    chunk = coarsest.chunks
    start = [max(0, s // 2 - c // 2) for s, c in zip(coarsest.shape, chunk)]
    return np.asarray(coarsest[tuple(slice(a, a + c) for a, c in zip(start, chunk))])


def ome_zarr_layers(path, kind: str | None = None) -> list[tuple]:
    """One layer (``kind`` "image" or "labels"; None: labels when the file says so) for an OME-Zarr image,
    multiscale when it has several levels, scale and translation in mm."""
    image = open_ome_zarr(path)
    kind = kind or ("labels" if image.is_labels else "image")
    pyramid = image.pyramid()
    scale = image.scales_mm[0]
    units = tuple("mm" if a in "zyx" else "pixel" for a in image.axes)
    kwargs = {
        "name": image.name or Path(path).name,
        "scale": scale,
        "units": units,
        "axis_labels": image.axes,
        "multiscale": len(pyramid) > 1,
        "translate": image.translation_mm or (0.0,) * len(scale),
        "metadata": {"source": str(path), "ngff_version": image.version, **image.attributes},
    }
    if kind == "image":
        kwargs["contrast_limits"] = contrast_limits_of(_contrast_sample(image.levels))
    return [(pyramid if len(pyramid) > 1 else pyramid[0], kwargs, kind)]


def tiff_planes_layers(path) -> list[tuple]:
    """One image layer for a folder of single-page TIFFs (one per z plane), lazy (one dask chunk per plane).

    A straightened volume written as per-slice TIFFs (``<name>-slices/`` or ``<name>/`` next to
    ``<name>-configuration.json``) gets that configuration in its metadata, for the straightened-volume writer.
    """
    from .processing.backproject.config import CONFIG_METADATA_KEY, CONFIG_SUFFIX
    from .processing.io.images import open_image

    folder = Path(path)
    image = open_image(folder)
    metadata = {"source": str(folder)}
    for base in (folder.name.removesuffix("-slices"), folder.name):
        config = folder.parent / f"{base}{CONFIG_SUFFIX}"
        if config.is_file():
            metadata[CONFIG_METADATA_KEY] = str(config)
            break
    middle = np.asarray(image.data[image.shape[0] // 2])  # one plane: napari never scans the volume
    kwargs = {"name": folder.name, "contrast_limits": contrast_limits_of(middle), "metadata": metadata}
    return [(image.data, kwargs, "image")]


def stacked_ome_zarr_layer(paths, name: str, kind: str = "image") -> tuple:
    """Several same-kind OME-Zarr images (e.g. one mosaic grid per slice) as one lazy image with a leading
    slice axis; smaller images are zero-padded at the end. Scale from the first image.
    """
    images = [open_ome_zarr(p) for p in paths]
    first = images[0]
    kwargs = {
        "name": name,
        "scale": (1.0, *first.scales_mm[0]),
        "units": ("pixel", *("mm" if a in "zyx" else "pixel" for a in first.axes)),
        "axis_labels": ("slice", *first.axes),
        "metadata": {"sources": [str(p) for p in paths]},
    }
    if kind == "image":
        kwargs["contrast_limits"] = contrast_limits_of(_contrast_sample(first.levels))
    return (_stack_padded([im.as_dask(0) for im in images]), kwargs, kind)


def tile_qc_layer(tiles: list[dict], name: str, scale, visible: bool = True) -> tuple:
    """Tiles as rectangles coloured by their first metric, every metric in the features table.

    ``tiles`` is the per-tile list a step reports in its metrics: ``{"x", "y", "y0_px", "x0_px",
    "height_px", "width_px", <metric>: float, ...}`` with the rectangle in the slice's pixel frame.
    """
    geometry = {"x", "y", "y0_px", "x0_px", "height_px", "width_px"}
    metric_names = [k for k in tiles[0] if k not in geometry and isinstance(tiles[0][k], int | float)]
    rects = [
        np.array([[t["y0_px"], t["x0_px"]], [t["y0_px"] + t["height_px"] - 1, t["x0_px"] + t["width_px"] - 1]], float)
        for t in tiles
    ]
    features = {"grid_x": [t["x"] for t in tiles], "grid_y": [t["y"] for t in tiles]}
    features.update({m: [float(t.get(m, np.nan)) for t in tiles] for m in metric_names})
    kwargs = {
        "name": name,
        "shape_type": "rectangle",
        "features": features,
        "face_color": "transparent",
        "edge_width": 2.0,
        "scale": tuple(scale),
        "visible": visible,
        "opacity": 0.8,
    }
    if metric_names:
        kwargs["edge_color"] = metric_names[0]
        kwargs["edge_colormap"] = "viridis"
    return (rects, kwargs, "shapes")
