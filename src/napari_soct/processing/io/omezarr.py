"""OME-Zarr images: write NGFF 0.5 (zarr v3), read NGFF 0.4 and 0.5 multiscale images lazily."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import dask.array as da
import numpy as np
import zarr

from .atomic import output_name

__all__ = [
    "OmeZarrImage",
    "COMPRESSION_CHOICES",
    "create_ome_zarr_image",
    "open_ome_zarr",
    "is_ome_zarr",
    "compressors_for",
    "create_ome_zarr_pyramid",
    "PyramidWriter",
    "open_pyramid_writer",
    "pyramid_level_count",
]

COMPRESSION_CHOICES = ("blosc-lz4", "zstd", "none")
_UNIT_TO_MM = {"millimeter": 1.0, "micrometer": 1e-3, "nanometer": 1e-6, "meter": 1e3, "centimeter": 10.0}


def compressors_for(compression: str):
    """zarr v3 compressor list for a compression name."""
    if compression == "none":
        return None
    if compression == "zstd":
        return [zarr.codecs.ZstdCodec(level=1)]
    if compression == "blosc-lz4":
        return [zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")]
    raise ValueError(f"compression must be one of {COMPRESSION_CHOICES}, got {compression!r}")


def _multiscales(name: str, scales_mm: list[tuple[float, ...]], axes: tuple[str, ...]) -> dict:
    return {
        "name": name,
        "axes": [{"name": a, "type": "space", "unit": "millimeter"} for a in axes],
        "datasets": [
            {"path": str(i), "coordinateTransformations": [{"type": "scale", "scale": [float(s) for s in sc]}]}
            for i, sc in enumerate(scales_mm)
        ],
    }


def create_ome_zarr_image(
    path: str | os.PathLike,
    shape: tuple[int, ...],
    scale_mm: tuple[float, ...],
    *,
    chunks: tuple[int, ...],
    shards: tuple[int, ...] | None = None,
    dtype=np.float32,
    compression: str = "blosc-lz4",
    name: str | None = None,
    attributes: dict | None = None,
    axes: tuple[str, ...] = ("z", "y", "x"),
) -> zarr.Array:
    """Create a one-level NGFF 0.5 image (zarr v3) with array ``0`` and return that array for writing.

    Parameters
    ----------
    shape, chunks, shards : tuple of int
        Array geometry; ``shards`` (a multiple of ``chunks``) enables the zarr v3 sharding codec.
    scale_mm : tuple of float
        Voxel size per axis in millimetres.
    attributes : dict, optional
        Extra group attributes (kept beside the ``ome`` key).
    """
    path = Path(path)
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    attrs = {"ome": {"version": "0.5", "multiscales": [_multiscales(name or output_name(path), [scale_mm], axes)]}}
    if attributes:
        attrs.update(attributes)
    group.attrs.update(attrs)
    return group.create_array(
        "0",
        shape=shape,
        chunks=chunks,
        shards=shards,
        dtype=dtype,
        compressors=compressors_for(compression),
        fill_value=0,
        dimension_names=list(axes),
    )


@dataclass
class OmeZarrImage:
    """A multiscale OME-Zarr image opened lazily.

    Attributes
    ----------
    path : Path
    levels : list of zarr.Array
        Resolution levels, finest first.
    scales_mm : list of tuple
        Voxel size of each level per axis, in millimetres (legacy micrometre files converted).
    axes : tuple of str
    version : str
        NGFF version (``"0.4"`` or ``"0.5"``).
    attributes : dict
        Group attributes other than the NGFF metadata.
    """

    path: Path
    levels: list
    scales_mm: list[tuple[float, ...]]
    axes: tuple[str, ...]
    version: str
    name: str = ""
    attributes: dict = field(default_factory=dict)
    translation_mm: tuple[float, ...] | None = None  # physical position of voxel 0 of level 0 (None: origin)
    is_labels: bool = False  # NGFF "image-label" metadata: integer label ids

    def as_dask(self, level: int = 0) -> da.Array:
        """Level ``level`` as a dask array chunked like the zarr array."""
        arr = self.levels[level]
        return da.from_zarr(arr, chunks=arr.chunks)

    def pyramid(self) -> list[da.Array]:
        """All levels as dask arrays (what napari wants for a multiscale layer)."""
        return [self.as_dask(i) for i in range(len(self.levels))]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.levels[0].shape)


def _read_group_attrs(path: Path) -> tuple[dict, int] | None:
    v3 = path / "zarr.json"
    if v3.is_file():
        meta = json.loads(v3.read_text())
        if meta.get("node_type") != "group":
            return None
        return meta.get("attributes", {}), 3
    v2 = path / ".zattrs"
    if v2.is_file():
        return json.loads(v2.read_text()), 2
    return None


def is_ome_zarr(path: str | os.PathLike) -> bool:
    """Cheap check (one small JSON read) that ``path`` is an OME-Zarr multiscale image group."""
    path = Path(path)
    try:
        found = _read_group_attrs(path) if path.is_dir() else None
    except (OSError, ValueError):
        return False
    if not found:
        return False
    attrs, _ = found
    return "multiscales" in attrs.get("ome", attrs)


def open_ome_zarr(path: str | os.PathLike) -> OmeZarrImage:
    """Open an OME-Zarr multiscale image (NGFF 0.4 on zarr v2 or 0.5 on zarr v3) without reading data.

    Scales are returned in millimetres. Files without axis units follow the lab rule: a first scale below 1
    means millimetres, otherwise micrometres.

    Raises
    ------
    ValueError
        If ``path`` is not an OME-Zarr multiscale image, naming what is missing.
    """
    path = Path(path)
    found = _read_group_attrs(path) if path.is_dir() else None
    if not found:
        raise ValueError(f"{path}: not a zarr group (no zarr.json or .zattrs)")
    attrs, zarr_format = found
    ome = attrs.get("ome", attrs)
    if "multiscales" not in ome:
        raise ValueError(f"{path}: zarr group without OME-NGFF 'multiscales' metadata")
    ms = ome["multiscales"][0]
    version = str(ome.get("version", ms.get("version", "0.4")))
    group = zarr.open_group(str(path), mode="r", zarr_format=zarr_format)
    # NGFF 0.3 and older have no axes: assume the trailing letters of tczyx.
    axes_meta = ms.get("axes") or [{"name": n} for n in "tczyx"[-group[ms["datasets"][0]["path"]].ndim :]]
    axes = tuple(a["name"] if isinstance(a, dict) else str(a) for a in axes_meta)
    units = [a.get("unit") if isinstance(a, dict) else None for a in axes_meta]
    levels, scales = [], []
    translation = None
    for ds in ms["datasets"]:
        arr = group[ds["path"]]
        scale = [1.0] * arr.ndim
        shift = None
        for t in ds.get("coordinateTransformations", []):
            if t.get("type") == "scale":
                scale = [float(s) for s in t["scale"]]
            elif t.get("type") == "translation":
                shift = [float(v) for v in t["translation"]]
        factors = [1.0] * arr.ndim
        for i, unit in enumerate(units):
            if unit in _UNIT_TO_MM:
                factors[i] = _UNIT_TO_MM[unit]
            elif unit is None and axes[i] in "zyx":
                # Legacy unit-less files: lab convention, scale < 1 means mm, else um.
                factors[i] = 1.0 if scale[-1] < 1 else 1e-3
        if not levels and shift is not None:
            translation = tuple(v * f for v, f in zip(shift, factors))
        levels.append(arr)
        scales.append(tuple(v * f for v, f in zip(scale, factors)))
    extra = {k: v for k, v in attrs.items() if k not in ("ome", "multiscales", "omero")}
    return OmeZarrImage(
        path=path,
        levels=levels,
        scales_mm=scales,
        axes=axes,
        version=version,
        name=output_name(ms.get("name") or path.name),  # files of older versions recorded their temporary
        attributes=extra,
        translation_mm=translation,
        is_labels="image-label" in ome,
    )


def pyramid_level_count(shape_yx: tuple[int, int], smallest: int = 256, max_levels: int = 6) -> int:
    """Levels so the coarsest one is about ``smallest`` pixels on its shorter side (at least one level)."""
    short = min(shape_yx)
    levels = 1
    while levels < max_levels and short / 2**levels >= smallest:
        levels += 1
    return levels


def _halve_yx(block: np.ndarray) -> np.ndarray:
    """2x2 mean in the last two axes; an odd trailing row/column is averaged with itself (edge replicate)."""
    if block.shape[-2] % 2:
        block = np.concatenate([block, block[..., -1:, :]], axis=-2)
    if block.shape[-1] % 2:
        block = np.concatenate([block, block[..., -1:]], axis=-1)
    out = block[..., 0::2, 0::2].astype(np.float32)
    out += block[..., 1::2, 0::2]
    out += block[..., 0::2, 1::2]
    out += block[..., 1::2, 1::2]
    out *= 0.25
    return out.astype(block.dtype, copy=False)


class PyramidWriter:
    """Writes blocks of level 0 of a multiscale OME-Zarr image and all coarser levels in the same pass.

    Coarser levels halve y and x (2x2 mean; depth kept), so a block is read once whatever the number of
    levels. Blocks must start at multiples of ``2**(n_levels - 1)`` in y and x (or end at the array edge).
    """

    def __init__(self, levels: list[zarr.Array]):
        self.levels = levels
        self.align = 2 ** (len(levels) - 1)

    @property
    def n_levels(self) -> int:
        return len(self.levels)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.levels[0].shape)

    def chunk_cuts(self, axis: int) -> list[int]:
        """Positions along level 0's ``axis`` (y or x, counted from the end) where a cut splits no chunk of any
        level: regions between such cuts can be written by different processes at the same time."""
        period = 1
        for k, level in enumerate(self.levels):
            if level.chunks[axis] >= level.shape[axis]:
                return []  # one chunk spans this level: any cut would split it
            period = math.lcm(period, level.chunks[axis] * 2**k)
        return list(range(period, self.shape[axis], period))

    def parts(self, per_axis: int = 2) -> list[tuple[slice, slice]]:
        """At most ``per_axis`` x ``per_axis`` ``(y, x)`` regions of level 0 that own whole chunks at every
        level, about equal in size, covering the image (one region when no cut is possible)."""
        edges = []
        for axis in (-2, -1):
            cuts, n = self.chunk_cuts(axis), self.shape[axis]
            chosen = sorted({min(cuts, key=lambda c: abs(c - n * i / per_axis)) for i in range(1, per_axis)}
                            if cuts else set())
            edges.append([0, *chosen, n])
        return [(slice(y0, y1), slice(x0, x1)) for y0, y1 in zip(edges[0], edges[0][1:])
                for x0, x1 in zip(edges[1], edges[1][1:])]

    def write(self, region: tuple[slice, ...], block: np.ndarray) -> None:
        """Write ``block`` at ``region`` of level 0 and its downsampled versions into the other levels."""
        full = self.levels[0].shape
        starts = [r.start or 0 for r in region]
        for axis in (-2, -1):
            start, stop = starts[axis], starts[axis] + block.shape[axis]
            if start % self.align or (stop % self.align and stop != full[axis]):
                raise ValueError(
                    f"block at {region} is not aligned to {self.align} pixels in y/x (needed for "
                    f"{self.n_levels} pyramid levels)"
                )
        self.levels[0][region] = block
        for level in self.levels[1:]:
            block = _halve_yx(block)
            starts = [*starts[:-2], starts[-2] // 2, starts[-1] // 2]
            stop = [min(s + b, n) for s, b, n in zip(starts, block.shape, level.shape)]
            level[tuple(slice(a, b) for a, b in zip(starts, stop))] = block[
                tuple(slice(0, b - a) for a, b in zip(starts, stop))
            ]


def open_pyramid_writer(path: str | os.PathLike) -> PyramidWriter:
    """A :class:`PyramidWriter` on the levels of an existing multiscale image (made by
    :func:`create_ome_zarr_pyramid`), e.g. in another process that writes a part of it."""
    group = zarr.open_group(str(path), mode="r+", zarr_format=3)
    datasets = group.attrs["ome"]["multiscales"][0]["datasets"]
    return PyramidWriter([group[d["path"]] for d in datasets])


def create_ome_zarr_pyramid(
    path: str | os.PathLike,
    shape: tuple[int, ...],
    scale_mm: tuple[float, ...],
    *,
    chunks: tuple[int, ...],
    n_levels: int | None = None,
    dtype=np.float32,
    compression: str = "blosc-lz4",
    name: str | None = None,
    attributes: dict | None = None,
    axes: tuple[str, ...] = ("z", "y", "x"),
) -> PyramidWriter:
    """Create a multiscale NGFF 0.5 image (levels ``0..n_levels-1``, y and x halved per level) for writing
    with :class:`PyramidWriter`. ``n_levels`` defaults to :func:`pyramid_level_count`."""
    path = Path(path)
    n_levels = n_levels or pyramid_level_count(shape[-2:])
    shapes, scales = [], []
    for k in range(n_levels):
        f = 2**k
        shapes.append((*shape[:-2], -(-shape[-2] // f), -(-shape[-1] // f)))
        scales.append((*scale_mm[:-2], scale_mm[-2] * f, scale_mm[-1] * f))
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    attrs = {"ome": {"version": "0.5", "multiscales": [_multiscales(name or output_name(path), scales, axes)]}}
    attrs.update(attributes or {})
    group.attrs.update(attrs)
    levels = [
        group.create_array(
            str(k), shape=s, chunks=tuple(min(c, n) for c, n in zip(chunks, s)), dtype=dtype,
            compressors=compressors_for(compression), fill_value=0, dimension_names=list(axes),
        )
        for k, s in enumerate(shapes)
    ]
    return PyramidWriter(levels)
