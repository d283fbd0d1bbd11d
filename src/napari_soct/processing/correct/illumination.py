"""Illumination (flat-field) correction with our own implementation of BaSiC (step 3 of the reconstruction).

Model
-----
BaSiC (Peng et al. 2017, *Nat. Commun.* 8:14836) explains a stack of ``n`` images of the same optics as

    D_i(r) = b_i F(r) + k + E_i(r),

a rank-one part (flat-field ``F`` times a per-image baseline ``b_i``), an optional dark offset ``k`` and a
sparse residual ``E`` (the content that does not follow the shading). With the data scaled to mean 1 it solves

    min  lam_F ||C(F)||_1 + (1/n) sum_i ||w_i * E_i||_1     s.t.  D_i = b_i F + k + E_i,

where ``C`` is the orthonormal 2-D DCT-II: an L1 penalty on DCT coefficients favours flat-fields made of a few
smooth cosines. The constrained problem is solved by an inexact augmented Lagrangian (ADMM) on images
downsampled to ``working_size``: with the scaled multiplier ``U`` and a penalty ``mu`` that starts at
``12.5 / ||D||_2`` and grows by 1.5 per iteration, each iteration

- shrinks the residual: ``E = S_{w/mu}(D - bF - k + U)`` (soft threshold);
- fits the baselines by least squares ``b_i = <F, D_i - k - E_i + U_i> / <F, F>`` (kept >= 0, mean 1: the
  rank-one model's scale goes into the flat-field's level);
- with ``get_darkfield``, estimates ``k`` as the paper does, from the straight line that the images' means
  over the flat-field's bright half make against their means over its dark half (slope ``F_in / F_out``,
  intercept ``k (1 - slope)``), clipped to ``[0, darkest pixel]``;
- takes a proximal gradient step for ``F`` in the DCT domain, ``F = C^-1 S_{lam_F/mu}(C(F + mean_i(D_i - b_i F -
  k - E_i + U_i)))``, the DC coefficient (the level, fixed by ``mean(b) = 1``) left unshrunk;
- updates ``U += D - bF - k - E``, until ``||D - bF - k - E|| / ||D|| < tolerance``.

Reweighting (the paper's): after each solve the weights become ``w = 1 / (|E_i| / mean(b_i F + k) + epsilon)``
(normalised to mean 1), which lowers the cost of pixels that clearly are content, and the solve is repeated
until the flat-field changes by less than ``reweight_tolerance`` (mean absolute relative change).

The automatic smoothness is the paper's rule ``lam_F = sum|C(mean image)| / 400 * 0.5`` (what basicpy uses),
but never below five times the noise level of the mean image (the median absolute DCT coefficient of its
upper frequencies / 0.6745): the paper's constant was set for 128 x 128 working images, and for smaller
ones (e.g. 40 x 40 tiles) its threshold falls below the noise, which then stays in the flat-field.

Our choices beyond the paper: the dark-field is one constant per stack (the additive noise floor of OCT),
not a spatially varying image; the images are low-pass filtered before downsampling (Gaussian of half the
downsampling factor, then the area average), which keeps speckle from aliasing into the working images; the
ADMM runs on many depth planes at once (arrays ``(planes, n, h, w)`` with per-plane penalty, thresholds and
convergence; planes that have converged are frozen, so a plane's result does not depend on its batch); a
plane can be warm-started from the previous plane's flat-field and weights; the flat-field found at working
size is brought back to the tile size by evaluating its DCT series at the tile's pixel centres (a smooth,
exact interpolation of the fitted cosines). CuPy is used when it is installed and a GPU is present
(``backend="auto"``); numpy/scipy on the CPU is the reference.

Correction of a slice
---------------------
:func:`correct_illumination` estimates one flat-field (and dark offset) per depth plane from all tiles of the
slice, as the lab pipeline does, and writes ``(tile - darkfield) / flatfield`` in the same mosaic layout.
``plane_step = n`` fits every n-th plane only (and the last) and interpolates linearly in between. The fitted
planes form groups of about ``planes_per_task`` (64), each warm-started on its own (the first plane of a group
starts cold): on a dask worker the groups of a slice are sub-tasks, so a cluster's idle workers share a slice.
The groups follow from the parameters only; one thread or a cluster writes the same bytes.

Memory: the estimation reads the tiles z-block by z-block and keeps them only at working size (``n_tiles x
z_block x h x w`` float32, ``z_block`` chosen from ``memory_budget_gb``); the correction then streams tile by
tile, each tile written as one whole chunk. Peak memory per slice is about
``max(z_block * P + batch * 14 * P + 3 tiles, 5 tiles) + 2 nz h w * 4`` bytes with ``P = n_tiles * h * w * 4``
(one plane of all tiles at working size): it grows with the number of tiles only through ``P``, and the
least it needs is about ``15 P + 3 tiles``. The flat-fields at tile size (one tile's worth) are written as
``slice_z{NN}_illumination_flatfield.npy`` next to the output (the divided field, values below 0.05 clamped).
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import scipy.fft
import zarr
from scipy.ndimage import gaussian_filter1d

from ..io.atomic import atomic_output
from ..io.mosaic import create_mosaic_grid_like, open_mosaic_grid
from ..io.omezarr import COMPRESSION_CHOICES
from ..params import param
from ..slices import (SUBTASK_PRIORITY, SliceRunParams, SliceStepResult, current_dask_worker, find_slice_files,
                      map_subtasks, run_slice_step, slice_output_name)

__all__ = [
    "BACKEND_CHOICES",
    "BasicFit",
    "IlluminationParams",
    "basic_fit",
    "correct_illumination",
    "flatfield_path_for",
]

BACKEND_CHOICES = ("auto", "numpy", "basicpy")
STEP_NAME = "illumination"
GIB = 1024**3
_F32 = 4  # bytes

# ADMM constants of the paper: initial penalty mu0 = 12.5 / ||D||_2, growth 1.5 per iteration, capped at
# 1e7 * mu0; reweighting epsilon 0.1; the dark-field smoothness defaults to a tenth of the flat-field's.
_MU_COEF = 12.5
_RHO = 1.5
_MAX_MU_RATIO = 1e7
_DARK_SMOOTHNESS_RATIO = 0.1
# The automatic flat-field threshold is at least this many times the mean image's noise level.
_NOISE_THRESHOLDS = 5.0
# Flat-field values below this are treated as this when dividing (a guard against a failed estimate).
_MIN_FLATFIELD = 0.05
# Planes solved together: enough elements per ADMM array operation to amortise numpy's per-call cost.
_BATCH_ELEMENTS = 1 << 16


# ============================================================================ array backends


class _Backend:
    """numpy/scipy or CuPy: the array module, the DCT pair and transfers to host memory."""

    def __init__(self, name: str):
        self.name = name
        if name == "cupy":
            import cupy
            import cupyx.scipy.fft as cufft

            self.xp = cupy
            self._fft = cufft
        else:
            self.xp = np
            self._fft = scipy.fft

    def dct2(self, a):
        return self._fft.dctn(a, type=2, axes=(-2, -1), norm="ortho")

    def idct2(self, a):
        return self._fft.idctn(a, type=2, axes=(-2, -1), norm="ortho")

    def asarray(self, a):
        return self.xp.asarray(a, dtype=np.float32)

    def to_host(self, a) -> np.ndarray:
        return a.get() if self.name == "cupy" else np.asarray(a)


def _cupy_usable() -> bool:
    try:
        import cupy
        import cupyx.scipy.fft  # noqa: F401

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # no CuPy, no driver, no device: the CPU path is the reference
        return False


def _array_backend(backend: str) -> _Backend:
    if backend not in BACKEND_CHOICES:
        raise ValueError(f"backend must be one of {', '.join(BACKEND_CHOICES)}, got {backend!r}")
    if backend == "auto" and _cupy_usable():
        return _Backend("cupy")
    return _Backend("numpy")


def _import_basicpy():
    try:
        from basicpy import BaSiC
    except ImportError as err:
        raise ImportError(
            "backend='basicpy' needs the basicpy package, which is not installed in this environment "
            "(basicpy caps scipy below 1.13, so it is not a dependency of napari-soct; use backend='auto' or "
            f"'numpy' for our own implementation): {err}"
        ) from None
    return BaSiC


# ============================================================================ resampling


def _area_matrix(n_out: int, n_in: int) -> np.ndarray:
    """``(n_out, n_in)`` matrix averaging the input pixels each output pixel covers (fractional overlaps)."""
    edges_in = np.arange(n_in + 1) / n_in
    edges_out = np.arange(n_out + 1) / n_out
    low = np.maximum(edges_out[:-1, None], edges_in[None, :-1])
    high = np.minimum(edges_out[1:, None], edges_in[None, 1:])
    weight = np.clip(high - low, 0.0, None)
    return (weight / weight.sum(axis=1, keepdims=True)).astype(np.float32)


def _downsampling_matrix(n_out: int, n_in: int) -> np.ndarray:
    """Anti-aliased downsampling ``(n_out, n_in)``: a Gaussian of sigma = factor / 2 input pixels (the usual
    pyramid rule), then the area average. Without the Gaussian, speckle aliases into the working images and
    the L1 fit of the flat-field gets noisier (bench phantom: correlation with the truth about 0.97 -> 0.985)."""
    factor = n_in / n_out
    smoothing = gaussian_filter1d(np.eye(n_in, dtype=np.float64), 0.5 * factor, axis=0, mode="nearest")
    return (_area_matrix(n_out, n_in).astype(np.float64) @ smoothing).astype(np.float32)


def _dct_synthesis_matrix(n_out: int, n_work: int) -> np.ndarray:
    """``(n_out, n_work)`` matrix evaluating an orthonormal DCT-II series of ``n_work`` coefficients at
    ``n_out`` pixel centres spanning the same field of view (the identity transform when equal)."""
    k = np.arange(n_work)
    u = (np.arange(n_out) + 0.5) / n_out
    norm = np.where(k == 0, math.sqrt(1.0 / n_work), math.sqrt(2.0 / n_work))
    return (np.cos(np.pi * u[:, None] * k[None, :]) * norm[None, :]).astype(np.float32)


class _Resampler:
    """Down to working size (Gaussian low-pass and area average) and back up (DCT series), for one tile shape."""

    def __init__(self, shape: tuple[int, int], working_size: int | None):
        ty, tx = shape
        if working_size is None or working_size <= 0:
            working_size = max(ty, tx)
        self.shape = (ty, tx)
        self.work_shape = (min(ty, working_size), min(tx, working_size))
        wy, wx = self.work_shape
        self.down_y = None if wy == ty else _downsampling_matrix(wy, ty)
        self.down_x = None if wx == tx else _downsampling_matrix(wx, tx).T.copy()
        self.up_y = _dct_synthesis_matrix(ty, wy)
        self.up_x = _dct_synthesis_matrix(tx, wx).T.copy()

    def down(self, images: np.ndarray) -> np.ndarray:
        """``(..., ty, tx)`` -> ``(..., wy, wx)`` float32."""
        out = np.asarray(images, dtype=np.float32)
        if self.down_y is not None:
            out = np.matmul(self.down_y, out)
        if self.down_x is not None:
            out = np.matmul(out, self.down_x)
        return out

    def up(self, fields: np.ndarray) -> np.ndarray:
        """``(..., wy, wx)`` fields at working size -> ``(..., ty, tx)`` float32 through their DCT series."""
        coefficients = scipy.fft.dctn(np.asarray(fields, np.float64), type=2, axes=(-2, -1), norm="ortho")
        return np.matmul(np.matmul(self.up_y, coefficients.astype(np.float32)), self.up_x)


# ============================================================================ the BaSiC solver


@dataclass
class BasicFit:
    """A BaSiC fit of one image stack.

    Attributes
    ----------
    flatfield : ndarray (y, x) float32
        Flat-field, mean 1.
    darkfield : ndarray (y, x) float32
        Additive dark-field in image units: zeros unless ``get_darkfield``; one constant (the offset) with our
        implementation, an image with basicpy.
    baseline : ndarray (n,) float32
        Per-image baseline: image ``i`` is about ``baseline[i] * flatfield + darkfield``.
    iterations : int
        ADMM iterations, summed over the reweighting rounds.
    reweight_iterations : int
        Reweighting rounds.
    residual : float
        Mean absolute sparse residual relative to the mean image intensity (content the model leaves out).
    converged : bool
        Whether the last solve met ``tolerance`` within ``max_iterations`` and the reweighting settled.
    backend : str
        ``"numpy"``, ``"cupy"`` or ``"basicpy"``.
    """

    flatfield: np.ndarray
    darkfield: np.ndarray
    baseline: np.ndarray
    iterations: int
    reweight_iterations: int
    residual: float
    converged: bool
    backend: str = "numpy"


@dataclass
class _Settings:
    get_darkfield: bool = False
    smoothness_flatfield: float = 1.0
    smoothness_darkfield: float | None = None
    max_iterations: int = 500
    tolerance: float = 1e-3
    max_reweight_iterations: int = 10
    reweight_tolerance: float = 1e-2
    epsilon: float = 0.1


@dataclass
class _PlaneState:
    """What a plane hands to the next one as a warm start (working size, normalised units)."""

    flatfield: object  # (G, 1, h, w) mean 1
    darkfield: object  # (G, 1, h, w)
    weights: object  # (G, n, h, w)


@dataclass
class _StackFit:
    """Fits of ``G`` stacks at working size (host arrays)."""

    flatfield: np.ndarray  # (G, h, w), mean 1
    darkfield: np.ndarray  # (G, h, w), image units
    baseline: np.ndarray  # (G, n), image units
    tile_residual: np.ndarray  # (G, n) mean |E_i| / mean(B_i)
    iterations: np.ndarray  # (G,)
    reweights: np.ndarray  # (G,)
    residual: np.ndarray  # (G,)
    converged: np.ndarray  # (G,) bool
    state: _PlaneState | None = None


def _shrink(xp, values, threshold):
    """Soft threshold ``sign(v) * max(|v| - t, 0)``."""
    return xp.sign(values) * xp.maximum(xp.abs(values) - threshold, 0)


def _spectral_norm(xp, data):
    """Largest singular value of each ``(n, p)`` matrix in ``data (G, n, h, w)`` (power iteration on D D^T)."""
    g, n = data.shape[:2]
    flat = data.reshape(g, n, -1)
    gram = xp.matmul(flat, flat.transpose(0, 2, 1)).astype(xp.float64)
    vector = xp.ones((g, n, 1), dtype=xp.float64)
    value = xp.ones((g, 1, 1), dtype=xp.float64)
    for _ in range(50):
        nxt = xp.matmul(gram, vector)
        value = xp.sqrt((nxt**2).sum(axis=1, keepdims=True))
        vector = nxt / xp.maximum(value, 1e-30)
    return xp.sqrt(value).astype(xp.float32).reshape(g, 1, 1, 1)


def _dark_offset(xp, target, flat, previous, darkest):
    """The constant dark offset ``k`` of ``D_i = b_i F + k`` (the paper's bright/dark-region regression).

    Over the images, the mean of the flat-field's bright half ``m_in,i = b_i F_in + k`` is a straight line of
    the mean of its dark half ``m_out,i = b_i F_out + k`` with slope ``a = F_in / F_out`` and intercept
    ``k (1 - a)``; only the ordering of the current flat-field is used, not its level, which the offset
    would otherwise trade against. Planes whose images do not vary enough keep the previous offset.
    """
    bright = (flat >= flat.mean(axis=(2, 3), keepdims=True)).astype(target.dtype)
    n_bright = xp.maximum(bright.sum(axis=(2, 3), keepdims=True), 1)
    n_dark = xp.maximum((1 - bright).sum(axis=(2, 3), keepdims=True), 1)
    m_in = (target * bright).sum(axis=(2, 3), keepdims=True) / n_bright
    m_out = (target * (1 - bright)).sum(axis=(2, 3), keepdims=True) / n_dark
    c_out = m_out - m_out.mean(axis=1, keepdims=True)
    c_in = m_in - m_in.mean(axis=1, keepdims=True)
    var_out = (c_out * c_out).mean(axis=1, keepdims=True)
    slope = (c_in * c_out).mean(axis=1, keepdims=True) / xp.maximum(var_out, 1e-12)
    intercept = m_in.mean(axis=1, keepdims=True) - slope * m_out.mean(axis=1, keepdims=True)
    usable = (var_out > 1e-4) & (slope > 1.01)
    offset = xp.where(usable, intercept / xp.where(usable, 1 - slope, -1), previous)
    return xp.clip(offset, 0, darkest)


def _fit_stacks(be: _Backend, data, settings: _Settings, warm: _PlaneState | None = None) -> _StackFit:
    """BaSiC on ``G`` stacks at once: ``data (G, n, h, w)`` float32, each stack with a positive mean."""
    xp = be.xp
    data = be.asarray(data)
    g, n, h, w = data.shape
    scale = data.mean(axis=(1, 2, 3), keepdims=True)
    d = data / scale  # each stack scaled to mean 1: thresholds below are in these units
    d_norm = xp.sqrt((d * d).sum(axis=(1, 2, 3), keepdims=True))

    mean_image = d.mean(axis=1, keepdims=True)
    mean_image = mean_image / mean_image.mean(axis=(2, 3), keepdims=True)
    # Automatic smoothness: the paper's rule, sum|C(mean image)| / 400 * 0.5, but never below five times the
    # noise of the mean image (the median |coefficient| of its upper frequencies / 0.6745). The paper's
    # constant was set for 128 x 128 images; for smaller ones its threshold falls below the noise.
    spectrum = xp.abs(be.dct2(mean_image))
    upper = xp.concatenate([spectrum[:, :, h // 2 :, :].reshape(g, -1),
                            spectrum[:, :, : h // 2, w // 2 :].reshape(g, -1)], axis=1)
    noise = xp.median(upper, axis=1).reshape(g, 1, 1, 1) / 0.6745
    auto = xp.maximum(spectrum.sum(axis=(2, 3), keepdims=True) / 800.0, _NOISE_THRESHOLDS * noise)
    lam_f = settings.smoothness_flatfield * auto
    mu0 = _MU_COEF / _spectral_norm(xp, d)
    mu_max = mu0 * _MAX_MU_RATIO
    keep_dc = xp.ones((h, w), dtype=xp.float32)
    keep_dc[0, 0] = 0  # the DC coefficient (the level) is not shrunk

    if warm is not None:
        flat = be.asarray(warm.flatfield)
        dark = (be.asarray(warm.darkfield).mean(axis=(2, 3), keepdims=True) if settings.get_darkfield
                else xp.zeros((g, 1, 1, 1), dtype=xp.float32))
        weights = be.asarray(warm.weights)
    else:
        flat = xp.ones((g, 1, h, w), dtype=xp.float32)
        dark = xp.zeros((g, 1, 1, 1), dtype=xp.float32)
        weights = xp.ones_like(d)
    darkest = d.min(axis=(1, 2, 3), keepdims=True)  # a dark offset cannot exceed the darkest pixel
    base = (d * flat).sum(axis=(2, 3), keepdims=True) / (flat * flat).sum(axis=(2, 3), keepdims=True)
    base = base / xp.maximum(base.mean(axis=1, keepdims=True), 1e-12)

    iterations = np.zeros(g, np.int64)
    reweights = np.zeros(g, np.int64)
    converged = np.zeros(g, bool)
    settled = np.zeros(g, bool)
    # A warm start counts as the previous round: a plane like its neighbour settles after one round.
    previous = flat / flat.mean(axis=(2, 3), keepdims=True) if warm is not None else None
    pixels = h * w
    d_rows = d.reshape(g, n, pixels)
    # Work arrays of the stack's size, reused in place (no allocation per iteration): with c = clip(v, -t,
    # t) the shrinkage E = v - c, the data the low-rank part must explain is D - E + U = L + c, and the
    # constraint gap is D - L' - E = (L + c) - U - L' for the new low-rank part L'.
    low_rank = xp.empty_like(d)  # L = b F + k, then L + c
    v = xp.empty_like(d)  # D - L + U
    clipped = xp.empty_like(d)  # c
    limit = xp.empty_like(d)  # t = w / mu, then -t
    gap = xp.empty_like(d)
    dual = xp.zeros_like(d)
    mu = mu0.copy()
    for _round in range(settings.max_reweight_iterations):
        # Each plane is solved on its own terms: planes that have settled (reweighting) or converged (ADMM)
        # are frozen, so a plane's result does not depend on which planes share its batch.
        active = ~settled
        restart = be.asarray(active.astype(np.float32)).reshape(g, 1, 1, 1) > 0
        dual = xp.where(restart, 0, dual)
        mu = xp.where(restart, mu0, mu)
        frozen = settled.copy()
        for _it in range(settings.max_iterations):
            if frozen.any():
                kept = (v.copy(), clipped.copy(), base, flat, dark, dual.copy())
            xp.multiply(base, flat, out=low_rank)
            low_rank += dark
            xp.subtract(d, low_rank, out=v)
            v += dual
            xp.divide(weights, mu, out=limit)
            xp.minimum(v, limit, out=clipped)
            xp.negative(limit, out=limit)
            xp.maximum(clipped, limit, out=clipped)
            target = low_rank
            target += clipped  # D - E + U
            # Baselines: least squares against the current flat-field (and the dark offset), kept >= 0, mean 1
            # (the rank-one model's scale ambiguity goes into the flat-field's level).
            if settings.get_darkfield:
                dark = _dark_offset(xp, d, flat, dark, darkest)
            projection = xp.matmul(target.reshape(g, n, pixels), flat.reshape(g, pixels, 1)).reshape(g, n, 1, 1)
            flat_mean = flat.mean(axis=(2, 3), keepdims=True)
            flat_power = xp.maximum((flat * flat).mean(axis=(2, 3), keepdims=True), 1e-12)
            base = xp.maximum((projection / pixels - dark * flat_mean) / flat_power, 0)
            level = xp.maximum(base.mean(axis=1, keepdims=True), 1e-12)
            base = base / level
            flat = flat * level
            # Proximal gradient step for F (mean(b) = 1): F + mean_i(T_i - k - b_i F) = mean_i(T_i) - k, where
            # T_i = D_i - E_i + U_i, then soft thresholding of its DCT coefficients.
            coef = be.dct2(target.mean(axis=1, keepdims=True) - dark)
            coef -= keep_dc * xp.clip(coef, -lam_f / mu, lam_f / mu)  # soft threshold, DC kept
            flat = be.idct2(coef)
            # gap = (L + c) - U - L'
            xp.multiply(base, flat, out=gap)
            gap += dark
            xp.subtract(target, gap, out=gap)
            gap -= dual
            dual += gap
            rel = be.to_host(xp.sqrt(xp.einsum("gi,gi->g", gap.reshape(g, -1), gap.reshape(g, -1)))
                             / d_norm.reshape(g))
            mu_next = xp.minimum(mu * _RHO, mu_max)
            dual *= mu / mu_next
            mu = mu_next
            if frozen.any():
                fz = be.asarray(frozen.astype(np.float32)).reshape(g, 1, 1, 1) > 0
                v, clipped, base, flat, dark, dual = (xp.where(fz, old, new) for old, new in
                                                      zip(kept, (v, clipped, base, flat, dark, dual)))
            iterations += ~frozen
            newly = ~frozen & (rel < settings.tolerance)
            converged = np.where(newly, True, np.where(frozen, converged, False))
            frozen |= newly
            if frozen.all():
                break
        reweights += active
        resid = v - clipped
        mean_flat = flat.mean(axis=(2, 3), keepdims=True)
        current = flat / mean_flat
        low_rank_level = base * mean_flat + dark
        new_weights = 1.0 / (xp.abs(resid) / xp.maximum(low_rank_level, 1e-12) + settings.epsilon)
        new_weights /= new_weights.mean(axis=(1, 2, 3), keepdims=True)
        weights = xp.where(restart, new_weights, weights)  # settled planes keep theirs
        del new_weights
        if previous is not None:
            change = xp.abs(current - previous).mean(axis=(1, 2, 3)) / xp.abs(previous).mean(axis=(1, 2, 3))
            settled |= be.to_host(change) <= settings.reweight_tolerance
        previous = current
        if settled.all():
            break
    residual = v - clipped
    del low_rank, limit, gap, d_rows

    mean_flat = flat.mean(axis=(2, 3), keepdims=True)
    flatfield = flat / mean_flat
    low_rank_level = (base * flat + dark).mean(axis=(2, 3), keepdims=True)
    tile_residual = xp.abs(residual).mean(axis=(2, 3), keepdims=True) / xp.maximum(low_rank_level, 1e-12)
    dark = xp.broadcast_to(dark, (g, 1, h, w))
    state = _PlaneState(flatfield=flatfield, darkfield=dark, weights=weights)
    return _StackFit(
        flatfield=be.to_host(flatfield[:, 0]).astype(np.float32),
        darkfield=be.to_host((dark * scale)[:, 0]).astype(np.float32),
        baseline=be.to_host((base * mean_flat * scale)[..., 0, 0]).astype(np.float32),
        tile_residual=be.to_host(tile_residual[..., 0, 0]).astype(np.float32),
        iterations=iterations,
        reweights=reweights,
        residual=be.to_host(xp.abs(residual).mean(axis=(1, 2, 3))).astype(np.float64),
        converged=converged & settled,
        state=state,
    )


def _check_images(images) -> np.ndarray:
    array = np.asarray(images)
    if array.ndim != 3:
        raise ValueError(f"images: expected a stack (n, y, x), got an array of shape {array.shape}")
    n, ty, tx = array.shape
    if n < 2:
        raise ValueError(f"images: BaSiC needs at least 2 images (it estimates what they share), got {n}")
    if ty < 2 or tx < 2:
        raise ValueError(f"images: each image needs at least 2 x 2 pixels, got {ty} x {tx}")
    if not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
        raise ValueError(f"images: expected real numbers, got dtype {array.dtype}")
    array = array.astype(np.float32, copy=False)
    if not np.isfinite(array).all():
        raise ValueError("images: contains NaN or infinite values")
    if not array.mean() > 0:
        raise ValueError("images: the mean intensity is not positive (empty or all-zero stack)")
    return array


def _settings(get_darkfield, smoothness_flatfield, smoothness_darkfield, max_iterations, tolerance,
              max_reweight_iterations, reweight_tolerance, epsilon) -> _Settings:
    for name, value, low in (("smoothness_flatfield", smoothness_flatfield, 0.0),
                             ("smoothness_darkfield", smoothness_darkfield, 0.0)):
        if value is not None and not value > low:
            raise ValueError(f"{name} must be positive (a factor of the automatic value), got {value}")
    if int(max_iterations) < 1 or int(max_reweight_iterations) < 1:
        raise ValueError("max_iterations and max_reweight_iterations must be >= 1")
    if not tolerance > 0 or not reweight_tolerance > 0 or not epsilon > 0:
        raise ValueError("tolerance, reweight_tolerance and epsilon must be positive")
    return _Settings(
        get_darkfield=bool(get_darkfield),
        smoothness_flatfield=1.0 if smoothness_flatfield is None else float(smoothness_flatfield),
        smoothness_darkfield=None if smoothness_darkfield is None else float(smoothness_darkfield),
        max_iterations=int(max_iterations),
        tolerance=float(tolerance),
        max_reweight_iterations=int(max_reweight_iterations),
        reweight_tolerance=float(reweight_tolerance),
        epsilon=float(epsilon),
    )


def basic_fit(
    images,
    *,
    get_darkfield: bool = False,
    smoothness_flatfield: float | None = None,
    smoothness_darkfield: float | None = None,
    max_iterations: int = 500,
    tolerance: float = 1e-3,
    working_size: int | None = 128,
    max_reweight_iterations: int = 10,
    reweight_tolerance: float = 1e-2,
    epsilon: float = 0.1,
    backend: str = "auto",
) -> BasicFit:
    """Estimate the flat-field (and optionally the dark-field) shared by a stack of images with BaSiC.

    Parameters
    ----------
    images : array (n, y, x)
        At least two images of the same optics (e.g. all tiles of one depth plane).
    get_darkfield : bool
        Also estimate an additive dark offset (ours: one constant; basicpy: an image); otherwise zero.
    smoothness_flatfield : float, optional
        Factor of the automatic flat-field smoothness (None = 1; larger = smoother).
    smoothness_darkfield : float, optional
        basicpy backend only: factor of the flat-field's automatic value for its dark-field smoothness
        (None = basicpy's default, a tenth). Our dark-field is a constant and has no smoothness.
    max_iterations : int
        ADMM iterations per reweighting round at most.
    tolerance : float
        ADMM stops when ``||D - bF - k - E|| / ||D||`` is below it.
    working_size : int or None
        Images larger than this (per axis) are low-pass filtered and area-averaged down to it for the fit;
        None keeps the full size.
    max_reweight_iterations, reweight_tolerance, epsilon : optional
        Reweighting rounds at most, the relative flat-field change that ends them, and the weights' epsilon.
    backend : {"auto", "numpy", "basicpy"}
        "auto": our implementation on CuPy when a GPU is usable, else numpy; "numpy": our implementation on
        the CPU; "basicpy": the basicpy package, when it is installed (an optional alternative).

    Returns
    -------
    BasicFit
        Flat-field and dark-field at the images' size.

    Raises
    ------
    ValueError
        On a stack that is not ``(n >= 2, y, x)``, holds NaN/inf, has no positive mean, or bad settings.
    ImportError
        For ``backend="basicpy"`` when basicpy is not installed.

    Examples
    --------
    >>> fit = basic_fit(tiles_of_one_plane)          # doctest: +SKIP
    >>> corrected = (tile - fit.darkfield) / fit.flatfield   # doctest: +SKIP
    """
    array = _check_images(images)
    settings = _settings(get_darkfield, smoothness_flatfield, smoothness_darkfield, max_iterations, tolerance,
                         max_reweight_iterations, reweight_tolerance, epsilon)
    if working_size is not None and int(working_size) < 2:
        raise ValueError(f"working_size must be >= 2 or None, got {working_size}")
    if backend == "basicpy":
        return _basicpy_fit(array, settings, working_size)
    be = _array_backend(backend)
    resampler = _Resampler(array.shape[1:], working_size)
    fit = _fit_stacks(be, resampler.down(array)[None], settings)
    flatfield = resampler.up(fit.flatfield)[0]
    flatfield /= flatfield.mean()
    darkfield = resampler.up(fit.darkfield)[0] if settings.get_darkfield else np.zeros(array.shape[1:], np.float32)
    return BasicFit(
        flatfield=flatfield.astype(np.float32),
        darkfield=darkfield.astype(np.float32),
        baseline=fit.baseline[0],
        iterations=int(fit.iterations[0]),
        reweight_iterations=int(fit.reweights[0]),
        residual=float(fit.residual[0]),
        converged=bool(fit.converged[0]),
        backend=be.name,
    )


def _basicpy_fit(array: np.ndarray, settings: _Settings, working_size: int | None) -> BasicFit:
    """The same fit through the basicpy package (its own algorithm and defaults, our parameter names)."""
    BaSiC = _import_basicpy()
    kwargs = dict(get_darkfield=settings.get_darkfield, max_iterations=settings.max_iterations,
                  optimization_tol=settings.tolerance, max_reweight_iterations=settings.max_reweight_iterations,
                  reweighting_tol=settings.reweight_tolerance, epsilon=settings.epsilon)
    if working_size is not None:
        kwargs["working_size"] = int(working_size)
    if settings.smoothness_flatfield != 1.0 or settings.smoothness_darkfield is not None:
        # basicpy takes absolute weights: the paper's automatic value (its own default) times our factors.
        small = _Resampler(array.shape[1:], working_size).down(array)
        mean_image = small.mean(axis=0)
        auto = float(np.abs(scipy.fft.dctn(mean_image / mean_image.mean(), norm="ortho")).sum() / 400 * 0.5)
        kwargs["smoothness_flatfield"] = auto * settings.smoothness_flatfield
        dark = _DARK_SMOOTHNESS_RATIO if settings.smoothness_darkfield is None else settings.smoothness_darkfield
        kwargs["smoothness_darkfield"] = auto * dark
    model = BaSiC(**kwargs)
    model.fit(array)
    flatfield = np.asarray(model.flatfield, np.float32)
    darkfield = np.asarray(model.darkfield, np.float32)
    baseline = np.asarray(getattr(model, "baseline", None) if getattr(model, "baseline", None) is not None
                          else np.full(array.shape[0], np.nan), np.float32).ravel()
    return BasicFit(flatfield=flatfield / flatfield.mean(), darkfield=darkfield, baseline=baseline,
                    iterations=-1, reweight_iterations=-1, residual=float("nan"), converged=True,
                    backend="basicpy")


# ============================================================================ the step on mosaic grids


@dataclass
class IlluminationParams(SliceRunParams):
    """Illumination correction: BaSiC flat-field (and dark-field) per depth plane across the tiles of a slice."""

    get_darkfield: bool = param(False, "Also estimate an additive dark offset per plane (the noise floor)")
    smoothness: float = param(
        1.0, "Flat-field smoothness as a factor of BaSiC's automatic value; larger = smoother", min=0.01,
        max=100.0,
    )
    working_size: int = param(
        128, "Tiles are low-pass filtered and averaged down to at most this many pixels per side for the fit", min=8,
        max=4096, unit="px", advanced=True,
    )
    max_iterations: int = param(500, "ADMM iterations per reweighting round at most", min=1, max=100000,
                                advanced=True)
    tolerance: float = param(1e-3, "ADMM stops at this relative constraint residual", min=1e-9, max=0.5,
                             advanced=True)
    max_reweight_iterations: int = param(10, "Reweighting rounds at most", min=1, max=100, advanced=True)
    z_block: int = param(
        0, "Depth planes of all tiles read per pass; 0 chooses the most that fit in memory_budget_gb", min=0,
        unit="planes",
    )
    planes_per_task: int = param(
        64, "Fit the planes in groups of about this many, each warm-started on its own, so that on a cluster "
        "the groups of one slice run in parallel (0 = one group per slice)", min=0, max=100000, unit="planes",
        advanced=True,
    )
    plane_step: int = param(
        1, "Fit every n-th depth plane and interpolate the flat-field linearly in between (1 = every plane, "
        "as the lab does; the vignetting varies slowly with depth)", min=1, max=64, unit="planes",
    )
    warm_start: bool = param(
        True, "Start each plane from the previous plane's flat-field and weights (about 2x faster; on the bench "
        "phantom also more accurate)", advanced=True
    )
    backend: str = param(
        "auto", "'auto': ours on CuPy when a GPU is usable, else numpy; 'numpy': ours on the CPU; 'basicpy': "
        "the basicpy package when installed", choices=BACKEND_CHOICES,
    )
    save_flatfield: bool = param(
        True, "Write the flat-fields (z, y, x) as slice_z<NN>_illumination_flatfield.npy next to the output"
    )
    compression: str = param("blosc-lz4", "Compression of the corrected mosaic grids", choices=COMPRESSION_CHOICES,
                             advanced=True)

    def settings(self) -> _Settings:
        return _settings(self.get_darkfield, self.smoothness, None, self.max_iterations,
                         self.tolerance, self.max_reweight_iterations, 1e-2, 0.1)


def flatfield_path_for(output: str | Path, kind: str = "flatfield") -> Path:
    """``slice_z07_illumination.ome.zarr`` -> ``slice_z07_illumination_flatfield.npy`` (or ``_darkfield``)."""
    output = Path(output)
    return output.with_name(output.name.removesuffix(".ome.zarr") + f"_{kind}.npy")


@dataclass
class _SlicePlan:
    """Geometry and memory plan of one slice."""

    n_tiles: int
    tile_shape: tuple[int, int, int]
    work_shape: tuple[int, int]
    z_block: int
    batch: int
    bytes_needed: int
    planes_in_memory: int = 0  # planes of all tiles at working size the budget holds besides the fit


def _plan(grid, params: IlluminationParams, budget_bytes: int) -> _SlicePlan:
    """Choose the z-block (planes of all tiles held at working size) and the number of planes fitted at once."""
    nz, ty, tx = grid.tile_shape
    n_tiles = len(grid.tile_positions())
    if params.backend == "basicpy":  # basicpy takes full-size tiles and resizes them itself
        wy, wx = ty, tx
    else:
        wy, wx = min(ty, params.working_size), min(tx, params.working_size)
    plane = n_tiles * wy * wx * _F32  # one depth plane of all tiles at working size
    tile = nz * ty * tx * _F32
    admm = 14 * plane  # per plane solved at once: the stack's copies, weights, residual, multiplier, temporaries
    reading = 3 * tile  # a tile chunk as decoded, its float32 block and the downsampled planes
    fields = 2 * nz * wy * wx * _F32  # flat- and dark-fields of the slice at working size
    applying = 5 * tile + fields  # tile read (decoded + float32), flat-field, dark-field, encoded chunk
    available = budget_bytes - reading - fields
    # Planes solved together: enough to amortise numpy's per-call cost, at most half of what memory allows.
    batch = max(1, min(nz, _BATCH_ELEMENTS // max(1, n_tiles * wy * wx), (available // 2) // admm))
    if params.z_block > 0:
        z_block = min(nz, params.z_block)
    else:
        z_block = int(max(1, min(nz, (available - batch * admm) // max(plane, 1))))
    batch = min(batch, z_block)
    needed = max(z_block * plane + batch * admm + reading + fields, applying)
    in_memory = max(0, (available - batch * admm) // max(plane, 1))
    return _SlicePlan(n_tiles, (nz, ty, tx), (wy, wx), z_block, batch, int(needed), int(in_memory))


def _slice_budget(params: IlluminationParams, n_slices: int) -> int:
    """Memory one slice worker may use: the budget shared by the slices running in parallel."""
    return int(params.memory_budget_gb * GIB / max(1, min(params.workers, n_slices)))


def _needs_error(path, plan: _SlicePlan, budget: int, params: IlluminationParams) -> ValueError:
    wy, wx = plan.work_shape
    return ValueError(
        f"{path}: memory_budget_gb={params.memory_budget_gb} (with workers={params.workers}) leaves "
        f"{budget / GIB:.3f} GiB per slice, below the {plan.bytes_needed / GIB:.3f} GiB the illumination step "
        f"needs for one depth plane of all {plan.n_tiles} tiles at {wy}x{wx} plus a few tiles of "
        f"{plan.tile_shape}; raise memory_budget_gb, lower workers or working_size"
    )


def _cold_state(be: _Backend, n: int, h: int, w: int) -> _PlaneState:
    xp = be.xp
    return _PlaneState(flatfield=xp.ones((1, 1, h, w), xp.float32), darkfield=xp.zeros((1, 1, h, w), xp.float32),
                       weights=xp.ones((1, n, h, w), xp.float32))


def _fit_block(stack: np.ndarray, be: _Backend, settings: _Settings, batch: int, warm: bool,
               carry: _PlaneState | None):
    """Fit the planes of ``stack (n_tiles, zb, h, w)``; returns per-plane results and the last plane's state.

    The block's planes form ``batch`` consecutive chains solved side by side: step ``j`` fits plane
    ``c * L + j`` of every chain ``c`` (``L`` planes per chain) in one vectorised ADMM, each plane
    warm-started from the plane before it (chain 0's first plane from ``carry``, the previous block's last).
    """
    n_tiles, zb, h, w = stack.shape
    chains = max(1, min(batch, zb))
    length = math.ceil(zb / chains)
    means = stack.mean(axis=(0, 2, 3))
    usable = np.isfinite(means) & (means > 0)
    out = {
        "flatfield": np.ones((zb, h, w), np.float32),
        "darkfield": np.zeros((zb, h, w), np.float32),
        "baseline": np.zeros((zb, n_tiles), np.float32),
        "tile_residual": np.zeros((zb, n_tiles), np.float32),
        "iterations": np.zeros(zb, np.int64),
        "reweights": np.zeros(zb, np.int64),
        "residual": np.zeros(zb, np.float64),
        "converged": np.ones(zb, bool),
        "fitted": usable.copy(),
    }
    states: dict[int, _PlaneState] = {-1: carry} if carry is not None else {}
    for j in range(length):
        planes = [c * length + j for c in range(chains) if c * length + j < zb and usable[c * length + j]]
        if not planes:
            states = {}
            continue
        init = None
        if warm:
            sources = [states.get(z - 1) if (z % length or z == 0) else None for z in planes]
            if any(s is not None for s in sources):
                cold = _cold_state(be, n_tiles, h, w)
                sources = [s if s is not None else cold for s in sources]
                init = _PlaneState(*(be.xp.concatenate([getattr(s, k) for s in sources])
                                     for k in ("flatfield", "darkfield", "weights")))
        data = np.ascontiguousarray(stack[:, planes].transpose(1, 0, 2, 3))
        fit = _fit_stacks(be, data, settings, init)
        states = {}
        for k, z in enumerate(planes):
            for key in ("flatfield", "darkfield", "baseline", "tile_residual", "iterations", "reweights",
                        "residual", "converged"):
                out[key][z] = getattr(fit, key)[k]
            if warm:
                states[z] = _PlaneState(fit.state.flatfield[k : k + 1], fit.state.darkfield[k : k + 1],
                                        fit.state.weights[k : k + 1])
    # Chain 0's first plane z == 0 looks up states[-1] (the carry); the next block starts from our last plane.
    return out, states.get(zb - 1)


def _basicpy_block(stack: np.ndarray, settings: _Settings, working_size: int):
    """Per-plane fits through basicpy (``backend="basicpy"``), at full tile size for the caller to keep."""
    n_tiles, zb, ty, tx = stack.shape
    out = {"flatfield": np.ones((zb, ty, tx), np.float32), "darkfield": np.zeros((zb, ty, tx), np.float32),
           "baseline": np.zeros((zb, n_tiles), np.float32), "tile_residual": np.full((zb, n_tiles), np.nan),
           "iterations": np.full(zb, -1), "reweights": np.full(zb, -1), "residual": np.full(zb, np.nan),
           "converged": np.ones(zb, bool), "fitted": np.zeros(zb, bool)}
    for z in range(zb):
        plane = stack[:, z]
        if not plane.mean() > 0:
            continue
        fit = _basicpy_fit(plane, settings, working_size)
        out["flatfield"][z], out["darkfield"][z], out["fitted"][z] = fit.flatfield, fit.darkfield, True
        out["baseline"][z] = fit.baseline[:n_tiles] if fit.baseline.size >= n_tiles else np.nan
    return out


def _interpolate_planes(fields: np.ndarray, fitted: np.ndarray) -> None:
    """Fill the planes of ``fields (z, h, w)`` not in ``fitted`` (sorted indices) linearly, in place."""
    for z in range(fields.shape[0]):
        k = int(np.searchsorted(fitted, z))
        if k < len(fitted) and fitted[k] == z:
            continue
        low, high = fitted[max(k - 1, 0)], fitted[min(k, len(fitted) - 1)]
        weight = 0.0 if high == low else (z - low) / (high - low)
        fields[z] = (1 - weight) * fields[low] + weight * fields[high]


def plane_groups(planned: np.ndarray, planes_per_task: int) -> list[np.ndarray]:
    """Split the fitted planes into ``ceil(len / planes_per_task)`` groups of nearly equal size (one group
    when ``planes_per_task`` is 0). The split depends on the parameters only, never on where the groups run,
    so the result is the same on one thread or a cluster."""
    n_groups = 1 if planes_per_task <= 0 else max(1, math.ceil(len(planned) / planes_per_task))
    return [g for g in np.array_split(planned, n_groups) if g.size]


def _read_planes(grid, chosen: np.ndarray, resampler: _Resampler | None, tracker=None) -> np.ndarray:
    """Planes ``chosen`` (sorted) of every tile, ``(n_tiles, planes, h, w)`` at working size (``resampler``) or
    full size (None)."""
    positions = grid.tile_positions()
    z0, z1 = int(chosen[0]), int(chosen[-1]) + 1
    fit_hw = grid.tile_shape[1:] if resampler is None else resampler.work_shape
    stack = np.empty((len(positions), len(chosen), *fit_hw), np.float32)
    for i, (x, y) in enumerate(positions):
        tile = grid.read_tile(x, y, z=slice(z0, z1))[chosen - z0]
        stack[i] = tile if resampler is None else resampler.down(tile)
        del tile
        if tracker is not None:
            tracker.check()
    return stack


def _fit_planes(stack: np.ndarray, params: IlluminationParams, plan: _SlicePlan, carry=None):
    """Fit every plane of ``stack (n_tiles, planes, h, w)``, each warm-started from the one before it (the first
    from ``carry``); returns the per-plane results (``_fit_block``'s keys) and the last plane's state."""
    settings = params.settings()
    if params.backend == "basicpy":
        return _basicpy_block(stack, settings, params.working_size), None
    return _fit_block(stack, _array_backend(params.backend), settings, plan.batch, params.warm_start, carry)


def _fit_stack(stack: np.ndarray, params: IlluminationParams, plan: _SlicePlan) -> dict:
    """:func:`_fit_planes` without the state: a sub-task's result."""
    return _fit_planes(stack, params, plan)[0]


def _fit_group_reading(in_path: Path, chosen_planes: np.ndarray, params: IlluminationParams, plan: _SlicePlan,
                       tracker=None, covered: int = 0) -> dict:
    """Fit the planes ``chosen_planes`` of one slice reading them z-block by z-block (when all planes at working
    size do not fit the memory budget), warm-started within the group. ``tracker`` (optional) counts the depth
    planes from ``covered`` on."""
    grid = open_mosaic_grid(in_path)
    resampler = None if params.backend == "basicpy" else _Resampler(grid.tile_shape[1:], params.working_size)
    results = []
    carry = None
    for start in range(0, len(chosen_planes), plan.z_block):
        chosen = chosen_planes[start : start + plan.z_block]
        block, carry = _fit_planes(_read_planes(grid, chosen, resampler, tracker), params, plan, carry)
        results.append(block)
        if tracker is not None:
            z1 = int(chosen[-1]) + 1
            tracker.advance(z1 - covered, f"{Path(in_path).name}: flat-field planes {covered}-{z1 - 1}")
            covered = z1
    return {key: np.concatenate([b[key] for b in results]) for key in results[0]}


def _fit_groups(in_path: Path, grid, resampler, groups: list[np.ndarray], params: IlluminationParams,
                plan: _SlicePlan, tracker):
    """``(planes, results)`` of every group of planes. When the planes at working size fit the memory plan they
    are read once and each group is fitted from memory; else each group reads its own planes z-block by z-block.
    On a dask worker (and with several groups) the groups are sub-tasks that any idle worker takes: the slice's
    task leaves its thread while they run."""
    worker = current_dask_worker() if len(groups) > 1 else None
    planned = np.concatenate(groups)
    # Held at once: the planes, and one group's copy (here) or every group's (sub-tasks) at most.
    in_memory = plan.planes_in_memory >= len(planned) * (2 if len(groups) > 1 else 1)
    name = Path(in_path).name
    stack = _read_planes(grid, planned, resampler, tracker) if in_memory else None
    if worker is None:
        covered = 0
        for chosen in groups:
            if in_memory:
                rows = np.searchsorted(planned, chosen)
                block = _fit_planes(stack[:, rows], params, plan)[0]
                z1 = int(chosen[-1]) + 1
                tracker.advance(z1 - covered, f"{name}: flat-field planes {covered}-{z1 - 1}")
            else:
                block = _fit_group_reading(in_path, chosen, params, plan, tracker, covered)
            yield chosen, block
            covered = int(chosen[-1]) + 1
        return
    from distributed import worker_client

    with worker_client() as client:
        futures = []
        for i, chosen in enumerate(groups):
            key = f"soct-illumination-fit-{name.split('.')[0]}-g{i}-{uuid.uuid4().hex[:8]}"
            if in_memory:
                part = client.scatter(np.ascontiguousarray(stack[:, np.searchsorted(planned, chosen)]), direct=True,
                                      hash=False)
                futures.append(client.submit(_fit_stack, part, params, plan, pure=False, key=key,
                                             priority=SUBTASK_PRIORITY))
            else:
                futures.append(client.submit(_fit_group_reading, in_path, chosen, params, plan, pure=False, key=key,
                                             priority=SUBTASK_PRIORITY))
        del stack
        for chosen, future in zip(groups, futures):
            yield chosen, future.result()
    tracker.advance(int(groups[-1][-1]) + 1, f"{name}: flat-field planes fitted")


def _correct_tiles(in_path, out_path, fields, tiles, check=None) -> None:
    """Divide the tiles ``[(x, y), ...]`` of the grid at ``in_path`` by the flat-field (after subtracting the
    dark-field, if any; ``fields = (flatfield, darkfield or None)``), each written as its chunk of the grid
    created at ``out_path``."""
    flatfield, darkfield = fields
    grid = open_mosaic_grid(in_path)
    output = zarr.open_group(str(out_path), mode="r+")["0"]
    for x, y in tiles:
        tile = grid.read_tile(int(x), int(y))
        if darkfield is not None:
            tile -= darkfield
        tile /= flatfield
        output[grid.tile_region(int(x), int(y))] = tile
        del tile
        if check is not None:
            check()


def _process_slice(params: IlluminationParams, n_slices: int):
    settings = params.settings()

    def process(in_path: Path, out_tmp: Path, tracker) -> dict:
        started = time.perf_counter()
        grid = open_mosaic_grid(in_path)
        positions = grid.tile_positions()
        if len(positions) < 2:
            raise ValueError(f"{in_path}: illumination correction needs at least 2 tiles, this slice has "
                             f"{len(positions)}")
        nz, ty, tx = grid.tile_shape
        budget = _slice_budget(params, n_slices)
        plan = _plan(grid, params, budget)
        if plan.bytes_needed > budget and params.z_block == 0:
            raise _needs_error(in_path, plan, budget, params)
        use_basicpy = params.backend == "basicpy"
        if use_basicpy:
            _import_basicpy()
        be = _array_backend("numpy" if use_basicpy else params.backend)
        resampler = _Resampler((ty, tx), None if use_basicpy else params.working_size)
        wy, wx = resampler.work_shape
        n_tiles = len(positions)

        # Pass 1: flat-fields per depth plane. With plane_step > 1 only every plane_step-th plane (and the last)
        # is fitted, the others interpolated. The planes form groups of planes_per_task, each fitted on its own
        # (warm-started within the group): on a dask worker the groups are sub-tasks any worker may take.
        fit_shape = (nz, ty, tx) if use_basicpy else (nz, wy, wx)
        flat_small = np.ones(fit_shape, np.float32)
        dark_small = np.zeros(fit_shape, np.float32)
        per_plane = {
            "baseline": np.zeros((nz, n_tiles), np.float32), "tile_residual": np.zeros((nz, n_tiles), np.float32),
            "iterations": np.zeros(nz, np.int64), "reweights": np.zeros(nz, np.int64),
            "residual": np.zeros(nz, np.float64), "converged": np.ones(nz, bool), "fitted": np.zeros(nz, bool),
        }
        planned = np.array(sorted(set(range(0, nz, params.plane_step)) | {nz - 1}))
        groups = plane_groups(planned, params.planes_per_task)
        for chosen, block in _fit_groups(in_path, grid, None if use_basicpy else resampler, groups, params, plan,
                                         tracker):
            flat_small[chosen] = block["flatfield"]
            dark_small[chosen] = block["darkfield"]
            for key in per_plane:
                per_plane[key][chosen] = block[key]
        _interpolate_planes(flat_small, planned)
        _interpolate_planes(dark_small, planned)
        fit_seconds = time.perf_counter() - started

        # Full-size fields: one tile's worth of memory each.
        if use_basicpy:
            flatfield, darkfield = flat_small, dark_small
        else:
            flatfield = np.empty((nz, ty, tx), np.float32)
            darkfield = np.zeros((nz, ty, tx), np.float32) if settings.get_darkfield else None
            for z0 in range(0, nz, 16):
                flatfield[z0 : z0 + 16] = resampler.up(flat_small[z0 : z0 + 16])
                if darkfield is not None:
                    darkfield[z0 : z0 + 16] = resampler.up(dark_small[z0 : z0 + 16])
            flatfield /= flatfield.mean(axis=(1, 2), keepdims=True)
        if darkfield is not None and not np.any(darkfield):
            darkfield = None
        np.maximum(flatfield, _MIN_FLATFIELD, out=flatfield)  # guard against a failed estimate (documented)

        # Pass 2: correct tile by tile, each written as one whole chunk.
        (sid,) = find_slice_files(in_path)  # the slice id the runner named the output with
        create_mosaic_grid_like(out_tmp, grid, compression=params.compression, extra_attributes={
            "illumination": {"method": "BaSiC", "backend": "basicpy" if use_basicpy else be.name,
                             "get_darkfield": settings.get_darkfield, "working_size": [wy, wx],
                             "source": str(in_path)}})
        if current_dask_worker() is None:
            _correct_tiles(in_path, out_tmp, (flatfield, darkfield), positions, check=tracker.check)
        else:  # groups of tiles as sub-tasks, the fields sent once
            groups = [list(g) for g in np.array_split(np.array(positions), min(4, len(positions))) if len(g)]
            map_subtasks(partial(_correct_tiles, in_path, str(out_tmp)), groups, "soct-illumination-apply",
                         shared=(flatfield, darkfield))
        apply_seconds = time.perf_counter() - started - fit_seconds

        final = slice_output_name(sid, STEP_NAME)
        target_dir = Path(out_tmp).parent
        if params.save_flatfield:
            for kind, values in (("flatfield", flatfield), ("darkfield", darkfield)):
                if values is None:
                    continue
                with atomic_output(target_dir / flatfield_path_for(final, kind).name, "overwrite") as tmp:
                    with open(tmp, "wb") as handle:
                        np.save(handle, values)

        fitted = per_plane["fitted"]
        ranges = flatfield.max(axis=(1, 2)) - flatfield.min(axis=(1, 2))
        tiles = []
        for i, (x, y) in enumerate(positions):
            tiles.append({
                "x": int(x), "y": int(y), "y0_px": float(y * ty), "x0_px": float(x * tx),
                "height_px": int(ty), "width_px": int(tx),
                "residual": float(np.nanmean(per_plane["tile_residual"][fitted, i])) if fitted.any() else 0.0,
                "baseline": float(np.nanmedian(per_plane["baseline"][fitted, i])) if fitted.any() else 0.0,
            })
        return {
            "backend": "basicpy" if use_basicpy else be.name,
            "n_tiles": n_tiles,
            "tile_shape": [nz, ty, tx],
            "working_shape": [wy, wx] if not use_basicpy else [params.working_size] * 2,
            "z_block": plan.z_block,
            "planes_fitted": int(fitted.sum()),
            "planes_skipped": int(len(planned) - fitted.sum()),
            "planes_interpolated": int(nz - len(planned)),
            "flatfield_min": float(flatfield[fitted].min()) if fitted.any() else 1.0,
            "flatfield_max": float(flatfield[fitted].max()) if fitted.any() else 1.0,
            "flatfield_range_median": float(np.median(ranges[fitted])) if fitted.any() else 0.0,
            "iterations_mean": float(per_plane["iterations"][fitted].mean()) if fitted.any() else 0.0,
            "iterations_max": int(per_plane["iterations"].max()),
            "reweights_mean": float(per_plane["reweights"][fitted].mean()) if fitted.any() else 0.0,
            "residual_median": float(np.nanmedian(per_plane["residual"][fitted])) if fitted.any() else 0.0,
            "converged_fraction": float(per_plane["converged"][fitted].mean()) if fitted.any() else 1.0,
            "memory_estimate_bytes": plan.bytes_needed,
            "seconds_fit": fit_seconds,
            "seconds_apply": apply_seconds,
            "flatfield_path": str(target_dir / flatfield_path_for(final).name) if params.save_flatfield else None,
            "planes": {
                "flatfield_min": [round(float(v), 5) for v in flatfield.min(axis=(1, 2))],
                "flatfield_max": [round(float(v), 5) for v in flatfield.max(axis=(1, 2))],
                "iterations": [int(v) for v in per_plane["iterations"]],
                "residual": [round(float(v), 5) for v in per_plane["residual"]],
                "fitted": [bool(v) for v in fitted],
            },
            "tiles": tiles,
        }

    return process


def correct_illumination(source, out_dir, params: IlluminationParams | None = None, *, progress=None,
                         cancel=None) -> SliceStepResult:
    """Step 3: estimate the flat-field per depth plane across the tiles of each slice and divide it out.

    Parameters
    ----------
    source : path
        A folder of mosaic grids (``mosaic_grid_3d_z{NN}.ome.zarr`` or any ``*_z{NN}*.ome.zarr`` in mosaic
        layout), or one of them.
    out_dir : path
        Output folder: ``slice_z{NN}_illumination.ome.zarr`` (same mosaic layout), the flat-fields
        ``slice_z{NN}_illumination_flatfield.npy`` ``(z, y, x)`` (and ``_darkfield.npy``) and
        ``illumination_metrics.json``.
    params : IlluminationParams, optional
    progress, cancel
        ``progress(done, total, message)`` per depth plane; ``cancel.is_set()`` stops (no partial output).

    Returns
    -------
    SliceStepResult

    Raises
    ------
    ValueError
        If a slice has fewer than two tiles, or one depth plane of all tiles does not fit the memory budget.
    ImportError
        For ``backend="basicpy"`` without basicpy.
    """
    params = params or IlluminationParams()
    if params.backend == "basicpy":
        _import_basicpy()  # fail before any work
    inputs = find_slice_files(source)
    n_slices = len(inputs)

    def units(path) -> int:
        return open_mosaic_grid(path).tile_shape[0]

    def memory(path) -> int:
        grid = open_mosaic_grid(path)
        budget = _slice_budget(params, n_slices)
        plan = _plan(grid, params, budget)
        if plan.bytes_needed > budget and params.z_block == 0:
            raise _needs_error(path, plan, budget, params)
        return plan.bytes_needed

    return run_slice_step(STEP_NAME, source, out_dir, _process_slice(params, n_slices), params,
                          progress=progress, cancel=cancel, units_per_slice=units, memory_per_slice_bytes=memory)
