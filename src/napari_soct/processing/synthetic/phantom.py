"""An analytic 3D brain-block phantom, defined in physical coordinates.

The phantom is a function ``value = phantom.evaluate(x_mm, y_mm, d_mm)`` that can be sampled anywhere:
``x, y`` are lateral sample-frame coordinates in millimetres (the same frame as the stage positions) and
``d`` is the depth in the block in millimetres, measured downwards from the cut surface of the first slice.
It is evaluated procedurally (no stored volume), so a tile and the ground-truth volume sample exactly the
same function, and a bench-size acquisition needs no bench-size memory.

Structure (all smooth or with sharp but well-defined edges, not noise):

- a brain outline (an ellipse-like cross-section with a wavy boundary that shrinks slowly with depth)
  inside agarose, with a darker midline fissure and a brighter deep region (a cortex-like gradient);
- oriented fibre bundles: tubes along curved paths, mostly running laterally with a slow depth
  undulation (with fine stripes along their direction), plus a few solid ones running through the depth;
- dark cell-body-like blobs on a jittered lattice (procedural: the blob of a lattice cell is found by
  hashing the cell index, so the cost per sample is constant whatever the volume size);
- dark ventricle-like ellipsoids;
- tissue heterogeneity: a sum of random plane waves from about one to ten cell spacings.

Values are positive, of order 0.1 (agarose) to ~1.5 (bright fibres).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Phantom", "PhantomParams"]

# Large odd constants to mix lattice indices into a 64-bit hash (any distinct odd values do).
_P1 = np.uint64(0x9E3779B97F4A7C15)
_P2 = np.uint64(0xC2B2AE3D27D4EB4F)
_P3 = np.uint64(0x165667B19E3779F9)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _mix64(h: np.ndarray) -> np.ndarray:
    """Finalise a 64-bit hash (the splitmix64 output function), so nearby cells look unrelated."""
    h = (h ^ (h >> np.uint64(30))) * _M1
    h = (h ^ (h >> np.uint64(27))) * _M2
    return h ^ (h >> np.uint64(31))


def _bits01(h: np.ndarray, shift: int) -> np.ndarray:
    """A uniform number in [0, 1) from 12 bits of ``h`` starting at ``shift`` (float32)."""
    return ((h >> np.uint64(shift)) & np.uint64(0xFFF)).astype(np.float32) * np.float32(1.0 / 4096.0)


def _random_rotation(rng: np.random.Generator) -> list[list[float]]:
    """A uniformly random 3D rotation matrix (from a random unit quaternion)."""
    q = rng.normal(size=4)
    w, x, y, z = q / np.linalg.norm(q)
    m = [[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
         [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
         [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]]
    return [[float(v) for v in row] for row in m]


@dataclass
class PhantomParams:
    """Random parameters of one phantom (drawn once from the seed; plain numbers, JSON friendly)."""

    center_mm: tuple[float, float]
    semi_axes_mm: tuple[float, float]
    depth_mm: float
    outline_harmonics: list[tuple[int, float, float]]  # (order, amplitude, phase)
    shrink_per_mm: float
    edge_width_mm: float
    fissure: dict
    texture: list[dict]
    fibres: list[dict]
    vertical_fibres: list[dict]
    ventricles: list[dict]
    blob_radius_mm: float
    blob_spacing_mm: float
    blob_fill: float
    blob_seed: int
    blob_rotation: list[list[float]]  # 3x3 rotation of the blob lattice
    agarose_level: float
    tissue_level: float


class Phantom:
    """The analytic tissue block.

    Parameters
    ----------
    params : PhantomParams
        Its random parameters (see :meth:`random`).
    """

    def __init__(self, params: PhantomParams):
        self.params = params
        self._cx, self._cy = (float(v) for v in params.center_mm)

    # ------------------------------------------------------------------ construction
    @classmethod
    def random(cls, rng: np.random.Generator, *, center_mm, extent_mm, depth_mm: float, blob_radius_um: float,
               blob_spacing_um: float, blob_fill: float, fibre_radius_um: tuple[float, float],
               fibre_stripe_um: float, n_fibres: int, n_vertical_fibres: int, n_ventricles: int,
               edge_width_um: float, agarose_level: float, tissue_level: float) -> "Phantom":
        """Draw a phantom that fits a mosaic of lateral size ``extent_mm`` (x, y) centred on ``center_mm``.

        Parameters
        ----------
        rng : numpy.random.Generator
            Source of all random choices (the phantom is a pure function of it).
        center_mm, extent_mm : (float, float)
            Mosaic centre and size, (x, y), millimetres: the brain outline is sized so that its edge and
            some agarose show inside the mosaic.
        depth_mm : float
            Block depth covered by the acquisition; structures are spread over it.
        blob_radius_um, blob_spacing_um, blob_fill : float
            Cell bodies: radius, lattice spacing, and fraction of lattice cells holding one.
        fibre_radius_um : (float, float)
            Range of fibre bundle radii.
        fibre_stripe_um : float
            Period of the fine stripes along the bundles.
        n_fibres, n_vertical_fibres, n_ventricles : int
            Numbers of lateral bundles, through-depth bundles and dark ventricles.
        edge_width_um : float
            Width of the brain/agarose boundary ramp.
        agarose_level, tissue_level : float
            Mean scattering of the agarose and of the tissue.
        """
        w, h = (float(v) for v in extent_mm)
        size = min(w, h)
        ax, ay = 0.40 * w, 0.38 * h
        harmonics = [(k, float(rng.uniform(0.02, 0.06)), float(rng.uniform(0, 2 * np.pi))) for k in (2, 3, 5)]
        fissure = {
            "x0": float(rng.uniform(-0.05, 0.05) * w), "amp": float(rng.uniform(0.02, 0.05) * w),
            "wavelength": float(rng.uniform(0.8, 1.5) * h), "phase": float(rng.uniform(0, 2 * np.pi)),
            "width": 1.5 * edge_width_um / 1000.0, "depth_slope": float(rng.uniform(-0.1, 0.1)),
        }
        # Tissue heterogeneity: a sum of random plane waves from the cell scale to a few cell sizes, so
        # that every tile (and its depth-average) carries texture for registration.
        texture = []
        n_tex = 24
        for i in range(n_tex):
            wl = float(blob_spacing_um / 1000.0 * np.exp(rng.uniform(np.log(1.5), np.log(10.0))))
            direction = rng.normal(size=3)
            direction[2] *= 0.5  # structures a bit elongated in depth
            direction /= np.linalg.norm(direction)
            texture.append({"k": [float(v) for v in 2 * np.pi / wl * direction],
                            "phase": float(rng.uniform(0, 2 * np.pi)),
                            "amp": float(rng.uniform(0.5, 1.0) * 0.3 / np.sqrt(n_tex))})
        fibres = []
        r_lo, r_hi = (v / 1000.0 for v in fibre_radius_um)
        for i in range(n_fibres):
            # Spread the bundles over the depth so that every slice sees some.
            d0 = depth_mm * (i + rng.uniform(0.25, 0.75)) / max(n_fibres, 1)
            fibres.append({
                "angle": float(rng.uniform(0, np.pi)), "v0": float(rng.uniform(-0.3, 0.3) * size),
                "amp": float(rng.uniform(0.04, 0.12) * size), "wavelength": float(rng.uniform(0.6, 1.4) * size),
                "phase": float(rng.uniform(0, 2 * np.pi)), "d0": float(d0),
                "d_amp": float(rng.uniform(0.02, 0.08) * depth_mm),
                "d_wavelength": float(rng.uniform(0.5, 1.2) * size), "d_phase": float(rng.uniform(0, 2 * np.pi)),
                "radius": float(rng.uniform(r_lo, r_hi)), "depth_aspect": float(rng.uniform(1.2, 2.5)),
                "stripe": fibre_stripe_um / 1000.0 * float(rng.uniform(0.9, 1.1)),
                "gain": float(rng.uniform(0.5, 0.9)),
            })
        vertical = []
        for _ in range(n_vertical_fibres):
            vertical.append({
                "x0": float(rng.uniform(-0.25, 0.25) * w), "y0": float(rng.uniform(-0.25, 0.25) * h),
                "amp_x": float(rng.uniform(0.02, 0.06) * size), "amp_y": float(rng.uniform(0.02, 0.06) * size),
                "wavelength": float(rng.uniform(0.8, 1.6) * depth_mm), "phase": float(rng.uniform(0, 2 * np.pi)),
                "radius": float(rng.uniform(r_lo, r_hi)), "gain": float(rng.uniform(0.4, 0.7)),
            })
        ventricles = []
        for _ in range(n_ventricles):
            ventricles.append({
                "x0": float(rng.uniform(-0.2, 0.2) * w), "y0": float(rng.uniform(-0.2, 0.2) * h),
                "d0": float(rng.uniform(0.3, 0.7) * depth_mm), "a": float(rng.uniform(0.06, 0.12) * w),
                "b": float(rng.uniform(0.03, 0.06) * h), "c": float(rng.uniform(0.3, 0.6) * depth_mm),
                "angle": float(rng.uniform(0, np.pi)),
            })
        params = PhantomParams(
            center_mm=(float(center_mm[0]), float(center_mm[1])), semi_axes_mm=(ax, ay), depth_mm=float(depth_mm),
            outline_harmonics=harmonics, shrink_per_mm=float(rng.uniform(0.08, 0.15)),
            edge_width_mm=edge_width_um / 1000.0, fissure=fissure, texture=texture, fibres=fibres,
            vertical_fibres=vertical, ventricles=ventricles, blob_radius_mm=blob_radius_um / 1000.0,
            blob_spacing_mm=blob_spacing_um / 1000.0, blob_fill=float(blob_fill),
            blob_seed=int(rng.integers(0, 2**62)), blob_rotation=_random_rotation(rng),
            agarose_level=float(agarose_level), tissue_level=float(tissue_level),
        )
        if params.blob_spacing_mm <= 2.0 * params.blob_radius_mm:
            raise ValueError("blob_spacing_um must exceed 2 x blob_radius_um (one blob per lattice cell)")
        return cls(params)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, x_mm, y_mm, d_mm, *, max_points: int = 2_000_000) -> np.ndarray:
        """Sample the phantom.

        Parameters
        ----------
        x_mm, y_mm, d_mm : array_like
            Broadcastable coordinates in millimetres (lateral x, lateral y, block depth). Typical use:
            ``x`` of shape ``(1, 1, nx)``, ``y`` of shape ``(1, ny, 1)``, ``d`` of shape ``(nz, ny, nx)``.
        max_points : int
            Evaluate in blocks along the first axis of at most about this many points (bounds the memory
            of the temporaries).

        Returns
        -------
        numpy.ndarray
            float32 values, of the broadcast shape.
        """
        x = np.asarray(x_mm, dtype=np.float64)
        y = np.asarray(y_mm, dtype=np.float64)
        d = np.asarray(d_mm, dtype=np.float64)
        shape = np.broadcast_shapes(x.shape, y.shape, d.shape)
        if len(shape) == 0:
            return self._evaluate(x[None], y[None], d[None])[0]
        # Left-pad every input to the full rank so that the first axis can be sliced consistently; inputs
        # that are constant along it (size 1) are passed whole, which keeps lateral-only terms 2D.
        x, y, d = (a.reshape((1,) * (len(shape) - a.ndim) + a.shape) for a in (x, y, d))
        out = np.empty(shape, dtype=np.float32)
        n_per_row = int(np.prod(shape[1:]))
        step = max(1, max_points // max(n_per_row, 1))
        for start in range(0, shape[0], step):
            sl = slice(start, min(start + step, shape[0]))
            xs, ys, ds = (a if a.shape[0] == 1 else a[sl] for a in (x, y, d))
            out[sl] = self._evaluate(xs, ys, ds)
        return out

    def _evaluate(self, x, y, d) -> np.ndarray:
        p = self.params
        f32 = np.float32
        # Local coordinates, float32 from here on (differences are small so precision is ample).
        xl = (x - self._cx).astype(f32)
        yl = (y - self._cy).astype(f32)
        dd = d.astype(f32)
        lat_shape = np.broadcast_shapes(xl.shape, yl.shape)
        xl2 = np.broadcast_to(xl, lat_shape)
        yl2 = np.broadcast_to(yl, lat_shape)

        # --- brain outline: normalised radius vs a wavy boundary that shrinks with depth
        ax, ay = (f32(v) for v in p.semi_axes_mm)
        rn = np.sqrt((xl2 / ax) ** 2 + (yl2 / ay) ** 2)
        theta = np.arctan2(yl2 / ay, xl2 / ax)
        wav = np.ones(lat_shape, dtype=f32)
        for k, amp, ph in p.outline_harmonics:
            wav += f32(amp) * np.cos(f32(k) * theta + f32(ph))
        scale = f32(1.0) - f32(p.shrink_per_mm) * dd  # (depth part)
        # Linear ramp across the edge, edge width in normalised units along the mean axis.
        w_n = f32(p.edge_width_mm / (0.5 * (p.semi_axes_mm[0] + p.semi_axes_mm[1])))
        inside = np.clip((wav * scale - rn) / w_n + f32(0.5), 0, 1)

        # --- tissue base: brighter towards the deep centre (a cortex-like gradient), times the texture
        depth_in = np.clip(wav - rn, 0, None)  # normalised distance inside the outline (lateral)
        base = f32(p.tissue_level) * (f32(0.75) + f32(0.45) * (f32(1) - np.exp(-depth_in / f32(0.3))))
        tex = np.zeros(np.broadcast_shapes(lat_shape, dd.shape), dtype=f32)
        for t in p.texture:
            kx, ky, kd = (f32(v) for v in t["k"])
            tex += f32(t["amp"]) * np.cos((kx * xl2 + ky * yl2 + f32(t["phase"])) + kd * dd)
        tissue = base * (f32(1) + tex)

        # --- midline fissure: a thin dark sheet, slightly slanted through depth
        fz = p.fissure
        xf = f32(fz["x0"]) + f32(fz["amp"]) * np.sin(f32(2 * np.pi / fz["wavelength"]) * yl2 + f32(fz["phase"]))
        dist_f = (xl2 - xf) - f32(fz["depth_slope"]) * dd
        tissue *= f32(1) - f32(0.8) * np.exp(-((dist_f / f32(fz["width"])) ** 2))

        # --- lateral fibre bundles: bright tubes with stripes along their direction
        for fb in p.fibres:
            ca, sa = f32(np.cos(fb["angle"])), f32(np.sin(fb["angle"]))
            u = ca * xl2 + sa * yl2
            v = -sa * xl2 + ca * yl2
            vc = f32(fb["v0"]) + f32(fb["amp"]) * np.sin(f32(2 * np.pi / fb["wavelength"]) * u + f32(fb["phase"]))
            dc = f32(fb["d0"]) + f32(fb["d_amp"]) * np.sin(
                f32(2 * np.pi / fb["d_wavelength"]) * u + f32(fb["d_phase"]))
            dv = v - vc
            r = f32(fb["radius"])
            q = (dv / r) ** 2 + ((dd - dc) / (r * f32(fb["depth_aspect"]))) ** 2
            prof = np.clip(f32(1) - q, 0, None)
            stripes = f32(0.65) + f32(0.35) * np.cos(f32(2 * np.pi / fb["stripe"]) * dv)
            tissue += f32(fb["gain"]) * f32(p.tissue_level) * prof * stripes

        # --- through-depth bundles: tubes wandering slowly with depth (discs in an en-face view)
        for fb in p.vertical_fibres:
            ph = f32(2 * np.pi / fb["wavelength"]) * dd + f32(fb["phase"])
            xc = f32(fb["x0"]) + f32(fb["amp_x"]) * np.sin(ph)
            yc = f32(fb["y0"]) + f32(fb["amp_y"]) * np.cos(ph)
            r = f32(fb["radius"])
            q = ((xl2 - xc) ** 2 + (yl2 - yc) ** 2) / (r * r)
            prof = np.clip(f32(1) - q, 0, None)
            tissue += f32(fb["gain"]) * f32(p.tissue_level) * np.sqrt(prof)

        # --- dark cell bodies (one per lattice cell at most, fully inside its cell)
        tissue *= f32(1) - self._blobs(xl2, yl2, dd)

        # --- dark ventricles (smooth-edged ellipsoids)
        for vt in p.ventricles:
            ca, sa = f32(np.cos(vt["angle"])), f32(np.sin(vt["angle"]))
            ex = xl2 - f32(vt["x0"])
            ey = yl2 - f32(vt["y0"])
            u = (ca * ex + sa * ey) / f32(vt["a"])
            v = (-sa * ex + ca * ey) / f32(vt["b"])
            q = u * u + v * v + ((dd - f32(vt["d0"])) / f32(vt["c"])) ** 2
            tissue *= f32(1) - f32(0.85) * np.clip((f32(1.15) - q) / f32(0.3), 0, 1)

        agarose = f32(p.agarose_level) * (f32(1) + f32(0.3) * tex)
        out = agarose + inside * (tissue - agarose)
        return np.maximum(out, f32(1e-3)).astype(f32, copy=False)

    def _blobs(self, xl, yl, dd) -> np.ndarray:
        """Darkening factor in [0, 0.9) of the cell bodies at the given local coordinates.

        The lattice is rotated in 3D (random rotation) so that neither a section nor a depth projection
        shows it as a regular grid.
        """
        p = self.params
        f32 = np.float32
        c = f32(p.blob_spacing_mm)
        rot = np.asarray(p.blob_rotation, dtype=f32)
        # Lattice-frame coordinates in cell units; the lateral parts stay 2D until the depth term is added.
        fa, fb, fc = ((rot[i, 0] * xl + rot[i, 1] * yl) / c + (rot[i, 2] / c) * dd for i in range(3))
        ia, ib, ic = np.floor(fa), np.floor(fb), np.floor(fc)
        h = (ia.astype(np.int64).astype(np.uint64) * _P1) ^ (ib.astype(np.int64).astype(np.uint64) * _P2)
        h ^= ic.astype(np.int64).astype(np.uint64) * _P3
        h ^= np.uint64(p.blob_seed)
        h = _mix64(h)
        rad = f32(p.blob_radius_mm / p.blob_spacing_mm)  # blob radius in cell units (< 0.5)
        span = f32(1) - f32(2) * rad
        r2 = ((fa - ia) - (rad + span * _bits01(h, 0))) ** 2
        r2 += ((fb - ib) - (rad + span * _bits01(h, 12))) ** 2
        r2 += ((fc - ic) - (rad + span * _bits01(h, 24))) ** 2
        amp = f32(0.5) + f32(0.4) * _bits01(h, 36)
        present = _bits01(h, 48) < f32(p.blob_fill)
        bump = np.clip(f32(1) - r2 / (rad * rad), 0, None)
        return np.where(present, amp * bump * bump, f32(0))
