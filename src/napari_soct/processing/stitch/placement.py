"""Tile placement: nominal (stage) positions, the affine stage model fitted to pairwise shifts, and the clamped
per-tile refinement.

Model
-----
Every tile ``k`` of a slice has a nominal position ``n_k`` (from the stage positions recorded in the mosaic
grid, or from the grid index and the overlap). The stage moves by ``A @ (n_k - c)`` instead of ``n_k - c``
(``c``: the centre of the slice's nominal positions), ``A`` a 2x2 matrix holding stage rotation,
non-perpendicularity (shear) and a scale per axis. Neighbours ``i, j`` are then displaced by
``d_ij = A @ (n_j - n_i)``, which the pairwise registration measures: ``A`` is a weighted linear least
squares fit (weights: the pairs' overlap correlation), robust to outlier pairs, per slice or pooled over
the slices of a run. The fit is done in millimetres so that slices with different voxel sizes can be pooled.

Each tile may then move from its model position ``m_k`` towards the pairwise evidence by a residual
``r_k``: minimise ``sum_ij w_ij |r_j - r_i - e_ij|^2 + lam sum_k |r_k|^2`` (``e_ij = d_ij - (m_j - m_i)``;
the Tikhonov term pulls tiles without reliable neighbours to the model), then clamp ``|r_k|`` to
``max_residual_px``.

Vectors are ``(y, x)``; :func:`affine_parameters` reports ``A`` in the stage convention acting on
``(x, y)``, as ``R(rotation) @ [[1, tan(shear)], [0, 1]] @ diag(scale_x, scale_y)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import sparse
from scipy.sparse.linalg import spsolve

from ..io.mosaic import MosaicGrid
from .pairwise import PairEstimate

__all__ = [
    "nominal_positions",
    "AffineFit",
    "fit_stage_affine",
    "affine_parameters",
    "Placement",
    "place_tiles",
    "motor_placement",
]


def nominal_positions(grid: MosaicGrid) -> tuple[dict[tuple[int, int], np.ndarray], str]:
    """Nominal ``(y, x)`` pixel position of every present tile, and where it came from.

    The stage positions recorded in the mosaic grid are used when every present tile has one and they
    agree with the grid (neighbours one step apart in the expected direction, within 50 %); otherwise the
    grid index times the nominal step ``tile_size * (1 - overlap_fraction)``.

    Returns
    -------
    positions : dict
        ``{(ix, iy): array([y_px, x_px])}``.
    source : str
        ``"stage"`` or ``"grid"`` (with the reason when the stage positions were not usable).
    """
    _, ty, tx = grid.tile_shape
    _, vy, vx = grid.voxel_size_um
    tiles = grid.tile_positions()
    step = np.array([ty, tx], dtype=float) * (1.0 - grid.overlap_fraction)
    by_grid = {t: np.array([t[1] * step[0], t[0] * step[1]]) for t in tiles}
    stage = grid.stage_positions_mm
    if not stage or any(t not in stage for t in tiles):
        return by_grid, "grid (no stage position for some tiles)"
    pos = {t: np.array([stage[t][1] * 1e3 / vy, stage[t][0] * 1e3 / vx]) for t in tiles}
    for t in tiles:
        for nb, axis in (((t[0] + 1, t[1]), 1), ((t[0], t[1] + 1), 0)):
            if nb in pos:
                delta = pos[nb] - pos[t]
                if not (0.5 * step[axis] <= delta[axis] <= 1.5 * step[axis]) or abs(delta[1 - axis]) > 0.5 * step[axis]:
                    return by_grid, (f"grid (stage positions of tiles {t} and {nb} are {delta.round(1).tolist()} px "
                                     f"apart, the grid says about {step[axis]:.1f} px along {'yx'[axis]})")
    return pos, "stage"


@dataclass
class AffineFit:
    """The stage affine fitted to pairwise displacements.

    Attributes
    ----------
    matrix : ndarray (2, 2)
        ``A`` acting on ``(y, x)`` millimetre vectors: ``d = A @ n``.
    n_pairs : int
        Pairs used (after outlier rejection).
    n_rejected : int
        Pairs rejected as outliers of the fit.
    rms_px : float
        Weighted RMS of the pairs' residuals against the model, in pixels.
    rejected : list
        ``(slice_id, a, b)`` of the rejected pairs.
    extra_variance_px2 : float
        Variance of the pairs' displacements (px^2) beyond their measurement error that the affine does not
        explain (tile-position errors of the stage); half of it is the prior variance of a tile's residual.
    """

    matrix: np.ndarray
    n_pairs: int
    n_rejected: int
    rms_px: float
    rejected: list = field(default_factory=list)
    extra_variance_px2: float = 0.0

    @property
    def tile_sigma_px(self) -> float:
        """Standard deviation of a tile's position error not explained by the affine (px)."""
        return float(np.sqrt(self.extra_variance_px2 / 2.0))

    def to_dict(self) -> dict:
        return {"matrix_yx": self.matrix.tolist(), "n_pairs": self.n_pairs, "n_rejected": self.n_rejected,
                "rms_px": self.rms_px, "tile_sigma_px": self.tile_sigma_px, **affine_parameters(self.matrix)}


