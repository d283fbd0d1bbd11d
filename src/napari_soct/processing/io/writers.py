"""Save arrays as OME-Zarr (NGFF 0.5, zarr v3) or TIFF, block by block, with their physical metadata.

The functions take an array (numpy, dask or zarr; possibly larger than memory) or a list of resolution
levels, plus the physical scale, translation, axis names and units, and write them without ever holding the
whole array: blocks are read (a dask block is computed) one at a time under ``memory_budget_gb``.

- :func:`save_ome_zarr`: NGFF 0.5 multiscale image. A single array gets a pyramid built in the same pass as
  level 0 (y and x halved per level; images by 2x2 mean, labels by taking every other pixel so ids are never
  mixed); a list of levels is written as given. Scale, translation, axis names/types and units go into the
  ``multiscales`` metadata; labels also get the NGFF ``image-label`` key.
- :func:`save_tiff`: tiled TIFF via tifffile (compression ``none``, ``zlib`` or ``zstd`` through imagecodecs),
  BigTIFF when the file could pass 4 GiB (:func:`tiff_needs_bigtiff`), OME-XML metadata (physical pixel
  sizes, plane positions for the translation, and a map annotation with the exact scale/translate/units/axis
  labels) when the data type and axes fit OME, otherwise tifffile's JSON ("shaped") description with the
  same keys. A list of levels is written as a SubIFD pyramid.

Both write atomically (a dot-prefixed temporary beside the target, renamed at the end) and refuse an existing
output unless ``if_exists`` says otherwise. No napari imports here: the napari glue is ``napari_soct._writer``.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr

from ..progress import Progress, ProgressCallback
from .atomic import IF_EXISTS_CHOICES, atomic_output, check_can_write, output_name
from .omezarr import COMPRESSION_CHOICES, compressors_for, pyramid_level_count

__all__ = [
    "OME_ZARR_COMPRESSIONS",
    "TIFF_COMPRESSIONS",
    "AxisInfo",
    "describe_axes",
    "normalise_unit",
    "save_ome_zarr",
    "save_tiff",
    "tiff_needs_bigtiff",
    "BIGTIFF_THRESHOLD_BYTES",
]

OME_ZARR_COMPRESSIONS = COMPRESSION_CHOICES
TIFF_COMPRESSIONS = ("none", "zlib", "zstd")
# Classic TIFF stores 32-bit offsets; keep 32 MiB of head room for tags and metadata (tifffile's own margin).
BIGTIFF_THRESHOLD_BYTES = 2**32 - 2**25
GIB = 1024**3

# Unit spellings (napari/pint names, symbols, common aliases) -> NGFF (UDUNITS-2) names. None: no unit.
_UNIT_ALIASES = {
    "pixel": None, "pixels": None, "px": None, "": None, "dimensionless": None, "none": None,
    "angstrom": "angstrom", "å": "angstrom",
    "picometer": "picometer", "pm": "picometer",
    "nanometer": "nanometer", "nm": "nanometer",
    "micrometer": "micrometer", "micron": "micrometer", "um": "micrometer", "µm": "micrometer",
    "μm": "micrometer",
    "millimeter": "millimeter", "mm": "millimeter",
    "centimeter": "centimeter", "cm": "centimeter",
    "meter": "meter", "m": "meter",
    "nanosecond": "nanosecond", "ns": "nanosecond",
    "microsecond": "microsecond", "us": "microsecond", "µs": "microsecond", "μs": "microsecond",
    "millisecond": "millisecond", "ms": "millisecond",
    "second": "second", "s": "second",
    "minute": "minute", "min": "minute",
    "hour": "hour", "h": "hour",
    "day": "day", "d": "day",
}
_TIME_UNITS = {"nanosecond", "microsecond", "millisecond", "second", "minute", "hour", "day"}
# NGFF names -> OME-XML unit symbols (UnitsLength / UnitsTime).
_OME_UNIT = {
    "angstrom": "Å", "picometer": "pm", "nanometer": "nm", "micrometer": "µm", "millimeter": "mm",
    "centimeter": "cm", "meter": "m", "nanosecond": "ns", "microsecond": "µs", "millisecond": "ms",
    "second": "s", "minute": "min", "hour": "h", "day": "d",
}
_CM_PER_UNIT = {"nanometer": 1e-7, "micrometer": 1e-4, "millimeter": 0.1, "centimeter": 1.0, "meter": 100.0}
_OME_DTYPES = {"int8", "int16", "int32", "uint8", "uint16", "uint32", "float32", "float64", "complex64",
               "complex128"}
_DEFAULT_LABEL = re.compile(r"^(axis\s*)?-?\d+$")


def normalise_unit(unit) -> str | None:
    """NGFF unit name for a napari/pint unit or a unit string; None for pixels or no unit.

    Unknown strings are kept as given (NGFF only recommends the UDUNITS-2 names).
    """
    if unit is None:
        return None
    text = str(unit).strip()
    key = text.lower() if text not in ("µm", "μm", "µs", "μs", "Å") else text
    if key in _UNIT_ALIASES:
        return _UNIT_ALIASES[key]
    return text


@dataclass(frozen=True)
class AxisInfo:
    """One axis of an image as written: name, NGFF type, unit, scale and translation of level 0.

    Attributes
    ----------
    name : str
        Axis name written to the file (``"z"``, ``"y"``, ``"x"``, ``"t"``, ``"c"`` or the layer's label).
    type : str or None
        NGFF axis type: ``"space"``, ``"time"``, ``"channel"`` or None (a custom axis).
    unit : str or None
        NGFF unit name (``"millimeter"``...), None when the axis is in pixels.
    scale, translate : float
        Size of one pixel and position of pixel 0's centre, in ``unit``.
    label : str
        The label the caller gave (kept for TIFF metadata), or the name when it gave none.
    """

    name: str
    type: str | None
    unit: str | None
    scale: float
    translate: float
    label: str


def _per_axis(values, n: int, default: float, what: str) -> list[float]:
    if values is None:
        return [default] * n
    values = [float(v) for v in values]
    if len(values) != n:
        raise ValueError(f"{what} has {len(values)} values, the data has {n} non-channel axes")
    if what == "scale" and not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"scale must be finite and positive, got {values}")
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"{what} must be finite, got {values}")
    return values


def describe_axes(
    ndim: int,
    *,
    scale: Sequence[float] | None = None,
    translate: Sequence[float] | None = None,
    axes: Sequence[str] | None = None,
    units: Sequence | None = None,
    rgb: bool = False,
) -> list[AxisInfo]:
    """Axis names, types, units, scale and translation for an array of ``ndim`` dimensions.

    Parameters
    ----------
    ndim : int
        Dimensions of the data (for ``rgb``, including the trailing colour axis).
    scale, translate, axes, units : sequence, optional
        Per non-colour axis, as a napari layer has them. Missing axis names, and napari's default labels
        (``"-1"``, ``"axis -2"``...), become the NGFF letters ``t, c, z, y, x`` aligned to the last axes.
    rgb : bool
        The last axis holds colour samples (napari RGB(A) images); it is described as a channel axis
        named ``"c"`` placed last here (writers move it where their format wants it).

    Returns
    -------
    list of AxisInfo
        One per data axis, in the data's order.
    """
    n = ndim - 1 if rgb else ndim
    if n < 1:
        raise ValueError(f"data must have at least one {'non-colour ' if rgb else ''}axis")
    scales = _per_axis(scale, n, 1.0, "scale")
    translates = _per_axis(translate, n, 0.0, "translate")
    if units is None or isinstance(units, str):
        units = [units] * n
    units = list(units)
    if len(units) != n:
        raise ValueError(f"units has {len(units)} values, the data has {n} non-channel axes")
    given = [None if a is None or _DEFAULT_LABEL.match(str(a).strip()) else str(a) for a in (axes or [None] * n)]
    if len(given) != n:
        raise ValueError(f"axes has {len(given)} names, the data has {n} non-channel axes")
    defaults = ("tzyx" if rgb else "tczyx")[-n:] if n <= (4 if rgb else 5) else None
    names = []
    for i, label in enumerate(given):
        name = label.lower() if label else (defaults[i] if defaults else f"dim_{i}")
        names.append(name)
    if len(set(names)) != len(names) or (rgb and "c" in names):
        # A given label clashes with a default letter: fall back to neutral names for the defaults.
        names = [label.lower() if label else f"dim_{i}" for i, label in enumerate(given)]
        if len(set(names)) != len(names) or (rgb and "c" in names):
            raise ValueError(f"axis names must be unique, got {list(axes or [])}")
    types: list[str | None] = []
    for name in names:
        if name in ("t", "time"):
            types.append("time")
        elif name in ("c", "ch", "channel", "channels"):
            types.append("channel")
        else:
            types.append("")  # decided below
    other = [i for i, t in enumerate(types) if t == ""]
    space = set(other[-3:])
    types = [("space" if i in space else None) if t == "" else t for i, t in enumerate(types)]
    infos = []
    for i in range(n):
        unit = normalise_unit(units[i])
        infos.append(AxisInfo(names[i], types[i], unit, scales[i], translates[i],
                              str(axes[i]) if axes and given[i] else names[i]))
    if rgb:
        infos.append(AxisInfo("c", "channel", None, 1.0, 0.0, "c"))
    return infos


def _ngff_order(infos: list[AxisInfo]) -> list[int]:
    """Data axis order NGFF 0.5 requires (time, then channel or custom, then space); raises when impossible."""
    ndim = len(infos)
    spaces = [i for i, a in enumerate(infos) if a.type == "space"]
    times = [i for i, a in enumerate(infos) if a.type == "time"]
    others = [i for i, a in enumerate(infos) if a.type not in ("space", "time")]
    problem = None
    if not 2 <= ndim <= 5:
        problem = f"{ndim} axes (NGFF 0.5 allows 2 to 5)"
    elif not 2 <= len(spaces) <= 3:
        problem = f"{len(spaces)} spatial axes (NGFF 0.5 needs 2 or 3)"
    elif len(times) > 1 or len(others) > 1:
        problem = "more than one time axis or more than one channel/other axis"
    if problem:
        names = [a.name for a in infos]
        raise ValueError(f"cannot write axes {names} as OME-Zarr: {problem}; save as TIFF instead")
    return times + others + spaces


def _read_block(src, region: tuple[slice, ...]) -> np.ndarray:
    """One block of ``src`` as numpy (a dask block is computed; zarr reads only that region)."""
    part = src[region]
    if hasattr(part, "compute"):
        part = part.compute()
    return np.asarray(part)


def _regular_chunks(src) -> tuple[int, ...] | None:
    """The input's chunk shape (zarr; the largest chunk per axis for dask), None for in-memory arrays."""
    chunks = getattr(src, "chunks", None)
    if not isinstance(chunks, tuple) or not chunks:
        return None
    if all(isinstance(c, int | np.integer) for c in chunks):
        return tuple(int(c) for c in chunks)
    if all(isinstance(c, tuple) and c for c in chunks):
        try:
            return tuple(int(max(c)) for c in chunks)
        except (TypeError, ValueError):  # unknown (nan) chunk sizes
            return None
    return None


def _block_shape(shape, unit, in_chunks, itemsize: int, budget_bytes: int, copies: int) -> tuple[int, ...]:
    """Block shape for reading: multiples of ``unit`` per axis (whole output chunks), at least the input's
    chunk where that fits, grown from the last axis outwards while ``copies`` blocks fit ``budget_bytes``."""
    unit = [min(u, n) for u, n in zip(unit, shape)]
    if in_chunks:
        bumped = [min(n, u * -(-c // u)) if c > u else u for u, c, n in zip(unit, in_chunks, shape)]
        if math.prod(bumped) * itemsize * copies <= budget_bytes:
            unit = bumped  # whole input chunks: a dask/zarr chunk is read once
    block = list(unit)
    for axis in reversed(range(len(shape))):
        others = math.prod(block) // block[axis]
        fit = budget_bytes // max(1, copies * itemsize * others)
        block[axis] = min(shape[axis], max(1, fit // unit[axis]) * unit[axis])
    return tuple(block)


def _blocks(shape, block) -> list[tuple[slice, ...]]:
    return [
        tuple(slice(s, min(s + b, n)) for s, b, n in zip(starts, block, shape))
        for starts in itertools.product(*[range(0, n, b) for n, b in zip(shape, block)])
    ]


def _halve_mean_yx(block: np.ndarray) -> np.ndarray:
    """2x2 mean in the last two axes (odd edge replicated), computed in float, rounded back for integers."""
    if block.shape[-2] % 2:
        block = np.concatenate([block, block[..., -1:, :]], axis=-2)
    if block.shape[-1] % 2:
        block = np.concatenate([block, block[..., -1:]], axis=-1)
    integer = np.issubdtype(block.dtype, np.integer)
    work = np.float64 if (integer and block.dtype.itemsize >= 4) or block.dtype == np.float64 else np.float32
    if np.issubdtype(block.dtype, np.complexfloating):
        work = block.dtype
    out = block[..., 0::2, 0::2].astype(work)
    out += block[..., 1::2, 0::2]
    out += block[..., 0::2, 1::2]
    out += block[..., 1::2, 1::2]
    out *= 0.25
    if integer:
        np.rint(out, out=out)
    return out.astype(block.dtype, copy=False)


def _subsample_yx(block: np.ndarray) -> np.ndarray:
    """Every other pixel in the last two axes: labels keep their exact ids (never averaged)."""
    return block[..., ::2, ::2]


def _default_chunks(shape: tuple[int, ...], infos: list[AxisInfo], itemsize: int, max_bytes: int) -> tuple[int, ...]:
    """Chunks of at most ``max_bytes`` (about 4 MiB by default): y/x up to 256 (512 for 2D), then spatial z,
    other axes 1; y/x halved when even one plane of chunk would not fit."""
    yx = 512 if sum(a.type == "space" for a in infos) == 2 else 256
    chunks = [1] * len(shape)
    chunks[-1], chunks[-2] = min(shape[-1], yx), min(shape[-2], yx)
    while chunks[-1] * chunks[-2] * itemsize > max_bytes and max(chunks[-2:]) > 16:
        chunks[-1], chunks[-2] = max(1, chunks[-1] // 2), max(1, chunks[-2] // 2)
    for i in reversed(range(len(shape) - 2)):
        if infos[i].type == "space":
            chunks[i] = min(shape[i], max(1, max_bytes // (chunks[-1] * chunks[-2] * itemsize)))
    return tuple(chunks)


def _level_chunks(chunks0: tuple[int, ...], shape: tuple[int, ...], level: int) -> tuple[int, ...]:
    """Chunks of a pyramid level: y/x halved per level down to 64, so a level-0 block maps onto whole chunks
    of the first coarse levels (no read-modify-write of partly written chunks there)."""
    yx = [max(c >> level, min(c, 64)) for c in chunks0[-2:]]
    return tuple(min(c, n) for c, n in zip((*chunks0[:-2], *yx), shape))


def _as_levels(data) -> list:
    levels = list(data) if isinstance(data, list | tuple) else [data]
    if not levels:
        raise ValueError("no data to save (empty list of levels)")
    first = levels[0]
    for k, level in enumerate(levels):
        if not hasattr(level, "shape") or not hasattr(level, "dtype"):
            level = levels[k] = np.asarray(level)
        if level.ndim != first.ndim or np.dtype(level.dtype) != np.dtype(first.dtype):
            raise ValueError(f"level {k} has shape {level.shape} / dtype {level.dtype}; all levels must have "
                             f"{first.ndim} dimensions and dtype {first.dtype}")
        if 0 in level.shape or (k and any(s > p for s, p in zip(level.shape, levels[k - 1].shape))):
            raise ValueError(f"level {k} shape {level.shape} is not a non-empty reduction of level {k - 1}")
    return levels


def _moveaxis(level, source: int, destination: int):
    """Move an axis without reading data (numpy view or dask graph; zarr arrays go through dask)."""
    if source == destination:
        return level
    if isinstance(level, np.ndarray):
        return np.moveaxis(level, source, destination)
    import dask.array as da

    if not isinstance(level, da.Array):
        chunks = _regular_chunks(level)
        level = da.from_array(level, chunks=chunks or "auto")
    return da.moveaxis(level, source, destination)


def _budget_bytes(memory_budget_gb: float) -> int:
    if not memory_budget_gb > 0:
        raise ValueError(f"memory_budget_gb must be positive, got {memory_budget_gb}")
    return int(memory_budget_gb * GIB)


def _check_if_exists(if_exists: str) -> None:
    if if_exists not in IF_EXISTS_CHOICES:
        raise ValueError(f"if_exists must be one of {IF_EXISTS_CHOICES}, got {if_exists!r}")


def _json_safe(obj, what: str):
    try:
        return json.loads(json.dumps(obj))
    except (TypeError, ValueError) as err:
        raise ValueError(f"{what} must be JSON-serialisable ({err})") from None


def save_ome_zarr(
    path: str | os.PathLike,
    data,
    *,
    kind: str = "image",
    scale: Sequence[float] | None = None,
    translate: Sequence[float] | None = None,
    axes: Sequence[str] | None = None,
    units: Sequence | str | None = None,
    rgb: bool = False,
    n_levels: int | None = None,
    chunks: Sequence[int] | None = None,
    compression: str = "blosc-lz4",
    name: str | None = None,
    attributes: dict | None = None,
    if_exists: str = "error",
    memory_budget_gb: float = 1.0,
    progress: ProgressCallback | None = None,
    cancel=None,
) -> Path:
    """Write an image or labels array as an OME-Zarr (NGFF 0.5, zarr v3) multiscale image.

    Parameters
    ----------
    path : str or PathLike
        Output folder (``*.ome.zarr``).
    data : array-like or list of array-like
        numpy, dask or zarr array (read block by block, never whole), or a list of resolution levels
        (finest first, as a multiscale napari layer has them), written as given.
    kind : {"image", "labels"}
        Labels keep their integer dtype, get pyramid levels by subsampling (every other pixel, so ids are
        never averaged) and the NGFF ``image-label`` metadata; images get 2x2 mean levels.
    scale, translate : sequence of float, optional
        Pixel size and position of pixel 0 per non-colour axis (default 1 and 0).
    axes : sequence of str, optional
        Axis names per non-colour axis (default ``t, c, z, y, x`` aligned to the last axes).
    units : sequence or str, optional
        Unit per axis (pint units or strings such as ``"mm"``; ``"pixel"``/None: no unit written).
    rgb : bool
        The last axis holds colour samples; it is written as a channel axis before the spatial axes.
    n_levels : int, optional
        Resolution levels to build from a single array (y and x halved per level); default
        :func:`~napari_soct.processing.io.omezarr.pyramid_level_count` (coarsest level about 256 pixels).
        1 writes one level. Ignored when ``data`` is a list of levels.
    chunks : sequence of int, optional
        Chunk shape of level 0 in the file's axis order (default: up to 256 x 256 in y/x, then planes up to
        4 MiB and an eighth of the memory budget). Blocks are whole chunks, so at least one chunk (several
        copies of it while building levels) is held whatever the budget.
    compression : {"blosc-lz4", "zstd", "none"}
    name : str, optional
        Image name in the metadata (default: the folder name).
    attributes : dict, optional
        Extra JSON group attributes (e.g. ``{"soct": {...}}``), kept beside ``ome``.
    if_exists : {"error", "skip", "overwrite"}
        An existing ``path`` is refused (default), kept, or replaced once the new one is complete.
    memory_budget_gb : float
        Peak memory for the blocks being written, in GiB.
    progress, cancel
        Progress callback ``(done, total, message)`` and cancellation flag (``is_set()``).

    Returns
    -------
    Path
        The written (or, with ``if_exists="skip"``, the existing) folder.

    Raises
    ------
    OutputExistsError
        If ``path`` exists and ``if_exists="error"``.
    ValueError
        For bad options, non-integer labels, or axes NGFF 0.5 cannot describe.
    """
    path = Path(path)
    if kind not in ("image", "labels"):
        raise ValueError(f"kind must be 'image' or 'labels', got {kind!r}")
    if compression not in OME_ZARR_COMPRESSIONS:
        raise ValueError(f"compression must be one of {OME_ZARR_COMPRESSIONS}, got {compression!r}")
    _check_if_exists(if_exists)
    budget = _budget_bytes(memory_budget_gb)
    levels = _as_levels(data)
    dtype = np.dtype(levels[0].dtype)
    if kind == "labels" and not (np.issubdtype(dtype, np.integer) or dtype == np.bool_):
        raise ValueError(f"labels must have an integer dtype, got {dtype}")
    if kind == "labels" and rgb:
        raise ValueError("labels cannot be RGB")
    infos = describe_axes(levels[0].ndim, scale=scale, translate=translate, axes=axes, units=units, rgb=rgb)
    order = _ngff_order(infos)
    if order != list(range(len(infos))):
        # napari keeps RGB samples last; NGFF wants the channel axis just before the spatial axes.
        first_space = next(i for i, a in enumerate(infos) if a.type == "space")
        moved = list(range(len(infos) - 1))
        moved.insert(first_space, len(infos) - 1)
        if rgb and order == moved:
            levels = [_moveaxis(lv, -1, first_space) for lv in levels]
            infos = [infos[i] for i in order]
        else:
            names = [a.name for a in infos]
            raise ValueError(f"axes {names} are not in NGFF order (time, channel, z, y, x); transpose the data "
                             "before saving as OME-Zarr, or save as TIFF")
    extra = _json_safe(attributes or {}, "attributes")
    if "ome" in extra:
        raise ValueError("attributes must not contain the key 'ome' (written by save_ome_zarr)")
    if not check_can_write(path, if_exists):
        return path

    shape0 = tuple(int(s) for s in levels[0].shape)
    build = len(levels) == 1
    if build:
        n_levels = pyramid_level_count(shape0[-2:]) if n_levels is None else int(n_levels)
        if not 1 <= n_levels <= 16:
            raise ValueError(f"n_levels must be between 1 and 16, got {n_levels}")
        shapes = [(*shape0[:-2], -(-shape0[-2] // 2**k), -(-shape0[-1] // 2**k)) for k in range(n_levels)]
    else:
        shapes = [tuple(int(s) for s in lv.shape) for lv in levels]
    if chunks is None:
        # A block being written holds a few chunks: keep one chunk well inside the memory budget.
        chunks0 = _default_chunks(shape0, infos, dtype.itemsize, max(1, min(2**22, budget // 8)))
    else:
        chunks0 = tuple(int(c) for c in chunks)
    if len(chunks0) != len(shape0) or any(c < 1 for c in chunks0):
        raise ValueError(f"chunks must be {len(shape0)} positive integers, got {chunks}")

    scale0 = np.array([a.scale for a in infos])
    trans0 = np.array([a.translate for a in infos])
    datasets = []
    for k, shp in enumerate(shapes):
        factor = np.array(shape0, float) / np.array(shp, float)
        if build:
            factor = np.array([1.0] * (len(shp) - 2) + [2.0**k, 2.0**k])
        level_scale = scale0 * factor
        # Where pixel 0 of the level sits: a 2x2 mean is centred between the pixels it averages; a
        # subsample (labels) or a given level (napari draws level pixel j at level-0 pixel j * factor) is not.
        level_trans = trans0 + (scale0 * (factor - 1) / 2 if build and kind == "image" else 0.0)
        datasets.append({"path": str(k), "coordinateTransformations": [
            {"type": "scale", "scale": [float(v) for v in level_scale]},
            {"type": "translation", "translation": [float(v) for v in level_trans]},
        ]})
    axes_meta = []
    for a in infos:
        entry = {"name": a.name}
        if a.type:
            entry["type"] = a.type
        if a.unit and a.type in ("space", "time"):
            entry["unit"] = a.unit
        axes_meta.append(entry)
    multiscale = {"name": name or output_name(path), "axes": axes_meta, "datasets": datasets}
    if build and n_levels > 1:
        multiscale["type"] = "mean" if kind == "image" else "nearest"
        multiscale["metadata"] = {
            "description": "y and x halved per level: 2x2 mean (images) or every other pixel (labels)",
            "method": "napari_soct.processing.io.writers.save_ome_zarr",
        }
    ome = {"version": "0.5", "multiscales": [multiscale]}
    if kind == "labels":
        ome["image-label"] = {}

    with atomic_output(path, "overwrite" if if_exists == "skip" else if_exists) as tmp:
        group = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        group.attrs.update({"ome": ome, **extra})
        arrays = [
            group.create_array(
                str(k), shape=shp, chunks=_level_chunks(chunks0, shp, k if build else 0), dtype=dtype,
                compressors=compressors_for(compression), fill_value=0, dimension_names=[a.name for a in infos],
            )
            for k, shp in enumerate(shapes)
        ]
        if build:
            _write_pyramid(levels[0], arrays, kind, budget, progress, cancel)
        else:
            _write_given_levels(levels, arrays, budget, progress, cancel)
    return path


def _write_pyramid(src, arrays, kind: str, budget: int, progress, cancel) -> None:
    """Read ``src`` block by block once; write each block to level 0 and its reductions to the others."""
    shape = tuple(arrays[0].shape)
    align = 2 ** (len(arrays) - 1)
    unit = list(arrays[0].chunks)
    for axis in (-2, -1):
        unit[axis] = math.lcm(unit[axis], align)
    itemsize = arrays[0].dtype.itemsize
    # Held per block: the block, the input chunks it was assembled from, zarr's chunk buffers, and for
    # 2x2 means a float work copy of the first reduction (measured: 3.5 to 5 times the block).
    copies = 4 if kind == "labels" or len(arrays) == 1 else 5
    block = _block_shape(shape, unit, _regular_chunks(src), itemsize, budget, copies)
    regions = _blocks(shape, block)
    tracker = Progress(len(regions), progress, cancel)
    reduce = _subsample_yx if kind == "labels" or arrays[0].dtype == np.bool_ else _halve_mean_yx
    for region in regions:
        tracker.check()
        values = _read_block(src, region)
        arrays[0][region] = values
        starts = [r.start for r in region]
        for level in arrays[1:]:
            values = reduce(values)
            starts = [*starts[:-2], starts[-2] // 2, starts[-1] // 2]
            level[tuple(slice(s, s + b) for s, b in zip(starts, values.shape))] = values
        del values
        tracker.advance(1, "writing OME-Zarr")


def _write_given_levels(levels, arrays, budget: int, progress, cancel) -> None:
    """Copy each given level block by block (whole output chunks)."""
    plans = []
    for src, arr in zip(levels, arrays):
        block = _block_shape(arr.shape, arr.chunks, _regular_chunks(src), arr.dtype.itemsize, budget, 4)
        plans.append((src, arr, _blocks(arr.shape, block)))
    tracker = Progress(sum(len(p[2]) for p in plans), progress, cancel)
    for src, arr, regions in plans:
        for region in regions:
            tracker.check()
            arr[region] = _read_block(src, region)
            tracker.advance(1, "writing OME-Zarr")


# --------------------------------------------------------------------------------------------- TIFF


def tiff_needs_bigtiff(data_bytes: int, *, n_segments: int = 1, n_pages: int = 1, compressed: bool = False) -> bool:
    """Whether a TIFF holding ``data_bytes`` of pixel data must be a BigTIFF (64-bit offsets).

    Classic TIFF addresses at most 4 GiB. The estimate adds, per tile or strip, 16 bytes of offsets and
    counts (plus a little for the encoder's framing when compressed, since incompressible data can grow),
    per page 1 KiB of tags and OME plane metadata, and, for compressed data, 1 % of slack; BigTIFF is
    chosen when that reaches :data:`BIGTIFF_THRESHOLD_BYTES` (4 GiB - 32 MiB).

    Parameters
    ----------
    data_bytes : int
        Uncompressed size of all pixel data (all pages and pyramid levels).
    n_segments : int
        Tiles or strips in the file.
    n_pages : int
        IFDs (pages, including pyramid SubIFDs).
    compressed : bool
        Whether the data are compressed.
    """
    data = data_bytes * (1.01 if compressed else 1.0) + n_segments * (16 + (64 if compressed else 0))
    return data + n_pages * 1024 >= BIGTIFF_THRESHOLD_BYTES


def _ome_axes(infos: list[AxisInfo], rgb: bool) -> str:
    """OME/tifffile axis letters: the last two (non-sample) axes are Y and X, the spatial axis before them Z,
    time T, channel C, another axis (e.g. "slice") the first free of C, T, else Q (other)."""
    n = len(infos)
    y_axis, x_axis = (n - 3, n - 2) if rgb else (n - 2, n - 1)
    letters = [""] * n
    letters[y_axis], letters[x_axis] = "Y", "X"
    if rgb:
        letters[-1] = "S"
    before = [i for i in range(y_axis) if infos[i].type == "space"]
    if before:
        letters[before[-1]] = "Z"
    for i, a in enumerate(infos):
        if not letters[i] and a.type == "time" and "T" not in letters:
            letters[i] = "T"
        elif not letters[i] and a.type == "channel" and "C" not in letters:
            letters[i] = "C"
    for i, letter in enumerate(letters):
        if not letter:
            letters[i] = next((c for c in "CTQ" if c not in letters), "Q")
    return "".join(letters)


def _ome_length_unit(unit: str | None) -> str:
    return _OME_UNIT[unit] if unit in _CM_PER_UNIT or unit in ("angstrom", "picometer") else "pixel"


def _ome_metadata(infos: list[AxisInfo], axes: str, shape, name: str, rgb: bool) -> dict:
    """OME-XML metadata: physical sizes, plane positions (the translation), and a map annotation with the
    exact per-axis scale, translation, units and labels."""
    md: dict = {"axes": axes, "Name": name}
    for letter in "XYZ":
        if letter in axes:
            a = infos[axes.index(letter)]
            md[f"PhysicalSize{letter}"] = a.scale
            md[f"PhysicalSize{letter}Unit"] = _ome_length_unit(a.unit)
    if "T" in axes:
        a = infos[axes.index("T")]
        md["TimeIncrement"] = a.scale
        if a.unit in _TIME_UNITS:
            md["TimeIncrementUnit"] = _OME_UNIT[a.unit]
    # One Plane per page, in page order (the leading axes in C order).
    lead = [i for i, letter in enumerate(axes) if letter not in "YXS"]
    n_pages = math.prod(shape[i] for i in lead)
    plane: dict = {}
    for letter in "XYZ":
        if letter not in axes:
            continue
        i = axes.index(letter)
        a = infos[i]
        if letter == "Z":
            index = np.unravel_index(np.arange(n_pages), [shape[j] for j in lead])[lead.index(i)]
            values = (a.translate + a.scale * index).tolist()
        else:
            values = [a.translate] * n_pages
        plane[f"Position{letter}"] = values
        plane[f"Position{letter}Unit"] = [_ome_length_unit(a.unit)] * n_pages
    md["Plane"] = plane
    md["MapAnnotation"] = {"Namespace": "napari-soct", "Value": {
        k: json.dumps(v) for k, v in _axis_record(infos, name, rgb).items()}}
    return md


def _axis_record(infos: list[AxisInfo], name: str, rgb: bool) -> dict:
    """The napari-side description of the axes (exact values), stored in TIFF metadata."""
    axes = infos[:-1] if rgb else infos
    return {
        "name": name,
        "axis_labels": [a.label for a in axes],
        "scale": [a.scale for a in axes],
        "translate": [a.translate for a in axes],
        "units": [a.unit or "pixel" for a in axes],
        "rgb": bool(rgb),
    }


def _read_cost(region_shape, full_shape, in_chunks, itemsize: int) -> int:
    """Bytes held while reading a region: the input chunks it touches (a dask or zarr read loads whole
    chunks) plus the region itself."""
    region = math.prod(region_shape) * itemsize
    if not in_chunks:
        return 2 * region
    hull = itemsize
    for length, chunk, n in zip(region_shape, in_chunks, full_shape):
        # Reads start at multiples of their length: they straddle a chunk boundary only when neither
        # length divides the other.
        aligned = length % chunk == 0 or chunk % length == 0
        span = chunk * (-(-length // chunk) + (0 if aligned else 1))
        hull *= min(n, span)
    return hull + region


def _largest_multiple(limit: int, step: int, fits) -> int:
    """The largest multiple of ``step`` up to ``limit`` (``limit`` itself allowed) for which ``fits`` holds, or 0."""
    candidates = [limit, *range((limit - 1) // step * step, 0, -step)]
    return next((c for c in candidates if c > 0 and fits(c)), 0)


def _iter_tiles(src, shape, rgb: bool, tile: tuple[int, int], budget: int, tracker: Progress):
    """Tiles of ``src`` in TIFF order (page by page, rows of tiles, left to right).

    Reads, whichever is the largest that fits ``budget`` (with the input chunks each read touches): slabs of
    whole pages; else bands of tile rows of one page; else windows of one tile row. The budget is raised to
    twice the cost of reading one tile (which loads whole input chunks), the least any reader holds.
    Advances ``tracker`` by one per page.
    """
    ndim = len(shape)
    y_axis = ndim - 3 if rgb else ndim - 2
    ny, nx = shape[y_axis], shape[y_axis + 1]
    lead = shape[:y_axis]
    itemsize = np.dtype(src.dtype).itemsize
    ty, tx = tile
    in_chunks = _regular_chunks(src)
    in_chunks = in_chunks if in_chunks and len(in_chunks) == ndim else None
    tail = shape[y_axis + 2 :]  # the RGB samples axis, if any

    def cost(pages: int, rows: int, cols: int) -> int:
        region = (*(1,) * max(0, len(lead) - 1), *((pages,) if lead else ()), rows, cols, *tail)
        return _read_cost(region, shape, in_chunks, itemsize)

    def read(page_index, pages: slice, rows: slice, cols: slice) -> np.ndarray:
        """(pages, rows, cols[, samples]) of the page stack (a lone 2D page is a stack of one)."""
        if not lead:
            return _read_block(src, (rows, cols))[None]
        return _read_block(src, (*page_index, pages, rows, cols))

    def tiles_of(plane):
        for y in range(0, plane.shape[0], ty):
            for x in range(0, plane.shape[1], tx):
                yield np.ascontiguousarray(plane[y : y + ty, x : x + tx])

    # The smallest read (one tile) already loads the input chunks it touches: below twice that, a smaller
    # read saves no memory, only re-reads the same chunks.
    budget = max(budget, 2 * cost(1, min(ty, ny), min(tx, nx)))
    inner = lead[-1] if lead else 1
    outers = list(itertools.product(*[range(n) for n in lead[:-1]]))
    chunk = lambda axis, default: in_chunks[axis] if in_chunks else default  # noqa: E731
    depth = _largest_multiple(inner, chunk(y_axis - 1, 1) if lead else 1, lambda d: cost(d, ny, nx) <= budget)
    if depth:  # slabs of whole pages
        for outer in outers:
            for z0 in range(0, inner, depth):
                slab = read(outer, slice(z0, z0 + depth), slice(None), slice(None))
                for plane in slab:
                    yield from tiles_of(plane)
                tracker.advance(len(slab), "writing TIFF")
                del slab
        return
    step_rows = math.lcm(ty, chunk(y_axis, ty))
    band = _largest_multiple(ny, step_rows, lambda r: cost(1, r, nx) <= budget) or _largest_multiple(
        min(ny, step_rows), ty, lambda r: cost(1, r, nx) <= budget)
    step_cols = math.lcm(tx, chunk(y_axis + 1, tx))
    width = _largest_multiple(nx, step_cols, lambda c: cost(1, ty, c) <= budget) or _largest_multiple(
        min(nx, step_cols), tx, lambda c: cost(1, ty, c) <= budget) or tx
    for outer in outers:
        for z in range(inner):
            page = slice(z, z + 1)
            if band:  # bands of whole tile rows
                for y0 in range(0, ny, band):
                    yield from tiles_of(read(outer, page, slice(y0, y0 + band), slice(None))[0])
            else:  # one tile row at a time, in windows from left to right
                for y0 in range(0, ny, ty):
                    for x0 in range(0, nx, width):
                        yield from tiles_of(read(outer, page, slice(y0, y0 + ty), slice(x0, x0 + width))[0])
            tracker.advance(1, "writing TIFF")


def save_tiff(
    path: str | os.PathLike,
    data,
    *,
    scale: Sequence[float] | None = None,
    translate: Sequence[float] | None = None,
    axes: Sequence[str] | None = None,
    units: Sequence | str | None = None,
    rgb: bool = False,
    compression: str = "zlib",
    bigtiff: bool | None = None,
    tile: int | tuple[int, int] = 256,
    name: str | None = None,
    if_exists: str = "error",
    memory_budget_gb: float = 1.0,
    progress: ProgressCallback | None = None,
    cancel=None,
) -> Path:
    """Write an array (or a list of resolution levels) as a tiled TIFF with physical metadata.

    Parameters
    ----------
    path : str or PathLike
        Output file (``*.tif``, ``*.tiff``).
    data : array-like or list of array-like
        numpy, dask or zarr array, read block by block; a list of levels (finest first) is written as a
        pyramid in SubIFDs. The data type is kept exactly (integer ids, floats).
    scale, translate, axes, units, rgb, name
        As for :func:`save_ome_zarr`. With OME-XML, the spatial axes get ``PhysicalSize{X,Y,Z}`` with their
        units and each page ``Position{X,Y,Z}`` (the translation); all values also go, exactly, into a map
        annotation (OME) or the JSON description (other TIFFs) under ``scale``, ``translate``, ``units``,
        ``axis_labels``. The standard X/YResolution tags are set in pixels per centimetre for length units.
    compression : {"zlib", "zstd", "none"}
        Tile compression (TIFF tags 8 Adobe deflate, 50000 Zstandard, 1 none).
    bigtiff : bool, optional
        Force BigTIFF on or off; default: :func:`tiff_needs_bigtiff` on the data size.
    tile : int or (int, int)
        Tile height and width (multiples of 16; shrunk for small images).
    if_exists : {"error", "skip", "overwrite"}
    memory_budget_gb : float
        Peak memory for the pages being written, in GiB.
    progress, cancel
        Progress callback and cancellation flag.

    Returns
    -------
    Path
        The written (or kept) file.

    Notes
    -----
    OME-XML is used when the data type is one OME knows (not 64-bit integers or float16) and the axes map
    to OME's T, C, Z, Y, X (S for RGB); otherwise the file has tifffile's JSON description. Both are read by
    ``tifffile`` (``TiffFile.ome_metadata`` / ``TiffFile.shaped_metadata``).
    """
    import tifffile

    path = Path(path)
    if compression not in TIFF_COMPRESSIONS:
        raise ValueError(f"compression must be one of {TIFF_COMPRESSIONS}, got {compression!r}")
    _check_if_exists(if_exists)
    budget = _budget_bytes(memory_budget_gb)
    levels = _as_levels(data)
    shape0 = tuple(int(s) for s in levels[0].shape)
    dtype = np.dtype(levels[0].dtype)
    if rgb and shape0[-1] not in (3, 4):
        raise ValueError(f"rgb data need 3 or 4 samples in the last axis, got shape {shape0}")
    if len(shape0) < (3 if rgb else 2):
        raise ValueError(f"TIFF needs at least 2 spatial axes, got shape {shape0}")
    infos = describe_axes(len(shape0), scale=scale, translate=translate, axes=axes, units=units, rgb=rgb)
    ty, tx = (tile, tile) if isinstance(tile, int) else tuple(tile)
    ny, nx = (shape0[-3], shape0[-2]) if rgb else (shape0[-2], shape0[-1])
    ty, tx = min(ty, -(-ny // 16) * 16), min(tx, -(-nx // 16) * 16)
    if ty % 16 or tx % 16 or ty < 16 or tx < 16:
        raise ValueError(f"tile sizes must be positive multiples of 16, got {tile}")
    name = name or path.name.split(".")[0]
    if not check_can_write(path, if_exists):
        return path

    letters = _ome_axes(infos, rgb)
    use_ome = dtype.name in _OME_DTYPES
    if use_ome:
        try:
            storedshape = (math.prod(shape0[: -3 if rgb else -2]), 1, 1, ny, nx, shape0[-1] if rgb else 1)
            metadata = _ome_metadata(infos, letters, shape0, name, rgb)
            tifffile.OmeXml().addimage(dtype, shape0, storedshape, **metadata)
        except (tifffile.OmeXmlError, ValueError):
            use_ome = False
    if not use_ome:
        metadata = {"axes": letters, **_axis_record(infos, name, rgb)}

    n_pages = [math.prod(lv.shape[: -3 if rgb else -2]) for lv in levels]
    level_yx = [(lv.shape[-3], lv.shape[-2]) if rgb else (lv.shape[-2], lv.shape[-1]) for lv in levels]
    n_tiles = sum(p * -(-y // ty) * -(-x // tx) for p, (y, x) in zip(n_pages, level_yx))
    nbytes = sum(math.prod(lv.shape) * dtype.itemsize for lv in levels)
    if bigtiff is None:
        bigtiff = tiff_needs_bigtiff(nbytes, n_segments=n_tiles, n_pages=sum(n_pages),
                                     compressed=compression != "none")

    options: dict = {
        "tile": (ty, tx),
        "compression": None if compression == "none" else compression,
        "photometric": "rgb" if rgb else "minisblack",
        "maxworkers": min(2, os.cpu_count() or 1),
        "buffersize": max(1, budget // 4),
    }
    ax_y, ax_x = infos[letters.index("Y")], infos[letters.index("X")]
    if ax_x.unit in _CM_PER_UNIT and ax_y.unit in _CM_PER_UNIT:
        # Standard resolution tags for viewers that ignore OME: pixels per centimetre in x and y.
        options["resolution"] = (1 / (ax_x.scale * _CM_PER_UNIT[ax_x.unit]),
                                 1 / (ax_y.scale * _CM_PER_UNIT[ax_y.unit]))
        options["resolutionunit"] = "CENTIMETER"

    tracker = Progress(sum(n_pages), progress, cancel)
    with atomic_output(path, "overwrite" if if_exists == "skip" else if_exists) as tmp:
        with tifffile.TiffWriter(tmp, bigtiff=bigtiff, ome=use_ome, shaped=not use_ome) as writer:
            for k, level in enumerate(levels):
                shape = tuple(int(s) for s in level.shape)
                # tifffile buffers up to `buffersize` of tiles to compress them in parallel
                tiles = _iter_tiles(level, shape, rgb, (ty, tx), budget - options["buffersize"], tracker)
                if k == 0:
                    writer.write(tiles, shape=shape, dtype=dtype, subifds=len(levels) - 1, metadata=metadata,
                                 **options)
                else:
                    level_options = {**options}
                    if "resolution" in options:
                        fy, fx = shape0[-3 if rgb else -2] / shape[-3 if rgb else -2], nx / shape[-2 if rgb else -1]
                        level_options["resolution"] = (options["resolution"][0] / fx,
                                                       options["resolution"][1] / fy)
                    writer.write(tiles, shape=shape, dtype=dtype, subfiletype=1, metadata=None, **level_options)
    return path
