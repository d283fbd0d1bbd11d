"""Stitching placed tiles into one slice, block by block, with diffusion, average or no blending.

Canvas
------
Tile ``k`` at position ``p_k = (y, x)`` (pixels, the slice's stage frame) is drawn at the integer offset
``floor(p_k) - origin`` of the canvas, its content shifted by the fractional part (linear interpolation,
when sub-pixel placement is on). ``origin = floor(min_k p_k)``.

Blending weights (one 2D map per tile, the same for every depth)
----------------------------------------------------------------
- ``diffusion``: inside the part of a tile's footprint that other tiles also cover, the weight solves
  Laplace's equation with the tile's own single-covered pixels as Dirichlet value 1 and the pixels just
  beyond its border that other tiles cover as Dirichlet value 0 (borders nobody covers: no flux). For two
  tiles this is the linear ramp across the overlap; at corners where three or four tiles meet it is the
  smooth harmonic partition. The sparse system is solved once per overlap geometry (cached), on a coarser
  grid when the overlap is large (harmonic fields are smooth), then normalised over the tiles.
- ``average``: feathering, weight = product of the distances to the tile's borders (linear ramps).
- ``none``: each pixel from the tile whose border is furthest (hard seams half-way across overlaps).

Streaming
---------
The canvas is written in blocks of whole chunks (all depths, a band of rows and columns), each built from
the tiles that intersect it. Read tiles are kept in a cache bounded in bytes, so memory is bounded by the
budget whatever the number of tiles; a tile evicted too early is read again.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
from scipy import ndimage, sparse
from scipy.sparse.linalg import spsolve

__all__ = [
    "BLENDING_CHOICES",
    "diffusion_solve_bytes",
    "CanvasLayout",
    "canvas_layout",
    "blend_weights",
    "shift_tile",
    "TileCache",
    "stitch_blocks",
]

BLENDING_CHOICES = ("diffusion", "average", "none")
_PLANES = 8  # depth planes accumulated per step
# Laplace unknowns per tile solved at full resolution; above, a coarser grid (every k-th pixel) is solved and
# interpolated linearly: harmonic weights are ramps and smooth corners, which this reproduces, and the solve
# stays small (~10 ms, ~2 MB).
_MAX_UNKNOWNS = 4_000
SOLVE_BYTES_PER_UNKNOWN = 450  # peak memory of building and solving the system (measured: ~420 B per unknown)


def diffusion_solve_bytes(tile_hw: tuple[int, int]) -> int:
    """Upper bound of the memory one diffusion-weight solve takes for tiles of this size."""
    area = int(tile_hw[0]) * int(tile_hw[1])
    # the solve itself, plus the interpolation of a coarse solution to the tile (a few float64 maps)
    return SOLVE_BYTES_PER_UNKNOWN * min(area, _MAX_UNKNOWNS) + 48 * area


@dataclass
class CanvasLayout:
    """Where every tile goes on the slice canvas.

    Attributes
    ----------
    origin : ndarray (2,)
        ``(y, x)`` of canvas pixel ``(0, 0)`` in the positions' frame (whole pixels).
    shape : (int, int)
        Canvas ``(height, width)``.
    offsets : dict
        ``{tile: (y0, x0)}`` integer canvas offset of each tile's footprint.
    fractions : dict
        ``{tile: (fy, fx)}`` sub-pixel part of each position, in ``[0, 1)``.
    tile_hw : (int, int)
    """

    origin: np.ndarray
    shape: tuple[int, int]
    offsets: dict
    fractions: dict
    tile_hw: tuple[int, int]

    def rect(self, tile) -> tuple[int, int, int, int]:
        """``(y0, x0, y1, x1)`` of the tile's footprint on the canvas."""
        y0, x0 = self.offsets[tile]
        return y0, x0, y0 + self.tile_hw[0], x0 + self.tile_hw[1]

    def tiles_in(self, y0: int, x0: int, y1: int, x1: int) -> list:
        """Tiles whose footprint intersects the canvas region ``[y0, y1) x [x0, x1)``."""
        out = []
        for t in self.offsets:
            ty0, tx0, ty1, tx1 = self.rect(t)
            if ty0 < y1 and ty1 > y0 and tx0 < x1 and tx1 > x0:
                out.append(t)
        return out


