"""Pairwise registration of neighbouring tiles of a mosaic grid.

Conventions
-----------
Tile positions are the ``(y, x)`` pixel coordinates of a tile's pixel ``(0, 0)`` in the slice frame. The
displacement of a pair ``(a, b)`` is ``d = p_b - p_a``: pixel ``u`` of tile ``a`` shows the same tissue as
pixel ``u - d`` of tile ``b``. Registration works on 2D projections of the tiles (average intensity
projections over depth, "AIP").

Method
------
1. The overlap predicted by the nominal (stage) displacement is cut from both projections (the *strips*),
   band-passed (difference of Gaussians: speckle and illumination/tissue-scale trends removed).
2. Phase correlation of the windowed strips gives the ``n_peaks`` highest peaks; each peak is ambiguous by
   the strip size (circular correlation), so every wrap of it is a candidate shift. Candidates further than
   ``max_shift_px`` from the nominal displacement are rejected.
3. Each candidate is scored by the normalised cross-correlation (NCC) of the band-passed pixels the two
   projections share at that shift; the best ones (up to three within 0.1 of the best NCC) are refined.
4. Sub-pixel refinement (:func:`refine_shift`): Gauss-Newton on the shared pixels, one tile resampled by
   cubic splines, with an intensity model (gain with an optional linear gradient, offset) so that the
   opposite illumination gradients two tiles have in their overlap (vignetting) do not pull the shift. The
   refined candidate whose fit correlates best wins; it comes with an inverse covariance (the pair's weight).
5. A pair whose correlation at the refined shift is below ``min_ncc``, or whose overlap is flat, gives no
   constraint (empty overlaps: agarose, background, missing data).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

__all__ = [
    "PairEstimate",
    "tile_projection",
    "phase_correlation_peaks",
    "upsampled_phase_correlation",
    "overlap_ncc",
    "refine_shift",
    "register_pair",
    "register_grid",
]

_EPS = 1e-12


@dataclass
class PairEstimate:
    """Registration result of two neighbouring tiles.

    Attributes
    ----------
    a, b : (int, int)
        Grid positions ``(ix, iy)`` of the two tiles (``b`` is right of or below ``a``).
    nominal : (float, float)
        Displacement ``(dy, dx)`` in pixels predicted by the stage (or grid) positions.
    shift : (float, float) or None
        Measured displacement ``p_b - p_a`` in pixels; None when the pair gives no constraint.
    ncc : float
        Normalised cross-correlation of the shared pixels at the measured shift (best candidate when
        rejected; NaN when not computed).
    reason : str
        Why the pair was skipped ("" when used).
    candidates : list
        ``[(dy, dx, ncc), ...]`` of the integer candidates that were scored.
    information : ndarray (2, 2) or None
        Inverse covariance of ``shift`` (px^-2): the pair's weight in the placement fits.
    """

    a: tuple[int, int]
    b: tuple[int, int]
    nominal: tuple[float, float]
    shift: tuple[float, float] | None = None
    ncc: float = float("nan")
    reason: str = ""
    candidates: list = field(default_factory=list)
    information: np.ndarray | None = None

    @property
    def used(self) -> bool:
        return self.shift is not None

    @property
    def axis(self) -> str:
        """``"x"`` for left-right neighbours, ``"y"`` for top-bottom ones."""
        return "x" if self.a[1] == self.b[1] else "y"

    def to_dict(self) -> dict:
        return {
            "a": list(self.a), "b": list(self.b), "nominal": [float(v) for v in self.nominal],
            "shift": None if self.shift is None else [float(v) for v in self.shift],
            "ncc": None if not np.isfinite(self.ncc) else float(self.ncc), "reason": self.reason,
            "sigma_px": None if self.information is None else self.sigma_px,
        }

    @property
    def sigma_px(self) -> float:
        """Standard error of the shift (px, RMS over both axes) from :attr:`information`; inf if none."""
        if self.information is None:
            return float("inf")
        try:
            return float(np.sqrt(np.trace(np.linalg.inv(self.information)) / 2))
        except np.linalg.LinAlgError:
            return float("inf")


def tile_projection(tile: np.ndarray, z_range: tuple[int, int] | None = None) -> np.ndarray:
    """Average intensity projection of a ``(z, y, x)`` tile over depth (or over ``z_range``), float32."""
    if z_range is not None:
        tile = tile[z_range[0] : z_range[1]]
    if tile.shape[0] == 0:
        raise ValueError(f"z_range {z_range} selects no depth sample of a tile with {tile.shape} samples")
    return tile.mean(axis=0, dtype=np.float64).astype(np.float32)


def _window(shape: tuple[int, int], kind: str) -> np.ndarray:
    """Separable apodisation window; ``tukey`` keeps the middle half flat (better for narrow strips)."""
    def one(n: int) -> np.ndarray:
        if n < 3 or kind == "none":
            return np.ones(n)
        if kind == "hann":
            return np.hanning(n + 2)[1:-1]
        if kind == "tukey":
            alpha = 0.5
            t = np.linspace(0.0, 1.0, n)
            w = np.ones(n)
            edge = alpha / 2
            lo, hi = t < edge, t > 1 - edge
            w[lo] = 0.5 * (1 + np.cos(np.pi * (2 * t[lo] / alpha - 1)))
            w[hi] = 0.5 * (1 + np.cos(np.pi * (2 * t[hi] / alpha - 2 / alpha + 1)))
            return np.maximum(w, 1e-3)
        raise ValueError(f"window must be 'hann', 'tukey' or 'none', got {kind!r}")

    return np.outer(one(shape[0]), one(shape[1]))


def _cross_power(a: np.ndarray, b: np.ndarray, window: str) -> np.ndarray:
    win = _window(a.shape, window)
    fa = np.fft.fft2((a - a.mean()) * win)
    fb = np.fft.fft2((b - b.mean()) * win)
    cross = fa * np.conj(fb)
    return cross / (np.abs(cross) + _EPS * (np.abs(cross).max() + _EPS))


def phase_correlation_peaks(
    a: np.ndarray, b: np.ndarray, n_peaks: int = 5, window: str = "tukey"
) -> list[tuple[int, int, float]]:
    """The highest peaks of the phase correlation of two same-shaped images.

    Parameters
    ----------
    a, b : ndarray (h, w)
        Images with ``a(u) ~ b(u - s)``.
    n_peaks : int
        Number of peaks returned (local maxima, highest first).
    window : {"tukey", "hann", "none"}
        Apodisation before the FFT.

    Returns
    -------
    list of (int, int, float)
        ``(sy, sx, height)`` with ``0 <= sy < h``, ``0 <= sx < w``; a shift is only known modulo the image
        size (see :func:`_wraps`).
    """
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"phase correlation needs two 2D images of the same shape, got {a.shape} and {b.shape}")
    corr = np.fft.ifft2(_cross_power(a, b, window)).real
    # Local maxima on the torus (the correlation is circular).
    padded = np.pad(corr, 1, mode="wrap")
    is_max = corr >= ndimage.maximum_filter(padded, size=3)[1:-1, 1:-1]
    ys, xs = np.nonzero(is_max)
    order = np.argsort(corr[ys, xs])[::-1][:n_peaks]
    return [(int(ys[i]), int(xs[i]), float(corr[ys[i], xs[i]])) for i in order]


def _wraps(s: int, n: int) -> tuple[int, ...]:
    """Shifts equal to ``s`` modulo ``n`` that a strip of size ``n`` can show: ``s`` and ``s - n``."""
    return (s,) if s == 0 else (s, s - n)


def upsampled_phase_correlation(
    a: np.ndarray, b: np.ndarray, upsample: int = 20, window: str = "tukey", around=(0.0, 0.0)
) -> tuple[float, float]:
    """Sub-pixel shift ``s`` with ``a(u) ~ b(u - s)`` by evaluating the phase correlation on a fine grid.

    The inverse DFT of the cross-power spectrum is evaluated only on a ``3 x 3`` pixel neighbourhood of
    ``around`` sampled every ``1 / upsample`` pixel (matrix products with the DFT kernel, cheap), and the
    maximum is returned. Used to refine the blending offset of a seam (small, near-integer shifts).

    Returns
    -------
    (float, float)
        ``(sy, sx)`` in pixels, in ``around +- 1.5``.
    """
    h, w = a.shape
    cross = _cross_power(a, b, window)
    ky = np.fft.fftfreq(h)  # cycles per pixel
    kx = np.fft.fftfreq(w)
    offsets = np.arange(-1.5 * upsample, 1.5 * upsample + 1) / upsample
    sy = around[0] + offsets
    sx = around[1] + offsets
    ey = np.exp(2j * np.pi * np.outer(sy, ky))  # (n, h)
    ex = np.exp(2j * np.pi * np.outer(kx, sx))  # (w, n)
    surface = (ey @ cross @ ex).real
    iy, ix = np.unravel_index(int(np.argmax(surface)), surface.shape)
    return float(sy[iy]), float(sx[ix])


def _overlap_regions(shape_a, shape_b, d: tuple[int, int]):
    """Index ranges of the pixels tiles ``a`` and ``b`` share at integer displacement ``d`` (None if none)."""
    (ha, wa), (hb, wb) = shape_a, shape_b
    dy, dx = d
    y0, y1 = max(0, dy), min(ha, hb + dy)
    x0, x1 = max(0, dx), min(wa, wb + dx)
    if y1 <= y0 or x1 <= x0:
        return None
    return (slice(y0, y1), slice(x0, x1)), (slice(y0 - dy, y1 - dy), slice(x0 - dx, x1 - dx))


def _ncc(u: np.ndarray, v: np.ndarray) -> float:
    if u.size < 2:
        return 0.0
    u = u.astype(np.float64).ravel() - u.mean()
    v = v.astype(np.float64).ravel() - v.mean()
    den = np.sqrt((u * u).sum() * (v * v).sum())
    return float((u * v).sum() / den) if den > _EPS else 0.0


def overlap_ncc(aip_a: np.ndarray, aip_b: np.ndarray, d: tuple[int, int], min_pixels: int = 16) -> float:
    """NCC of the pixels tiles ``a`` and ``b`` share at integer displacement ``d`` (NaN below ``min_pixels``)."""
    regions = _overlap_regions(aip_a.shape, aip_b.shape, d)
    if regions is None:
        return float("nan")
    ra, rb = regions
    u, v = aip_a[ra], aip_b[rb]
    if u.size < min_pixels:
        return float("nan")
    return _ncc(u, v)


def refine_shift(
    proj_a: np.ndarray, proj_b: np.ndarray, d_int: tuple[int, int], *, gain_gradient: bool = True,
    max_iter: int = 20, tol: float = 1e-3, search_px: float = 1.5,
):
    """Sub-pixel displacement near an integer one, by Gauss-Newton on the shared pixels.

    Minimises ``sum_k sum_u (a_k(u) - G_k(u) b_k(u - d) - c_k)^2`` over the displacement ``d`` shared by
    all bands ``k`` of the projections, with ``b`` resampled by cubic splines and, per band, an intensity
    model: a gain ``G`` (with a linear gradient across the overlap when ``gain_gradient``, so that the
    opposite illumination gradients two tiles have in their overlap - vignetting not corrected - do not pull
    the shift) and an offset ``c``, projected out at each step (variable projection). Only pixels ``u``
    with ``u - d`` inside tile ``b`` are used, so no extrapolated value enters.

    The Jacobian is taken from the central differences of ``a`` rather than of the resampled ``b``: at
    alignment they agree, and ``a``'s noise is independent of ``b``'s, so no product of a tile's noise with
    itself (whose size depends on the sub-pixel part of the shift once resampled) biases the estimate.

    Parameters
    ----------
    proj_a, proj_b : ndarray (h, w) or (k, h, w)
        Projections of the two tiles (one, or one per depth band).
    d_int : (int, int)
        Integer displacement to start from.
    gain_gradient : bool
        Fit a gain varying linearly across the overlap.
    search_px : float
        Largest distance from ``d_int`` (per axis); a refinement leaving it is discarded.

    Returns
    -------
    (dy, dx) : (float, float)
        Refined displacement (``d_int`` itself when the refinement fails).
    ncc : float
        Correlation of ``a`` with ``b`` under the fitted intensity model at the refined shift (the square root
        of the fit's R^2, pooled over bands); the plain NCC when the refinement failed.
    information : ndarray (2, 2) or None
        Inverse covariance of the displacement in px^-2 (None when the refinement failed), the weight of
        the pair in the placement fits.
    """
    stack_a = proj_a[None] if proj_a.ndim == 2 else proj_a
    stack_b = proj_b[None] if proj_b.ndim == 2 else proj_b
    n_bands, ha, wa = stack_a.shape
    _, hb, wb = stack_b.shape
    regions = _overlap_regions((ha, wa), (hb, wb), d_int)
    if regions is None:
        raise ValueError(f"tiles do not overlap at displacement {d_int}")
    (ys, xs), _ = regions
    mean_a, mean_b = stack_a.mean(axis=0), stack_b.mean(axis=0)
    # Central differences of a need both neighbours: leave out a's outermost rows/columns.
    ys = slice(max(ys.start, 1), min(ys.stop, ha - 1))
    xs = slice(max(xs.start, 1), min(xs.stop, wa - 1))
    if ys.stop - ys.start < 2 or xs.stop - xs.start < 2:
        return (float(d_int[0]), float(d_int[1])), overlap_ncc(mean_a, mean_b, d_int), None
    a64 = stack_a.astype(np.float64)
    a_all = a64[:, ys, xs].reshape(n_bands, -1)
    up, down = a64[:, ys.start + 1 : ys.stop + 1, xs], a64[:, ys.start - 1 : ys.stop - 1, xs]
    right, left = a64[:, ys, xs.start + 1 : xs.stop + 1], a64[:, ys, xs.start - 1 : xs.stop - 1]
    day_all = (0.5 * (up - down)).reshape(n_bands, -1)
    dax_all = (0.5 * (right - left)).reshape(n_bands, -1)
    gy, gx = np.mgrid[ys, xs].astype(np.float64)
    gy, gx = gy.ravel(), gx.ravel()
    coeffs = [ndimage.spline_filter(b.astype(np.float64), order=3, mode="mirror") for b in stack_b]
    start = np.asarray(d_int, dtype=np.float64)
    d = start.copy()

    def inside_at(d):
        by, bx = gy - d[0], gx - d[1]
        inside = (by >= 0) & (by <= hb - 1) & (bx >= 0) & (bx <= wb - 1)
        return inside, np.stack([by[inside], bx[inside]])

    def band_terms(k, inside, coords):
        """Projected residual and Jacobian of band k, and the number of intensity parameters."""
        bw = ndimage.map_coordinates(coeffs[k], coords, order=3, mode="mirror", prefilter=False)
        cols = [bw, np.ones_like(bw)]
        if gain_gradient:
            yc = (gy[inside] - gy[inside].mean()) / max(np.ptp(gy[inside]), 1.0)
            xc = (gx[inside] - gx[inside].mean()) / max(np.ptp(gx[inside]), 1.0)
            cols += [bw * yc, bw * xc]
        q, _ = np.linalg.qr(np.stack(cols, axis=-1))
        a = a_all[k, inside]
        resid = a - q @ (q.T @ a)
        jac = np.stack([day_all[k, inside], dax_all[k, inside]], axis=-1)
        return resid, jac - q @ (q.T @ jac), len(cols)

    ok = False
    terms = []
    for _ in range(max_iter):
        inside, coords = inside_at(d)
        if inside.sum() < 16:
            ok = False
            break
        terms = [band_terms(k, inside, coords) for k in range(n_bands)]
        jtj = sum(j.T @ j for _, j, _ in terms)
        jtr = sum(j.T @ r for r, j, _ in terms)
        try:
            delta = -np.linalg.solve(jtj, jtr)
        except np.linalg.LinAlgError:
            ok = False
            break
        d = d + delta
        if np.any(np.abs(d - start) > search_px):
            ok = False
            break
        ok = True  # noisy pairs may creep by less than a thousandth of a pixel per step: accept the last one
        if np.hypot(*delta) < tol:
            break
    if not ok:
        return (float(d_int[0]), float(d_int[1])), overlap_ncc(mean_a, mean_b, d_int), None
    info = sum(_shift_information(j, r, n_int) for r, j, n_int in terms)
    # Correlation of a with b under the fitted intensity model (sqrt of R^2 of the last fit): what the
    # candidate choice compares, insensitive to the tiles' illumination gradients.
    inside, _ = inside_at(d)
    resid = sum(float(r @ r) for r, _, _ in terms)
    total = sum(float(((a_all[k, inside] - a_all[k, inside].mean()) ** 2).sum()) for k in range(n_bands))
    fit_corr = float(np.sqrt(max(0.0, 1.0 - resid / total))) if total > 0 else 0.0
    return (float(d[0]), float(d[1])), fit_corr, info


def _shift_information(jac: np.ndarray, resid: np.ndarray, n_intensity: int) -> np.ndarray:
    """Inverse covariance (px^-2) of a shift found by :func:`refine_shift`.

    ``J`` holds central differences of the noisy tile ``a``, so ``J^T J`` overstates the signal's gradient
    energy by the noise's (``n sigma_a^2 / 2`` per axis, ``sigma_a^2 ~ sigma_r^2 / 2`` when both tiles are
    equally noisy). With ``S = J^T J - noise``, the estimate's covariance is
    ``sigma_r^2 S^-1 (J^T J) S^-1``. An overlap without structure gets ``S ~ 0``: no information.
    """
    n = len(resid)
    dof = max(n - n_intensity - 2, 1)
    var_r = float(resid @ resid) / dof
    if var_r <= 0:
        return np.zeros((2, 2))
    jtj = jac.T @ jac
    signal = jtj - (n * var_r / 4.0) * np.eye(2)
    w, v = np.linalg.eigh(signal)
    signal = (v * np.clip(w, 0.0, None)) @ v.T
    try:
        info = signal @ np.linalg.solve(jtj, signal) / var_r
    except np.linalg.LinAlgError:
        return np.zeros((2, 2))
    return 0.5 * (info + info.T)


_MAX_REFINED = 3  # integer candidates refined per pair
_CANDIDATE_MARGIN = 0.1  # ... when their band-passed NCC is this close to the best one


def _band_pass(image: np.ndarray, sigma: float) -> np.ndarray:
    """Difference of Gaussians (``sigma`` and ``4 sigma``, at least 1 and 4 px), float32."""
    sigma = max(float(sigma), 1.0)
    image = image.astype(np.float32)
    return ndimage.gaussian_filter(image, sigma, mode="nearest") - ndimage.gaussian_filter(image, 4 * sigma,
                                                                                         mode="nearest")


def register_pair(
    aip_a: np.ndarray,
    aip_b: np.ndarray,
    nominal: tuple[float, float],
    *,
    a: tuple[int, int] = (0, 0),
    b: tuple[int, int] = (1, 0),
    n_peaks: int = 5,
    max_shift_px: float = 10.0,
    min_ncc: float = 0.3,
    subpixel: bool = True,
    window: str = "tukey",
    min_overlap_px: int = 4,
    smooth_px: float = 1.0,
) -> PairEstimate:
    """Register two neighbouring tiles from their projections.

    Parameters
    ----------
    aip_a, aip_b : ndarray (h, w)
        Projections of tiles ``a`` and ``b``.
    nominal : (float, float)
        Displacement ``p_b - p_a`` predicted by the stage, ``(dy, dx)`` pixels.
    a, b : (int, int)
        Grid positions, recorded in the result.
    n_peaks : int
        Phase-correlation peaks checked.
    max_shift_px : float
        Candidates further than this from ``nominal`` are rejected.
    min_ncc : float
        A pair whose tiles correlate less at the refined shift (under the fitted intensity model) gives no
        constraint.
    subpixel : bool
        Refine the best integer shift to sub-pixel precision.
    window : {"tukey", "hann", "none"}
        Apodisation of the strips.
    min_overlap_px : int
        Narrowest overlap (pixels across the seam) registered; narrower pairs give no constraint.
    smooth_px : float
        Scale (sigma, pixels, at least 1) of the band-pass (difference of Gaussians ``sigma``, ``4 sigma``)
        applied to the projections for the integer search (peaks and NCC scores). The sub-pixel refinement
        uses the unfiltered projections.

    Returns
    -------
    PairEstimate
    """
    nominal = (float(nominal[0]), float(nominal[1]))
    result = PairEstimate(a=tuple(a), b=tuple(b), nominal=nominal)
    raw_a, raw_b = aip_a, aip_b
    # The integer search works on band-passed projections: speckle (high frequencies) and illumination or
    # tissue-scale trends (low frequencies) removed, the correlation peak is sharp where broad structure
    # alone would leave several shifts almost equally good.
    aip_a = _band_pass(aip_a, smooth_px)
    aip_b = _band_pass(aip_b, smooth_px)
    d0 = (int(round(nominal[0])), int(round(nominal[1])))
    regions = _overlap_regions(aip_a.shape, aip_b.shape, d0)
    if regions is None or min(regions[0][0].stop - regions[0][0].start,
                              regions[0][1].stop - regions[0][1].start) < min_overlap_px:
        result.reason = "no overlap at the nominal position"
        return result
    ra, rb = regions
    raw_strip_a, raw_strip_b = raw_a[ra].astype(np.float64), raw_b[rb].astype(np.float64)
    scale = max(abs(raw_strip_a).mean(), abs(raw_strip_b).mean(), _EPS)
    if min(raw_strip_a.std(), raw_strip_b.std()) <= 1e-6 * scale:
        result.reason = "flat overlap (no structure)"
        return result
    strip_a, strip_b = aip_a[ra].astype(np.float64), aip_b[rb].astype(np.float64)
    h, w = strip_a.shape
    candidates = set()
    for sy, sx, _ in phase_correlation_peaks(strip_a, strip_b, n_peaks, window):
        for wy in _wraps(sy, h):
            for wx in _wraps(sx, w):
                if np.hypot(wy + d0[0] - nominal[0], wx + d0[1] - nominal[1]) <= max_shift_px:
                    candidates.add((d0[0] + wy, d0[1] + wx))
    candidates.add(d0)  # the stage prediction itself is always a candidate
    min_pixels = max(16, (h * w) // 4)
    scored = []
    for cand in sorted(candidates):
        ncc = overlap_ncc(aip_a, aip_b, cand, min_pixels=min_pixels)
        if np.isfinite(ncc):
            scored.append((cand[0], cand[1], ncc))
    result.candidates = scored
    if not scored:
        result.reason = "no candidate shift within max_shift_px"
        return result
    ranked = sorted(scored, key=lambda c: -c[2])
    best = ranked[0]
    if not subpixel:
        shift, ncc, info = (float(best[0]), float(best[1])), overlap_ncc(raw_a, raw_b, best[:2]), None
    else:
        # Near-equal integer peaks: refine each (their basins are a pixel or two wide) and keep the shift the
        # tiles agree best at. On the unsmoothed projections: smoothing near the tile borders (where the
        # overlaps are) would move features asymmetrically in the two tiles and bias the shift.
        tried = []
        for cand in ranked:
            if len(tried) == _MAX_REFINED or cand[2] < best[2] - _CANDIDATE_MARGIN:
                break
            if any(max(abs(cand[0] - t[0][0]), abs(cand[1] - t[0][1])) <= 1 for t in tried):
                continue
            tried.append(((cand[0], cand[1]), refine_shift(raw_a, raw_b, (cand[0], cand[1]))))
        _, (shift, ncc, info) = max(tried, key=lambda t: t[1][1])
    result.ncc = float(ncc)
    if ncc < min_ncc:
        result.reason = f"overlap correlation {ncc:.2f} < min_overlap_ncc {min_ncc}"
        return result
    if info is None:  # integer shift: a quantisation error of 1/sqrt(12) px per axis, weighted by the NCC
        info = np.eye(2) * 12.0 * max(float(ncc), 0.0)
    result.shift = shift
    result.ncc = float(ncc)
    result.information = np.asarray(info, dtype=float)
    return result


def register_grid(
    read_projection, tiles: list[tuple[int, int]], nominal: dict, *, on_tile=None, **options
) -> list[PairEstimate]:
    """Register every pair of grid neighbours (right and lower), reading each tile's projection once.

    Tiles are visited row by row and only the projections of the current and the previous grid row are
    kept, so memory grows with the grid width, not with the number of tiles.

    Parameters
    ----------
    read_projection : callable
        ``read_projection(ix, iy) -> ndarray (h, w)`` (e.g. the AIP of the tile).
    tiles : list of (int, int)
        Present grid positions ``(ix, iy)``.
    nominal : dict
        ``{(ix, iy): array([y_px, x_px])}`` nominal positions.
    on_tile : callable, optional
        Called with ``(ix, iy)`` after each tile (progress, cancellation).
    **options
        Passed to :func:`register_pair`.

    Returns
    -------
    list of PairEstimate
        Pairs ``(left, right)`` and ``(top, bottom)`` of present tiles, in reading order.
    """
    present = set(tiles)
    rows = sorted({t[1] for t in tiles})
    kept: dict[tuple[int, int], np.ndarray] = {}
    pairs: list[PairEstimate] = []
    for iy in rows:
        for ix in sorted(t[0] for t in tiles if t[1] == iy):
            proj = read_projection(ix, iy)
            kept[(ix, iy)] = proj
            for nb in ((ix - 1, iy), (ix, iy - 1)):
                if nb in present and nb in kept:
                    d = np.asarray(nominal[(ix, iy)]) - np.asarray(nominal[nb])
                    pairs.append(register_pair(kept[nb], proj, d, a=nb, b=(ix, iy), **options))
            if on_tile is not None:
                on_tile(ix, iy)
        for t in [t for t in kept if t[1] < iy]:
            del kept[t]
    return pairs