def affine_parameters(matrix_yx: np.ndarray) -> dict:
    """Rotation, shear and scales of a stage affine given on ``(y, x)`` vectors.

    The matrix is converted to ``(x, y)`` and factored as ``R(rotation) @ [[1, tan(shear)], [0, 1]] @
    diag(scale_x, scale_y)`` (QR decomposition with a positive diagonal).

    Returns
    -------
    dict
        ``matrix_xy``, ``rotation_deg``, ``shear_deg``, ``scale_x``, ``scale_y``.
    """
    m = np.asarray(matrix_yx, dtype=float)[::-1, ::-1]  # (x, y) convention
    q, r = np.linalg.qr(m)
    signs = np.sign(np.diag(r))
    signs[signs == 0] = 1
    q, r = q * signs, (r.T * signs).T
    sx, sy = r[0, 0], r[1, 1]
    return {
        "matrix_xy": m.tolist(),
        "rotation_deg": math.degrees(math.atan2(q[1, 0], q[0, 0])),
        "shear_deg": math.degrees(math.atan2(r[0, 1], sy)),
        "scale_x": float(sx),
        "scale_y": float(sy),
    }


def _pair_information(p: PairEstimate) -> np.ndarray:
    """The pair's inverse covariance (px^-2); NCC-weighted unit information when it has none."""
    if p.information is not None and np.all(np.isfinite(p.information)):
        return np.asarray(p.information, dtype=float)
    return np.eye(2) * max(float(p.ncc), 1e-3)


def fit_stage_affine(
    pairs_by_slice: dict, nominal_by_slice: dict, pixel_mm_by_slice: dict, *, outlier_sigma: float = 4.0,
    outlier_px: float = 1.0, iterations: int = 5,
) -> AffineFit:
    """Weighted, outlier-robust least-squares fit of the stage affine to pairwise displacements.

    Each pair weighs with its inverse covariance (:attr:`PairEstimate.information`) plus a common extra
    variance estimated from the residuals (tile-position errors the affine cannot describe, such as
    per-tile jitter), so that neither a few very sharp overlaps nor many blurry ones dominate.

    Parameters
    ----------
    pairs_by_slice : dict
        ``{slice_id: [PairEstimate, ...]}``; pairs without a shift are ignored. Several slices: one pooled
        matrix.
    nominal_by_slice : dict
        ``{slice_id: {(ix, iy): array([y_px, x_px])}}`` (:func:`nominal_positions`).
    pixel_mm_by_slice : dict
        ``{slice_id: (py_mm, px_mm)}``.
    outlier_sigma, outlier_px : float
        A pair is dropped (and the fit repeated) when its residual exceeds ``outlier_sigma`` standard
        errors and ``outlier_px`` pixels.

    Returns
    -------
    AffineFit
        The identity (and ``n_pairs == 0``) when no pair was usable.
    """
    rows = []  # (sid, pair, n_px, d_px, info_px, pixel_mm)
    for sid, pairs in pairs_by_slice.items():
        pix = np.asarray(pixel_mm_by_slice[sid], dtype=float)
        nom = nominal_by_slice[sid]
        for p in pairs:
            if p.shift is None:
                continue
            rows.append((sid, p, nom[p.b] - nom[p.a], np.asarray(p.shift, dtype=float), _pair_information(p), pix))
    if not rows:
        return AffineFit(np.eye(2), 0, 0, float("nan"))
    n_mm = np.array([r[2] * r[5] for r in rows])
    d_mm = np.array([r[3] * r[5] for r in rows])
    pix = np.array([r[5] for r in rows])
    cov_px = np.array([np.linalg.inv(r[4] + 1e-6 * np.eye(2)) for r in rows])
    keep = np.ones(len(rows), bool)
    extra = 0.0  # extra variance (px^2) the affine model does not explain
    matrix = np.eye(2)
    for _ in range(iterations + 1):
        weights = _weights_mm(cov_px, extra, pix)
        matrix = _weighted_affine(n_mm[keep], d_mm[keep], weights[keep])
        resid_px = (d_mm - n_mm @ matrix.T) / pix
        chi2 = np.einsum("ki,kij,kj->k", resid_px, np.linalg.inv(cov_px + extra * np.eye(2)), resid_px)
        extra = _extra_variance(resid_px[keep], cov_px[keep])
        new_keep = ~((chi2 > outlier_sigma**2) & (np.hypot(*resid_px.T) > outlier_px))
        if new_keep.sum() < 2:
            break
        if np.array_equal(new_keep, keep) and _ > 0:
            break
        keep = new_keep
    resid_px = np.hypot(*((d_mm - n_mm @ matrix.T) / pix).T)
    rms = float(np.sqrt(np.mean(resid_px[keep] ** 2))) if keep.any() else float("nan")
    rejected = [(rows[i][0], rows[i][1].a, rows[i][1].b) for i in np.nonzero(~keep)[0]]
    return AffineFit(matrix, int(keep.sum()), int((~keep).sum()), rms, rejected, float(extra))


