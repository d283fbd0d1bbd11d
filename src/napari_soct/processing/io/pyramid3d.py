"""Multi-resolution 3D OME-Zarr images written in one streaming pass along z.

Levels are given by their voxel size. Level 0 is the input grid; every coarser level ``l`` is an area-weighted
(box) mean of level 0: with ``f = voxel_l / voxel_0`` per axis (``f >= 1``, not necessarily an integer: 25 um
from 10 um is ``f = 2.5``), voxel ``j`` of level ``l`` covers the interval ``[j f, (j + 1) f)`` of level-0
voxels along each axis, and its value is the mean of level 0 over that box, each level-0 voxel weighted by the
fraction of it inside the box. The last voxel along an axis covers what is left of the volume
(``[j f, n)``), so it is the mean of the voxels it covers. Every level is computed from level 0 directly (no
error builds up from level to level). With ``skip_zeros`` (volumes where 0 means "no data", like a stacked
brain's canvas), the mean is over the voxels with data only (weighted the same way): a coarse voxel at the
edge of the data reads the data's value, not a blend with the empty canvas.

Streaming: the caller appends level-0 planes in z order (:meth:`Pyramid3DWriter.append`); each plane is
reduced in x then y for every level (a factor ``f = a / b`` in lowest terms is applied period by period, ``a``
input voxels to ``b`` boxes, as one small matrix product over the axis), and its contribution is added, weighted
by its z overlap, to the few pending planes of each level. A coarse plane is written once complete, and only whole
z-rows of chunks are ever written (never a partial chunk update), so the input is read once whatever the
number of levels and memory holds a few planes per level, not the volume.
"""

from __future__ import annotations

import math
import os
import threading
from fractions import Fraction
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import zarr

from .atomic import output_name
from .omezarr import _multiscales, compressors_for

__all__ = [
    "Pyramid3DWriter",
    "create_ome_zarr_pyramid3d",
    "pyramid_voxel_sizes",
    "parse_resolutions_um",
    "level_shape",
    "area_weights",
    "MIN_POW2_SIDE",
]

#: Power-of-two levels are added while the smallest axis of the level keeps at least this many voxels.
MIN_POW2_SIDE = 32
_TOL = 1e-3  # relative tolerance when comparing voxel sizes
_MAX_PERIOD = 1024  # largest period (input voxels) of a fractional factor reduced by matrix products


def parse_resolutions_um(text: str, name: str = "pyramid_resolutions_um") -> list[float]:
    """Parse ``"10,25,50,100"`` into sorted positive floats (empty text: none)."""
    values = []
    for part in str(text).replace(";", ",").split(","):
        part = part.strip()
        if not part:
            continue
        try:
            value = float(part)
        except ValueError:
            raise ValueError(f"parameter '{name}': {part!r} is not a number (give e.g. '10,25,50,100')") from None
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"parameter '{name}': resolutions must be positive, got {part!r}")
        values.append(value)
    return sorted(set(values))


def level_shape(shape, factors) -> tuple[int, ...]:
    """Shape of a level whose voxels are ``factors`` level-0 voxels wide (the last voxel may be partial)."""
    return tuple(max(1, math.ceil(n / f - 1e-9)) for n, f in zip(shape, factors))


def pyramid_voxel_sizes(base_um, shape, resolutions_um=(), min_side: int = MIN_POW2_SIDE) -> list[tuple[float, ...]]:
    """Voxel sizes (um, per axis) of the levels: level 0, power-of-two levels, isotropic analysis resolutions.

    An analysis resolution ``r`` (isotropic ``(r, r, r)``) is added when it is at least the largest base voxel
    size; power-of-two levels ``base * 2**j`` (all axes) are added while the level keeps at least ``min_side``
    voxels along its smallest axis, unless one would break the order (possible only for anisotropic base voxels)
    or equals a level already there (within 0.1 %). The list goes from fine to coarse, every level at least as
    coarse as the one before along every axis, so the shapes decrease along every axis.
    """
    base = tuple(float(b) for b in base_um)

    def same(a, b):
        return all(abs(x - y) <= _TOL * y for x, y in zip(a, b))

    def coarser_or_equal(a, b):  # a at least as coarse as b along every axis
        return all(x >= y * (1 - _TOL) for x, y in zip(a, b))

    # The analysis resolutions are asked for: they always stay. Power-of-two levels fill in where they keep the
    # order (every axis coarser than the level before and finer than the one after).
    levels = [base]
    for r in sorted(resolutions_um):
        v = tuple(float(r) for _ in base)
        if coarser_or_equal(v, base) and not any(same(v, w) for w in levels):
            levels.append(v)
    j = 1
    while min(n / 2**j for n in shape) >= min_side and j <= 8:
        v = tuple(b * 2**j for b in base)
        j += 1
        if any(same(v, w) for w in levels):
            continue
        finer = [w for w in levels if coarser_or_equal(v, w)]
        coarser = [w for w in levels if not coarser_or_equal(v, w)]
        if len(finer) + len(coarser) == len(levels) and all(coarser_or_equal(w, v) for w in coarser):
            levels = finer + [v] + coarser
    return levels


