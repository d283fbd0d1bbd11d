"""Parameters of a synthetic S-OCT acquisition and the named presets.

:class:`SyntheticConfig` holds every parameter (its field defaults are the ``tiny`` preset);
``SyntheticConfig.from_preset(name, seed=..., **overrides)`` starts from a preset and applies overrides.

Slice references (``missing_tiles``, ``encoder_glitch_slice``, ``rehoming_slice``) are slice **ids**.
The presets store them relative to the first slice, and :meth:`SyntheticConfig.from_preset` shifts the
preset's values by ``slice_id_start``; values given as overrides are taken as ids as they are.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field, fields

__all__ = ["PRESETS", "SyntheticConfig", "DEFAULT_STAGE_AFFINE"]

#: Stage error used when ``stage_affine=True``: the true stage motion is ``A @ nominal`` about the grid
#: centre, ``A = R(rotation) @ [[1, tan(shear)], [0, 1]] @ diag(scale_x, scale_y)``.
DEFAULT_STAGE_AFFINE = {"rotation_deg": 0.5, "shear_deg": 0.3, "scale_x": 1.005, "scale_y": 0.996}

# Keys whose preset values are relative to the first slice id (see module docstring).
_SLICE_RELATIVE = ("missing_tiles", "encoder_glitch_slice", "rehoming_slice")

_TUPLE_FIELDS = ("grid_shape", "stage_origin_mm", "encoder_glitch_mm", "rehoming_mm", "dark_band_level",
                 "bright_band_level", "interface_tilt_um_per_mm", "fibre_radius_um", "truth_chunks")


@dataclass
class SyntheticConfig:
    """Every parameter of a synthetic acquisition (defaults: the ``tiny`` preset).

    Lateral axes: x is the A-line (fast galvo) axis, y the B-scan axis; tile grid index ``ix`` runs
    along x, ``iy`` along y. Depth ``z`` is the axial sample index (0 at the top of the image).
    """

    preset: str = "tiny"
    seed: int = 0

    # --- acquisition geometry
    n_slices: int = 3
    slice_id_start: int = 0
    grid_shape: tuple[int, int] = (3, 3)  # (n_tiles_y, n_tiles_x)
    nx: int = 40  # A-lines kept per B-scan
    ny: int = 40  # B-scans per tile
    n_z: int = 32  # depth samples
    n_extra: int = 8  # galvo fly-back A-lines per B-scan
    n_repeat: int = 2  # repeated frames per B-scan (averaged by the reader)
    n_bin_files: int = 2  # image_*.bin files per tile (frames split in order)
    width_um: float = 400.0  # tile field of view along x
    height_um: float = 400.0  # tile field of view along y
    axial_resolution_um: float = 10.0
    slice_thickness_um: float = 150.0
    overlap: float = 0.2  # fraction of the tile FOV shared by neighbouring tiles
    layout: str = "grouped"  # "grouped" (<raw>/zNN/tile_...) or "flat" (<raw>/tile_...)
    write_axial_resolution: bool = True
    stage_origin_mm: tuple[float, float] = (12.0, 8.0)  # reported (x, y) of tile (0, 0), nominal
    stage_z_origin_mm: float = 5.0
    line_rate: int = 100000
    exposure: float = 9.6
    alinerepeat: int = 1
    focus_z: int | None = None  # focus depth (sample); None: 35 % of n_z

    # --- stage errors
    drift_px: float = 1.5  # std (pixels) of the per-slice random-walk step of the stage
    stage_affine: bool | dict = False  # True: DEFAULT_STAGE_AFFINE; or a dict with some of its keys
    tile_jitter_px: float = 0.0  # std of an independent true-position error per tile (not reported)
    encoder_glitch_slice: int | None = None  # this slice's *reported* positions jump (true do not)
    encoder_glitch_mm: tuple[float, float] = (0.3, 0.0)
    rehoming_slice: int | None = None  # from this slice on, true and reported positions jump
    rehoming_mm: tuple[float, float] = (0.25, -0.15)

    # --- galvo band
    galvo_offsets: list[int] | None = None  # per slice, A-line where the band starts; None: random
    bright_band: bool | list[int] = False  # True (all slices) or a list of slice ids with a bright band
    dark_band_level: tuple[float, float] = (0.1, 0.3)  # band / local signal, drawn per slice
    bright_band_level: tuple[float, float] = (1.8, 2.4)

    # --- files
    missing_tiles: list[tuple[int, int, int]] = field(default_factory=lambda: [(1, 1, 2)])  # (sid, ix, iy)
    stray_files: bool = True

    # --- image formation
    interface_depth_um: float = 50.0  # cut surface below the top of the image, at the mosaic centre
    interface_tilt_um_per_mm: tuple[float, float] = (12.0, -8.0)  # (along x, along y)
    interface_curvature_um_per_mm2: float = 15.0
    interface_jitter_um: float = 8.0  # per-slice random offset of the surface depth
    attenuation_length_um: float = 200.0  # intensity decays as exp(-depth below surface / this)
    focus_width_um: float = 120.0  # std of the Gaussian focus profile
    focus_floor: float = 0.35  # focus profile = floor + (1 - floor) * gaussian
    vignetting_min: float = 0.6  # flat-field value in the tile corners (centre = 1)
    speckle_shape: float = 2.0  # gamma shape of the per-repeat multiplicative speckle (mean 1)
    noise_floor: float = 0.01  # mean of an additive exponential detector noise
    medium_level: float = 0.02  # scattering above the cut surface (water / agarose remnant)
    agarose_level: float = 0.12  # agarose around the brain
    tissue_level: float = 0.55
    slice_gain_jitter: float = 0.05  # per-slice global intensity factor 1 + N(0, this)

    # --- phantom structure
    blob_radius_um: float = 19.0
    blob_spacing_um: float = 64.0
    blob_fill: float = 0.7
    fibre_radius_um: tuple[float, float] = (50.0, 110.0)
    fibre_stripe_um: float = 30.0
    n_fibres: int = 8
    n_vertical_fibres: int = 2
    n_ventricles: int = 1
    edge_width_um: float = 15.0

    # --- ground-truth volume
    truth_downsample: int = 1  # write truth/volume.zarr every this many voxels along each axis
    truth_chunks: tuple[int, int, int] = (32, 128, 128)

    def __post_init__(self):
        for name in _TUPLE_FIELDS:
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, tuple(value))
        self.missing_tiles = [tuple(int(v) for v in t) for t in (self.missing_tiles or [])]
        if self.galvo_offsets is not None:
            self.galvo_offsets = [int(v) for v in self.galvo_offsets]
        if isinstance(self.bright_band, (list, tuple)):
            self.bright_band = [int(v) for v in self.bright_band]
        self.validate()

    # ------------------------------------------------------------------ helpers
    @property
    def slice_ids(self) -> list[int]:
        """Slice ids, in acquisition order."""
        return list(range(self.slice_id_start, self.slice_id_start + self.n_slices))

    @property
    def n_aline(self) -> int:
        """A-lines per raw B-scan (kept + fly-back)."""
        return self.nx + self.n_extra

    def stage_affine_params(self) -> dict | None:
        """The resolved stage affine error (``None`` when off)."""
        if self.stage_affine is False or self.stage_affine is None:
            return None
        params = dict(DEFAULT_STAGE_AFFINE)
        if isinstance(self.stage_affine, dict):
            unknown = set(self.stage_affine) - set(params)
            if unknown:
                raise ValueError(f"stage_affine: unknown keys {sorted(unknown)}; known: {sorted(params)}")
            params.update({k: float(v) for k, v in self.stage_affine.items()})
        return params

    def validate(self) -> None:
        """Check the parameters; raise ValueError naming the first bad one."""
        def bad(name, why):
            raise ValueError(f"SyntheticConfig.{name}: {why}")

        for name in ("n_slices", "nx", "ny", "n_z", "n_repeat", "n_bin_files", "truth_downsample"):
            if int(getattr(self, name)) < 1:
                bad(name, "must be >= 1")
        if self.n_extra < 0:
            bad("n_extra", "must be >= 0")
        if self.slice_id_start < 0:
            bad("slice_id_start", "must be >= 0")
        if len(self.grid_shape) != 2 or min(self.grid_shape) < 1:
            bad("grid_shape", "must be (n_tiles_y, n_tiles_x) with both >= 1")
        if self.layout not in ("grouped", "flat"):
            bad("layout", "must be 'grouped' or 'flat'")
        if not 0.0 <= self.overlap < 0.9:
            bad("overlap", "must be in [0, 0.9)")
        if self.n_bin_files > self.ny * self.n_repeat:
            bad("n_bin_files", f"more files than frames ({self.ny * self.n_repeat})")
        ids = set(self.slice_ids)
        if self.galvo_offsets is not None:
            if len(self.galvo_offsets) != self.n_slices:
                bad("galvo_offsets", f"needs one value per slice ({self.n_slices})")
            if any(not 0 <= p < self.n_aline for p in self.galvo_offsets):
                bad("galvo_offsets", f"values must be in [0, {self.n_aline})")
        for sid, ix, iy in self.missing_tiles:
            if sid not in ids or not (0 <= ix < self.grid_shape[1] and 0 <= iy < self.grid_shape[0]):
                bad("missing_tiles", f"({sid}, {ix}, {iy}) is not a tile of this acquisition")
        for name in ("encoder_glitch_slice", "rehoming_slice"):
            sid = getattr(self, name)
            if sid is not None and sid not in ids:
                bad(name, f"slice id {sid} is not in {sorted(ids)}")
        if isinstance(self.bright_band, list) and not set(self.bright_band) <= ids:
            bad("bright_band", "lists slice ids that are not in the acquisition")
        if self.speckle_shape <= 0:
            bad("speckle_shape", "must be > 0")
        if not 0 < self.vignetting_min <= 1:
            bad("vignetting_min", "must be in (0, 1]")
        if self.focus_z is not None and not 0 <= self.focus_z < self.n_z:
            bad("focus_z", "must be a sample index in [0, n_z)")
        if len(self.truth_chunks) != 3 or min(self.truth_chunks) < 1:
            bad("truth_chunks", "must be three positive ints")
        self.stage_affine_params()

    def to_dict(self) -> dict:
        """A JSON-ready copy of every parameter."""
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        d["missing_tiles"] = [list(t) for t in self.missing_tiles]
        return d

    @classmethod
    def from_dict(cls, data: dict) -> "SyntheticConfig":
        """Inverse of :meth:`to_dict` (unknown keys raise)."""
        return cls(**data)

    @classmethod
    def from_preset(cls, name: str = "tiny", seed: int = 0, **overrides) -> "SyntheticConfig":
        """A config from a named preset, with ``overrides`` applied.

        Parameters
        ----------
        name : str
            One of :data:`PRESETS`.
        seed : int
            Seed of every random choice (same seed and parameters: byte-identical raw files).
        **overrides
            Any :class:`SyntheticConfig` field. Slice references given here are slice ids.

        Returns
        -------
        SyntheticConfig
        """
        if name not in PRESETS:
            raise ValueError(f"unknown synthetic preset {name!r}; choose one of {sorted(PRESETS)}")
        known = {f.name for f in fields(cls)}
        unknown = set(overrides) - known
        if unknown:
            raise TypeError(f"unknown synthetic parameter(s) {sorted(unknown)}")
        values = dict(PRESETS[name])
        start = int(overrides.get("slice_id_start", values.get("slice_id_start", 0)))
        for key in _SLICE_RELATIVE:
            if key in overrides:
                continue
            if key == "missing_tiles":
                rel = values.get(key, [f.default_factory() for f in fields(cls) if f.name == key][0])
                values[key] = [(s + start, ix, iy) for s, ix, iy in rel]
            elif values.get(key) is not None:
                values[key] = values[key] + start
        values.update(overrides)
        values["preset"] = name
        values["seed"] = int(seed)
        return cls(**values)

    def replace(self, **changes) -> "SyntheticConfig":
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)


#: Named presets: only the values that differ from the :class:`SyntheticConfig` defaults (``tiny``).
#: ``tiny``: tests, ~13 MB, ~1 s. ``small``: demo, ~210 MB. ``bench``: ~2.25 GB of raw tiles.
PRESETS: dict[str, dict] = {
    "tiny": {},
    "small": {
        "n_slices": 5, "grid_shape": (4, 4), "nx": 64, "ny": 64, "n_z": 64, "n_extra": 16, "n_repeat": 2,
        "n_bin_files": 2, "width_um": 512.0, "height_um": 512.0, "axial_resolution_um": 6.0,
        "slice_thickness_um": 200.0, "drift_px": 2.0, "stage_affine": True, "tile_jitter_px": 0.3,
        "encoder_glitch_slice": 3, "missing_tiles": [(2, 3, 0)],
        "interface_depth_um": 60.0, "interface_jitter_um": 8.0, "attenuation_length_um": 250.0,
        "focus_width_um": 130.0, "blob_radius_um": 14.0, "blob_spacing_um": 48.0, "fibre_radius_um": (45.0, 100.0),
        "fibre_stripe_um": 24.0, "n_fibres": 10, "edge_width_um": 12.0, "truth_chunks": (32, 128, 128),
    },
    "bench": {
        "n_slices": 5, "grid_shape": (4, 4), "nx": 200, "ny": 200, "n_z": 160, "n_extra": 20, "n_repeat": 1,
        "n_bin_files": 2, "width_um": 500.0, "height_um": 500.0, "axial_resolution_um": 3.5,
        "slice_thickness_um": 200.0, "drift_px": 3.0, "stage_affine": True, "tile_jitter_px": 0.3,
        "missing_tiles": [(2, 0, 3)],
        "interface_depth_um": 70.0, "interface_jitter_um": 8.0, "attenuation_length_um": 350.0,
        "focus_width_um": 180.0, "blob_radius_um": 7.0, "blob_spacing_um": 24.0, "fibre_radius_um": (30.0, 80.0),
        "fibre_stripe_um": 9.0, "n_fibres": 12, "edge_width_um": 6.0, "truth_downsample": 2,
        "truth_chunks": (64, 128, 128),
    },
}
