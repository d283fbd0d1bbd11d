"""Raw S-OCT tiles: discovery, metadata and reading (``soct-formats.md`` section 1).

An acquisition is a folder of ``tile_x{X}_y{Y}_z{Z}`` folders, either flat or grouped per slice under
``z{Z}/``. Each tile folder holds an ``info.txt`` (``key: value`` lines) and one or more ``image_*.bin``
files: float32 little endian, Fortran-ordered ``(n_z, nx + n_extra, n_frames)``, concatenated along the
frame axis in name order. Consecutive frames are the ``n_repeat`` repeats of one B-scan.

Opening an acquisition reads only ``info.txt`` files and file sizes; tiles are read on demand.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

__all__ = [
    "RawFormatError",
    "BadTileWarning",
    "TileInfo",
    "RawTile",
    "RawAcquisition",
    "parse_info_txt",
    "is_raw_acquisition",
    "open_raw_acquisition",
]

TILE_DIR_RE = re.compile(r"^tile_x(?P<x>\d+)_y(?P<y>\d+)_z(?P<z>\d+)$")
SLICE_DIR_RE = re.compile(r"^z(?P<z>\d+)$")
BIN_GLOB = "image_*.bin"
AXIAL_RESOLUTION_KEYS = ("axial_resolution", "z_resolution", "axial_res", "dz")
REQUIRED_KEYS = ("nx", "ny", "n_extra", "width", "height", "stage_x_pos_mm", "stage_y_pos_mm")
FLOAT32_BYTES = 4


class RawFormatError(ValueError):
    """A raw acquisition or tile does not follow the S-OCT raw format; the message names file and problem."""


class BadTileWarning(UserWarning):
    """One tile is unusable; it is treated as missing and the run goes on."""


def parse_info_txt(path: str | os.PathLike) -> dict[str, int | str]:
    """Parse an S-OCT ``info.txt``.

    Lines are ``key: value`` split on the first ``": "``; other lines (such as a ``Scan info`` header) are
    ignored. Integer-looking values become ``int``, everything else stays ``str``.

    Raises
    ------
    RawFormatError
        If the file is missing or unreadable as text.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8", errors="strict")
    except FileNotFoundError:
        raise RawFormatError(f"{path}: missing info.txt (every tile folder needs one)") from None
    except (UnicodeDecodeError, OSError) as err:
        raise RawFormatError(f"{path}: cannot read info.txt as text ({err})") from None
    info: dict[str, int | str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(": ")
        if not sep:
            continue
        key, value = key.strip(), value.strip()
        if re.fullmatch(r"[+-]?\d+", value):
            info[key] = int(value)
        else:
            info[key] = value
    return info


def _as_float(info: dict, key: str, path: Path) -> float:
    value = info.get(key)
    if value is None:
        raise RawFormatError(f"{path}: key '{key}' is missing")
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise RawFormatError(f"{path}: key '{key}' has value {value!r}, expected a number") from None
    if not math.isfinite(out):
        raise RawFormatError(f"{path}: key '{key}' has non-finite value {value!r}")
    return out


def _as_positive_int(info: dict, key: str, path: Path, *, allow_zero: bool = False) -> int:
    value = info.get(key)
    if value is None:
        raise RawFormatError(f"{path}: key '{key}' is missing")
    if not isinstance(value, int) or value < 0 or (value == 0 and not allow_zero):
        kind = "a non-negative" if allow_zero else "a positive"
        raise RawFormatError(f"{path}: key '{key}' has value {value!r}, expected {kind} integer")
    return value


@dataclass(frozen=True)
class TileInfo:
    """Validated metadata of one raw tile (everything needed to read it, no pixel data).

    Attributes
    ----------
    nx, ny : int
        A-lines kept per B-scan and B-scans per tile.
    n_extra : int
        Fly-back A-lines recorded per B-scan (the galvo return band).
    n_repeat : int
        Repeated frames per B-scan, averaged on read.
    n_z : int
        Depth samples.
    width_um, height_um : float
        Field of view along x (A-line axis) and y (B-scan axis), micrometres.
    stage_x_mm, stage_y_mm, stage_z_mm : float
        Stage position of the tile.
    axial_resolution_um : float or None
        Axial sample spacing when the file states it.
    """

    nx: int
    ny: int
    n_extra: int
    n_repeat: int
    n_z: int
    width_um: float
    height_um: float
    stage_x_mm: float
    stage_y_mm: float
    stage_z_mm: float
    axial_resolution_um: float | None
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def n_alines(self) -> int:
        """A-lines per raw B-scan, fly-back included."""
        return self.nx + self.n_extra

    @property
    def shape(self) -> tuple[int, int, int]:
        """Shape ``(z, y, x)`` of the tile after galvo crop."""
        return (self.n_z, self.ny, self.nx)

    @classmethod
    def from_info(cls, info: dict, path: Path, total_bin_bytes: int | None = None) -> TileInfo:
        """Validate a parsed ``info.txt``; ``total_bin_bytes`` lets a missing depth be inferred."""
        nx = _as_positive_int(info, "nx", path)
        ny = _as_positive_int(info, "ny", path)
        n_extra = _as_positive_int(info, "n_extra", path, allow_zero=True)
        n_repeat = _as_positive_int(info, "n_repeat", path) if "n_repeat" in info else 1
        if "top_z" in info or "bottom_z" in info:
            top = info.get("top_z")
            bottom = info.get("bottom_z")
            if not isinstance(top, int) or not isinstance(bottom, int) or bottom < top:
                raise RawFormatError(
                    f"{path}: keys 'top_z'={top!r}, 'bottom_z'={bottom!r} do not give a depth range "
                    "(integers with bottom_z >= top_z expected)"
                )
            n_z = bottom - top + 1
        elif total_bin_bytes is not None:
            # No depth range in the header: the data size gives it (n_z * n_alines * frames samples).
            per_depth = (nx + n_extra) * ny * n_repeat * FLOAT32_BYTES
            if total_bin_bytes % per_depth:
                raise RawFormatError(
                    f"{path}: no 'top_z'/'bottom_z' keys and the image data size ({total_bin_bytes} bytes) "
                    f"is not a multiple of (nx+n_extra)*ny*n_repeat*4 = {per_depth} bytes"
                )
            n_z = total_bin_bytes // per_depth
        else:
            raise RawFormatError(f"{path}: keys 'top_z'/'bottom_z' are missing")
        axial = None
        for key in AXIAL_RESOLUTION_KEYS:
            if key in info:
                axial = _as_float(info, key, path)
                if axial <= 0:
                    raise RawFormatError(f"{path}: key '{key}' must be positive, got {info[key]!r}")
                break
        width = _as_float(info, "width", path)
        height = _as_float(info, "height", path)
        if width <= 0 or height <= 0:
            raise RawFormatError(f"{path}: field of view width={width}, height={height} must be positive")
        return cls(
            nx=nx,
            ny=ny,
            n_extra=n_extra,
            n_repeat=n_repeat,
            n_z=n_z,
            width_um=width,
            height_um=height,
            stage_x_mm=_as_float(info, "stage_x_pos_mm", path),
            stage_y_mm=_as_float(info, "stage_y_pos_mm", path),
            stage_z_mm=_as_float(info, "stage_z_pos_mm", path) if "stage_z_pos_mm" in info else 0.0,
            axial_resolution_um=axial,
            raw=dict(info),
        )

    @property
    def expected_bytes(self) -> int:
        """Total size of the tile's ``image_*.bin`` files."""
        return self.n_z * self.n_alines * self.ny * self.n_repeat * FLOAT32_BYTES


@dataclass(frozen=True)
class RawTile:
    """One tile folder of an acquisition: grid indices, files and validated metadata."""

    x: int
    y: int
    z: int
    path: Path
    bin_files: tuple[Path, ...]
    info: TileInfo

    @property
    def name(self) -> str:
        return self.path.name

    def read(
        self,
        galvo_shift: int = 0,
        *,
        camera_shift: bool = False,
        legacy_orientation: bool = False,
        check_finite: bool = True,
    ) -> np.ndarray:
        """Read the tile as ``(z, y, x)`` float32.

        Parameters
        ----------
        galvo_shift : int
            Circular shift applied to the A-line axis before cropping to ``nx`` (moves the galvo return band
            to ``[nx, nx + n_extra)``); see :func:`napari_soct.processing.preprocess.galvo.detect_galvo_band`.
        camera_shift : bool
            Old-data fix: roll the A-line axis so the brightest A-line of the average projection comes
            first, and replace the saturated first depth sample by its neighbour.
        legacy_orientation : bool
            Swap the two lateral axes and reverse both (legacy systems).
        check_finite : bool
            Raise :class:`RawFormatError` if the data hold NaN or infinity.
        """
        info = self.info
        if camera_shift:
            frames = _fix_camera_shift(read_raw_frames(self))[:, None]
        else:
            frames = _read_frames(self)  # (ny, n_repeat, n_alines, n_z), the on-disk order
        tile = np.empty(info.shape, np.float32)
        runs = _kept_aline_runs(info.nx, info.n_alines, galvo_shift)
        # One B-scan at a time: the (A-line, depth) -> (depth, A-line) transpose of a B-scan fits in cache,
        # which makes it several times faster than transposing the whole tile at once.
        for y in range(info.ny):
            bscan = frames[y, 0] if frames.shape[1] == 1 else frames[y].mean(axis=0, dtype=np.float32)
            for dst, src, n in runs:
                tile[:, y, dst : dst + n] = bscan[src : src + n].T
        if legacy_orientation:
            tile = np.ascontiguousarray(tile.transpose(0, 2, 1)[:, ::-1, ::-1])
        # A sum is far cheaper than isfinite over the tile; only a non-finite sum needs the exact count.
        if check_finite and not np.isfinite(tile.sum(dtype=np.float64)):
            n_bad = int(tile.size - np.count_nonzero(np.isfinite(tile)))
            raise RawFormatError(f"{self.path}: {n_bad} NaN/inf values in the image data")
        return tile


def _kept_aline_runs(nx: int, n_alines: int, shift: int) -> list[tuple[int, int, int]]:
    """Contiguous runs ``(dst, src, length)`` of the A-lines kept after rolling by ``shift`` and cropping to nx."""
    src = (np.arange(nx) - shift) % n_alines
    starts = [0, *(np.flatnonzero(np.diff(src) != 1) + 1)]
    ends = [*starts[1:], nx]
    return [(int(a), int(src[a]), int(b - a)) for a, b in zip(starts, ends)]


def _read_frames(tile: RawTile) -> np.ndarray:
    """A tile's ``image_*.bin`` files as ``(ny, n_repeat, n_alines, n_z)`` float32 (no copy beyond the read)."""
    info = tile.info
    parts = []
    for f in tile.bin_files:
        data = np.fromfile(f, dtype="<f4")
        if data.size % (info.n_z * info.n_alines):
            raise RawFormatError(
                f"{f}: {data.size * 4} bytes is not a whole number of frames of "
                f"n_z*(nx+n_extra) = {info.n_z}*{info.n_alines} float32 samples"
            )
        parts.append(data)
    data = parts[0] if len(parts) == 1 else np.concatenate(parts)
    n_frames = data.size // (info.n_z * info.n_alines)
    if n_frames != info.ny * info.n_repeat:
        raise RawFormatError(
            f"{tile.path}: image data hold {n_frames} frames, info.txt says ny*n_repeat = "
            f"{info.ny}*{info.n_repeat} = {info.ny * info.n_repeat}"
        )
    return data.reshape(info.ny, info.n_repeat, info.n_alines, info.n_z)


def read_raw_frames(tile: RawTile, bscans: np.ndarray | None = None) -> np.ndarray:
    """Read a tile's B-scans (all, or a subset) with repeats averaged, before the galvo crop.

    Parameters
    ----------
    bscans : array of int, optional
        B-scan indices to read; only their bytes are read from disk (galvo detection needs a few dozen).

    Returns
    -------
    numpy.ndarray
        ``(n_bscans, n_alines, n_z)`` float32: the on-disk (Fortran) array seen in C order, no transposing copy.
    """
    info = tile.info
    if bscans is None:
        frames = _read_frames(tile)
    else:
        frames = _read_selected_frames(tile, np.asarray(bscans, dtype=np.int64))
    if info.n_repeat == 1:
        return frames[:, 0]
    return frames.mean(axis=1, dtype=np.float32)


def _read_selected_frames(tile: RawTile, bscans: np.ndarray) -> np.ndarray:
    """Only the frames of some B-scans, as ``(len(bscans), n_repeat, n_alines, n_z)``, via memory maps."""
    info = tile.info
    frame_size = info.n_alines * info.n_z
    maps, first_frame = [], []
    start = 0
    for f in tile.bin_files:
        n = f.stat().st_size // (4 * frame_size)
        maps.append(np.memmap(f, dtype="<f4", mode="r", shape=(n, info.n_alines, info.n_z)))
        first_frame.append(start)
        start += n
    if start != info.ny * info.n_repeat:
        raise RawFormatError(
            f"{tile.path}: image data hold {start} frames, info.txt says ny*n_repeat = "
            f"{info.ny * info.n_repeat}"
        )
    frames = (bscans[:, None] * info.n_repeat + np.arange(info.n_repeat)).ravel()
    which = np.searchsorted(first_frame, frames, side="right") - 1
    out = np.empty((frames.size, info.n_alines, info.n_z), np.float32)
    for i, (fi, frame) in enumerate(zip(which, frames)):
        out[i] = maps[fi][frame - first_frame[fi]]
    return out.reshape(bscans.size, info.n_repeat, info.n_alines, info.n_z)


def _fix_camera_shift(frames: np.ndarray) -> np.ndarray:
    """Roll A-lines so the over-exposed one comes first; replace its saturated first sample."""
    aip = frames.mean(axis=(0, 2))
    frames = np.roll(frames, -int(np.argmax(aip)), axis=1)
    frames = frames.copy()
    if frames.shape[2] > 1:
        frames[:, 0, 0] = frames[:, 0, 1]
    return frames


def _tile_dirs(root: Path) -> tuple[list[tuple[Path, int, int, int]], str]:
    """List tile folders (flat and grouped layouts) without reading them."""
    found = []
    layouts = set()
    with os.scandir(root) as it:
        entries = [e for e in it if e.is_dir()]
    for entry in entries:
        m = TILE_DIR_RE.match(entry.name)
        if m:
            found.append((Path(entry.path), int(m["x"]), int(m["y"]), int(m["z"])))
            layouts.add("flat")
            continue
        if SLICE_DIR_RE.match(entry.name):
            with os.scandir(entry.path) as sub:
                for e in sub:
                    m = TILE_DIR_RE.match(e.name)
                    if m and e.is_dir():
                        found.append((Path(e.path), int(m["x"]), int(m["y"]), int(m["z"])))
                        layouts.add("grouped")
    layout = "+".join(sorted(layouts)) if layouts else "none"
    return found, layout


def is_raw_acquisition(path: str | os.PathLike) -> bool:
    """Cheap check that ``path`` looks like a raw S-OCT acquisition (a few directory listings, no reads)."""
    root = Path(path)
    if not root.is_dir():
        return False
    try:
        with os.scandir(root) as it:
            for entry in it:
                if not entry.is_dir():
                    continue
                if TILE_DIR_RE.match(entry.name):
                    return True
                if SLICE_DIR_RE.match(entry.name):
                    with os.scandir(entry.path) as sub:
                        if any(TILE_DIR_RE.match(e.name) for e in sub):
                            return True
    except OSError:
        return False
    return False


@dataclass
class RawAcquisition:
    """A raw S-OCT acquisition opened lazily: tile metadata only, pixel data on demand.

    Use :func:`open_raw_acquisition` to create one.

    Attributes
    ----------
    root : Path
        The acquisition folder.
    tiles : dict
        ``{slice_id: {(x, y): RawTile}}`` for every readable tile.
    bad_tiles : dict
        ``{slice_id: {(x, y): message}}`` for tiles that could not be used (treated as missing).
    axial_resolution_um : float
        Depth sample spacing.
    layout : str
        ``"flat"`` or ``"grouped"``.
    """

    root: Path
    tiles: dict[int, dict[tuple[int, int], RawTile]]
    bad_tiles: dict[int, dict[tuple[int, int], str]]
    axial_resolution_um: float
    layout: str

    @property
    def slice_ids(self) -> list[int]:
        """Sorted ids of slices with at least one usable tile."""
        return sorted(sid for sid, t in self.tiles.items() if t)

    def grid_shape(self, slice_id: int) -> tuple[int, int]:
        """Mosaic grid ``(n_tiles_y, n_tiles_x)`` of a slice (max index + 1, bad tiles included)."""
        keys = list(self.tiles.get(slice_id, {})) + list(self.bad_tiles.get(slice_id, {}))
        if not keys:
            raise KeyError(f"slice {slice_id} is not in {self.root}")
        return (max(y for _, y in keys) + 1, max(x for x, _ in keys) + 1)

    @cached_property
    def tile_info(self) -> TileInfo:
        """Metadata of a reference tile (all tiles share shape and field of view)."""
        first = self.slice_ids[0]
        return next(iter(self.tiles[first].values())).info

    @property
    def tile_shape(self) -> tuple[int, int, int]:
        """``(z, y, x)`` shape of every tile after galvo crop."""
        return self.tile_info.shape

    @property
    def voxel_size_um(self) -> tuple[float, float, float]:
        """``(z, y, x)`` voxel size in micrometres."""
        info = self.tile_info
        return (self.axial_resolution_um, info.height_um / info.ny, info.width_um / info.nx)

    @property
    def n_tiles(self) -> int:
        return sum(len(t) for t in self.tiles.values())

    def tile(self, slice_id: int, x: int, y: int) -> RawTile | None:
        """The tile at grid position ``(x, y)`` of a slice, or None when absent or unusable."""
        return self.tiles.get(slice_id, {}).get((x, y))

    def nbytes_raw(self) -> int:
        """Bytes of raw image data (on disk)."""
        return sum(t.info.expected_bytes for s in self.tiles.values() for t in s.values())


def _validate_tile(path: Path, x: int, y: int, z: int) -> RawTile:
    bins = tuple(sorted(path.glob(BIN_GLOB)))
    if not bins:
        raise RawFormatError(f"{path}: no {BIN_GLOB} files in the tile folder")
    sizes = [b.stat().st_size for b in bins]
    info = TileInfo.from_info(parse_info_txt(path / "info.txt"), path / "info.txt", sum(sizes))
    expected = info.expected_bytes
    if sum(sizes) != expected:
        names = ", ".join(b.name for b in bins)
        raise RawFormatError(
            f"{path}: image data ({names}) hold {sum(sizes)} bytes but info.txt describes "
            f"n_z*(nx+n_extra)*ny*n_repeat*4 = {info.n_z}*{info.n_alines}*{info.ny}*{info.n_repeat}*4 "
            f"= {expected} bytes"
        )
    frame_bytes = info.n_z * info.n_alines * FLOAT32_BYTES
    for b, size in zip(bins, sizes):
        if size % frame_bytes:
            raise RawFormatError(
                f"{b}: {size} bytes is not a whole number of frames of {frame_bytes} bytes "
                f"(n_z={info.n_z}, nx+n_extra={info.n_alines}, float32)"
            )
    return RawTile(x=x, y=y, z=z, path=path, bin_files=bins, info=info)


def open_raw_acquisition(
    root: str | os.PathLike,
    *,
    axial_resolution_um: float | None = None,
    on_bad_tile: str = "warn",
    slice_ids: list[int] | None = None,
) -> RawAcquisition:
    """Open a raw S-OCT acquisition (flat or grouped layout) without reading pixel data.

    Parameters
    ----------
    root : path
        Acquisition folder holding ``tile_x*_y*_z*`` folders, or ``z*/tile_x*_y*_z*`` folders.
    axial_resolution_um : float, optional
        Axial sample spacing. Overrides the value in ``info.txt``; required when the files do not state it.
    on_bad_tile : {"warn", "error"}
        What to do with a tile that cannot be used (missing or garbled ``info.txt``, no ``.bin`` files, data
        size not matching the header): ``"warn"`` emits :class:`BadTileWarning` and treats the tile as
        missing (listed in :attr:`RawAcquisition.bad_tiles`); ``"error"`` raises :class:`RawFormatError`.
    slice_ids : list of int, optional
        Open only these slices.

    Raises
    ------
    RawFormatError
        If ``root`` is not an acquisition, tiles of one slice differ in shape or field of view, or the
        axial resolution is unknown.
    """
    if on_bad_tile not in ("warn", "error"):
        raise ValueError(f"on_bad_tile must be 'warn' or 'error', got {on_bad_tile!r}")
    root = Path(root)
    if not root.is_dir():
        raise RawFormatError(f"{root}: not a folder")
    found, layout = _tile_dirs(root)
    if not found:
        raise RawFormatError(
            f"{root}: not a raw S-OCT acquisition (no tile_x<X>_y<Y>_z<Z> folders, flat or under z<Z>/)"
        )
    tiles: dict[int, dict[tuple[int, int], RawTile]] = {}
    bad: dict[int, dict[tuple[int, int], str]] = {}
    for path, x, y, z in sorted(found, key=lambda t: (t[3], t[2], t[1])):
        if slice_ids is not None and z not in slice_ids:
            continue
        tiles.setdefault(z, {})
        if (x, y) in tiles[z]:
            raise RawFormatError(f"{path}: duplicate tile x={x} y={y} z={z} (also {tiles[z][(x, y)].path})")
        try:
            tiles[z][(x, y)] = _validate_tile(path, x, y, z)
        except RawFormatError as err:
            if on_bad_tile == "error":
                raise
            warnings.warn(f"{err}; the tile is treated as missing", BadTileWarning, stacklevel=2)
            bad.setdefault(z, {})[(x, y)] = str(err)
    if not any(tiles.values()):
        raise RawFormatError(f"{root}: no usable tile (all tile folders are broken)")
    # One geometry per slice: a mosaic cannot mix tile shapes.
    reference: TileInfo | None = None
    ref_tile: RawTile | None = None
    for sid in sorted(tiles):
        for tile in tiles[sid].values():
            geometry = (tile.info.shape, tile.info.n_extra, tile.info.width_um, tile.info.height_um)
            if reference is None:
                reference, ref_tile = tile.info, tile
                ref_geometry = geometry
            elif geometry != ref_geometry:
                raise RawFormatError(
                    f"{tile.path}: tile shape (z, y, x)={tile.info.shape}, n_extra={tile.info.n_extra}, "
                    f"FOV={tile.info.width_um}x{tile.info.height_um} um differs from {ref_tile.path} "
                    f"(shape {reference.shape}, n_extra={reference.n_extra}, "
                    f"FOV={reference.width_um}x{reference.height_um} um); all tiles must match"
                )
    if axial_resolution_um is None:
        axial_resolution_um = reference.axial_resolution_um
        if axial_resolution_um is None:
            raise RawFormatError(
                f"{ref_tile.path / 'info.txt'}: no axial resolution in info.txt (keys "
                f"{', '.join(AXIAL_RESOLUTION_KEYS)}); pass axial_resolution_um"
            )
    elif not axial_resolution_um > 0:
        raise ValueError(f"axial_resolution_um must be positive, got {axial_resolution_um}")
    return RawAcquisition(
        root=root, tiles=tiles, bad_tiles=bad, axial_resolution_um=float(axial_resolution_um), layout=layout
    )
