"""Manual slice alignment (issue 9): inspect and correct the pairwise transforms of step 12 by hand.

Everything here is plain numpy/scipy/scikit-image; the dock widget (``widgets/_alignment_widget.py``) only wires
Qt controls to an :class:`AlignmentSession`.

Views
-----
A pair (fixed slice ``F``, moving slice ``M``, see :mod:`.transforms`) is looked at on 2D images of both slices,
read from a reduced pyramid level (largest side at most ``max_px``; ``factor`` canvas pixels per image pixel,
an image pixel ``i`` centred on canvas ``factor * i + (factor - 1) / 2``):

- ``aip``: the average intensity projection of each slice (mean over the planes with data, per pixel);
- ``overlap``: the mean of ``M``'s first ``overlap_planes`` planes and of ``F``'s planes ``z .. z + n`` with ``z``
  the pair's ``z_match_plane`` (the depth where the two slices image the same tissue);
- ``plane``: one plane: ``M``'s plane ``j`` against ``F``'s plane ``z + j``.

The moving image is resampled into the fixed frame with the pair transform (linear interpolation of the values
and of the data mask, values renormalised by the mask weight so that no-data never darkens an edge) and shown
as a two-colour overlay (fixed magenta, moving green: aligned structure is grey), a difference, or a
checkerboard. CLAHE (``skimage.exposure.equalize_adapthist``) or an unsharp mask only change what is shown; the
NCC (Pearson correlation over the pixels where both images have data) is computed on the unenhanced images.

Saved table
-----------
The edited table is ``pairwise_registration.csv`` itself (same columns and conventions, written atomically):
a pair set by hand has ``manual = 1``, ``confidence = 1`` (stacking uses it at full confidence), ``status =
ok``, and ``ncc_before`` / ``ncc_after`` measured on the reference view (``overlap`` when the slices' planes are
available, else ``aip``) at the identity and at the manual transform. The automatic result of such a row is
kept in the extra columns ``auto_<column>`` (:data:`AUTO_FIELDS`), which readers of the shared format ignore,
so "reset to automatic" works after a reload, on another machine, and after an import. ``verified`` marks a
pair checked by hand (step 13 then trusts it), set by hand or not. The slice configuration that stacking
reads gets a note ``manual alignment F->M`` (or ``alignment verified F->M``) on the moving slice's row.

Alignment package
-----------------
A folder or ``.zip`` holding ``alignment_package.json`` (the manifest), each slice's AIP as ``.npy`` at
``factor`` and the transforms table, so a pair can be aligned on a laptop; only the table comes back
(:meth:`AlignmentSession.import_table`, or the ``alignment-import`` step), which refuses rows whose automatic
values differ from the target's (registration re-run since the export) unless forced.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import time
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from scipy.ndimage import affine_transform

from ..io.atomic import IF_EXISTS_CHOICES, atomic_output, check_can_write
from ..io.omezarr import open_ome_zarr
from ..io.tables import read_slice_config, write_slice_config
from ..params import param, validate_params
from ..progress import Progress
from ..slices import find_slice_files
from .transforms import PAIR_COLUMNS, PairTransform, read_pairwise_registration

__all__ = [
    "VIEW_MODES",
    "OVERLAY_MODES",
    "ENHANCEMENTS",
    "AUTO_FIELDS",
    "ALIGNMENT_COLUMNS",
    "PACKAGE_MANIFEST",
    "AlignmentState",
    "EditHistory",
    "SliceImages",
    "AlignmentSession",
    "PackageParams",
    "PackageResult",
    "ImportParams",
    "ImportResult",
    "pair_matrix",
    "recentred",
    "warp_moving",
    "overlap_ncc",
    "display_image",
    "overlay_image",
    "read_alignment_table",
    "write_alignment_table",
    "note_hand_aligned_pairs",
    "find_reconstruction_inputs",
    "restack_inputs",
    "open_alignment",
    "export_alignment_package",
    "import_alignment_transforms",
]

VIEW_MODES = ("overlap", "aip", "plane")
OVERLAY_MODES = ("two-colour", "difference", "checkerboard")
ENHANCEMENTS = ("none", "clahe", "sharpen")
#: Columns of a pair row whose automatic value is kept (as ``auto_<name>``) when the row is set by hand.
AUTO_FIELDS = ("z_match_plane", "z_match_ncc", "tx_px", "ty_px", "rotation_deg", "center_y_px", "center_x_px",
               "ncc_before", "ncc_after", "confidence", "status")
AUTO_PREFIX = "auto_"
ALIGNMENT_COLUMNS = PAIR_COLUMNS + tuple(AUTO_PREFIX + name for name in AUTO_FIELDS)
TABLE_NAME = "pairwise_registration.csv"
PACKAGE_MANIFEST = "alignment_package.json"
PACKAGE_FORMAT = "napari-soct-alignment-package"
#: Slice-config notes written for hand-aligned / verified pairs (on the moving slice's row).
NOTE_MANUAL, NOTE_VERIFIED = "manual alignment", "alignment verified"
#: Pixels with data that the NCC needs (fewer: NaN).
MIN_NCC_PIXELS = 64
_CACHE_SIZE = 48


# ------------------------------------------------------------------------------------------------ transforms
def pair_matrix(pair: PairTransform, factor: float = 1.0) -> np.ndarray:
    """The pair transform (3x3 on ``(x, y, 1)``, moving -> fixed) in the pixels of an image reduced by ``factor``.

    Image pixel ``i`` is centred on canvas ``factor * i + (factor - 1) / 2`` (block means), so the matrix is
    ``S^-1 M S`` with ``S`` that image-to-canvas map.
    """
    s = np.array([[factor, 0.0, (factor - 1) / 2], [0.0, factor, (factor - 1) / 2], [0.0, 0.0, 1.0]])
    return np.linalg.inv(s) @ pair.matrix() @ s


def recentred(pair: PairTransform, center_x_px: float, center_y_px: float) -> PairTransform:
    """The same transform written about another centre: ``t' = t + (R - I)(c' - c)``."""
    th = math.radians(pair.rotation_deg)
    r = np.array([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]])
    d = np.array([center_x_px - pair.center_x_px, center_y_px - pair.center_y_px])
    t = np.array([pair.tx_px, pair.ty_px]) + (r - np.eye(2)) @ d
    return replace(pair, tx_px=float(t[0]), ty_px=float(t[1]), center_x_px=float(center_x_px),
                   center_y_px=float(center_y_px))


def warp_moving(moving: np.ndarray, pair: PairTransform, *, factor: float = 1.0, output_shape=None,
                order: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Resample a 2D moving image into the fixed frame: ``out(q) = moving(T^-1 q)`` (``T`` the pair, moving ->
    fixed, see :mod:`.transforms`).

    Parameters
    ----------
    moving : (ny, nx) array
        ``0`` = no data.
    pair : PairTransform
    factor : float
        Canvas pixels per pixel of ``moving`` (see :func:`pair_matrix`).
    output_shape : tuple, optional
        Shape of the fixed image (default: that of ``moving``).
    order : int
        Spline order of the value interpolation.

    Returns
    -------
    values : float32 array
        Renormalised by the interpolated data mask, 0 where the moving image has no data.
    valid : bool array
        Where the interpolated data mask is at least 0.5.
    """
    moving = np.asarray(moving, dtype=np.float32)
    if moving.ndim != 2:
        raise ValueError(f"warp_moving needs a 2D image, got shape {moving.shape}")
    shape = tuple(output_shape) if output_shape is not None else moving.shape
    inverse = np.linalg.inv(pair_matrix(pair, factor))  # fixed (x, y) -> moving (x, y)
    # scipy indexes (row, col) = (y, x): reverse both axes of the linear part and the offset.
    linear, offset = inverse[:2, :2][::-1, ::-1], inverse[:2, 2][::-1]
    values = affine_transform(moving, linear, offset, output_shape=shape, order=order, mode="constant", cval=0.0,
                              output=np.float32)
    weight = affine_transform((moving > 0).astype(np.float32), linear, offset, output_shape=shape, order=1,
                              mode="constant", cval=0.0, output=np.float32)
    valid = weight >= 0.5
    np.divide(values, weight, out=values, where=valid)
    values[~valid] = 0.0
    return values, valid