def canvas_layout(positions: dict, tile_hw: tuple[int, int], subpixel: bool = True) -> CanvasLayout:
    """Integer offsets and sub-pixel fractions of every tile (see the module docstring).

    Parameters
    ----------
    positions : dict
        ``{tile: (y, x)}`` in pixels.
    tile_hw : (int, int)
        Tile height and width.
    subpixel : bool
        When False, positions are rounded and the fractions are zero.
    """
    if not positions:
        raise ValueError("no tile to place: the slice has no present tile")
    pos = {t: np.asarray(p, dtype=float) for t, p in positions.items()}
    if not subpixel:
        pos = {t: np.round(p) for t, p in pos.items()}
    origin = np.floor(np.min(np.array(list(pos.values())), axis=0))
    offsets, fractions = {}, {}
    for t, p in pos.items():
        rel = p - origin
        whole = np.floor(rel + 1e-9)
        offsets[t] = (int(whole[0]), int(whole[1]))
        frac = rel - whole
        fractions[t] = (float(frac[0]) if frac[0] > 1e-6 else 0.0, float(frac[1]) if frac[1] > 1e-6 else 0.0)
    height = max(o[0] for o in offsets.values()) + tile_hw[0]
    width = max(o[1] for o in offsets.values()) + tile_hw[1]
    return CanvasLayout(origin, (int(height), int(width)), offsets, fractions, tuple(int(v) for v in tile_hw))


