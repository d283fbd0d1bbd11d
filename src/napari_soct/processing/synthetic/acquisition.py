"""Write a synthetic S-OCT acquisition (raw tiles in the lab format) together with its ground truth.

Physical model
--------------
A tissue block (:class:`~.phantom.Phantom`: brain in agarose) is cut into serial slices of thickness
``T = slice_thickness_um``. Slice ``k`` (0-based acquisition index, id ``slice_id_start + k``) has its
cut surface at block depth ``k * T``; the OCT images it from above with ``n_z`` samples of
``dz = axial_resolution_um``. The cut surface appears at a per-pixel sample depth ``I_k(x, y)`` (a small
tilt plus a gentle quadratic over the sample, plus a per-slice offset), so tile sample ``z`` of slice ``k``
at lateral position ``(x, y)`` images block depth ``d = k * T + (z - I_k(x, y)) * dz``; samples above the
surface see the low-scattering medium. Because ``(n_z - I_k) * dz > T`` consecutive slices overlap in depth.

Frames and coordinates
----------------------
- Sample frame (mm): the stage frame. Tile ``(ix, iy)`` is nominally centred at
  ``stage_origin_mm + (ix * step_x, iy * step_y)``, ``step = FOV * (1 - overlap)``.
- True tile positions = nominal, transformed about the grid centre by the optional stage affine error,
  + the slice's stage drift (random walk) + re-homing jump (from its slice on) + optional per-tile jitter.
- Reported positions (``info.txt``) = nominal + drift + re-homing + encoder glitch (one slice only),
  rounded to 1 nm (6 decimals), so that what is written parses back to exactly the same float.
- Volume frame (pixels): the regular grid of the truth volume at full resolution,
  voxel ``(kz, i, j)`` at block depth ``kz * dz`` and sample position
  ``(x, y) = volume_origin_mm + (j * px, i * py)``. Tile pixel ``(b, a)`` (B-scan, A-line) of a tile whose
  true top-left is ``(y0, x0)`` pixels lies at volume pixel ``(y0 + b, x0 + a)``.

Image formation per tile (float32)
----------------------------------
``object = medium + w * (phantom - medium)`` with ``w = clip(z - I + 0.5, 0, 1)`` (partial volume at the
surface), ``signal = gain_k * flatfield(y, x) * focus(z) * exp(-max(z - I, 0) * dz / L) * object``.
The ``n_extra`` galvo fly-back A-lines hold ``band_level_k * mean_x(signal)`` (dark: 0.1-0.3, or bright).
Each repeat ``r`` of a B-scan gets independent speckle ``Gamma(k, 1/k)`` (mean 1) and an additive
exponential noise floor. All random draws of a tile come from ``default_rng([seed, 7, sid, ix, iy])``.

Repeat averaging (the contract with the reader)
-----------------------------------------------
The tile a correct reader returns is ``np.mean(frames, axis=<repeat axis>, dtype=np.float32)`` of the
float32 frames, rolled so that the band sits at ``[nx, nx + n_extra)``, cropped to ``[:nx]``, as
``(Z, Y, X)``. :meth:`SyntheticAcquisition.true_tile` computes exactly that from regenerated frames
(reducing a C-ordered ``(ny, n_repeat, n_aline, n_z)`` array over axis 1). For ``n_repeat < 8`` numpy
sums the repeats sequentially whatever the memory layout, so a reader doing the same gets identical bits;
from 8 repeats numpy's pairwise summation makes the result layout dependent by a few float32 ulp
(relative difference < 1e-6).
"""

from __future__ import annotations

import binascii
import json
import math
import os
import shutil
import struct
import warnings
import zlib
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

import numpy as np

from ..progress import Cancelled, Progress
from .phantom import Phantom
from .presets import SyntheticConfig

__all__ = ["SyntheticAcquisition", "make_acquisition", "tile_folder_name"]

_F32 = np.float32
_TRUTH_JSON = "truth.json"
_FORMAT_VERSION = 1


def tile_folder_name(sid: int, ix: int, iy: int) -> str:
    """Raw tile folder name, ids zero-padded to two digits (wider when needed)."""
    return f"tile_x{ix:02d}_y{iy:02d}_z{sid:02d}"