def _pearson(a: np.ndarray, b: np.ndarray, mask: np.ndarray, min_pixels: int) -> float:
    n = int(np.count_nonzero(mask))
    if n < min_pixels:
        return float("nan")
    x = a[mask].astype(np.float64)
    y = b[mask].astype(np.float64)
    x -= x.mean()
    y -= y.mean()
    denominator = math.sqrt(float(x @ x) * float(y @ y))
    return float(x @ y) / denominator if denominator > 0 else float("nan")


def overlap_ncc(fixed: np.ndarray, moving: np.ndarray, pair: PairTransform, *, factor: float = 1.0,
                min_pixels: int = MIN_NCC_PIXELS) -> float:
    """NCC (Pearson) of ``fixed`` and ``moving`` placed by ``pair``, over the pixels where both have data
    (NaN when fewer than ``min_pixels``)."""
    fixed = np.asarray(fixed, dtype=np.float32)
    warped, valid = warp_moving(moving, pair, factor=factor, output_shape=fixed.shape)
    return _pearson(fixed, warped, valid & (fixed > 0), min_pixels)


# ------------------------------------------------------------------------------------------------ display
def display_image(image: np.ndarray, enhancement: str = "none", *, percentiles=(1.0, 99.5)) -> np.ndarray:
    """``image`` scaled to [0, 1] by the percentiles of its data pixels (``> 0``; no data stays 0), optionally
    enhanced for viewing: ``clahe`` (adaptive histogram equalisation) or ``sharpen`` (unsharp mask)."""
    if enhancement not in ENHANCEMENTS:
        raise ValueError(f"enhancement must be one of {ENHANCEMENTS}, got {enhancement!r}")
    image = np.asarray(image, dtype=np.float32)
    valid = image > 0
    out = np.zeros(image.shape, np.float32)
    if not valid.any():
        return out
    lo, hi = np.percentile(image[valid], percentiles)
    scale = float(hi - lo) if hi > lo else 1.0
    out[valid] = np.clip((image[valid] - lo) / scale, 0.0, 1.0)
    if enhancement == "clahe":
        from skimage.exposure import equalize_adapthist

        out = equalize_adapthist(out, kernel_size=max(8, min(out.shape) // 8), clip_limit=0.01).astype(np.float32)
    elif enhancement == "sharpen":
        from skimage.filters import unsharp_mask

        out = np.clip(unsharp_mask(out, radius=2.0, amount=1.0), 0.0, 1.0).astype(np.float32)
    out[~valid] = 0.0
    return out


def overlay_image(fixed: np.ndarray, moving: np.ndarray, mode: str = "two-colour", *, tile_px: int = 0) -> np.ndarray:
    """Overlay of two display images (in [0, 1], same shape).

    ``two-colour``: RGB ``(ny, nx, 3)`` with the fixed image in magenta and the moving one in green;
    ``difference``: ``fixed - moving`` in [-1, 1]; ``checkerboard``: squares of ``tile_px`` (default: an eighth of
    the smaller side) alternately from the fixed and the moving image.
    """
    fixed = np.asarray(fixed, dtype=np.float32)
    moving = np.asarray(moving, dtype=np.float32)
    if fixed.shape != moving.shape:
        raise ValueError(f"overlay: images differ in shape, {fixed.shape} and {moving.shape}")
    if mode == "two-colour":
        return np.stack([fixed, moving, fixed], axis=-1)
    if mode == "difference":
        return fixed - moving
    if mode == "checkerboard":
        tile = int(tile_px) or max(4, min(fixed.shape) // 8)
        yy, xx = np.indices(fixed.shape)
        return np.where(((yy // tile) + (xx // tile)) % 2 == 0, fixed, moving).astype(np.float32)
    raise ValueError(f"overlay mode must be one of {OVERLAY_MODES}, got {mode!r}")


# ------------------------------------------------------------------------------------------------ slice images
def _block_mean(image: np.ndarray, g: int) -> np.ndarray:
    """Mean of ``g x g`` blocks (the image padded with no-data to a multiple of ``g``)."""
    if g == 1:
        return image.astype(np.float32)
    pad = np.zeros((-(-image.shape[0] // g) * g, -(-image.shape[1] // g) * g), np.float32)
    pad[:image.shape[0], :image.shape[1]] = image
    return pad.reshape(pad.shape[0] // g, g, pad.shape[1] // g, g).mean(axis=(1, 3))


class SliceImages:
    """2D views of common-space slices at a reduced resolution (largest side at most ``max_px``).

    Reads the coarsest pyramid level not below that size, then block-means by an integer factor if the level is
    still larger; ``factor`` is canvas pixels per image pixel. Images are computed plane by plane and cached.

    Parameters
    ----------
    files : dict
        ``{slice_id: path}`` of the slices (OME-Zarr, one canvas).
    max_px : int
    """

    has_planes = True

    def __init__(self, files: dict[int, Path], max_px: int = 1024):
        if not files:
            raise ValueError("no slice to align")
        self.files = dict(sorted(files.items()))
        self._images = {sid: open_ome_zarr(p) for sid, p in self.files.items()}
        first = next(iter(self._images.values()))
        canvas = first.levels[0].shape[-2:]
        for sid, im in self._images.items():
            if im.levels[0].shape[-2:] != canvas:
                raise ValueError(f"{self.files[sid]}: canvas {im.levels[0].shape[-2:]} differs from {canvas} "
                                 "(slices must be in common space, step 10)")
        level = next((i for i, a in enumerate(first.levels) if max(a.shape[-2:]) <= max_px), len(first.levels) - 1)
        self.level = level
        level_factor = first.scales_mm[level][-1] / first.scales_mm[0][-1]
        self._group = max(1, math.ceil(max(first.levels[level].shape[-2:]) / max_px))
        self.factor = float(level_factor * self._group)
        self.canvas_shape = tuple(int(n) for n in canvas)
        self.shape = tuple(-(-int(n) // self._group) for n in first.levels[level].shape[-2:])
        self.pixel_mm = tuple(float(v) for v in first.scales_mm[0][-2:])
        soct = first.attributes.get("soct", {})
        self.canvas_origin_mm = tuple(soct.get("canvas_origin_mm") or soct.get("origin_mm") or (0.0, 0.0))
        self._cache: dict = {}

    @property
    def slice_ids(self) -> list[int]:
        return list(self.files)

    def n_planes(self, sid: int) -> int:
        return int(self._level(sid).shape[0])

    def _level(self, sid: int):
        try:
            return self._images[sid].levels[self.level]
        except KeyError:
            raise KeyError(f"slice {sid} is not among the slices opened ({', '.join(map(str, self.files))})") from None

    def _cached(self, key, compute):
        if key not in self._cache:
            if len(self._cache) >= _CACHE_SIZE:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = compute()
        return self._cache[key]

    def _mean(self, sid: int, start: int, stop: int) -> np.ndarray:
        """Mean over the planes ``[start, stop)`` with data, per pixel (0 where none has data)."""
        arr = self._level(sid)
        start, stop = max(0, start), min(arr.shape[0], stop)
        total = np.zeros(arr.shape[-2:], np.float64)
        count = np.zeros(arr.shape[-2:], np.int32)
        for z in range(start, stop):
            plane = np.asarray(arr[z], dtype=np.float32)
            valid = plane > 0
            total[valid] += plane[valid]
            count += valid
        mean = np.where(count > 0, total / np.maximum(count, 1), 0).astype(np.float32)
        return _block_mean(mean, self._group)

    def aip(self, sid: int) -> np.ndarray:
        """Average intensity projection of slice ``sid`` (planes with data only)."""
        return self._cached((sid, "aip"), lambda: self._mean(sid, 0, self.n_planes(sid)))

    def planes_mean(self, sid: int, start: int, stop: int) -> np.ndarray:
        """Mean of planes ``[start, stop)`` of slice ``sid`` (planes with data only, per pixel)."""
        return self._cached((sid, int(start), int(stop)), lambda: self._mean(sid, int(start), int(stop)))

    def data_centre_xy(self, sid: int) -> tuple[float, float]:
        """Canvas ``(x, y)`` of the centre of the slice's data bounding box."""
        valid = self.aip(sid) > 0
        if not valid.any():
            return ((self.canvas_shape[1] - 1) / 2, (self.canvas_shape[0] - 1) / 2)
        rows, cols = np.flatnonzero(valid.any(axis=1)), np.flatnonzero(valid.any(axis=0))
        f = self.factor
        return (float(f * (cols[0] + cols[-1]) / 2 + (f - 1) / 2), float(f * (rows[0] + rows[-1]) / 2 + (f - 1) / 2))


class _PackageImages(SliceImages):
    """The AIPs of an alignment package (planes are not in a package: only the ``aip`` view)."""

    has_planes = False

    def __init__(self, reader, manifest: dict):  # noqa: D107 - built by open_alignment
        self._reader = reader
        self.files = {int(k): v["aip"] for k, v in sorted(manifest["slices"].items(), key=lambda kv: int(kv[0]))}
        self._planes = {int(k): int(v.get("planes", 0)) for k, v in manifest["slices"].items()}
        self.level = 0
        self._group = 1
        self.factor = float(manifest["factor"])
        self.canvas_shape = tuple(int(n) for n in manifest["canvas_shape"])
        self.shape = tuple(int(n) for n in manifest["image_shape"])
        self.pixel_mm = tuple(float(v) for v in manifest["pixel_mm"])
        self.canvas_origin_mm = tuple(float(v) for v in manifest.get("canvas_origin_mm", (0.0, 0.0)))
        self._cache = {}

    def n_planes(self, sid: int) -> int:
        return self._planes[sid]

    def aip(self, sid: int) -> np.ndarray:
        if sid not in self.files:
            raise KeyError(f"slice {sid} is not in the alignment package")
        return self._cached((sid, "aip"), lambda: np.asarray(np.load(io.BytesIO(self._reader(self.files[sid]))),
                                                             dtype=np.float32))

    def planes_mean(self, sid: int, start: int, stop: int) -> np.ndarray:
        raise ValueError("an alignment package holds the slices' AIPs only: use the 'aip' view")


# ------------------------------------------------------------------------------------------------ table
def _cell(value) -> str:
    if isinstance(value, bool | np.bool_):
        return str(int(value))
    if isinstance(value, float | np.floating):
        text = repr(float(value))  # the shortest text that reads back as the same float: a reload changes nothing
        return text[:-2] if text.endswith(".0") else text
    return str(value)


def write_alignment_table(path: str | os.PathLike, pairs: list[PairTransform],
                          automatic: dict[tuple[int, int], PairTransform | None] | None = None,
                          if_exists: str = "overwrite") -> Path:
    """Write ``pairwise_registration.csv`` atomically: the shared columns, plus ``auto_<column>`` holding the
    automatic result of every row set by hand (``manual``) whose automatic result is known."""
    path = Path(path)
    with atomic_output(path, if_exists) as tmp:
        Path(tmp).write_text(_table_text(pairs, automatic or {}))
    return path


def _table_text(pairs: list[PairTransform], automatic: dict) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(ALIGNMENT_COLUMNS)
    for p in pairs:
        row = [_cell(getattr(p, name)) for name in PAIR_COLUMNS]
        auto = automatic.get((p.fixed_id, p.moving_id)) if p.manual else None
        row += [_cell(getattr(auto, name)) if auto is not None else "" for name in AUTO_FIELDS]
        writer.writerow(row)
    return buffer.getvalue()


def read_alignment_table(path: str | os.PathLike) -> tuple[list[PairTransform], dict]:
    """Read a ``pairwise_registration.csv`` (with or without ``auto_*`` columns).

    Returns
    -------
    pairs : list of PairTransform
        The rows as stacking reads them.
    automatic : dict
        ``{(fixed_id, moving_id): automatic result}``: the row itself when it is not manual, the row with its
        ``auto_*`` values when it is manual and has them, None for a manual row without them.
    """
    path = Path(path)
    pairs = read_pairwise_registration(path)
    with path.open(newline="") as fh:
        raws = list(csv.DictReader(fh))
    automatic: dict[tuple[int, int], PairTransform | None] = {}
    for line, (p, raw) in enumerate(zip(pairs, raws), start=2):
        key = (p.fixed_id, p.moving_id)
        if not p.manual:
            automatic[key] = replace(p)
            continue
        texts = {name: (raw.get(AUTO_PREFIX + name) or "").strip() for name in AUTO_FIELDS}
        if not texts["status"]:
            automatic[key] = None
            continue
        values = {}
        for name, text in texts.items():
            if not text:
                continue
            try:
                values[name] = (int(float(text)) if name == "z_match_plane" else text if name == "status"
                                else float(text))
            except ValueError:
                raise ValueError(f"{path}, line {line}, column {AUTO_PREFIX}{name}: {text!r} is not a number") from None
        automatic[key] = replace(p, manual=False, verified=False, **values)
    return pairs, automatic


def note_hand_aligned_pairs(slice_config: str | os.PathLike, pairs: list[PairTransform]) -> Path:
    """Record in ``slice_config.csv`` (rewritten atomically) which pairs were aligned or verified by hand: a note
    ``manual alignment F->M`` or ``alignment verified F->M`` on the moving slice's row; earlier such notes of
    pairs no longer manual or verified are removed."""
    path = Path(slice_config)
    rows = read_slice_config(path)
    wanted: dict[int, list[str]] = {}
    for p in pairs:
        if p.manual:
            wanted.setdefault(p.moving_id, []).append(f"{NOTE_MANUAL} {p.fixed_id}->{p.moving_id}")
        elif p.verified:
            wanted.setdefault(p.moving_id, []).append(f"{NOTE_VERIFIED} {p.fixed_id}->{p.moving_id}")
    for row in rows:
        kept = [n for n in row.notes.split(";") if n and not n.startswith((NOTE_MANUAL + " ", NOTE_VERIFIED + " "))]
        row.notes = ";".join(kept)
        for note in wanted.get(row.slice_id, []):
            row.add_note(note)
    write_slice_config(path, rows, if_exists="overwrite")
    return path


# ------------------------------------------------------------------------------------------------ history
@dataclass(frozen=True)
class AlignmentState:
    """The editable part of a pair: translation, rotation about the pair's centre, z overlap, flags."""

    tx_px: float
    ty_px: float
    rotation_deg: float
    z_match_plane: int
    manual: bool = False
    verified: bool = False

    @classmethod
    def of(cls, pair: PairTransform) -> AlignmentState:
        return cls(float(pair.tx_px), float(pair.ty_px), float(pair.rotation_deg), int(pair.z_match_plane),
                   bool(pair.manual), bool(pair.verified))


class EditHistory:
    """Linear undo/redo over immutable states: ``push`` drops the redo branch; equal states are not pushed."""

    def __init__(self, initial):
        self._states = [initial]
        self._index = 0

    @property
    def current(self):
        return self._states[self._index]

    @property
    def can_undo(self) -> bool:
        return self._index > 0

    @property
    def can_redo(self) -> bool:
        return self._index < len(self._states) - 1

    def push(self, state) -> bool:
        """Make ``state`` current; False (nothing recorded) when it equals the current one."""
        if state == self.current:
            return False
        del self._states[self._index + 1:]
        self._states.append(state)
        self._index += 1
        return True

    def undo(self):
        if self.can_undo:
            self._index -= 1
        return self.current

    def redo(self):
        if self.can_redo:
            self._index += 1
        return self.current


# ------------------------------------------------------------------------------------------------ session
@dataclass
class Rendering:
    """What the widget shows for one pair: the overlay, the display images and the NCC of the overlap."""

    overlay: np.ndarray
    fixed: np.ndarray
    moving: np.ndarray
    ncc: float


class AlignmentSession:
    """The pairs of one ``pairwise_registration.csv`` being aligned by hand, with the slice images to look at.

    Parameters
    ----------
    table_path : path
        The table read, and written by :meth:`save` (unless told otherwise).
    images : SliceImages
    reconstruction : path, optional
        The reconstruction folder (for the slice configuration and restacking).
    slice_config : path, optional
        ``slice_config.csv`` that gets the hand-alignment notes on save.
    overlap_planes : int
        Planes averaged in the ``overlap`` view.
    """

    def __init__(self, table_path, images: SliceImages, *, reconstruction=None, slice_config=None,
                 overlap_planes: int = 6, package=None):
        self.table_path = Path(table_path)
        self.images = images
        self.reconstruction = Path(reconstruction) if reconstruction else None
        self.slice_config = Path(slice_config) if slice_config else None
        self.package = Path(package) if package else None
        self.overlap_planes = int(overlap_planes)
        pairs, automatic = read_alignment_table(self.table_path)
        if not pairs:
            raise ValueError(f"{self.table_path}: no pair to align")
        self._rows: dict[tuple[int, int], PairTransform] = {}
        self.automatic: dict[tuple[int, int], PairTransform | None] = {}
        self._automatic_read = dict(automatic)  # as read: what an untouched row is written back as
        for p in pairs:
            key = (p.fixed_id, p.moving_id)
            missing = [s for s in key if s not in images.files]
            if missing:
                raise ValueError(f"{self.table_path}: pair {key[0]}->{key[1]} names slice(s) "
                                 f"{', '.join(map(str, missing))} that are not among the slices")
            auto = automatic[key]
            if p.center_x_px == 0 and p.center_y_px == 0 and p.is_identity:
                # No centre (identity / error rows): rotate about the moving slice's data centre.
                cx, cy = images.data_centre_xy(p.moving_id)
                p = replace(p, center_x_px=cx, center_y_px=cy)
                if auto is not None and auto.is_identity:
                    auto = replace(auto, center_x_px=cx, center_y_px=cy)
            self._rows[key] = p
            self.automatic[key] = auto
        self._history = {key: EditHistory(AlignmentState.of(p)) for key, p in self._rows.items()}
        self._saved = {key: h.current for key, h in self._history.items()}

    # --- pairs and states
    @property
    def keys(self) -> list[tuple[int, int]]:
        return list(self._rows)

    def state(self, key) -> AlignmentState:
        return self._history[self._key(key)].current

    def _key(self, key) -> tuple[int, int]:
        key = (int(key[0]), int(key[1]))
        if key not in self._rows:
            raise KeyError(f"no pair {key[0]}->{key[1]} in {self.table_path}")
        return key

    def pair(self, key) -> PairTransform:
        """The pair with its current (edited) values."""
        key = self._key(key)
        s = self.state(key)
        return replace(self._rows[key], tx_px=s.tx_px, ty_px=s.ty_px, rotation_deg=s.rotation_deg,
                       z_match_plane=s.z_match_plane, manual=s.manual, verified=s.verified)

    def set_transform(self, key, *, tx_px=None, ty_px=None, rotation_deg=None, z_match_plane=None) -> AlignmentState:
        """Set values of a pair by hand (the pair becomes ``manual``); one undo step."""
        key = self._key(key)
        s = self.state(key)
        new = replace(s, tx_px=float(s.tx_px if tx_px is None else tx_px),
                      ty_px=float(s.ty_px if ty_px is None else ty_px),
                      rotation_deg=float(s.rotation_deg if rotation_deg is None else rotation_deg),
                      z_match_plane=int(s.z_match_plane if z_match_plane is None else z_match_plane))
        if new.z_match_plane < 1:
            raise ValueError(f"z overlap {new.z_match_plane}: the moving slice's top must lie at plane 1 or deeper "
                             "of the fixed slice")
        if (new.tx_px, new.ty_px, new.rotation_deg, new.z_match_plane) != (s.tx_px, s.ty_px, s.rotation_deg,
                                                                            s.z_match_plane):
            new = replace(new, manual=True)
        self._history[key].push(new)
        return self.state(key)

    def nudge(self, key, *, dx_px=0.0, dy_px=0.0, drotation_deg=0.0, dz=0) -> AlignmentState:
        """Move the moving slice by a step (translation, rotation about the centre, z overlap)."""
        s = self.state(key)
        return self.set_transform(key, tx_px=s.tx_px + dx_px, ty_px=s.ty_px + dy_px,
                                  rotation_deg=s.rotation_deg + drotation_deg, z_match_plane=s.z_match_plane + dz)

    def set_verified(self, key, verified: bool = True) -> AlignmentState:
        key = self._key(key)
        self._history[key].push(replace(self.state(key), verified=bool(verified)))
        return self.state(key)

    def reset_to_automatic(self, key) -> AlignmentState:
        """Back to the automatic result (not manual, not verified); one undo step."""
        key = self._key(key)
        auto = self.automatic.get(key)
        if auto is None:
            raise ValueError(f"pair {key[0]}->{key[1]}: the automatic result is unknown (a manual row without "
                             "auto_* columns)")
        self._history[key].push(AlignmentState.of(replace(auto, manual=False, verified=False)))
        return self.state(key)

    def undo(self, key) -> AlignmentState:
        return self._history[self._key(key)].undo()

    def redo(self, key) -> AlignmentState:
        return self._history[self._key(key)].redo()

    def can_undo(self, key) -> bool:
        return self._history[self._key(key)].can_undo

    def can_redo(self, key) -> bool:
        return self._history[self._key(key)].can_redo

    @property
    def dirty(self) -> bool:
        """Unsaved changes."""
        return any(h.current != self._saved[k] for k, h in self._history.items())

    def label(self, key) -> str:
        """A short description of a pair for a list."""
        p = self.pair(key)
        auto = self.automatic.get(self._key(key))
        conf = auto.confidence if auto is not None else p.confidence
        flags = "".join(f" [{f}]" for f, on in (("manual", p.manual), ("verified", p.verified)) if on)
        return f"{p.fixed_id} -> {p.moving_id}   conf {conf:.2f} {auto.status if auto else p.status}{flags}"

    # --- images
    @property
    def views(self) -> tuple[str, ...]:
        return VIEW_MODES if self.images.has_planes else ("aip",)

    @property
    def reference_view(self) -> str:
        return "overlap" if self.images.has_planes else "aip"

    def view_images(self, key, view: str = "overlap", plane: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """The fixed and moving 2D images of a pair for ``view`` (see the module docstring)."""
        key = self._key(key)
        if view not in VIEW_MODES:
            raise ValueError(f"view must be one of {VIEW_MODES}, got {view!r}")
        z = self.state(key).z_match_plane
        fixed_id, moving_id = key
        if view == "aip":
            return self.images.aip(fixed_id), self.images.aip(moving_id)
        if view == "overlap":
            n = self.overlap_planes
            return self.images.planes_mean(fixed_id, z, z + n), self.images.planes_mean(moving_id, 0, n)
        j = max(0, int(plane))
        return (self.images.planes_mean(fixed_id, z + j, z + j + 1),
                self.images.planes_mean(moving_id, j, j + 1))

    def ncc(self, key, view: str | None = None, plane: int = 0, pair: PairTransform | None = None) -> float:
        """NCC of the pair's overlap on ``view`` (default: the reference view) at its current transform."""
        view = view or self.reference_view
        fixed, moving = self.view_images(key, view, plane)
        return overlap_ncc(fixed, moving, pair or self.pair(key), factor=self.images.factor)

    def render(self, key, view: str = "overlap", overlay: str = "two-colour", plane: int = 0,
               enhancement: str = "none") -> Rendering:
        """The overlay of a pair at its current transform, and the NCC of the overlap."""
        fixed, moving = self.view_images(key, view, plane)
        pair = self.pair(key)
        warped, valid = warp_moving(moving, pair, factor=self.images.factor, output_shape=fixed.shape)
        ncc = _pearson(fixed, warped, valid & (fixed > 0), MIN_NCC_PIXELS)
        f, m = display_image(fixed, enhancement), display_image(warped, enhancement)
        return Rendering(overlay_image(f, m, overlay), f, m, ncc)

    # --- saving, importing, packages
    def rows(self) -> list[PairTransform]:
        """The table as it would be saved (manual rows: confidence 1, status ok, NCCs on the reference view)."""
        out = []
        for key in self.keys:
            p = self.pair(key)
            if p.manual:
                identity = replace(p, tx_px=0.0, ty_px=0.0, rotation_deg=0.0)
                p = replace(p, confidence=1.0, status="ok", ncc_before=self.ncc(key, pair=identity),
                            ncc_after=self.ncc(key))
            else:
                auto = self._automatic_read.get(key)
                p = replace(auto if auto is not None else p, verified=p.verified, manual=False)
            out.append(p)
        return out

    def save(self, path=None) -> Path:
        """Write the table (default: where it was read) and note hand-aligned pairs in the slice config."""
        target = Path(path) if path else self.table_path
        rows = self.rows()
        write_alignment_table(target, rows, self._automatic_read, if_exists="overwrite")
        if self.slice_config is not None and self.slice_config.is_file() and target == self.table_path:
            note_hand_aligned_pairs(self.slice_config, rows)
        self._saved = {key: h.current for key, h in self._history.items()}
        return target

    def import_table(self, path, *, force: bool = False) -> list[tuple[int, int]]:
        """Apply the manual and verified rows of a returned table (e.g. aligned on a laptop) as edits (undoable).

        Raises
        ------
        ValueError
            A row names a pair that is not here, or its automatic values differ from this session's (the
            registration was re-run since the package was made) and ``force`` is false.
        """
        pairs, automatic = read_alignment_table(path)
        chosen = [p for p in pairs if p.manual or p.verified]
        unknown = [f"{p.fixed_id}->{p.moving_id}" for p in chosen if (p.fixed_id, p.moving_id) not in self._rows]
        if unknown:
            raise ValueError(f"{path}: pair(s) {', '.join(unknown)} are not in {self.table_path}")
        for p in chosen:
            key = (p.fixed_id, p.moving_id)
            theirs, ours = automatic.get(key), self.automatic.get(key)
            if not force and theirs is not None and ours is not None and not _same_transform(theirs, ours):
                raise ValueError(f"{path}: pair {key[0]}->{key[1]} was aligned against another automatic result "
                                 f"than {self.table_path} holds (registration re-run since the export?); "
                                 "import with force to apply it anyway")
        for p in chosen:
            key = (p.fixed_id, p.moving_id)
            row = self._rows[key]
            if (p.center_x_px, p.center_y_px) != (row.center_x_px, row.center_y_px):
                p = recentred(p, row.center_x_px, row.center_y_px)
            self._history[key].push(AlignmentState.of(p))
        return [(p.fixed_id, p.moving_id) for p in chosen]

    def export_package(self, out_path, *, if_exists: str = "error") -> Path:
        """Write an alignment package (folder, or ``.zip`` by the suffix) with the AIPs and the current table."""
        out_path = Path(out_path)
        check_can_write(out_path, if_exists)
        table = _table_text(self.rows(), self._automatic_read).encode()
        ids = sorted({s for key in self.keys for s in key})
        members: dict[str, bytes] = {}
        slices = {}
        for sid in ids:
            npy = io.BytesIO()
            np.save(npy, self.images.aip(sid).astype(np.float32), allow_pickle=False)
            name = f"aip/slice_z{sid:02d}_aip.npy"
            members[name] = npy.getvalue()
            slices[str(sid)] = {"aip": name, "planes": self.images.n_planes(sid)}
        manifest = {
            "format": PACKAGE_FORMAT, "version": 1, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "source": str(self.reconstruction or self.table_path.parent), "table": TABLE_NAME,
            "table_sha256": hashlib.sha256(table).hexdigest(), "factor": self.images.factor,
            "canvas_shape": list(self.images.canvas_shape), "image_shape": list(self.images.aip(ids[0]).shape),
            "pixel_mm": list(self.images.pixel_mm), "canvas_origin_mm": list(self.images.canvas_origin_mm),
            "slices": slices,
        }
        members[TABLE_NAME] = table
        members[PACKAGE_MANIFEST] = json.dumps(manifest, indent=2).encode()
        with atomic_output(out_path, if_exists) as tmp:
            tmp = Path(tmp)
            if out_path.suffix.lower() == ".zip":
                with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
                    for name, data in members.items():
                        zf.writestr(name, data)
            else:
                for name, data in members.items():
                    (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                    (tmp / name).write_bytes(data)
        return out_path


def _same_transform(a: PairTransform, b: PairTransform, tol: float = 1e-6) -> bool:
    if a.z_match_plane != b.z_match_plane:
        return False
    b = recentred(b, a.center_x_px, a.center_y_px)
    return all(abs(getattr(a, n) - getattr(b, n)) <= tol for n in ("tx_px", "ty_px", "rotation_deg"))


# ------------------------------------------------------------------------------------------------ opening
def _has_slices(folder) -> bool:
    folder = Path(folder) if folder else None
    return bool(folder) and folder.is_dir() and any(e.name.endswith(".ome.zarr") for e in folder.iterdir())


def find_reconstruction_inputs(folder) -> dict:
    """The alignment inputs of a reconstruction folder: ``common_dir`` (10_common), ``table``
    (12_register/pairwise_registration.csv), ``interpolated_dir`` and ``slice_config``: those the last stacking
    read (``14_stack/stack_metrics.json``), else 11_interpolate when it holds slices and the latest of
    13_exclude, 11_interpolate, 09_rehoming, 08_quality ("" when none)."""
    folder = Path(folder)
    common, table = folder / "10_common", folder / "12_register" / TABLE_NAME
    if not common.is_dir() or not table.is_file():
        raise FileNotFoundError(f"{folder}: not a reconstruction folder with 10_common/ and "
                                f"12_register/{TABLE_NAME} (run steps 10 and 12 first)")
    interpolated = folder / "11_interpolate"
    if not _has_slices(interpolated):
        interpolated = ""
    slice_config = ""
    metrics = folder / "14_stack" / "stack_metrics.json"
    if metrics.is_file():  # what the last stacking read wins
        recorded = json.loads(metrics.read_text())
        if recorded.get("slice_config") and Path(recorded["slice_config"]).is_file():
            slice_config = recorded["slice_config"]
        if recorded.get("interpolated_dir") and Path(recorded["interpolated_dir"]).is_dir():
            interpolated = recorded["interpolated_dir"]
    if not slice_config:
        for candidate in ("13_exclude/slice_config.csv", "11_interpolate/slice_config_final.csv",
                          "09_rehoming/slice_config.csv", "08_quality/slice_config.csv"):
            if (folder / candidate).is_file():
                slice_config = str(folder / candidate)
                break
    return {"common_dir": common, "interpolated_dir": str(interpolated), "table": table,
            "slice_config": slice_config}


def restack_inputs(folder) -> tuple[tuple[Path, Path, Path], dict]:
    """Inputs and parameters to stack a reconstruction folder again with its (edited) registration table.

    Returns ``((common_dir, registration_csv, out_dir), params)`` for the registered ``stack`` step: the
    parameters the last stacking used (``14_stack/stack_metrics.json``), else the defaults, with the folder's
    interpolated slots and slice configuration, and ``if_exists = "overwrite"``.
    """
    folder = Path(folder)
    found = find_reconstruction_inputs(folder)
    params: dict = {}
    metrics = folder / "14_stack" / "stack_metrics.json"
    if metrics.is_file():
        params = dict(json.loads(metrics.read_text()).get("params") or {})
    params["interpolated_dir"] = found["interpolated_dir"]
    params["slice_config"] = found["slice_config"]
    params["if_exists"] = "overwrite"
    return (found["common_dir"], found["table"], folder / "14_stack"), params


def _package_reader(path: Path):
    """A function reading a member of a package (folder or zip) as bytes."""
    if path.is_file() and zipfile.is_zipfile(path):
        def read(name: str) -> bytes:
            with zipfile.ZipFile(path) as zf:
                return zf.read(name)
        return read
    return lambda name: (path / name).read_bytes()


def open_alignment(path, *, common_dir=None, max_px: int = 1024, overlap_planes: int = 6) -> AlignmentSession:
    """Open what a user points at for manual alignment.

    Parameters
    ----------
    path : path
        A reconstruction folder (with ``10_common`` and ``12_register``), an alignment package (folder or
        ``.zip``), or a ``pairwise_registration.csv`` / the folder holding it (then ``common_dir`` is needed).
    common_dir : path, optional
        Common-space slices (step 10) when ``path`` is a table.
    max_px : int
        Largest side of the images looked at.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if (path.is_file() and zipfile.is_zipfile(path)) or (path / PACKAGE_MANIFEST).is_file():
        reader = _package_reader(path)
        try:
            manifest = json.loads(reader(PACKAGE_MANIFEST))
        except KeyError:
            raise ValueError(f"{path}: a zip without {PACKAGE_MANIFEST} is not an alignment package") from None
        if manifest.get("format") != PACKAGE_FORMAT:
            raise ValueError(f"{path}: {PACKAGE_MANIFEST} is not a {PACKAGE_FORMAT} manifest")
        images = _PackageImages(reader, manifest)
        if path.is_dir():
            table = path / manifest["table"]
        else:  # a zip is read only: the table is edited next to it
            table = path.with_name(f"{path.stem}_{TABLE_NAME}")
            if not table.exists():
                with atomic_output(table, "error") as tmp:
                    Path(tmp).write_bytes(reader(manifest["table"]))
        return AlignmentSession(table, images, package=path, overlap_planes=overlap_planes)
    if path.is_dir() and (path / "10_common").is_dir():
        found = find_reconstruction_inputs(path)
        files = find_slice_files(found["common_dir"])
        if _has_slices(found["interpolated_dir"]):  # a step-11 folder may hold no slot at all
            files.update(find_slice_files(found["interpolated_dir"]))
        return AlignmentSession(found["table"], SliceImages(files, max_px), reconstruction=path,
                                slice_config=found["slice_config"] or None, overlap_planes=overlap_planes)
    table = path / TABLE_NAME if path.is_dir() else path
    if not table.is_file():
        raise FileNotFoundError(f"{path}: neither a reconstruction folder, an alignment package nor a "
                                f"{TABLE_NAME}")
    if not common_dir:
        raise ValueError(f"{table}: give the common-space slices (10_common) to align its pairs on")
    return AlignmentSession(table, SliceImages(find_slice_files(common_dir), max_px), overlap_planes=overlap_planes)


# ------------------------------------------------------------------------------------------------ CLI steps
@dataclass
class PackageParams:
    """Export of an alignment package (AIPs + transforms) to align on another machine."""

    max_px: int = param(1024, "Largest side of the slice AIPs in the package", min=16, max=65536, unit="px")
    if_exists: str = param("error", "Existing outputs: 'error' refuses, 'skip' keeps them, 'overwrite' replaces them",
                           choices=IF_EXISTS_CHOICES, advanced=True)


@dataclass
class PackageResult:
    path: Path
    n_slices: int = 0
    n_pairs: int = 0
    factor: float = 1.0
    bytes: int = 0
    skipped: bool = False


def export_alignment_package(reconstruction, out_path, params: PackageParams | None = None, *, progress=None,
                             cancel=None) -> PackageResult:
    """Write an alignment package of a reconstruction folder: each slice's AIP (``.npy``), the transforms
    table and a manifest, as a folder or a ``.zip`` (by the suffix of ``out_path``)."""
    params = params or PackageParams()
    validate_params(params)
    out_path = Path(out_path)
    result = PackageResult(out_path)
    if not check_can_write(out_path, params.if_exists):
        result.skipped = True
        return result
    tracker = Progress(2, progress, cancel)
    session = open_alignment(reconstruction, max_px=params.max_px)
    tracker.advance(1, "slices opened")
    session.export_package(out_path, if_exists="overwrite" if params.if_exists == "skip" else params.if_exists)
    tracker.advance(1, f"wrote {out_path}")
    ids = {s for key in session.keys for s in key}
    size = (out_path.stat().st_size if out_path.is_file()
            else sum(p.stat().st_size for p in out_path.rglob("*") if p.is_file()))
    return PackageResult(out_path, len(ids), len(session.keys), session.images.factor, size)


@dataclass
class ImportParams:
    """Import of transforms aligned elsewhere (the table of an alignment package) into a reconstruction."""

    force: bool = param(False, "Apply rows aligned against another automatic result (registration re-run since "
                        "the export)")


@dataclass
class ImportResult:
    table: Path
    imported: list = field(default_factory=list)
    slice_config: Path | None = None


def import_alignment_transforms(table, reconstruction, params: ImportParams | None = None, *, progress=None,
                                cancel=None) -> ImportResult:
    """Merge the manual and verified rows of ``table`` (returned from an alignment package) into the
    reconstruction's ``12_register/pairwise_registration.csv`` (rewritten atomically, automatic results kept in
    ``auto_*`` columns) and note them in its slice configuration; restack afterwards."""
    params = params or ImportParams()
    tracker = Progress(2, progress, cancel)
    session = open_alignment(reconstruction)
    imported = session.import_table(table, force=params.force)
    tracker.advance(1, f"{len(imported)} pair(s) read")
    path = session.save()
    tracker.advance(1, f"wrote {path}")
    return ImportResult(path, imported, session.slice_config)
