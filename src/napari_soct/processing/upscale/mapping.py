"""Grid geometry of label resampling: which source voxel (or voxels) each output voxel takes its label from.

Everything here is exact integer arithmetic on rational ratios (:class:`fractions.Fraction`), never floats, so a
mapping is the same on every machine and for any volume size.

Conventions, per axis: source voxel ``s`` covers the interval ``[s, s + 1)`` in source coordinates; output voxel
``j`` covers ``[j * r, (j + 1) * r)`` where ``r`` is the output voxel size in source voxels (the *ratio*). With
``align="extent"`` (the default) ``r = n_in / n_out``: both volumes cover the same field of view, voxel centres
are aligned, there is no half-voxel shift and no border.

* nearest: output voxel ``j`` takes the label of the source voxel containing its centre,
  ``floor((j + 1/2) * r)`` (clamped to the last source voxel when ``r`` comes from physical voxel sizes and the
  output extends past the source);
* mode: output voxel ``j`` takes the label covering the largest part of its interval (overlap lengths multiplied
  over the axes); ties go to the smallest label.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

__all__ = [
    "AxisMap",
    "LevelGeometry",
    "parse_numbers",
    "resolve_target",
    "pyramid_geometry",
]

MAX_DENOMINATOR = 1_000_000
ALIGN_CHOICES = ("extent", "scale")


def parse_numbers(text: str, name: str, ndim: int, *, integer: bool = False) -> list[Fraction]:
    """Parse ``"2,2,2.5"`` (or one value for every axis) into exact fractions.

    Decimal strings are taken exactly (``"2.5"`` is 5/2, not the nearest float).

    Raises
    ------
    ValueError
        Naming ``name`` when a value is not a positive number, not an integer where one is needed, or the count
        does not match ``ndim``.
    """
    parts = [p for p in str(text).replace(" ", ",").split(",") if p]
    if len(parts) == 1 and ndim > 1:
        parts = parts * ndim
    if len(parts) != ndim:
        raise ValueError(f"{name}: expected {ndim} comma-separated values (one per axis), got {text!r}")
    values = []
    for p in parts:
        try:
            v = Fraction(p)
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"{name}: {p!r} is not a number (in {text!r})") from None
        if v <= 0:
            raise ValueError(f"{name}: values must be positive, got {p!r}")
        if integer and v.denominator != 1:
            raise ValueError(f"{name}: values must be integers, got {p!r}")
        values.append(v)
    return values


@dataclass(frozen=True)
class AxisMap:
    """Mapping of one axis: ``n_out`` output voxels of ``ratio`` source voxels each over ``n_in`` source voxels."""

    n_in: int
    n_out: int
    ratio: Fraction

    @property
    def upscaling(self) -> bool:
        """True when an output voxel is at most one source voxel long (each overlaps at most two)."""
        return self.ratio <= 1

    @functools.cached_property
    def _nearest_all(self) -> np.ndarray:
        j = np.arange(self.n_out, dtype=object if (2 * self.n_out + 1) * self.ratio.numerator >= 2**62 else np.int64)
        p, q = self.ratio.numerator, self.ratio.denominator
        idx = ((2 * j + 1) * p) // (2 * q)  # Python integers for absurd ratios: no overflow
        return np.minimum(idx, self.n_in - 1).astype(np.intp)

    def nearest(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Source index of output voxels ``start..stop-1``: ``floor((2j + 1) * p / (2 q))`` for ``r = p / q``."""
        return self._nearest_all[start : self.n_out if stop is None else stop]

    def covering(self, start: int = 0, stop: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Source voxels overlapping each output voxel ``start..stop-1`` and the overlap lengths.

        Returns
        -------
        index : ndarray of intp, shape (n, m)
            Source indices; rows with fewer than ``m`` overlapping voxels repeat their last one.
        weight : ndarray of int64, shape (n, m)
            Overlap lengths in units of ``1 / ratio.denominator`` source voxels (0 for the repeats).
        """
        stop = self.n_out if stop is None else stop
        p, q = self.ratio.numerator, self.ratio.denominator
        j = np.arange(start, stop, dtype=np.int64)
        # In units of 1/q source voxel: output voxel j is [j p, (j + 1) p), source voxel s is [s q, (s + 1) q).
        lo_u = j * p
        hi_u = np.minimum((j + 1) * p, self.n_in * q)
        lo_u = np.minimum(lo_u, self.n_in * q - 1)  # output past the source (scale alignment): last voxel
        hi_u = np.maximum(hi_u, lo_u + 1)
        first = lo_u // q
        last = (hi_u - 1) // q
        m = int((last - first).max()) + 1 if len(j) else 1
        index = first[:, None] + np.arange(m)[None, :]
        valid = index <= last[:, None]
        index = np.minimum(index, last[:, None])
        weight = np.minimum(hi_u[:, None], (index + 1) * q) - np.maximum(lo_u[:, None], index * q)
        weight = np.where(valid, weight, 0)
        return index.astype(np.intp), weight.astype(np.int64)

    def source_range(self, start: int, stop: int, method: str = "nearest") -> tuple[int, int]:
        """Half-open range of source indices that output voxels ``start..stop-1`` read."""
        if method == "nearest":
            idx = self._nearest_all
            return int(idx[start]), int(idx[stop - 1]) + 1
        p, q = self.ratio.numerator, self.ratio.denominator
        lo = min(start * p // q, self.n_in - 1)
        hi = min(-(-stop * p // q), self.n_in)
        return int(lo), int(max(hi, lo + 1))


def _as_fraction(x: float) -> Fraction:
    return Fraction(x).limit_denominator(MAX_DENOMINATOR)


def resolve_target(
    in_shape: tuple[int, ...],
    in_scale: tuple[float, ...],
    *,
    factors: str = "",
    shape: str = "",
    like_shape: tuple[int, ...] | None = None,
    like_scale: tuple[float, ...] | None = None,
    out_scale: str = "",
    align: str = "extent",
) -> tuple[tuple[int, ...], list[Fraction], tuple[float, ...]]:
    """Output shape, per-axis ratios and output voxel size from exactly one kind of target.

    Parameters
    ----------
    in_shape, in_scale : tuple
        Source shape and voxel size.
    factors : str
        ``"2,2,2.5"`` (or one value for all axes): output size ``round(n_in * f)``; values below 1 downscale.
    shape : str
        ``"Z,Y,X"`` output shape.
    like_shape, like_scale : tuple, optional
        Grid of a reference image (its shape and voxel size).
    out_scale : str
        Output voxel size ``"Z,Y,X"``; empty derives it from ``in_scale`` (or takes ``like_scale``).
    align : {"extent", "scale"}
        ``extent``: output and source cover the same field of view (ratio ``n_in / n_out``); ``scale``: ratio
        from the voxel sizes (``1 / f`` for factors, ``out_scale / in_scale`` otherwise), origins aligned.

    Raises
    ------
    ValueError
        When not exactly one of factors, shape, like is given, or values are invalid.
    """
    ndim = len(in_shape)
    given = [n for n, v in (("factors", factors), ("shape", shape), ("like", like_shape)) if v]
    if len(given) != 1:
        raise ValueError(
            "give exactly one target: factors ('2,2,2.5'), shape ('Z,Y,X') or like (a reference image); "
            f"got {', '.join(given) if given else 'none'}"
        )
    if align not in ALIGN_CHOICES:
        raise ValueError(f"align must be one of {ALIGN_CHOICES}, got {align!r}")
    explicit_scale = [float(v) for v in parse_numbers(out_scale, "out_scale", ndim)] if out_scale else None
    if factors:
        f = parse_numbers(factors, "factors", ndim)
        out = tuple(max(1, math.floor(n * fi + Fraction(1, 2))) for n, fi in zip(in_shape, f))
        ratios = [1 / fi if align == "scale" else Fraction(n, o) for n, o, fi in zip(in_shape, out, f)]
    else:
        if shape:
            out = tuple(int(v) for v in parse_numbers(shape, "shape", ndim, integer=True))
        else:
            if len(like_shape) < ndim:
                raise ValueError(f"like: the reference has {len(like_shape)} axes, the labels {ndim}")
            out = tuple(int(v) for v in like_shape[-ndim:])
            if explicit_scale is None and like_scale is not None:
                explicit_scale = [float(v) for v in like_scale[-ndim:]]
        if align == "scale":
            if explicit_scale is None:
                raise ValueError("align='scale' with a shape target needs out_scale (the output voxel size)")
            ratios = [_as_fraction(o / i) for o, i in zip(explicit_scale, in_scale)]
        else:
            ratios = [Fraction(n, o) for n, o in zip(in_shape, out)]
    scale = tuple(explicit_scale) if explicit_scale else tuple(float(s * r) for s, r in zip(in_scale, ratios))
    return out, ratios, scale


@dataclass(frozen=True)
class LevelGeometry:
    """One pyramid level: its axis maps from the source, storage chunks and shards, and downsampling factor."""

    axes: tuple[AxisMap, ...]
    chunks: tuple[int, ...]
    shards: tuple[int, ...]
    factor: tuple[int, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(a.n_out for a in self.axes)

    @property
    def n_voxels(self) -> int:
        return math.prod(self.shape)

    def shard_grid(self) -> tuple[int, ...]:
        return tuple(-(-n // s) for n, s in zip(self.shape, self.shards))

    def shard_boxes(self):
        """``(index, (start, stop) per axis)`` of every shard, clipped to the array."""
        for index in np.ndindex(*self.shard_grid()):
            yield index, tuple((i * s, min((i + 1) * s, n)) for i, s, n in zip(index, self.shards, self.shape))


def _storage(shape, chunk: int, shard: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    chunks = tuple(max(1, min(chunk, n)) for n in shape)
    shards = tuple(c * max(1, min(shard // c, -(-n // c))) for n, c in zip(shape, chunks))
    return chunks, shards


def pyramid_geometry(
    in_shape: tuple[int, ...],
    ratios: list[Fraction],
    out_shape: tuple[int, ...],
    *,
    levels: int,
    chunk: int,
    shard: int,
    min_size: int | None = None,
) -> list[LevelGeometry]:
    """Level 0 and its 2x-downsampled levels, each mapped directly from the source.

    Level ``k`` voxel ``j`` covers level-0 voxels ``[j F, (j + 1) F)`` (``F`` its downsampling factor), so its
    ratio to the source is ``F`` times that of level 0 and its shape ``ceil(n_0 / F)``.

    Parameters
    ----------
    levels : int
        Number of levels below level 0; ``-1`` adds levels until the largest axis is at most ``min_size``
        (default ``4 * chunk``). An axis of size 1 is not downsampled further.
    """
    min_size = min_size or 4 * chunk
    geoms = []
    factor = (1,) * len(in_shape)
    k = 0
    while True:
        shape = tuple(-(-n // f) for n, f in zip(out_shape, factor))
        axes = tuple(AxisMap(n_in, n, r * f) for n_in, n, r, f in zip(in_shape, shape, ratios, factor))
        chunks, shards = _storage(shape, chunk, shard)
        geoms.append(LevelGeometry(axes, chunks, shards, factor))
        more = k < levels if levels >= 0 else max(shape) > min_size
        if not more or max(shape) <= 1:
            return geoms
        factor = tuple(f * 2 if n > 1 else f for f, n in zip(factor, shape))
        k += 1