def area_weights(n_in: int, factor: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Box edges of a level along one axis: ``(index, fraction, length)``.

    Edge ``e_j = min(j * factor, n_in)`` for ``j = 0 .. n_out`` is written ``index[j] + fraction[j]`` with
    ``index <= n_in - 1`` (so that ``C[index + 1]`` exists for a cumulative sum ``C`` of length ``n_in + 1``);
    ``length[j] = e_{j+1} - e_j``.
    """
    n_out = max(1, math.ceil(n_in / factor - 1e-9))
    edges = np.minimum(np.arange(n_out + 1, dtype=np.float64) * factor, float(n_in))
    edges[-1] = float(n_in)
    index = np.minimum(np.floor(edges).astype(np.intp), n_in - 1)
    fraction = edges - index
    return index, fraction, np.diff(edges)


def _gather(cumulative: np.ndarray, index: np.ndarray, fraction: np.ndarray, axis: int) -> np.ndarray:
    """Linear interpolation of a cumulative sum at fractional edges, then the sums between edges."""
    lo = np.take(cumulative, index, axis=axis)
    hi = np.take(cumulative, index + 1, axis=axis)
    shape = [1] * cumulative.ndim
    shape[axis] = -1
    at_edges = lo + fraction.reshape(shape) * (hi - lo)
    return np.diff(at_edges, axis=axis)


class _AxisReducer:
    """Box sums along one axis for a factor ``f``.

    When ``f = a / b`` exactly (small integers), the axis is cut into periods of ``a`` input voxels holding ``b``
    output boxes, and each period is reduced by one small ``(a, b)`` weight matrix (the overlaps of the input
    voxels with the boxes): one matrix product over the whole axis, a separate one for the last partial period.
    Otherwise (no such fraction) a float64 cumulative sum is interpolated at the box edges.
    """

    def __init__(self, n_in: int, factor: float):
        self.n_in = n_in
        self.index, self.fraction, self.length = area_weights(n_in, factor)
        self.n_out = len(self.length)
        ratio = Fraction(factor).limit_denominator(_MAX_PERIOD)
        self.period = None
        self._scratch = threading.local()
        if ratio.numerator <= _MAX_PERIOD and abs(float(ratio) - factor) <= 1e-9 * factor:
            a, b = ratio.numerator, ratio.denominator
            k = np.arange(a, dtype=np.float64)[:, None]
            q = np.arange(b, dtype=np.float64)[None, :]
            overlap = np.minimum(k + 1, (q + 1) * factor) - np.maximum(k, q * factor)
            self.weights = np.clip(overlap, 0.0, None).astype(np.float32)
            self.period = (a, b)

    def sums(self, array: np.ndarray, axis: int) -> np.ndarray:
        """Box sums of a 2D ``array`` along ``axis`` (0 or 1), float32."""
        if self.period is None:
            shape = list(array.shape)
            shape[axis] += 1
            cum = np.zeros(shape, np.float64)
            np.cumsum(array, axis=axis, out=cum[1:] if axis == 0 else cum[:, 1:])
            return _gather(cum, self.index, self.fraction, axis).astype(np.float32)
        a, b = self.period
        m = self.n_in // a
        rest = self.n_in - m * a
        if axis == 1:  # the x pass: its (large) output is scratch of this thread, reused plane after plane
            out = getattr(self._scratch, "x", None)
            if out is None or out.shape != (array.shape[0], self.n_out):
                out = self._scratch.x = np.empty((array.shape[0], self.n_out), np.float32)
            if m:
                np.matmul(array[:, :m * a].reshape(array.shape[0], m, a), self.weights,
                          out=out[:, :m * b].reshape(array.shape[0], m, b))
            if rest:
                out[:, m * b:] = (array[:, m * a:] @ self.weights[:rest])[:, :self.n_out - m * b]
        else:
            out = np.empty((self.n_out, array.shape[1]), np.float32)
            if m:
                main = self.weights.T @ array[:m * a].reshape(m, a, array.shape[1])
                out[:m * b] = main.reshape(m * b, array.shape[1])[:self.n_out]
            if rest:
                out[m * b:] = (self.weights[:rest].T @ array[m * a:])[:self.n_out - m * b]
        return out


class _Level:
    """Bookkeeping of one coarse level: box sums in y/x, pending z planes, planes waiting for a whole chunk row."""

    def __init__(self, array, factors, shape0, skip_zeros: bool = False):
        self.array = array
        self.skip_zeros = skip_zeros
        self.factors = factors
        self.fz = float(factors[0])
        self.nz0 = shape0[0]
        self.y = _AxisReducer(shape0[1], factors[1])
        self.x = _AxisReducer(shape0[2], factors[2])
        self.area = np.outer(self.y.length, self.x.length).astype(np.float32)
        self.chunk_z = array.chunks[0]
        self.pending: dict[int, np.ndarray] = {}  # output plane -> float64 weighted sum over z
        self.free: list[np.ndarray] = []  # accumulators to reuse
        self.scratch: np.ndarray | None = None
        self.row: np.ndarray | None = None  # finished planes of the current z-row of chunks
        self.n_ready = 0
        self.ready_start = 0  # output plane of row[0]

    def reduce_yx(self, plane: np.ndarray) -> np.ndarray:
        """Box means in y and x of one level-0 plane (float32); with ``skip_zeros``, the box sums of the plane
        and of its data mask, stacked ``(2, y, x)`` (their ratio, after z, is the mean over data)."""
        sums = self.y.sums(self.x.sums(plane, axis=1), axis=0)
        if self.skip_zeros:
            covered = self.y.sums(self.x.sums((plane != 0).astype(np.float32), axis=1), axis=0)
            return np.stack([sums, covered])
        sums /= self.area
        return sums

    def add(self, z: int, plane_mean: np.ndarray) -> None:
        """Add level-0 plane ``z`` (already reduced in y/x) to the output planes it overlaps; finish complete ones.

        Accumulators and the row of finished planes are reused (fresh large buffers cost page faults)."""
        f = self.fz
        j = int(math.floor(z / f))
        while j * f < z + 1:
            weight = min(z + 1.0, (j + 1) * f) - max(float(z), j * f)
            if weight > 1e-12:
                acc = self.pending.get(j)
                if acc is None:
                    acc = self.free.pop() if self.free else np.empty(plane_mean.shape, np.float64)
                    np.multiply(plane_mean, weight, out=acc)
                    self.pending[j] = acc
                else:
                    if self.scratch is None:
                        self.scratch = np.empty(plane_mean.shape, np.float64)
                    np.multiply(plane_mean, weight, out=self.scratch)
                    acc += self.scratch
            j += 1
        for j in sorted(self.pending):
            end = min((j + 1) * f, float(self.nz0))
            if end > z + 1 + 1e-9:
                break
            acc = self.pending.pop(j)
            if self.row is None:
                self.row = np.empty((self.chunk_z, *acc.shape[-2:]), np.float32)
            if self.skip_zeros:
                values, covered = acc
                # A box whose data covers less than a millionth of a level-0 voxel counts as empty.
                with np.errstate(invalid="ignore", divide="ignore"):  # buffered casting divides masked ones too
                    np.divide(values, covered, out=self.row[self.n_ready], where=covered > 1e-6, casting="same_kind")
                self.row[self.n_ready][covered <= 1e-6] = 0
            else:
                np.divide(acc, end - j * f, out=self.row[self.n_ready], casting="same_kind")
            self.free.append(acc)
            self.n_ready += 1
            if self.n_ready == self.chunk_z:
                self.flush()

    def flush(self, final: bool = False) -> None:
        """Write the row of finished planes when it is a whole z-row of chunks (or whatever is left, at the end)."""
        if self.n_ready and (self.n_ready == self.chunk_z or final):
            self.array[self.ready_start:self.ready_start + self.n_ready] = self.row[:self.n_ready]
            self.ready_start += self.n_ready
            self.n_ready = 0


class Pyramid3DWriter:
    """Streams level-0 planes of a 3D volume into every level of a multiscale OME-Zarr in one pass.

    Append ``(nz, Y, X)`` blocks in z order with :meth:`append`, then call :meth:`close`. Level-0 blocks that
    start and end on chunk boundaries of level 0 (or at the end of the volume) are written straight through;
    others are buffered until a whole z-row of chunks is complete.

    Parameters
    ----------
    arrays : list of zarr.Array
        The levels, finest first.
    factors : list of tuple of float
        Per level, its voxel size over level 0's along ``(z, y, x)``.
    threads : int
        Threads reducing planes in y/x (numpy releases the GIL).
    skip_zeros : bool
        0 means "no data": coarse voxels are means over the voxels with data only.
    """

    def __init__(self, arrays, factors, threads: int = 1, skip_zeros: bool = False):
        self.arrays = arrays
        self.factors = [tuple(float(f) for f in fs) for fs in factors]
        self.shape = tuple(arrays[0].shape)
        self.threads = max(1, int(threads))
        self.skip_zeros = bool(skip_zeros)
        self.levels = [_Level(a, f, self.shape, self.skip_zeros) for a, f in zip(arrays[1:], self.factors[1:])]
        self._z = 0  # next level-0 plane expected
        self._buffer: list[np.ndarray] = []  # level-0 planes waiting for a whole chunk row
        self._buffer_start = 0
        self._chunk_z = arrays[0].chunks[0]

    @property
    def n_levels(self) -> int:
        return len(self.arrays)

    @staticmethod
    def persistent_bytes(plane_shape, factors, chunk_z: list[int], skip_zeros: bool = False) -> int:
        """Bytes the writer keeps between appends: per coarse level two pending float64 planes, two to reuse and a
        scratch one (two of each with ``skip_zeros``: values and data mask), and one z-row of chunks of
        finished planes (float32)."""
        ny, nx = plane_shape
        total = 0
        planes = 2 if skip_zeros else 1
        for cz, (_, fy, fx) in zip(chunk_z[1:], factors[1:]):
            level_plane = math.ceil(ny / fy) * math.ceil(nx / fx)
            total += planes * 4 * 8 * level_plane + 4 * cz * level_plane
        return int(total)

    @staticmethod
    def append_bytes(plane_shape, factors, threads: int, block_planes: int, skip_zeros: bool = False) -> int:
        """Bytes an :meth:`append` of ``block_planes`` planes adds while it runs (besides the block): per thread
        a level's x sums, its matrix-product temporary and its y sums (float32; a float64 cumulative sum of the
        plane for a factor that is no small fraction; with ``skip_zeros`` the plane's data mask too); the
        reduced planes of the block (float32; twice with ``skip_zeros``)."""
        ny, nx = plane_shape
        widths = [math.ceil(nx / fx) for _, _, fx in factors[1:]]
        per_thread = 4 * 3 * ny * max(widths, default=0)
        if any(_AxisReducer(2, f).period is None for _, fy, fx in factors[1:] for f in (fy, fx)):
            per_thread += 8 * 3 * (ny + 1) * (nx + 1)
        reduced = sum(4 * math.ceil(ny / fy) * math.ceil(nx / fx) for _, fy, fx in factors[1:])
        if skip_zeros:
            per_thread += 4 * ny * nx
            reduced *= 2
        return int(threads * per_thread + block_planes * reduced)

    def _reduce(self, plane: np.ndarray) -> list[np.ndarray]:
        """One level-0 plane reduced in y and x for every level."""
        plane = np.asarray(plane, dtype=np.float32)
        return [level.reduce_yx(plane) for level in self.levels]

    def append(self, block: np.ndarray) -> None:
        """Write the next ``block.shape[0]`` planes of level 0 (and their share of every coarser level)."""
        block = np.asarray(block)
        if block.ndim != 3 or block.shape[1:] != self.shape[1:]:
            raise ValueError(f"block of shape {block.shape} does not match planes of shape {self.shape[1:]}")
        z0, nz = self._z, block.shape[0]
        if z0 + nz > self.shape[0]:
            raise ValueError(f"planes {z0}..{z0 + nz} exceed the volume's {self.shape[0]} planes")
        self._write_level0(z0, block)
        if self.levels:
            if self.threads > 1 and nz > 1:
                with ThreadPoolExecutor(self.threads, thread_name_prefix="soct-pyramid") as pool:
                    reduced = list(pool.map(self._reduce, block))
            else:
                reduced = [self._reduce(p) for p in block]
            for i, per_level in enumerate(reduced):
                for level, plane in zip(self.levels, per_level):
                    level.add(z0 + i, plane)
                reduced[i] = None  # free as we go
            for level in self.levels:
                level.flush()
        self._z += nz

    def _write_level0(self, z0: int, block: np.ndarray) -> None:
        arr, cz = self.arrays[0], self._chunk_z
        end = z0 + block.shape[0]
        if not self._buffer and z0 % cz == 0 and (end % cz == 0 or end == self.shape[0]):
            arr[z0:end] = block
            return
        if not self._buffer:
            self._buffer_start = z0
        self._buffer.extend(np.array(p, dtype=arr.dtype) for p in block)
        self._flush_level0(final=end == self.shape[0])

    def _flush_level0(self, final: bool = False) -> None:
        arr, cz = self.arrays[0], self._chunk_z
        while self._buffer:
            n = cz - self._buffer_start % cz
            if len(self._buffer) < n and not final:
                return
            n = min(n, len(self._buffer))
            arr[self._buffer_start:self._buffer_start + n] = np.stack(self._buffer[:n])
            del self._buffer[:n]
            self._buffer_start += n

    def close(self) -> None:
        """Check that every plane was given and write what is still buffered."""
        if self._z != self.shape[0]:
            raise ValueError(f"only {self._z} of {self.shape[0]} planes were written")
        self._flush_level0(final=True)
        for level in self.levels:
            if level.pending:
                raise RuntimeError(f"level with factors {level.factors}: planes {sorted(level.pending)} unfinished")
            level.flush(final=True)


def create_ome_zarr_pyramid3d(
    path: str | os.PathLike,
    shape: tuple[int, int, int],
    voxel_sizes_um: list[tuple[float, float, float]],
    *,
    chunks: tuple[int, int, int],
    dtype=np.float32,
    compression: str = "blosc-lz4",
    name: str | None = None,
    attributes: dict | None = None,
    threads: int = 1,
    skip_zeros: bool = False,
) -> Pyramid3DWriter:
    """Create a multiscale NGFF 0.5 ``(z, y, x)`` image with one level per voxel size and return its writer.

    Parameters
    ----------
    shape : tuple of int
        Level-0 shape.
    voxel_sizes_um : list of tuple of float
        Voxel size of each level in micrometres, finest (level 0) first, each at least as coarse as level 0
        along every axis (see :func:`pyramid_voxel_sizes`). Scales are stored in millimetres.
    chunks : tuple of int
        Chunk shape (clipped to each level's shape).
    threads : int
        Threads used by the writer to reduce planes.
    skip_zeros : bool
        0 means "no data": coarse voxels are means over the voxels with data (see the module docstring).
    """
    path = Path(path)
    base = voxel_sizes_um[0]
    factors = []
    for v in voxel_sizes_um:
        f = tuple(a / b for a, b in zip(v, base))
        if any(x < 1 - 1e-9 for x in f):
            raise ValueError(f"level voxel size {v} um is finer than level 0 ({base} um)")
        factors.append(f)
    shapes = [level_shape(shape, f) for f in factors]
    scales = [tuple(a * 1e-3 for a in v) for v in voxel_sizes_um]
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    multiscale = _multiscales(name or output_name(path), scales, ("z", "y", "x"))
    attrs = {"ome": {"version": "0.5", "multiscales": [multiscale]}}
    attrs.update(attributes or {})
    group.attrs.update(attrs)
    arrays = [
        group.create_array(
            str(k), shape=s, chunks=tuple(min(c, n) for c, n in zip(chunks, s)), dtype=dtype,
            compressors=compressors_for(compression), fill_value=0, dimension_names=["z", "y", "x"],
        )
        for k, s in enumerate(shapes)
    ]
    return Pyramid3DWriter(arrays, factors, threads=threads, skip_zeros=skip_zeros)
