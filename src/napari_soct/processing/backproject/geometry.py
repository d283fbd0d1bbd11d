"""Geometry of a straightened volume: the path, its arc-length samples, rotation-minimising frames and the
slice rectangles, and the planes used to map source voxels back to straightened coordinates.

Conventions
-----------
* Physical coordinates are ``(z, y, x)`` in the unit of the source image's scale (millimetres for OME-Zarr;
  voxels when the scale is 1).
* Voxel coordinates are ``(z, y, x)`` indices of the source at the sliced resolution level; voxel ``i`` has its
  centre at ``i``.
* A slice rectangle (the ``slice_rects`` of the configuration file) is four corners ``[x, y, z]`` in voxel
  coordinates: top-left, top-right, bottom-right, bottom-left. Pixel ``(row v, column u)`` of an
  ``height x width`` slice lies at ``rect[0] + u / (width - 1) * (rect[1] - rect[0]) + v / (height - 1) *
  (rect[3] - rect[0])`` (the first and last pixel centres are on the corners).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "PathSamples",
    "SliceGeometry",
    "sample_path",
    "rotation_minimising_frames",
    "slice_rects_from_frames",
]


@dataclass
class PathSamples:
    """Points along a path at equal arc-length spacing, with rotation-minimising frames.

    Attributes
    ----------
    points : ndarray (n, 3)
        Physical ``(z, y, x)`` positions.
    tangents, rows, columns : ndarray (n, 3)
        Orthonormal frame per point (physical space): the path direction, the direction of increasing slice
        row (v) and of increasing slice column (u); ``columns = rows x tangents``.
    arc_length : ndarray (n,)
        Arc length from the first point, physical units.
    total_length : float
        Length of the whole path.
    """

    points: np.ndarray
    tangents: np.ndarray
    rows: np.ndarray
    columns: np.ndarray
    arc_length: np.ndarray
    total_length: float


def _clean_points(points) -> np.ndarray:
    points = np.asarray(points, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 3:
        raise ValueError(f"path points must be an (N, 3) array of (z, y, x), got shape {points.shape}")
    if not np.isfinite(points).all():
        raise ValueError("path points contain NaN or infinite values")
    keep = np.ones(len(points), bool)
    keep[1:] = np.linalg.norm(np.diff(points, axis=0), axis=1) > 1e-12
    points = points[keep]
    if len(points) < 2:
        raise ValueError("the path needs at least two distinct points")
    return points


def _fit_spline(points: np.ndarray, smoothing: float):
    """Parametric spline through (or, with smoothing, near) the points; parameter in [0, 1] by chord length."""
    from scipy.interpolate import make_splprep

    degree = min(3, len(points) - 1)
    # The smoothing factor is a bound on the summed squared distances (scipy's ``s``): scale it by the number of
    # points so the parameter reads as a mean squared deviation per point.
    spline, _ = make_splprep(points.T, s=float(smoothing) * len(points), k=degree)
    return spline


def sample_path(points, spacing: float, *, smoothing: float = 0.0, reference_axis=(1.0, 0.0, 0.0)) -> PathSamples:
    """Fit a spline to ordered points and sample it at true arc-length spacing.

    Parameters
    ----------
    points : array-like (N, 3)
        Ordered path points, physical ``(z, y, x)``.
    spacing : float
        Arc length between consecutive samples (physical units).
    smoothing : float
        0 interpolates the points; larger values allow a mean squared deviation of about ``smoothing`` (physical
        units squared) per point.
    reference_axis : (3,) array-like
        The first slice's row direction is this axis made orthogonal to the path (default ``z``, depth, so rows
        of the first slice run down the depth axis); the next frames follow by parallel transport.

    Returns
    -------
    PathSamples
    """
    points = _clean_points(points)
    if not spacing > 0:
        raise ValueError(f"slice spacing must be positive, got {spacing}")
    spline = _fit_spline(points, smoothing)
    derivative = spline.derivative(1)
    # Arc length by Gauss-Legendre quadrature on a fine parameter grid (exact enough to invert to 1e-9).
    n_intervals = max(64, 32 * len(points))
    edges = np.linspace(0.0, 1.0, n_intervals + 1)
    nodes, weights = np.polynomial.legendre.leggauss(8)
    mids, halves = (edges[:-1] + edges[1:]) / 2, (edges[1:] - edges[:-1]) / 2
    params = mids[:, None] + halves[:, None] * nodes[None, :]
    speeds = np.linalg.norm(derivative(params.ravel()).T, axis=1).reshape(params.shape)
    cumulative = np.concatenate([[0.0], np.cumsum((speeds * weights).sum(axis=1) * halves)])
    total = float(cumulative[-1])
    n_samples = int(np.floor(total / spacing + 1e-9)) + 1
    targets = np.arange(n_samples) * spacing
    # Invert s(t): piecewise-linear first guess, then Newton steps on the exact arc length.
    t = np.interp(targets, cumulative, edges)
    for _ in range(4):
        interval = np.clip(np.searchsorted(edges, t, side="right") - 1, 0, n_intervals - 1)
        a = edges[interval]
        sub_nodes = (a[:, None] + t[:, None]) / 2 + (t[:, None] - a[:, None]) / 2 * nodes[None, :]
        sub_speed = np.linalg.norm(derivative(sub_nodes.ravel()).T, axis=1).reshape(sub_nodes.shape)
        s_at_t = cumulative[interval] + (sub_speed * weights).sum(axis=1) * (t - a) / 2
        speed = np.linalg.norm(derivative(t).T, axis=1)
        t = np.clip(t - (s_at_t - targets) / np.maximum(speed, 1e-12), 0.0, 1.0)
    positions = spline(t).T
    tangents = derivative(t).T
    tangents /= np.linalg.norm(tangents, axis=1, keepdims=True)
    rows, columns = rotation_minimising_frames(positions, tangents, reference_axis)
    return PathSamples(positions, tangents, rows, columns, targets, total)


def rotation_minimising_frames(points: np.ndarray, tangents: np.ndarray, reference_axis=(1.0, 0.0, 0.0)):
    """Rotation-minimising frames along sampled points by the double-reflection method.

    Each frame is carried to the next point by reflecting it in the bisector plane of the chord, then in the
    plane that maps the reflected tangent onto the next tangent (Wang, Juettler, Zheng and Liu, ACM TOG 2008).
    The frames twist as little as possible around the path.

    Parameters
    ----------
    points, tangents : ndarray (n, 3)
        Positions and unit tangents.
    reference_axis : (3,)
        The first row vector is this axis made orthogonal to the first tangent (another axis when they are
        nearly parallel).

    Returns
    -------
    rows, columns : ndarray (n, 3)
        Unit vectors orthogonal to the tangents; ``columns = rows x tangents``.
    """
    n = len(points)
    first = np.asarray(tangents[0], float)
    reference = np.asarray(reference_axis, float)
    for candidate in (reference, np.array([0.0, 1.0, 0.0]), np.array([0.0, 0.0, 1.0])):
        candidate = candidate / max(np.linalg.norm(candidate), 1e-300)
        r = candidate - candidate.dot(first) * first
        if np.linalg.norm(r) > 0.1:
            break
    r /= np.linalg.norm(r)
    rows = np.empty((n, 3))
    rows[0] = r
    for i in range(n - 1):
        chord = points[i + 1] - points[i]
        c1 = chord.dot(chord)
        if c1 < 1e-24:
            rows[i + 1] = rows[i]
            continue
        r_left = rows[i] - (2.0 / c1) * chord.dot(rows[i]) * chord
        t_left = tangents[i] - (2.0 / c1) * chord.dot(tangents[i]) * chord
        second = tangents[i + 1] - t_left
        c2 = second.dot(second)
        r_next = r_left - (2.0 / c2) * second.dot(r_left) * second if c2 > 1e-24 else r_left
        # Re-orthogonalise against rounding drift over long paths.
        r_next -= r_next.dot(tangents[i + 1]) * tangents[i + 1]
        rows[i + 1] = r_next / np.linalg.norm(r_next)
    columns = np.cross(rows, tangents)
    return rows, columns


def slice_rects_from_frames(samples: PathSamples, width: int, height: int, pixel_size: float,
                            scale, translate=(0.0, 0.0, 0.0)) -> np.ndarray:
    """Slice rectangles (configuration layout) centred on the path samples.

    Parameters
    ----------
    samples : PathSamples
    width, height : int
        Slice size in pixels (columns, rows).
    pixel_size : float
        Physical distance between neighbouring pixels of a slice.
    scale, translate : (3,)
        Source voxel size and origin, physical ``(z, y, x)``: voxel = (physical - translate) / scale.

    Returns
    -------
    ndarray (n, 4, 3)
        Corners ``[x, y, z]`` in source voxel coordinates: top-left, top-right, bottom-right, bottom-left.
    """
    scale, translate = np.asarray(scale, float), np.asarray(translate, float)
    half_u = (width - 1) / 2 * pixel_size
    half_v = (height - 1) / 2 * pixel_size
    p, r, c = samples.points, samples.rows, samples.columns
    corners_zyx = np.stack([
        p - half_u * c - half_v * r,  # row 0, column 0
        p + half_u * c - half_v * r,  # row 0, last column
        p + half_u * c + half_v * r,  # last row, last column
        p - half_u * c + half_v * r,  # last row, column 0
    ], axis=1)
    voxels_zyx = (corners_zyx - translate) / scale
    return voxels_zyx[..., ::-1].copy()


@dataclass
class SliceGeometry:
    """The slices of a straightened volume as planes in source voxel space (``z, y, x``).

    Built from the ``slice_rects`` of a configuration. Between consecutive slice planes lies a *slab*; two extra
    planes half a slice spacing before the first and after the last slice close the swept region, so a volume
    of ``n`` slices has ``n + 2`` planes and ``n + 1`` slabs.

    Attributes
    ----------
    n_slices, height, width : int
    origins : ndarray (n + 2, 3)
        Voxel position of pixel (0, 0) of each plane.
    row_steps, column_steps : ndarray (n + 2, 3)
        Voxel displacement of one row and one column.
    normals : ndarray (n + 2, 3)
        Unit plane normals, oriented along the path.
    inverse : ndarray (n + 2, 3, 3)
        Maps ``voxel - origin`` to ``(column u, row v, signed distance w)`` per plane.
    slice_of_plane : ndarray (n + 2,)
        Slice coordinate of each plane: ``-0.5, 0, 1, ..., n - 1, n - 0.5``.
    """

    n_slices: int
    height: int
    width: int
    origins: np.ndarray
    row_steps: np.ndarray
    column_steps: np.ndarray
    normals: np.ndarray
    inverse: np.ndarray
    slice_of_plane: np.ndarray

    @classmethod
    def from_rects(cls, rects, height: int, width: int, *, where: str = "slice_rects") -> SliceGeometry:
        """Planes from ``(n, 4, 3)`` corners ``[x, y, z]`` (see the module notes for the layout).

        Raises
        ------
        ValueError
            If the corners are not parallelograms, a slice is degenerate, consecutive slices turn by more
            than 60 degrees, or the sizes do not match; the message names ``where``.
        """
        rects = np.asarray(rects, dtype=np.float64)
        if rects.ndim != 3 or rects.shape[1:] != (4, 3):
            raise ValueError(f"{where}: expected (n, 4, 3) corners [x, y, z], got shape {rects.shape}")
        if len(rects) == 0:
            raise ValueError(f"{where}: no slices")
        if height < 2 or width < 2:
            raise ValueError(f"{where}: slices must be at least 2 x 2 pixels, got {height} x {width}")
        if not np.isfinite(rects).all():
            raise ValueError(f"{where}: corners contain NaN or infinite values")
        zyx = rects[..., ::-1]
        origin = zyx[:, 0]
        column_steps = (zyx[:, 1] - origin) / (width - 1)
        row_steps = (zyx[:, 3] - origin) / (height - 1)
        size = np.linalg.norm(zyx[:, 1] - origin, axis=1) + np.linalg.norm(zyx[:, 3] - origin, axis=1)
        misfit = np.linalg.norm(zyx[:, 2] - (zyx[:, 1] + zyx[:, 3] - origin), axis=1)
        if (misfit > 1e-3 * np.maximum(size, 1.0)).any():
            bad = int(np.argmax(misfit))
            raise ValueError(f"{where}: slice {bad} is not a parallelogram (corner 2 is {misfit[bad]:.3g} voxels "
                             "from corner 1 + corner 3 - corner 0)")
        normals = np.cross(column_steps, row_steps)
        lengths = np.linalg.norm(normals, axis=1)
        if (lengths < 1e-12).any():
            raise ValueError(f"{where}: slice {int(np.argmin(lengths))} is degenerate (zero area)")
        normals /= lengths[:, None]
        n = len(rects)
        centres = origin + column_steps * (width - 1) / 2 + row_steps * (height - 1) / 2
        if n > 1:
            forward = np.diff(centres, axis=0)
            forward = np.concatenate([forward, forward[-1:]])
            flip = np.einsum("ij,ij->i", normals, forward) < 0
            normals[flip] *= -1
            cosines = np.einsum("ij,ij->i", normals[:-1], normals[1:])
            if (cosines < 0.5).any():
                bad = int(np.argmin(cosines))
                raise ValueError(f"{where}: slices {bad} and {bad + 1} turn by "
                                 f"{np.degrees(np.arccos(np.clip(cosines[bad], -1, 1))):.0f} degrees (more than "
                                 "60); sample the path more densely")
            gaps = np.einsum("ij,ij->i", normals, forward)
            half_first, half_last = gaps[0] / 2, gaps[-2] / 2
        else:
            half_first = half_last = 0.25 * (np.linalg.norm(column_steps[0]) + np.linalg.norm(row_steps[0]))
        origins = np.concatenate([origin[:1] - half_first * normals[:1], origin,
                                  origin[-1:] + half_last * normals[-1:]])
        cols = np.concatenate([column_steps[:1], column_steps, column_steps[-1:]])
        rows = np.concatenate([row_steps[:1], row_steps, row_steps[-1:]])
        norms = np.concatenate([normals[:1], normals, normals[-1:]])
        basis = np.stack([cols, rows, norms], axis=2)  # columns of each 3x3: u, v, w directions
        inverse = np.linalg.inv(basis)
        slice_of_plane = np.concatenate([[-0.5], np.arange(n, dtype=float), [n - 0.5]])
        return cls(n, int(height), int(width), origins, rows, cols, norms, inverse, slice_of_plane)

    @property
    def n_slabs(self) -> int:
        return self.n_slices + 1

    def plane_corners(self) -> np.ndarray:
        """Corners of each plane's rectangle grown by half a pixel (the swept region's edge), ``(n + 2, 4, 3)``
        voxel ``(z, y, x)``."""
        o = self.origins - 0.5 * (self.column_steps + self.row_steps)
        du = self.column_steps * self.width
        dv = self.row_steps * self.height
        return np.stack([o, o + du, o + du + dv, o + dv], axis=1)

    def slab_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Bounding boxes of the slabs, ``(lo, hi)`` each ``(n + 1, 3)`` voxel ``(z, y, x)`` (inclusive reals).

        A slab's voxels lie in the hull of its two rectangles when they are parallel; where the planes turn,
        the blended in-plane position bulges past it by a fraction of how far the corners turn, hence the margin.
        """
        corners = self.plane_corners()
        pair = np.concatenate([corners[:-1], corners[1:]], axis=1)
        move = corners[1:] - corners[:-1]
        turn = np.linalg.norm(move - move.mean(axis=1, keepdims=True), axis=2).max(axis=1)
        margin = (0.25 * turn + 1e-6)[:, None]
        return pair.min(axis=1) - margin, pair.max(axis=1) + margin

    def swept_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Integer voxel box ``[lo, hi)`` (``z, y, x``) that contains every voxel the slices can cover."""
        lo, hi = self.slab_bounds()
        return np.ceil(lo.min(axis=0) - 1e-9).astype(np.int64), np.floor(hi.max(axis=0) + 1e-9).astype(np.int64) + 1