def _fmt(key: str, value) -> str:
    """Format an info.txt value.

    Stage positions are always written as floats (``repr``, which parses back to the same float); other
    integral numbers without a decimal point (``width: 400``), other floats with ``repr``.
    """
    if isinstance(value, (bool, np.bool_, int, np.integer)):
        return str(int(value))
    value = float(value)
    if key.startswith("stage_"):
        return repr(value)
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def _tiny_png() -> bytes:
    """A valid 1x1 grey PNG (a stray file the reader must ignore)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", binascii.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00\x80"))
            + chunk(b"IEND", b""))


class SyntheticAcquisition:
    """A synthetic acquisition on disk and its ground truth.

    Everything is a deterministic function of :attr:`config`; the truth is recomputed from it rather than
    read back from the raw files. Build one with :func:`make_acquisition` (writes it) or
    :meth:`load` (an existing one).

    Parameters
    ----------
    out_dir : path-like
        Folder holding ``raw/`` and ``truth/``.
    config : SyntheticConfig
        All parameters.
    """

    def __init__(self, out_dir, config: SyntheticConfig):
        self.out_dir = Path(out_dir)
        self.raw_dir = self.out_dir / "raw"
        self.truth_dir = self.out_dir / "truth"
        self.config = config
        self._build_geometry()

    # ================================================================== geometry (pure, from config)
    def _rng(self, *tag: int) -> np.random.Generator:
        return np.random.default_rng([int(self.config.seed), *[int(t) for t in tag]])

    def _build_geometry(self) -> None:
        c = self.config
        self.slice_ids = c.slice_ids
        self._index = {sid: k for k, sid in enumerate(self.slice_ids)}
        self.grid_shape = (int(c.grid_shape[0]), int(c.grid_shape[1]))
        nty, ntx = self.grid_shape
        self.tile_shape = (int(c.n_z), int(c.ny), int(c.nx))
        self.pixel_mm = (c.height_um / c.ny / 1000.0, c.width_um / c.nx / 1000.0)  # (y, x)
        self.voxel_size_um = (float(c.axial_resolution_um), c.height_um / c.ny, c.width_um / c.nx)
        self.fov_mm = (c.width_um / 1000.0, c.height_um / 1000.0)  # (x, y)
        self.step_mm = (self.fov_mm[0] * (1 - c.overlap), self.fov_mm[1] * (1 - c.overlap))  # (x, y)
        step_px = (c.ny * (1 - c.overlap), c.nx * (1 - c.overlap))  # (y, x)
        n_sl = c.n_slices
        py, px = self.pixel_mm

        # Stage drift: a random walk in pixels, zero for the first slice.
        steps = self._rng(1).normal(0.0, 1.0, size=(n_sl, 2)) * float(c.drift_px)  # (x, y)
        steps[0] = 0.0
        self._drift_px = np.cumsum(steps, axis=0)
        self._drift_mm = self._drift_px * np.array([px, py])

        rehome = np.zeros((n_sl, 2))
        glitch = np.zeros((n_sl, 2))
        if c.rehoming_slice is not None:
            rehome[self._index[c.rehoming_slice]:] = c.rehoming_mm
        if c.encoder_glitch_slice is not None:
            glitch[self._index[c.encoder_glitch_slice]] = c.encoder_glitch_mm
        self._rehome_mm, self._glitch_mm = rehome, glitch

        aff = c.stage_affine_params()
        if aff is None:
            A = np.eye(2)
        else:
            th, sh = math.radians(aff["rotation_deg"]), math.radians(aff["shear_deg"])
            R = np.array([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]])
            A = R @ np.array([[1.0, math.tan(sh)], [0.0, 1.0]]) @ np.diag([aff["scale_x"], aff["scale_y"]])
        self._affine = A
        self._affine_params = aff

        jitter = self._rng(8).normal(0.0, 1.0, size=(n_sl, nty, ntx, 2)) * float(c.tile_jitter_px)  # (y, x) px

        # Nominal centres (mm, x/y) and nominal top-left relative to tile (0, 0) in pixels (y/x).
        iy_g, ix_g = np.meshgrid(np.arange(nty), np.arange(ntx), indexing="ij")
        nom_x = c.stage_origin_mm[0] + ix_g * self.step_mm[0]
        nom_y = c.stage_origin_mm[1] + iy_g * self.step_mm[1]
        self._grid_center_mm = (c.stage_origin_mm[0] + (ntx - 1) / 2 * self.step_mm[0],
                                c.stage_origin_mm[1] + (nty - 1) / 2 * self.step_mm[1])
        rel = np.stack([ix_g * self.step_mm[0] - (ntx - 1) / 2 * self.step_mm[0],
                        iy_g * self.step_mm[1] - (nty - 1) / 2 * self.step_mm[1]], axis=-1)  # (nty, ntx, 2) x/y
        aff_delta_mm = rel @ (A - np.eye(2)).T  # true - nominal, from the affine error

        tl_rel_px = np.zeros((n_sl, nty, ntx, 2))  # (y, x), relative to the nominal top-left of tile (0, 0)
        reported = np.zeros((n_sl, nty, ntx, 2))  # (x, y) mm
        for k in range(n_sl):
            shift_mm = aff_delta_mm + self._drift_mm[k] + rehome[k]  # (x, y)
            tl_rel_px[k, ..., 0] = iy_g * step_px[0] + shift_mm[..., 1] / py + jitter[k, ..., 0]
            tl_rel_px[k, ..., 1] = ix_g * step_px[1] + shift_mm[..., 0] / px + jitter[k, ..., 1]
            rep_x = nom_x + self._drift_mm[k, 0] + rehome[k, 0] + glitch[k, 0]
            rep_y = nom_y + self._drift_mm[k, 1] + rehome[k, 1] + glitch[k, 1]
            reported[k, ..., 0] = np.round(rep_x, 6)
            reported[k, ..., 1] = np.round(rep_y, 6)
        self._reported_mm = reported
        off = np.floor(tl_rel_px.reshape(-1, 2).min(axis=0))  # volume origin, whole pixels
        self._tl_px = tl_rel_px - off  # (y, x) in the volume frame, >= 0
        tl00_x = c.stage_origin_mm[0] - self.fov_mm[0] / 2
        tl00_y = c.stage_origin_mm[1] - self.fov_mm[1] / 2
        self.volume_origin_mm = (tl00_y + off[0] * py, tl00_x + off[1] * px)  # (y, x) of voxel (., 0, 0)
        far = np.ceil(self._tl_px.reshape(-1, 2).max(axis=0) + np.array([c.ny, c.nx])).astype(int)
        self.slice_offset_samples = c.slice_thickness_um / c.axial_resolution_um
        nz_vol = int(math.ceil((n_sl - 1) * self.slice_offset_samples)) + c.n_z
        self.volume_shape_full = (nz_vol, int(far[0]), int(far[1]))

        # Missing tiles
        self._missing = {(int(s), int(ix), int(iy)) for s, ix, iy in c.missing_tiles}

        # Galvo band per slice
        n_a = c.n_aline
        if c.galvo_offsets is not None:
            offsets = list(c.galvo_offsets)
        else:
            g = self._rng(2)
            candidates = np.array([p for p in range(n_a) if p != c.nx])
            draws = g.choice(candidates, size=n_sl - 1, replace=(n_sl - 1) > len(candidates)) \
                if n_sl > 1 else np.array([], dtype=int)
            offsets = [int(v) for v in draws]
            offsets.insert(min(1, n_sl - 1), int(c.nx))  # one slice (the second) is already aligned
        self._galvo = offsets
        bright = c.bright_band
        self._band_kind = ["bright" if (bright is True or (isinstance(bright, list) and sid in bright)) else "dark"
                           for sid in self.slice_ids]
        g = self._rng(5)
        self._band_level = []
        for kind in self._band_kind:
            lo, hi = c.bright_band_level if kind == "bright" else c.dark_band_level
            self._band_level.append(float(g.uniform(lo, hi)))

        # Interface (cut surface) per slice, in samples: I_k(x, y)
        g = self._rng(3)
        tilt = np.asarray(c.interface_tilt_um_per_mm, dtype=float)
        self._iface = []
        for _k in range(n_sl):
            self._iface.append({
                "depth_um": float(c.interface_depth_um + g.normal(0.0, 1.0) * c.interface_jitter_um),
                "tilt_um_per_mm": [float(v) for v in tilt * (1.0 + 0.1 * g.normal(0.0, 1.0, size=2))],
                "curvature_um_per_mm2": float(c.interface_curvature_um_per_mm2),
            })
        self._gain = [float(v) for v in np.clip(1.0 + self._rng(6).normal(0.0, 1.0, size=n_sl)
                                                 * c.slice_gain_jitter, 0.7, 1.3)]
        self._focus_z = int(c.focus_z) if c.focus_z is not None else int(round(0.35 * c.n_z))

        # Phantom: sized to the nominal mosaic, through the whole imaged block depth.
        mosaic_w = self.fov_mm[0] + (ntx - 1) * self.step_mm[0]
        mosaic_h = self.fov_mm[1] + (nty - 1) * self.step_mm[1]
        self.phantom = Phantom.random(
            self._rng(4), center_mm=self._grid_center_mm, extent_mm=(mosaic_w, mosaic_h),
            depth_mm=nz_vol * c.axial_resolution_um / 1000.0, blob_radius_um=c.blob_radius_um,
            blob_spacing_um=c.blob_spacing_um, blob_fill=c.blob_fill, fibre_radius_um=c.fibre_radius_um,
            fibre_stripe_um=c.fibre_stripe_um, n_fibres=c.n_fibres, n_vertical_fibres=c.n_vertical_fibres,
            n_ventricles=c.n_ventricles, edge_width_um=c.edge_width_um, agarose_level=c.agarose_level,
            tissue_level=c.tissue_level)

        # Flat field (illumination vignetting), the same for every tile: 1 at the (slightly off-centre)
        # peak, vignetting_min in the far corner.
        yy = (np.arange(c.ny) - 0.47 * (c.ny - 1))[:, None] / c.ny
        xx = (np.arange(c.nx) - 0.54 * (c.nx - 1))[None, :] / c.nx
        r2 = (xx / 0.9) ** 2 + (yy / 1.0) ** 2
        bump = np.exp(-r2 / (2 * 0.35**2))
        bump = (bump - bump.min()) / (bump.max() - bump.min())
        self.flatfield = (c.vignetting_min + (1 - c.vignetting_min) * bump).astype(_F32)

    # ================================================================== public truth API
    @classmethod
    def load(cls, out_dir) -> "SyntheticAcquisition":
        """Open an acquisition written by :func:`make_acquisition`.

        Parameters
        ----------
        out_dir : path-like
            The folder holding ``raw/`` and ``truth/``.
        """
        path = Path(out_dir) / "truth" / _TRUTH_JSON
        with open(path) as f:
            truth = json.load(f)
        return cls(out_dir, SyntheticConfig.from_dict(truth["config"]))

    def _k(self, sid: int) -> int:
        try:
            return self._index[int(sid)]
        except KeyError:
            raise KeyError(f"slice id {sid} is not in this acquisition ({self.slice_ids})") from None

    def _check_tile(self, ix: int, iy: int) -> None:
        nty, ntx = self.grid_shape
        if not (0 <= ix < ntx and 0 <= iy < nty):
            raise KeyError(f"tile (ix={ix}, iy={iy}) is outside the {ntx} x {nty} grid")

    def galvo_offset(self, sid: int) -> int:
        """A-line index ``p`` where the fly-back band starts in the raw tiles of slice ``sid``."""
        return int(self._galvo[self._k(sid)])

    def galvo_band_kind(self, sid: int) -> str:
        """``"dark"`` or ``"bright"``."""
        return self._band_kind[self._k(sid)]

    def tile_present(self, sid: int, ix: int, iy: int) -> bool:
        """Whether the tile folder was written."""
        self._k(sid)
        self._check_tile(ix, iy)
        return (int(sid), int(ix), int(iy)) not in self._missing

    def tiles(self, sid: int, present_only: bool = True) -> list[tuple[int, int]]:
        """``(ix, iy)`` of the tiles of a slice (row-major: iy then ix)."""
        nty, ntx = self.grid_shape
        return [(ix, iy) for iy in range(nty) for ix in range(ntx)
                if not present_only or self.tile_present(sid, ix, iy)]

    def stage_position_mm(self, sid: int, ix: int, iy: int) -> tuple[float, float]:
        """Reported ``(x_mm, y_mm)``, exactly as written in the tile's info.txt."""
        self._check_tile(ix, iy)
        x, y = self._reported_mm[self._k(sid), iy, ix]
        return float(x), float(y)

    def true_tile_position_px(self, sid: int, ix: int, iy: int) -> tuple[float, float]:
        """True ``(y, x)`` of the tile's pixel (0, 0) in the volume frame, in full-resolution pixels."""
        self._check_tile(ix, iy)
        y, x = self._tl_px[self._k(sid), iy, ix]
        return float(y), float(x)

    def true_tile_position_mm(self, sid: int, ix: int, iy: int) -> tuple[float, float]:
        """True ``(x_mm, y_mm)`` of the tile's pixel (0, 0) in the sample (stage) frame."""
        y, x = self.true_tile_position_px(sid, ix, iy)
        return (self.volume_origin_mm[1] + x * self.pixel_mm[1], self.volume_origin_mm[0] + y * self.pixel_mm[0])

    def stage_drift_mm(self, sid: int) -> tuple[float, float]:
        """The slice's stage drift ``(x, y)`` mm (true and reported; relative to the first slice)."""
        x, y = self._drift_mm[self._k(sid)]
        return float(x), float(y)

    @property
    def stage_affine_matrix(self) -> np.ndarray:
        """2x2 matrix ``A`` (acting on (x, y) mm about the grid centre): true = A @ nominal."""
        return self._affine.copy()

    def expected_shifts_mm(self) -> list[tuple[int, int, float, float]]:
        """Shifts between consecutive slices from the reported stage positions.

        Per slice, the mosaic bounds are the min/max over present tiles of the reported positions
        -/+ half the tile FOV; per axis, the shift (moving - fixed) of the min bounds and of the max bounds
        are computed and the one of smaller magnitude is kept (as ``shifts_xy.csv`` does).

        Returns
        -------
        list of (fixed_id, moving_id, x_mm, y_mm)
        """
        bounds = {}
        for sid in self.slice_ids:
            pos = np.array([self.stage_position_mm(sid, ix, iy) for ix, iy in self.tiles(sid)])
            half = np.array(self.fov_mm) / 2
            bounds[sid] = (pos.min(axis=0) - half, pos.max(axis=0) + half)
        out = []
        for fixed, moving in zip(self.slice_ids[:-1], self.slice_ids[1:]):
            d_min = bounds[moving][0] - bounds[fixed][0]
            d_max = bounds[moving][1] - bounds[fixed][1]
            shift = np.where(np.abs(d_min) <= np.abs(d_max), d_min, d_max)
            out.append((int(fixed), int(moving), float(shift[0]), float(shift[1])))
        return out

    def interface_depth_samples(self, sid: int, x_mm, y_mm) -> np.ndarray:
        """True sample depth of the cut surface of slice ``sid`` at sample-frame positions (float32)."""
        p = self._iface[self._k(sid)]
        cx, cy = self._grid_center_mm
        dx = np.asarray(x_mm, dtype=np.float64) - cx
        dy = np.asarray(y_mm, dtype=np.float64) - cy
        tx, ty = p["tilt_um_per_mm"]
        um = p["depth_um"] + tx * dx + ty * dy + p["curvature_um_per_mm2"] * (dx * dx + dy * dy)
        return (um / self.config.axial_resolution_um).astype(_F32)

    def interface_depth_map(self, sid: int) -> np.ndarray:
        """Interface depth (samples) of slice ``sid`` at every pixel of the full-resolution volume frame.

        This is what ``truth/interface_depth_z{sid}.npy`` holds: shape ``volume_shape_full[1:]``; the map is
        defined everywhere (also where no tile of the slice lies).
        """
        _, vy, vx = self.volume_shape_full
        y = self.volume_origin_mm[0] + np.arange(vy)[:, None] * self.pixel_mm[0]
        x = self.volume_origin_mm[1] + np.arange(vx)[None, :] * self.pixel_mm[1]
        return self.interface_depth_samples(sid, x, y)

    def _tile_coords(self, sid: int, ix: int, iy: int):
        y0, x0 = self.true_tile_position_px(sid, ix, iy)
        c = self.config
        x = self.volume_origin_mm[1] + (x0 + np.arange(c.nx, dtype=np.float64)) * self.pixel_mm[1]
        y = self.volume_origin_mm[0] + (y0 + np.arange(c.ny, dtype=np.float64)) * self.pixel_mm[0]
        return x[None, None, :], y[None, :, None]

    def block_depth_mm(self, sid: int, ix: int, iy: int) -> np.ndarray:
        """Block depth (mm) imaged by every sample of a tile, ``(n_z, ny, nx)`` float32.

        ``d = k * T + (z - I_k(x, y)) * dz``; samples with ``d < k * T`` lie above the cut surface.
        """
        rel = self._rel_depth(sid, ix, iy)
        k = self._k(sid)
        c = self.config
        return (_F32(k * c.slice_thickness_um / 1000.0) + rel * _F32(c.axial_resolution_um / 1000.0)).astype(_F32)

    def _rel_depth(self, sid, ix, iy) -> np.ndarray:
        x, y = self._tile_coords(sid, ix, iy)
        iface = self.interface_depth_samples(sid, x, y)  # (1, ny, nx)
        z = np.arange(self.config.n_z, dtype=_F32)[:, None, None]
        return z - iface  # samples below the surface, (n_z, ny, nx)

    def tissue_tile(self, sid: int, ix: int, iy: int) -> np.ndarray:
        """Noise-free object seen by a tile: phantom below the cut surface, medium above, ``(n_z, ny, nx)``.

        No illumination, attenuation, focus, band or noise: the ground truth for depth/stack checks.
        """
        self._check_tile(ix, iy)
        c = self.config
        k = self._k(sid)
        x, y = self._tile_coords(sid, ix, iy)
        rel = self._rel_depth(sid, ix, iy)
        d = _F32(k * c.slice_thickness_um / 1000.0) + rel * _F32(c.axial_resolution_um / 1000.0)
        tissue = self.phantom.evaluate(x, y, d)
        w = np.clip(rel + _F32(0.5), 0, 1)  # fraction of the sample below the surface
        medium = _F32(c.medium_level)
        return (medium + w * (tissue - medium)).astype(_F32, copy=False)

    def clean_tile(self, sid: int, ix: int, iy: int) -> np.ndarray:
        """Noise-free signal of a tile (before band and noise), ``(n_z, ny, nx)`` float32."""
        c = self.config
        k = self._k(sid)
        obj = self.tissue_tile(sid, ix, iy)
        rel = self._rel_depth(sid, ix, iy)
        atten = np.exp(-np.maximum(rel, 0) * _F32(c.axial_resolution_um / c.attenuation_length_um))
        z = np.arange(c.n_z, dtype=np.float64)
        gauss = np.exp(-0.5 * ((z - self._focus_z) * c.axial_resolution_um / c.focus_width_um) ** 2)
        focus = (c.focus_floor + (1 - c.focus_floor) * gauss).astype(_F32)[:, None, None]
        obj *= atten
        obj *= focus
        obj *= self.flatfield[None] * _F32(self._gain[k])
        return obj

    def _frames(self, sid: int, ix: int, iy: int) -> np.ndarray:
        """All noisy frames of a tile before the galvo roll: ``(ny, n_repeat, nx + n_extra, n_z)`` C-order.

        C order ``(ny, n_repeat, n_aline, n_z)`` is the disk order of ``(n_z, n_aline, ny * n_repeat)``
        Fortran, with frame ``f = b * n_repeat + r``.
        """
        c = self.config
        k = self._k(sid)
        sig = self.clean_tile(sid, ix, iy)  # (n_z, ny, nx)
        band = _F32(self._band_level[k]) * sig.mean(axis=2, keepdims=True, dtype=np.float64).astype(_F32)
        full = np.concatenate([sig, np.broadcast_to(band, (c.n_z, c.ny, c.n_extra))], axis=2)
        full_t = np.ascontiguousarray(full.transpose(1, 2, 0))  # (ny, n_aline, n_z)
        del sig, full
        rng = self._rng(7, sid, ix, iy)
        shape = (c.ny, c.n_repeat, c.n_aline, c.n_z)
        frames = rng.standard_gamma(c.speckle_shape, size=shape, dtype=_F32)
        frames *= _F32(1.0 / c.speckle_shape)
        frames *= full_t[:, None]
        noise = rng.standard_exponential(size=shape, dtype=_F32)
        noise *= _F32(c.noise_floor)
        frames += noise
        return frames

    def raw_frames(self, sid: int, ix: int, iy: int) -> np.ndarray:
        """The tile exactly as stored: ``(n_z, nx + n_extra, ny * n_repeat)`` float32 (a Fortran-order view)."""
        c = self.config
        frames = np.roll(self._frames(sid, ix, iy), self.galvo_offset(sid) - c.nx, axis=2)
        return frames.reshape(c.ny * c.n_repeat, c.n_aline, c.n_z).T

    def true_tile(self, sid: int, ix: int, iy: int) -> np.ndarray:
        """What a correct reader returns for the tile: ``(n_z, ny, nx)`` float32.

        Regenerated (not read from disk): repeat mean ``np.mean(frames, axis=repeat, dtype=np.float32)``,
        galvo band removed, cropped to the ``nx`` true A-lines.
        """
        self._check_tile(ix, iy)
        frames = self._frames(sid, ix, iy)
        mean = np.mean(frames, axis=1, dtype=_F32)  # (ny, n_aline, n_z)
        return np.ascontiguousarray(mean[:, : self.config.nx, :].transpose(2, 0, 1))

    @property
    def true_volume(self):
        """The ground-truth tissue volume (zarr array, read-only), see :attr:`true_volume_voxel_size_um`."""
        import zarr

        return zarr.open_array(str(self.truth_dir / "volume.zarr"), mode="r")

    @property
    def true_volume_downsample(self) -> int:
        """Voxel ``i`` of ``truth/volume.zarr`` is full-resolution volume-frame voxel ``i * this``."""
        return int(self.config.truth_downsample)

    @property
    def true_volume_voxel_size_um(self) -> tuple[float, float, float]:
        """Voxel size (axial, y, x) of ``truth/volume.zarr`` in micrometres."""
        f = self.true_volume_downsample
        return tuple(v * f for v in self.voxel_size_um)

    @property
    def true_volume_shape(self) -> tuple[int, int, int]:
        f = self.true_volume_downsample
        return tuple(-(-n // f) for n in self.volume_shape_full)

    def truth_block(self, region) -> np.ndarray:
        """Evaluate the truth volume at its stored resolution.

        Parameters
        ----------
        region : tuple of 3 slices
            Index range (z, y, x) in ``truth/volume.zarr`` voxels (steps are ignored).
        """
        f = self.true_volume_downsample
        shape = self.true_volume_shape
        idx = [np.arange(*s.indices(n)) for s, n in zip(region, shape)]
        d = (idx[0] * f * self.voxel_size_um[0] / 1000.0)[:, None, None]
        y = (self.volume_origin_mm[0] + idx[1] * f * self.pixel_mm[0])[None, :, None]
        x = (self.volume_origin_mm[1] + idx[2] * f * self.pixel_mm[1])[None, None, :]
        return self.phantom.evaluate(x, y, d)

    def tile_dir(self, sid: int, ix: int, iy: int) -> Path:
        """Folder of a raw tile (whether or not it was written)."""
        name = tile_folder_name(sid, ix, iy)
        if self.config.layout == "grouped":
            return self.raw_dir / f"z{sid:02d}" / name
        return self.raw_dir / name

    def info(self, sid: int, ix: int, iy: int) -> dict:
        """The key/values written to the tile's info.txt (in order)."""
        c = self.config
        k = self._k(sid)
        x, y = self.stage_position_mm(sid, ix, iy)
        d = {
            "nx": c.nx, "ny": c.ny, "n_repeat": c.n_repeat, "width": c.width_um, "height": c.height_um,
            "n_extra": c.n_extra, "line_rate": c.line_rate, "exposure": c.exposure, "alinerepeat": c.alinerepeat,
            "top_z": 0, "bottom_z": c.n_z - 1, "focus_z": self._focus_z, "stage_x_pos_mm": x,
            "stage_y_pos_mm": y,
            "stage_z_pos_mm": round(c.stage_z_origin_mm + k * c.slice_thickness_um / 1000.0, 6),
        }
        if c.write_axial_resolution:
            d["axial_resolution"] = c.axial_resolution_um
        return d

    # ================================================================== truth record
    def truth_dict(self) -> dict:
        """Everything ``truth/truth.json`` holds (see :func:`make_acquisition`)."""
        c = self.config
        slices = []
        for k, sid in enumerate(self.slice_ids):
            tiles = []
            for iy in range(self.grid_shape[0]):
                for ix in range(self.grid_shape[1]):
                    rx, ry = self.stage_position_mm(sid, ix, iy)
                    tx, ty = self.true_tile_position_mm(sid, ix, iy)
                    py_, px_ = self.true_tile_position_px(sid, ix, iy)
                    tiles.append({
                        "ix": ix, "iy": iy, "present": self.tile_present(sid, ix, iy),
                        "folder": str(self.tile_dir(sid, ix, iy).relative_to(self.out_dir)),
                        "reported_stage_mm": [rx, ry],
                        "true_top_left_mm": [tx, ty],
                        "true_center_mm": [tx + self.fov_mm[0] / 2, ty + self.fov_mm[1] / 2],
                        "true_top_left_px": [py_, px_],
                    })
            slices.append({
                "slice_id": sid, "index": k,
                "galvo_offset": self.galvo_offset(sid), "galvo_band": self._band_kind[k],
                "galvo_band_level": self._band_level[k],
                "galvo_roll_to_fix": int((c.nx - self.galvo_offset(sid)) % c.n_aline),
                "drift_px": [float(v) for v in self._drift_px[k]],
                "drift_mm": list(self.stage_drift_mm(sid)),
                "encoder_glitch": bool(np.any(self._glitch_mm[k] != 0)),
                "encoder_glitch_mm": [float(v) for v in self._glitch_mm[k]],
                "rehomed": bool(c.rehoming_slice is not None and sid == c.rehoming_slice),
                "rehoming_offset_mm": [float(v) for v in self._rehome_mm[k]],
                "cut_depth_um": k * c.slice_thickness_um,
                "interface": self._iface[k],
                "interface_depth_file": f"interface_depth_z{sid:02d}.npy",
                "gain": self._gain[k],
                "stage_z_mm": self.info(sid, 0, 0)["stage_z_pos_mm"],
                "tiles": tiles,
            })
        return {
            "format_version": _FORMAT_VERSION,
            "preset": c.preset, "seed": c.seed, "config": c.to_dict(),
            "slice_ids": self.slice_ids,
            "voxel_size_um": list(self.voxel_size_um),
            "tile_shape": list(self.tile_shape), "n_extra": c.n_extra, "n_repeat": c.n_repeat,
            "grid_shape": list(self.grid_shape),
            "tile_fov_mm": list(self.fov_mm), "tile_step_mm": list(self.step_mm), "overlap": c.overlap,
            "slice_thickness_um": c.slice_thickness_um,
            "slice_offset_samples": self.slice_offset_samples,
            "focus_z": self._focus_z,
            "stage_affine": None if self._affine_params is None else {
                **self._affine_params, "matrix_xy": self._affine.tolist(),
                "center_mm": list(self._grid_center_mm)},
            "raw_format": {
                "layout": c.layout, "n_bin_files": c.n_bin_files, "dtype": "<f4",
                "file_shape": "(n_z, nx + n_extra, n_frames_in_file), Fortran order",
                "frame_order": "frame = bscan * n_repeat + repeat",
                "repeat_mean": "np.mean(frames, axis=repeat, dtype=np.float32)",
            },
            "volume": {
                "path": "volume.zarr", "frame": "block depth kz * dz; (y, x) = origin_mm + index * pixel",
                "origin_mm_yx": list(self.volume_origin_mm), "shape_full": list(self.volume_shape_full),
                "downsample": self.true_volume_downsample, "shape": list(self.true_volume_shape),
                "voxel_size_um": list(self.true_volume_voxel_size_um),
                "note": ("stored at reduced resolution: voxel i = full-resolution voxel i * downsample"
                         if self.true_volume_downsample > 1 else "full resolution"),
            },
            "interface_depth": ("per slice, float32 (Vy, Vx) over the full-resolution volume frame: sample "
                                "depth of the cut surface in the tiles covering that pixel"),
            "flatfield": "flatfield.npy, (ny, nx) float32, multiplies every tile",
            "expected_shifts_mm": [list(s) for s in self.expected_shifts_mm()],
            "depth_overlap_um": self.depth_overlap_um(),
            "slices": slices,
            "phantom": {k: v for k, v in vars(self.phantom.params).items()},
        }

    def interface_range_samples(self, sid: int) -> tuple[float, float]:
        """Smallest and largest interface depth (samples) over all tiles of slice ``sid``."""
        lo, hi = np.inf, -np.inf
        for ix, iy in self.tiles(sid, present_only=False):
            x, y = self._tile_coords(sid, ix, iy)
            i = self.interface_depth_samples(sid, x, y)
            lo, hi = min(lo, float(i.min())), max(hi, float(i.max()))
        return lo, hi

    def depth_overlap_um(self) -> float:
        """Smallest depth (um) imaged twice by consecutive slices (below the cut surface), over all pixels.

        Slice ``k`` images tissue down to ``(n_z - 1 - I_k) * dz`` below its cut; the next cut is ``T`` lower.
        """
        c = self.config
        return float(min((c.n_z - 1 - self.interface_range_samples(sid)[1]) * c.axial_resolution_um
                         - c.slice_thickness_um for sid in self.slice_ids))

    # ================================================================== writing
    def _write_tile(self, sid: int, ix: int, iy: int) -> None:
        c = self.config
        folder = self.tile_dir(sid, ix, iy)
        folder.mkdir(parents=True, exist_ok=False)
        lines = ["Scan info"] + [f"{key}: {_fmt(key, v)}" for key, v in self.info(sid, ix, iy).items()]
        (folder / "info.txt").write_text("\n".join(lines) + "\n")
        frames = np.roll(self._frames(sid, ix, iy), self.galvo_offset(sid) - c.nx, axis=2)
        frames = frames.reshape(c.ny * c.n_repeat, c.n_aline, c.n_z).astype("<f4", copy=False)
        bounds = np.linspace(0, frames.shape[0], c.n_bin_files + 1).round().astype(int)
        for i in range(c.n_bin_files):
            np.ascontiguousarray(frames[bounds[i]: bounds[i + 1]]).tofile(folder / f"image_{i:05d}.bin")

    def _write_strays(self) -> None:
        (self.raw_dir / "notes.txt").write_text("Synthetic S-OCT acquisition (napari-soct). Not a tile.\n")
        (self.raw_dir / "logs").mkdir(exist_ok=True)
        (self.raw_dir / "logs" / "acquisition.log").write_text("started\nfinished\n")
        (self.raw_dir / "tile_preview.png").write_bytes(_tiny_png())
        if self.config.layout == "grouped":
            (self.raw_dir / f"z{self.slice_ids[0]:02d}" / "scan_settings.ini").write_text("[scan]\nmode=3d\n")

    def _write(self, progress: Progress, n_workers: int) -> None:
        import zarr

        c = self.config
        self.raw_dir.mkdir(parents=True, exist_ok=True)
        self.truth_dir.mkdir(parents=True, exist_ok=True)
        jobs = [(sid, ix, iy) for sid in self.slice_ids for ix, iy in self.tiles(sid)]

        def run_bounded(func, items, on_done):
            # A small window of tasks in flight keeps memory independent of the acquisition size.
            with ThreadPoolExecutor(max_workers=n_workers) as pool:
                pending = {}
                it = iter(items)
                for item in it:
                    pending[pool.submit(func, item)] = item
                    if len(pending) >= 2 * n_workers:
                        break
                while pending:
                    done, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in done:
                        item = pending.pop(fut)
                        on_done(item, fut.result())
                    for item in it:
                        pending[pool.submit(func, item)] = item
                        if len(pending) >= 2 * n_workers:
                            break

        run_bounded(lambda t: self._write_tile(*t), jobs,
                    lambda t, _: progress.advance(1, f"tile x{t[1]:02d} y{t[2]:02d} z{t[0]:02d}"))
        if c.stray_files:
            self._write_strays()

        # Truth: flat field, interface maps, then the volume chunk by chunk.
        np.save(self.truth_dir / "flatfield.npy", self.flatfield)
        for sid in self.slice_ids:
            np.save(self.truth_dir / f"interface_depth_z{sid:02d}.npy", self.interface_depth_map(sid))
        shape = self.true_volume_shape
        chunks = tuple(min(a, b) for a, b in zip(c.truth_chunks, shape))
        arr = zarr.create_array(store=str(self.truth_dir / "volume.zarr"), shape=shape, chunks=chunks,
                                dtype="float32", fill_value=0.0,
                                attributes={"voxel_size_um": list(self.true_volume_voxel_size_um),
                                            "origin_mm_yx": list(self.volume_origin_mm),
                                            "downsample": self.true_volume_downsample,
                                            "axes": ["z", "y", "x"]})
        blocks = [tuple(slice(i * ch, min((i + 1) * ch, n)) for i, ch, n in zip(idx, chunks, shape))
                  for idx in np.ndindex(*[-(-n // ch) for n, ch in zip(shape, chunks)])]

        def store(region, block):
            arr[region] = block
            progress.advance(1, "truth volume")

        run_bounded(self.truth_block, blocks, store)
        with open(self.truth_dir / _TRUTH_JSON, "w") as f:
            json.dump(self.truth_dict(), f, indent=1)
        progress.advance(1, "truth.json")

    def _n_volume_blocks(self) -> int:
        shape = self.true_volume_shape
        chunks = tuple(min(a, b) for a, b in zip(self.config.truth_chunks, shape))
        return int(np.prod([-(-n // ch) for n, ch in zip(shape, chunks)]))

    def __repr__(self) -> str:
        return (f"SyntheticAcquisition({str(self.out_dir)!r}, preset={self.config.preset!r}, "
                f"seed={self.config.seed}, slices={self.slice_ids}, grid={self.grid_shape}, "
                f"tile={self.tile_shape})")


def make_acquisition(out_dir, preset: str = "tiny", seed: int = 0, progress=None, *, cancel=None,
                     n_workers: int | None = None, **overrides) -> SyntheticAcquisition:
    """Generate a synthetic S-OCT acquisition with ground truth.

    Writes ``out_dir/raw/`` (tile folders in the lab raw format, plus stray non-tile files when
    ``stray_files``) and ``out_dir/truth/``:

    - ``truth.json``: the full config, voxel sizes, tile and grid shapes, the stage affine error, and per
      slice the galvo offset and band kind, drift, glitch/re-homing flags and amounts, the interface
      parameters, and per tile ``present``, reported and true positions (mm and volume-frame pixels);
    - ``flatfield.npy`` (ny, nx); ``interface_depth_z{sid:02d}.npy`` per slice (full-resolution volume
      frame); ``volume.zarr`` (zarr v3, float32, the phantom on the volume grid, possibly downsampled).

    Parameters
    ----------
    out_dir : path-like
        Output folder (created).
    preset : str
        ``"tiny"``, ``"small"`` or ``"bench"`` (see :data:`PRESETS`).
    seed : int
        Seed; same seed and parameters give byte-identical raw files.
    progress : callable, optional
        ``progress(done, total, message)``.
    cancel : object with ``is_set()``, optional
        Cancellation flag; on cancel what was written is removed and :class:`Cancelled` is raised.
    n_workers : int, optional
        Threads rendering tiles (numpy releases the GIL); default ``min(4, cpu count)``. Does not change
        the output.
    **overrides
        Any :class:`SyntheticConfig` field.

    Returns
    -------
    SyntheticAcquisition

    Raises
    ------
    FileExistsError
        If ``out_dir/raw`` or ``out_dir/truth`` exists and is not empty.
    """
    config = SyntheticConfig.from_preset(preset, seed=seed, **overrides)
    acq = SyntheticAcquisition(out_dir, config)
    for d in (acq.raw_dir, acq.truth_dir):
        if d.exists() and any(d.iterdir()):
            raise FileExistsError(f"{d} exists and is not empty; refusing to overwrite it")
    for sid in acq.slice_ids:
        lo, hi = acq.interface_range_samples(sid)
        if lo < 0 or hi > config.n_z - 2:
            raise ValueError(f"the cut surface of slice {sid} spans samples {lo:.1f}..{hi:.1f}, outside the "
                             f"image (0..{config.n_z - 2}); reduce interface_depth_um / tilt / curvature")
    if acq.depth_overlap_um() <= 0:
        warnings.warn(f"consecutive slices do not overlap in depth (overlap {acq.depth_overlap_um():.1f} um): "
                      "the imaged depth below the surface is smaller than slice_thickness_um", stacklevel=2)
    if n_workers is None:
        n_workers = max(1, min(4, os.cpu_count() or 1))
    n_tiles = sum(len(acq.tiles(sid)) for sid in acq.slice_ids)
    prog = Progress(n_tiles + acq._n_volume_blocks() + 1, progress, cancel)
    created = [d for d in (acq.raw_dir, acq.truth_dir) if not d.exists()]
    try:
        prog.check()
        acq._write(prog, int(n_workers))
    except Cancelled:
        for d in (acq.raw_dir, acq.truth_dir):
            if not d.exists():
                continue
            if d in created:
                shutil.rmtree(d)
            else:  # it existed (empty) before: empty it again
                for p in d.iterdir():
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
        raise
    return acq