def _weights_mm(cov_px: np.ndarray, extra_px2: float, pix: np.ndarray) -> np.ndarray:
    """Inverse covariances in mm^-2 of displacements whose pixel covariance is ``cov_px + extra``."""
    cov = cov_px + extra_px2 * np.eye(2)
    cov_mm = cov * pix[:, :, None] * pix[:, None, :]
    return np.linalg.inv(cov_mm)


def _extra_variance(resid_px: np.ndarray, cov_px: np.ndarray) -> float:
    """Common variance ``s2`` (px^2) making the residuals' mean chi-square 2 (moment estimate, >= 0)."""
    if len(resid_px) < 3:
        return 0.0
    lo, hi = 0.0, max(float(np.mean(resid_px**2)) * 4, 1e-6)

    def mean_chi2(s2):
        inv = np.linalg.inv(cov_px + s2 * np.eye(2))
        return float(np.mean(np.einsum("ki,kij,kj->k", resid_px, inv, resid_px)))

    # Four parameters are fitted: aim at the mean chi-square of the residuals' degrees of freedom.
    target = 2.0 * max(len(resid_px) - 2, 1) / len(resid_px)
    if mean_chi2(0.0) <= target:
        return 0.0
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        if mean_chi2(mid) > target:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def _weighted_affine(n: np.ndarray, d: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``A`` minimising ``sum_k (d_k - A n_k)^T W_k (d_k - A n_k)``.

    A vanishing pull to the identity keeps axes that no pair observes at their nominal scale.
    """
    gram = np.zeros((4, 4))
    rhs = np.zeros(4)
    for nk, dk, wk in zip(n, d, w):
        design = np.array([[nk[0], nk[1], 0.0, 0.0], [0.0, 0.0, nk[0], nk[1]]])
        gram += design.T @ wk @ design
        rhs += design.T @ wk @ dk
    prior = 1e-9 * (np.trace(gram) if np.trace(gram) > 0 else 1.0)
    gram += prior * np.eye(4)
    rhs += prior * np.eye(2).ravel()
    return np.linalg.solve(gram, rhs).reshape(2, 2)


@dataclass
class Placement:
    """Final tile positions of one slice.

    Attributes
    ----------
    positions : dict
        ``{(ix, iy): array([y_px, x_px])}`` in the slice's stage pixel frame.
    model_positions : dict
        Positions given by the affine model alone (the nominal ones for motor placement).
    residuals : dict
        ``{(ix, iy): array([ry, rx])}``: final minus model position (after the clamp).
    method : str
        ``"image"`` or ``"motor"``.
    rms_model_px, rms_final_px : float
        RMS over used pairs of ``|d_ij - (p_j - p_i)|`` with the model and with the final positions.
    n_clamped : int
        Tiles whose residual was clamped to ``max_residual_px``.
    affine : AffineFit or None
        The stage affine the model positions come from (None for motor placement).
    """

    positions: dict
    model_positions: dict
    residuals: dict
    method: str
    rms_model_px: float = float("nan")
    rms_final_px: float = float("nan")
    n_clamped: int = 0
    affine: AffineFit | None = None


def motor_placement(nominal: dict) -> Placement:
    """Tiles at their stage (nominal) positions."""
    zero = {t: np.zeros(2) for t in nominal}
    pos = {t: np.asarray(p, dtype=float).copy() for t, p in nominal.items()}
    return Placement(pos, dict(pos), zero, "motor")


def _pair_rms(pairs: list[PairEstimate], positions: dict) -> float:
    """RMS over pairs of ``|d_ij - (p_j - p_i)|`` in pixels."""
    used = [p for p in pairs if p.shift is not None and p.a in positions and p.b in positions]
    if not used:
        return float("nan")
    err = np.array([np.hypot(*(np.asarray(p.shift) - (positions[p.b] - positions[p.a]))) for p in used])
    return float(np.sqrt(np.mean(err**2)))


def place_tiles(
    nominal: dict, pairs: list[PairEstimate], matrix_mm: np.ndarray, pixel_mm: tuple[float, float], *,
    max_residual_px: float = 2.0, tile_sigma_px: float | None = None, excluded: set | None = None,
) -> Placement:
    """Positions of one slice's tiles from the stage affine and the clamped residual refinement.

    Parameters
    ----------
    nominal : dict
        ``{(ix, iy): array([y_px, x_px])}``.
    pairs : list of PairEstimate
        The slice's pairwise results (pairs without a shift, or in ``excluded``, are ignored).
    matrix_mm : ndarray (2, 2)
        Stage affine on ``(y, x)`` millimetre vectors (:func:`fit_stage_affine`).
    pixel_mm : (float, float)
        Pixel size ``(y, x)`` in millimetres.
    max_residual_px : float
        Largest distance a tile may move from its model position (0: the model alone).
    tile_sigma_px : float, optional
        Expected size of a tile's deviation from the model (:attr:`AffineFit.tile_sigma_px`): the Tikhonov
        pull to the model is ``1 / tile_sigma_px^2``, so the residuals are the most probable ones given the
        pairs' covariances. 0: the model alone. Default: a pull equal to the median pair weight.
    excluded : set, optional
        ``(a, b)`` pairs rejected by the affine fit.

    Returns
    -------
    Placement
    """
    tiles = sorted(nominal, key=lambda t: (t[1], t[0]))
    pix = np.asarray(pixel_mm, dtype=float)
    centre = np.mean([nominal[t] for t in tiles], axis=0)
    # The matrix acts on millimetres; in pixels it is diag(1/pix) A diag(pix).
    a_px = (matrix_mm * pix[None, :]) / pix[:, None]
    model = {t: centre + a_px @ (nominal[t] - centre) for t in tiles}
    excluded = excluded or set()
    used = [p for p in pairs if p.shift is not None and (p.a, p.b) not in excluded
            and p.a in model and p.b in model]
    residual = {t: np.zeros(2) for t in tiles}
    n_clamped = 0
    if used and max_residual_px > 0:
        index = {t: i for i, t in enumerate(tiles)}
        n = len(tiles)
        infos = [_pair_information(p) for p in used]
        if tile_sigma_px is None:
            lam = float(np.median([np.trace(w) / 2 for w in infos]))
        else:
            lam = 1.0 / max(tile_sigma_px, 1e-6) ** 2
        # Normal equations of sum (r_b - r_a - e)^T W (r_b - r_a - e) + lam |r|^2, unknowns (ry, rx) per tile.
        rows, cols, vals = [], [], []
        rhs = np.zeros(2 * n)
        for p, w in zip(used, infos):
            ia, ib = index[p.a], index[p.b]
            e = np.asarray(p.shift) - (model[p.b] - model[p.a])
            for i, j, sign in ((ia, ia, 1.0), (ib, ib, 1.0), (ia, ib, -1.0), (ib, ia, -1.0)):
                for u in range(2):
                    for v in range(2):
                        rows.append(2 * i + u)
                        cols.append(2 * j + v)
                        vals.append(sign * w[u, v])
            rhs[2 * ib : 2 * ib + 2] += w @ e
            rhs[2 * ia : 2 * ia + 2] -= w @ e
        normal = sparse.coo_matrix((vals, (rows, cols)), shape=(2 * n, 2 * n)).tocsc()
        normal = normal + lam * sparse.identity(2 * n, format="csc")
        r = spsolve(normal, rhs).reshape(n, 2)
        for t in tiles:
            v = r[index[t]]
            norm = float(np.hypot(*v))
            if norm > max_residual_px:
                v = v * (max_residual_px / norm)
                n_clamped += 1
            residual[t] = v
    positions = {t: model[t] + residual[t] for t in tiles}
    return Placement(
        positions=positions, model_positions=model, residuals=residual, method="image",
        rms_model_px=_pair_rms(used, model), rms_final_px=_pair_rms(used, positions), n_clamped=n_clamped,
    )
