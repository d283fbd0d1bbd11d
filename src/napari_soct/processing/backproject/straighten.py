"""The straighten step: cut a volume along a path into a stack of slices, with an Ouroboros-style configuration.

Slices are perpendicular to a spline through the path points, spaced by true arc length, oriented by
rotation-minimising frames; slice ``i`` is ``height x width`` pixels centred on the path. The source is read
lazily: each batch of slices reads only the source box it needs, so sources larger than memory work.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from ..io.atomic import IF_EXISTS_CHOICES, atomic_output, check_can_write
from ..io.images import ImageData
from ..io.omezarr import create_ome_zarr_image, open_ome_zarr
from ..memory import return_large_buffers_to_os
from ..params import param, validate_params
from ..progress import Progress, ProgressCallback
from .arrays import direct_array
from .config import CONFIG_SUFFIX, bounding_boxes_for, write_configuration
from .geometry import SliceGeometry, sample_path, slice_rects_from_frames
from .points import as_points, read_points
from .pull import _gather_labels

__all__ = ["StraightenParams", "StraightenResult", "straighten_volume", "TIFF_COMPRESSIONS", "VALUE_MODES"]

GIB = 1024**3
TIFF_COMPRESSIONS = ("none", "zlib", "zstd")
VALUE_MODES = ("intensity", "labels")


@dataclass
class StraightenParams:
    """Parameters of the straighten step."""

    width: int = param(64, "Slice width in pixels (across the path, along the slice rows)", min=2, max=1_000_000)
    height: int = param(64, "Slice height in pixels (starts along the depth axis z)", min=2, max=1_000_000)
    slice_spacing: float = param(
        0.0, "Arc length between slices in the source's physical unit (mm for OME-Zarr, voxels when the source "
        "has no scale); 0 = the smallest voxel size", min=0.0,
    )
    pixel_size: float = param(0.0, "Pixel size of the slices (same unit); 0 = the smallest voxel size", min=0.0)
    smoothing: float = param(
        0.0, "Path spline smoothing: 0 passes through every point, else the allowed mean squared distance to "
        "the points (unit squared)", min=0.0,
    )
    points_in_voxels: bool = param(
        False, "The path points are source voxel indices (z, y, x) rather than physical coordinates"
    )
    value_mode: str = param(
        "intensity", "'intensity' interpolates values; 'labels' takes at each sample the label with the "
        "largest trilinear weight (segmentations; ids kept exactly)", choices=VALUE_MODES,
    )
    interpolation_order: int = param(
        1, "Spline order for intensities: 0 nearest, 1 linear, 3 cubic", min=0, max=5, advanced=True
    )
    mip_level: int = param(0, "Pyramid level of an OME-Zarr source to slice (0 = full resolution)", min=0,
                           advanced=True)
    name: str = param("straightened", "Base name of the outputs (<name>.tif, <name>.ome.zarr, "
                      "<name>-configuration.json)")
    make_single_file: bool = param(True, "One TIFF stack; off: a folder <name>-slices of one TIFF per slice")
    compression: str = param("zstd", "TIFF compression", choices=TIFF_COMPRESSIONS)
    memory_budget_gb: float = param(2.0, "Peak memory the step may use, in GiB", min=1e-4, unit="GiB")
    if_exists: str = param(
        "error", "Existing outputs: 'error' refuses, 'skip' keeps them, 'overwrite' replaces them",
        choices=IF_EXISTS_CHOICES,
    )


@dataclass
class StraightenResult:
    """Products of :func:`straighten_volume`."""

    out_dir: Path
    tiff_path: Path
    zarr_path: Path
    config_path: Path
    metrics_path: Path
    shape: tuple[int, int, int]
    value_mode: str
    path_length: float
    skipped: bool = False
    seconds: float = 0.0
    source_voxels_read: int = 0
    notes: list[str] = field(default_factory=list)


def _source_level(image: ImageData, level: int):
    """The array and voxel size of pyramid level ``level``, plus every level's voxel size over level 0's."""
    levels = None
    if image.source is not None:
        try:
            pyramid = open_ome_zarr(image.source)
            levels = [tuple(np.asarray(s) / np.asarray(pyramid.scales_mm[0])) for s in pyramid.scales_mm]
        except (ValueError, OSError):
            pyramid = None
    else:
        pyramid = None
    if level == 0:
        return direct_array(image), tuple(float(s) for s in image.scale[-3:]), levels or []
    if pyramid is None or level >= len(pyramid.levels):
        available = len(pyramid.levels) if pyramid is not None else 1
        raise ValueError(f"mip_level={level}: the source ({image.source or image.name}) has {available} "
                         "pyramid level(s); use an OME-Zarr source with that level or mip_level=0")
    return pyramid.levels[level], tuple(float(s) for s in pyramid.scales_mm[level][-3:]), levels


def _plan_batches(geometry: SliceGeometry, shape, margin: int, bytes_per_source_voxel: int,
                  bytes_per_sample: int, budget: int, chunks=None, source_itemsize: int = 4):
    """Split slices (and, when one slice is too big, rows) into pieces whose source box fits the budget.

    The box counts with its working copies; a chunked source (zarr, dask) decodes whole chunks, so the chunks
    a box touches count too (decoded and encoded). Yields ``(first_slice, stop_slice, first_row, stop_row,
    box_lo, box_hi)``.
    """
    g = geometry
    n, h, w = g.n_slices, g.height, g.width
    origins, rows, cols = g.origins[1:-1], g.row_steps[1:-1], g.column_steps[1:-1]
    shape = np.asarray(shape)
    chunks = np.asarray(chunks if chunks is not None else (1, 1, 1), np.int64)

    def box(i0, i1, r0, r1):
        o = origins[i0:i1] + rows[i0:i1] * r0
        corners = np.concatenate([o, o + cols[i0:i1] * (w - 1), o + rows[i0:i1] * (r1 - 1 - r0),
                                  o + rows[i0:i1] * (r1 - 1 - r0) + cols[i0:i1] * (w - 1)])
        lo = np.floor(corners.min(axis=0)).astype(np.int64) - margin
        hi = np.floor(corners.max(axis=0)).astype(np.int64) + margin + 2
        lo_c, hi_c = np.clip(lo, 0, shape), np.clip(hi, 0, shape)
        read = np.maximum(hi_c - lo_c, 0)
        touched = np.where(read > 0, -(-hi_c // chunks) * chunks - (lo_c // chunks) * chunks, 0)
        return lo, hi, (int(np.prod(np.maximum(hi - lo, 0))) * bytes_per_source_voxel
                        + int(np.prod(read)) * source_itemsize + 2 * int(np.prod(touched)) * source_itemsize)

    def cost(i0, i1, r0, r1):
        lo, hi, box_bytes = box(i0, i1, r0, r1)
        return lo, hi, box_bytes + (i1 - i0) * (r1 - r0) * w * bytes_per_sample

    i = 0
    while i < n:
        lo, hi, need = cost(i, i + 1, 0, h)
        if need > budget:
            # One slice is too big: rows in pieces.
            r = 0
            while r < h:
                step = h - r
                while step > 1 and cost(i, i + 1, r, r + step)[2] > budget:
                    step //= 2
                lo, hi, need = cost(i, i + 1, r, r + step)
                if need > budget:
                    raise ValueError(f"memory_budget_gb is too small: one row of a slice needs "
                                     f"{need / GIB:.3g} GiB with the source chunks it touches; raise "
                                     "memory_budget_gb, lower width, or store the source in smaller chunks")
                yield i, i + 1, r, r + step, lo, hi
                r += step
            i += 1
            continue
        k = 1
        while i + k < n:
            k2 = min(n - i, 2 * k)
            lo2, hi2, need2 = cost(i, i + k2, 0, h)
            if need2 > budget:
                break
            k, lo, hi = k2, lo2, hi2
        # Refine between k and 2k once (keeps batches near the budget without many box evaluations).
        if i + k < n:
            extra = k // 2
            while extra >= 1:
                if i + k + extra <= n:
                    lo2, hi2, need2 = cost(i, i + k + extra, 0, h)
                    if need2 <= budget:
                        k, lo, hi = k + extra, lo2, hi2
                extra //= 2
        yield i, i + k, 0, h, lo, hi
        i += k


def _chunk_shape(data):
    """The (largest) chunk of a zarr or dask array along each axis; None for in-memory arrays."""
    chunks = getattr(data, "chunks", None)
    if not chunks:
        return None
    if isinstance(chunks[0], tuple):  # dask: per-axis tuples of chunk sizes
        return tuple(max(c) for c in chunks[-3:])
    return tuple(int(c) for c in chunks[-3:])


def _read_box(data, lo, hi, dtype) -> np.ndarray:
    """Source box ``[lo, hi)`` (may extend past the source: zeros there), read lazily from ``data``."""
    shape = np.asarray(data.shape[-3:])
    lo_c, hi_c = np.clip(lo, 0, shape), np.clip(hi, 0, shape)
    out = np.zeros(tuple(int(x) for x in hi - lo), dtype=dtype)
    if (hi_c > lo_c).all():
        region = tuple(slice(int(a), int(b)) for a, b in zip(lo_c, hi_c))
        block = data[region]
        block = np.asarray(block.compute() if hasattr(block, "compute") else block)
        out[tuple(slice(int(a - l), int(b - l)) for a, b, l in zip(lo_c, hi_c, lo))] = block
    return out


def _sample(geometry: SliceGeometry, box: np.ndarray, box_lo, i0, i1, r0, r1, mode: str, order: int) -> np.ndarray:
    """Sample slices ``[i0, i1)``, rows ``[r0, r1)`` from a source box."""
    from scipy.ndimage import map_coordinates

    g = geometry
    rows = np.arange(r0, r1, dtype=np.float64)
    cols = np.arange(g.width, dtype=np.float64)
    o = g.origins[1 + i0 : 1 + i1] - np.asarray(box_lo, float)
    coords = (o[:, None, None, :] + rows[None, :, None, None] * g.row_steps[1 + i0 : 1 + i1, None, None, :]
              + cols[None, None, :, None] * g.column_steps[1 + i0 : 1 + i1, None, None, :])
    out_shape = coords.shape[:3]
    coords = coords.reshape(-1, 3)
    if mode == "labels":
        padded = np.pad(box, ((0, 1), (0, 1), (0, 1)))
        np.clip(coords, 0, np.asarray(box.shape) - 1, out=coords)
        z0 = np.floor(coords[:, 0])
        plane = padded.shape[1] * padded.shape[2]
        values = _gather_labels(padded, z0.astype(np.intp) * plane, (coords[:, 0] - z0).astype(np.float32),
                                coords[:, 1].astype(np.float32), coords[:, 2].astype(np.float32))
        return values.reshape(out_shape)
    values = map_coordinates(box, coords.T, order=order, mode="nearest", output=np.float32,
                             prefilter=order > 1)
    return values.reshape(out_shape)


def straighten_volume(
    image: ImageData,
    points,
    out_dir,
    params: StraightenParams | None = None,
    *,
    progress: ProgressCallback | None = None,
    cancel=None,
    **overrides,
) -> StraightenResult:
    """Straighten ``image`` along the path through ``points``.

    Parameters
    ----------
    image : ImageData
        Source volume ``(z, y, x)``, lazy (numpy, dask or zarr); its ``scale`` (and ``metadata["translate"]``
        when present) relate voxels to physical coordinates.
    points : array-like (N, 3) or path
        Ordered path points ``(z, y, x)``: physical coordinates (the unit of ``image.scale``), or voxel
        indices with ``params.points_in_voxels``; or a ``.csv`` / ``.npy`` file of them.
    out_dir : path
        Output folder.
    params : StraightenParams, optional
        Keyword ``overrides`` replace single fields.

    Returns
    -------
    StraightenResult
        ``<name>.tif`` (or ``<name>-slices/``), ``<name>.ome.zarr`` (slices ``(n, height, width)``, scale
        ``(spacing, pixel, pixel)``), ``<name>-configuration.json`` and ``<name>-straighten_metrics.json``.
    """
    params = params or StraightenParams()
    if overrides:
        params = replace(params, **overrides)
    validate_params(params)
    return_large_buffers_to_os()
    started = time.perf_counter()
    if not isinstance(image, ImageData):
        image = ImageData(image, (1.0,) * np.ndim(image))
    if image.ndim != 3:
        raise ValueError(f"image '{image.name}': straightening needs a 3D (z, y, x) volume, got shape {image.shape}")
    if isinstance(points, (str, Path)):
        points = read_points(points)
    points = as_points(points, "points")
    out_dir = Path(out_dir)
    name = params.name.strip()
    if not name or any(c in name for c in "/\\"):
        raise ValueError(f"parameter 'name': {params.name!r} is not a valid file name")
    tiff_path = out_dir / (f"{name}.tif" if params.make_single_file else f"{name}-slices")
    zarr_path = out_dir / f"{name}.ome.zarr"
    config_path = out_dir / f"{name}{CONFIG_SUFFIX}"
    metrics_path = out_dir / f"{name}-straighten_metrics.json"
    outputs = (tiff_path, zarr_path, config_path)
    writes = [check_can_write(p, params.if_exists) for p in outputs]
    scale0 = np.asarray(image.scale[-3:], float)
    translate = np.asarray(image.metadata.get("translate", (0.0, 0.0, 0.0)), float)[-3:]
    if params.points_in_voxels:
        points = points * scale0 + translate
    if not any(writes):
        return StraightenResult(out_dir, tiff_path, zarr_path, config_path, metrics_path, (0, 0, 0),
                                params.value_mode, 0.0, skipped=True)

    data, level_scale, level_factors = _source_level(image, params.mip_level)
    level_scale = np.asarray(level_scale, float)
    spacing = params.slice_spacing or float(level_scale.min())
    pixel = params.pixel_size or float(level_scale.min())
    samples = sample_path(points, spacing, smoothing=params.smoothing)
    rects = slice_rects_from_frames(samples, params.width, params.height, pixel, level_scale, translate)
    geometry = SliceGeometry.from_rects(rects, params.height, params.width, where="path")
    n, h, w = geometry.n_slices, params.height, params.width
    labels = params.value_mode == "labels"
    if labels and not np.issubdtype(image.dtype, np.integer) and image.dtype != bool:
        raise ValueError(f"value_mode='labels' needs an integer label image; '{image.name}' is {image.dtype}")
    out_dtype = image.dtype if labels else np.dtype(np.float32)
    source_dtype = image.dtype if labels else np.dtype(np.float32)
    order = 0 if labels else params.interpolation_order
    margin = 1 + (6 if order > 1 else 0)
    budget = int(params.memory_budget_gb * GIB)
    # Per source voxel: the box, and map_coordinates' float64 spline copy for order > 1.
    bytes_per_source_voxel = source_dtype.itemsize + (8 if order > 1 else 0)
    # Per sample: coordinates (float64 x 3, plus float32 copies for labels), the value, TIFF/zarr buffers.
    bytes_per_sample = 24 + 3 * out_dtype.itemsize + (64 if labels else 16)
    chunk_z = int(max(1, min(n, (1 << 20) // (h * w), budget // 16 // (h * w * out_dtype.itemsize))))
    chunks = (chunk_z, min(h, 512), min(w, 512))
    flush_bytes = chunk_z * h * w * out_dtype.itemsize
    if flush_bytes * 2 > budget // 2:
        chunk_z = 1
        chunks = (1, min(h, 512), min(w, 512))
        flush_bytes = h * w * out_dtype.itemsize
    batches = list(_plan_batches(geometry, data.shape[-3:], margin, bytes_per_source_voxel, bytes_per_sample,
                                 max(budget - 2 * flush_bytes, budget // 4), _chunk_shape(data),
                                 np.dtype(data.dtype).itemsize))
    tracker = Progress(len(batches), progress, cancel)
    tracker.check()
    voxels_read = 0
    out_dir.mkdir(parents=True, exist_ok=True)

    import tifffile

    with atomic_output(zarr_path, "overwrite" if params.if_exists != "error" else "error") as zarr_tmp, \
            atomic_output(tiff_path, "overwrite" if params.if_exists != "error" else "error") as tiff_tmp:
        array = create_ome_zarr_image(
            zarr_tmp, (n, h, w), (spacing, pixel, pixel), chunks=chunks, dtype=out_dtype,
            compression="zstd", name=name,
            attributes={"soct_straighten": {"configuration": config_path.name, "value_mode": params.value_mode}},
        )
        pending: list[np.ndarray] = []
        written = [0]

        def flush(final=False):
            # zarr gets whole chunks along the slice axis (no partial chunk rewrites).
            stack = np.concatenate(pending) if len(pending) > 1 else pending[0]
            keep = len(stack) if final else (len(stack) // chunk_z) * chunk_z
            if keep:
                array[written[0] : written[0] + keep] = stack[:keep]
                written[0] += keep
            pending[:] = [stack[keep:]] if keep < len(stack) else []

        def slices():
            nonlocal voxels_read
            row_parts: list[np.ndarray] = []
            for i0, i1, r0, r1, lo, hi in batches:
                box = _read_box(data, lo, hi, source_dtype)
                voxels_read += box.size
                part = _sample(geometry, box, lo, i0, i1, r0, r1, params.value_mode, order)
                del box
                if (r0, r1) != (0, h):
                    row_parts.append(part)
                    if r1 < h:
                        tracker.advance(1, f"slice {i0 + 1}/{n}, rows {r0}-{r1}")
                        continue
                    part = np.concatenate(row_parts, axis=1)
                    row_parts = []
                pending.append(part.astype(out_dtype, copy=False))
                if sum(len(p) for p in pending) >= chunk_z or i1 == n:
                    flush(final=i1 == n)
                # Count before yielding: the TIFF writer stops pulling after the last slice.
                tracker.advance(1, f"slices {i0 + 1}-{i1} of {n}")
                yield from part

        compression = None if params.compression == "none" else params.compression
        description = {"axes": "ZYX", "straightened_from": str(image.source or image.name),
                       "configuration": config_path.name}
        if params.make_single_file:
            tifffile.imwrite(tiff_tmp, slices(), shape=(n, h, w), dtype=out_dtype, photometric="minisblack",
                             compression=compression, metadata=description, software="napari-soct", maxworkers=1,
                             bigtiff=n * h * w * out_dtype.itemsize > 2**31)
        else:
            Path(tiff_tmp).mkdir(parents=True)
            digits = len(str(max(n - 1, 0)))
            for i, s in enumerate(slices()):
                tifffile.imwrite(Path(tiff_tmp) / f"{str(i).zfill(digits)}.tif", s, photometric="minisblack",
                                 compression=compression, software="napari-soct")

        boxes, links = bounding_boxes_for(rects)
        seconds = time.perf_counter() - started
        config = {
            "json_path": None,
            "source_url": str(image.source or image.name),
            "slice_options": {
                "output_file_folder": str(out_dir),
                "output_file_name": name,
                "flush_cache": False,
                "make_single_file": params.make_single_file,
                "max_ram_gb": params.memory_budget_gb,
                "output_mip_level": params.mip_level,
                "slice_width": w,
                "slice_height": h,
                "neuroglancer_json": "",
                "neuroglancer_image_layer": "",
                "neuroglancer_annotation_layer": "",
                "dist_between_slices": spacing / float(level_scale.min()),
                "bounding_box_params": {"max_depth": 0, "target_slices_per_box": 128},
                "connect_start_and_end": False,
                "annotation_mip_level": 0,
            },
            "backproject_options": None,
            "sample_points": (samples.points - translate) / level_scale,
            "slice_rects": rects,
            "volume_cache": {
                "bounding_boxes": boxes,
                "link_rects": links,
                "cv": {"source_url": str(image.source or image.name)},
                "mip": params.mip_level,
                "flush_cache": False,
            },
            "output_file_path": tiff_path.name,
            "backprojected_folder_path": None,
            "config_file_path": str(config_path),
            "backprojection_offset": None,
            "napari_soct": {
                "version": 1,
                "axes_note": "slice_rects and sample_points are [x, y, z] voxels of the sliced level; "
                             "*_zyx entries are (z, y, x)",
                "source_shape_zyx": [int(s) for s in image.shape[-3:]],
                "sliced_shape_zyx": [int(s) for s in data.shape[-3:]],
                "source_scale_zyx": [float(s) for s in scale0],
                "source_translate_zyx": [float(s) for s in translate],
                "level_factors_zyx": [[float(x) for x in f] for f in level_factors],
                "slice_spacing": spacing,
                "pixel_size": pixel,
                "smoothing": params.smoothing,
                "path_length": samples.total_length,
                "value_mode": params.value_mode,
                "dtype": str(out_dtype),
                "straightened_zarr": zarr_path.name,
                "path_points_zyx": points,
            },
        }
        write_configuration(config_path, config, "overwrite" if params.if_exists != "error" else "error")
    result = StraightenResult(out_dir, tiff_path, zarr_path, config_path, metrics_path, (n, h, w),
                              params.value_mode, samples.total_length, seconds=seconds,
                              source_voxels_read=voxels_read)
    metrics = {"step": "straighten", "source": str(image.source or image.name), "params": asdict(params),
               "shape": [n, h, w], "path_length": samples.total_length, "slice_spacing": spacing,
               "pixel_size": pixel, "batches": len(batches), "source_voxels_read": voxels_read,
               "seconds": seconds}
    with atomic_output(metrics_path, "overwrite") as tmp:
        Path(tmp).write_text(json.dumps(metrics, indent=2, default=str))
    return result