def shift_tile(tile: np.ndarray, fraction: tuple[float, float]) -> np.ndarray:
    """Move a ``(z, y, x)`` tile's content by a sub-pixel ``(fy, fx)`` in ``[0, 1)`` (linear interpolation).

    Output pixel ``i`` takes the tile at ``i - f``; the first row/column repeats the border (no data there).
    Works a few depth planes at a time so that the temporaries stay small.
    """
    fy, fx = fraction
    out = tile.astype(np.float32, copy=True)
    step = max(1, (1 << 20) // max(1, out[0].nbytes))  # about 1 MiB of planes per pass
    for z0 in range(0, out.shape[0], step):
        part = out[z0 : z0 + step]
        if fy > 0:
            prev = part[:, :-1] * np.float32(fy)
            part[:, 1:] *= np.float32(1 - fy)
            part[:, 1:] += prev
        if fx > 0:
            prev = part[:, :, :-1] * np.float32(fx)
            part[:, :, 1:] *= np.float32(1 - fx)
            part[:, :, 1:] += prev
    return out


def _coverage(layout: CanvasLayout, tile, margin: int = 1) -> np.ndarray:
    """Number of *other* tiles covering each pixel of ``tile``'s footprint grown by ``margin``."""
    y0, x0, y1, x1 = layout.rect(tile)
    y0, x0, y1, x1 = y0 - margin, x0 - margin, y1 + margin, x1 + margin
    cov = np.zeros((y1 - y0, x1 - x0), np.int16)
    for other in layout.tiles_in(y0, x0, y1, x1):
        if other == tile:
            continue
        oy0, ox0, oy1, ox1 = layout.rect(other)
        cov[max(oy0, y0) - y0 : min(oy1, y1) - y0, max(ox0, x0) - x0 : min(ox1, x1) - x0] += 1
    return cov


def _edge_distance(h: int, w: int) -> np.ndarray:
    iy = np.minimum(np.arange(h) + 1, h - np.arange(h)).astype(np.float32)
    ix = np.minimum(np.arange(w) + 1, w - np.arange(w)).astype(np.float32)
    return iy, ix


def _harmonic_weight(others: np.ndarray, h: int, w: int) -> np.ndarray:
    """Solve the diffusion weight of one tile from the coverage of the other tiles (footprint + 1 px ring).

    ``others[1:-1, 1:-1]`` covers the footprint; the ring says whether a pixel beyond the border is covered
    by another tile (Dirichlet 0) or by none (no flux).
    """
    inner = others[1:-1, 1:-1]
    unknown = inner > 0
    weight = np.ones((h, w), np.float64)
    n_unknown = int(unknown.sum())
    if n_unknown == 0:
        return weight.astype(np.float32)
    step = max(1, math.ceil(math.sqrt(n_unknown / _MAX_UNKNOWNS)))
    if step > 1:
        # Coarse grid: every step-th pixel (the last row/column included) carries the same conditions.
        ys = np.unique(np.r_[np.arange(0, h, step), h - 1])
        xs = np.unique(np.r_[np.arange(0, w, step), w - 1])
        ring_y = np.r_[0, ys + 1, h + 1]
        ring_x = np.r_[0, xs + 1, w + 1]
        coarse_others = others[np.ix_(ring_y, ring_x)]
        coarse = _solve_laplace(coarse_others)
        interp = ndimage.map_coordinates(
            coarse, np.meshgrid(np.interp(np.arange(h), ys, np.arange(len(ys))),
                                np.interp(np.arange(w), xs, np.arange(len(xs))), indexing="ij"),
            order=1, mode="nearest",
        )
        weight = np.where(unknown, interp, 1.0)
    else:
        weight = _solve_laplace(others)
    return np.clip(weight, 0.0, 1.0).astype(np.float32)


def _solve_laplace(others: np.ndarray) -> np.ndarray:
    """Weight on the footprint ``others[1:-1, 1:-1]``: 1 where no other tile covers, harmonic elsewhere."""
    inner = others[1:-1, 1:-1]
    h, w = inner.shape
    unknown = inner > 0
    index = -np.ones((h, w), np.int64)
    index[unknown] = np.arange(int(unknown.sum()))
    n = int(unknown.sum())
    rows, cols, vals = [], [], []
    diag = np.zeros(n)
    rhs = np.zeros(n)
    uy, ux = np.nonzero(unknown)
    ids = index[uy, ux]
    for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        ny, nx = uy + dy, ux + dx
        outside = (ny < 0) | (ny >= h) | (nx < 0) | (nx >= w)
        nyc, nxc = np.clip(ny, 0, h - 1), np.clip(nx, 0, w - 1)
        # Beyond the border: Dirichlet 0 where another tile covers, no flux (nothing) where none does.
        covered_beyond = others[ny + 1, nx + 1] > 0
        counts = ~outside | covered_beyond
        diag += counts
        inside_unknown = ~outside & unknown[nyc, nxc]
        rows.append(ids[inside_unknown])
        cols.append(index[nyc, nxc][inside_unknown])
        vals.append(-np.ones(int(inside_unknown.sum())))
        inside_known = ~outside & ~unknown[nyc, nxc]
        rhs += inside_known  # neighbour weight 1 (only this tile covers it)
    # A region with no Dirichlet neighbour at all would be singular: a faint pull to 1/2 settles it.
    eps = 1e-6
    diag += eps
    rhs += 0.5 * eps
    matrix = sparse.csr_matrix(
        (np.concatenate([diag, *vals]), (np.concatenate([np.arange(n), *rows]), np.concatenate([np.arange(n), *cols]))),
        shape=(n, n),
    )
    solution = spsolve(matrix.tocsc(), rhs)
    out = np.ones((h, w), np.float64)
    out[unknown] = solution
    return out


class _WeightCache:
    """Diffusion weights per overlap geometry (the coverage pattern around a tile), bounded in bytes."""

    def __init__(self, max_bytes: int = 16 * 2**20):
        self._items: OrderedDict = OrderedDict()
        self.max_bytes = int(max_bytes)
        self._bytes = 0
        self.solves = 0

    def get(self, others: np.ndarray, h: int, w: int) -> np.ndarray:
        key = (h, w, others.shape, others.tobytes())
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        weight = _harmonic_weight(others, h, w)
        self.solves += 1
        while self._items and self._bytes + weight.nbytes > self.max_bytes:
            _, old = self._items.popitem(last=False)
            self._bytes -= old.nbytes
        if weight.nbytes <= self.max_bytes:
            self._items[key] = weight
            self._bytes += weight.nbytes
        return weight


def blend_weights(layout: CanvasLayout, tile, blending: str, cache: _WeightCache | None = None) -> np.ndarray:
    """The 2D blending weight (or, for ``none``, the selection score) of one tile over its footprint."""
    h, w = layout.tile_hw
    if blending == "diffusion":
        others = np.minimum(_coverage(layout, tile), 1).astype(np.int8)
        return (cache or _WeightCache()).get(others, h, w)
    iy, ix = _edge_distance(h, w)
    if blending == "average":
        return np.outer(iy, ix)
    if blending == "none":
        return np.minimum(iy[:, None], ix[None, :])
    raise ValueError(f"blending must be one of {BLENDING_CHOICES}, got {blending!r}")


class TileCache:
    """Tiles ready to draw (shifted by their sub-pixel fraction) with their weights, bounded in bytes."""

    def __init__(self, read_tile, layout: CanvasLayout, blending: str, max_bytes: int, subpixel: bool = True,
                 weight_cache_bytes: int | None = None):
        self.read_tile = read_tile
        self.layout = layout
        self.blending = blending
        self.max_bytes = int(max_bytes)
        self.subpixel = subpixel
        h, w = layout.tile_hw
        # Enough for the distinct geometries of a few grid rows; never more than the tile cache itself.
        self.weights = _WeightCache(weight_cache_bytes if weight_cache_bytes is not None
                                    else min(16 * 2**20, self.max_bytes // 8, 64 * 4 * h * w))
        self._items: OrderedDict = OrderedDict()
        self._bytes = 0
        self.reads = 0
        self.bytes_read = 0
        self.peak_bytes = 0

    def get(self, tile):
        if tile in self._items:
            self._items.move_to_end(tile)
            return self._items[tile]
        data = self.read_tile(*tile)
        self.reads += 1
        self.bytes_read += data.nbytes
        frac = self.layout.fractions[tile]
        if self.subpixel and (frac[0] or frac[1]):
            data = shift_tile(data, frac)
        else:
            data = np.asarray(data, dtype=np.float32)
        weight = blend_weights(self.layout, tile, self.blending, self.weights)
        size = data.nbytes + weight.nbytes
        while self._items and self._bytes + size > self.max_bytes:
            _, (old, old_w) = self._items.popitem(last=False)
            self._bytes -= old.nbytes + old_w.nbytes
        self._items[tile] = (data, weight)
        self._bytes += size
        self.peak_bytes = max(self.peak_bytes, self._bytes)
        return data, weight


def stitch_blocks(layout: CanvasLayout, cache: TileCache, n_z: int, block_hw: tuple[int, int], write, *,
                  on_block=None, region: tuple[slice, slice] | None = None) -> dict:
    """Build the canvas block by block and hand each block to ``write(region, block)``.

    Parameters
    ----------
    layout : CanvasLayout
    cache : TileCache
        Gives each tile (shifted) and its blending weight.
    n_z : int
        Depth samples of the tiles.
    block_hw : (int, int)
        Block height and width in canvas pixels (the last blocks are cut at the canvas edge).
    write : callable
        ``write((slice_z, slice_y, slice_x), block)`` with ``block`` float32 ``(n_z, h, w)``.
    on_block : callable, optional
        Called after each block (progress, cancellation).
    region : (slice, slice), optional
        Only the blocks of this ``(y, x)`` part of the canvas (blocks start at its corner); default the whole
        canvas. Each pixel's value does not depend on the blocks it was built in.

    Returns
    -------
    dict
        ``blocks`` written and ``empty_pixels`` (canvas pixels no tile covers, left at 0).
    """
    ys, xs = region or (slice(0, layout.shape[0]), slice(0, layout.shape[1]))
    bh, bw = block_hw
    n_blocks = 0
    empty = 0
    for y0 in range(ys.start, ys.stop, bh):
        y1 = min(y0 + bh, ys.stop)
        for x0 in range(xs.start, xs.stop, bw):
            x1 = min(x0 + bw, xs.stop)
            out = np.zeros((n_z, y1 - y0, x1 - x0), np.float32)
            wsum = np.zeros((y1 - y0, x1 - x0), np.float32)
            best = np.full((y1 - y0, x1 - x0), -1.0, np.float32) if cache.blending == "none" else None
            for t in layout.tiles_in(y0, x0, y1, x1):
                data, weight = cache.get(t)
                ty0, tx0, ty1, tx1 = layout.rect(t)
                cy0, cy1 = max(ty0, y0), min(ty1, y1)
                cx0, cx1 = max(tx0, x0), min(tx1, x1)
                src = (slice(cy0 - ty0, cy1 - ty0), slice(cx0 - tx0, cx1 - tx0))
                dst = (slice(cy0 - y0, cy1 - y0), slice(cx0 - x0, cx1 - x0))
                w = weight[src]
                region = out[(slice(None), *dst)]
                tile_part = data[(slice(None), *src)]
                if best is not None:
                    take = w > best[dst]
                    best[dst] = np.where(take, w, best[dst])
                    np.copyto(region, tile_part, where=take[None])
                    wsum[dst] = np.where(take, 1.0, wsum[dst])
                else:
                    # A few planes at a time: the weighted copy stays small (and in cache).
                    for z0 in range(0, n_z, _PLANES):
                        region[z0 : z0 + _PLANES] += tile_part[z0 : z0 + _PLANES] * w
                    wsum[dst] += w
            if best is None:
                inverse = np.divide(1.0, wsum, out=np.zeros_like(wsum), where=wsum > 0)
                out *= inverse[None]
            empty += int((wsum <= 0).sum())
            write((slice(0, n_z), slice(y0, y1), slice(x0, x1)), out)
            n_blocks += 1
            if on_block is not None:
                on_block((y0, x0, y1, x1))
    return {"blocks": n_blocks, "empty_pixels": empty}
