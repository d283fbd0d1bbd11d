"""Preview images for the report: slice AIPs and orthogonal sections of a volume, as small 8-bit PNGs.

Everything is read from the coarsest pyramid level that is still at least as fine as the preview, row band by
row band within a memory budget, reduced by block means while reading and resampled so a pixel is square in
millimetres (the aspect ratio of the image is that of the tissue).
"""

from __future__ import annotations

import base64
import math
import os
from pathlib import Path

import imageio.v3 as iio
import numpy as np
from skimage.transform import downscale_local_mean, resize

from ..io.omezarr import open_ome_zarr
from ..preprocess.previews import to_uint8

__all__ = ["png_bytes", "data_uri", "slice_aip", "volume_sections", "png_file_preview", "target_shape"]


def png_bytes(image: np.ndarray) -> bytes:
    """Encode a 2-D uint8 (or RGB(A)) image as PNG."""
    return iio.imwrite("<bytes>", np.ascontiguousarray(image), extension=".png")


def data_uri(png: bytes) -> str:
    """``data:image/png;base64,...`` for an ``<img src>``."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def target_shape(extent_rows_mm: float, extent_cols_mm: float, max_px: int) -> tuple[int, int]:
    """Pixel shape of a preview of a physical extent whose longest side is ``max_px``."""
    pixel = max(extent_rows_mm, extent_cols_mm) / max_px
    return max(1, round(extent_rows_mm / pixel)), max(1, round(extent_cols_mm / pixel))


def _choose_level(image, axes_in_plane: tuple[int, ...], max_px: int) -> int:
    """The coarsest level whose in-plane axes still have at least ``max_px`` samples (else the finest)."""
    best = 0
    for k, level in enumerate(image.levels):
        if all(level.shape[a] >= max_px for a in axes_in_plane if image.levels[0].shape[a] >= max_px):
            best = k
    return best


def _reduction(n: int, max_px: int) -> int:
    """Integer block size that brings ``n`` samples to at most about ``2 * max_px`` (resize does the rest)."""
    return max(1, n // (2 * max_px))


def _finish(image: np.ndarray, extent_mm: tuple[float, float], max_px: int) -> np.ndarray:
    shape = target_shape(*extent_mm, max_px)
    if image.shape != shape:
        image = resize(image, shape, order=1, anti_aliasing=True, preserve_range=True)
    return to_uint8(image)


def slice_aip(path: str | os.PathLike, max_px: int = 256, budget_bytes: int = 256 * 2**20) -> np.ndarray:
    """Average intensity projection over depth of one slice (zeros = no data, left out of the mean), 8-bit.

    The image spans the slice's ``(y, x)`` extent with square pixels, its longest side ``max_px``.
    """
    image = open_ome_zarr(path)
    level = _choose_level(image, (1, 2), max_px)
    array, scale = image.levels[level], image.scales_mm[level]
    nz, ny, nx = array.shape[-3:]
    f = _reduction(max(ny, nx), max_px)
    rows = max(f, (budget_bytes // max(1, nz * nx * 4 * 3)) // f * f)
    bands = []
    for y0 in range(0, ny, rows):
        block = np.asarray(array[..., y0:y0 + rows, :], dtype=np.float32).reshape(nz, -1, nx)
        count = np.count_nonzero(block, axis=0)
        aip = block.sum(axis=0) / np.maximum(count, 1)
        del block
        bands.append(downscale_local_mean(aip, (f, f)) if f > 1 else aip)
    aip = np.concatenate(bands, axis=0)
    return _finish(aip, (ny * scale[-2], nx * scale[-1]), max_px)


def volume_sections(path: str | os.PathLike, max_px: int = 256,
                    budget_bytes: int = 256 * 2**20) -> dict[str, np.ndarray]:
    """Orthogonal sections through the centre of a ``(z, y, x)`` volume: ``{"xy": ..., "xz": ..., "yz": ...}``.

    ``xy`` spans ``(y, x)``, ``xz`` spans ``(z, x)`` and ``yz`` spans ``(z, y)``, each with square pixels in
    millimetres, the longest side of the volume mapped to ``max_px``.
    """
    image = open_ome_zarr(path)
    level = _choose_level(image, (1, 2), max_px)
    array, scale = image.levels[level], image.scales_mm[level]
    lead = (0,) * (array.ndim - 3)
    nz, ny, nx = array.shape[-3:]
    dz, dy, dx = scale[-3:]
    longest = max(nz * dz, ny * dy, nx * dx)
    pixels = {"xy": (ny * dy, nx * dx), "xz": (nz * dz, nx * dx), "yz": (nz * dz, ny * dy)}
    out = {}
    for view, extent in pixels.items():
        side = max(1, round(max_px * max(extent) / longest))
        if view == "xy":
            reader, n_rows = (lambda r0, r1: array[(*lead, nz // 2, slice(r0, r1), slice(None))]), ny
        elif view == "xz":
            reader, n_rows = (lambda r0, r1: array[(*lead, slice(r0, r1), ny // 2, slice(None))]), nz
        else:
            reader, n_rows = (lambda r0, r1: array[(*lead, slice(r0, r1), slice(None), nx // 2)]), nz
        n_cols = nx if view != "yz" else ny
        fr, fc = _reduction(n_rows, side), _reduction(n_cols, side)
        # A section costs the chunks it crosses; bands of rows keep that bounded.
        chunk_cost = math.prod(array.chunks[-3:]) * 4
        rows = max(fr, (budget_bytes // max(1, chunk_cost + n_cols * 4 * 3)) // fr * fr)
        bands = []
        for r0 in range(0, n_rows, rows):
            band = np.asarray(reader(r0, min(n_rows, r0 + rows)), dtype=np.float32)
            bands.append(downscale_local_mean(band, (fr, fc)) if fr > 1 or fc > 1 else band)
        out[view] = _finish(np.concatenate(bands, axis=0), extent, side)
    return out


def png_file_preview(path: str | os.PathLike, max_px: int = 256) -> np.ndarray:
    """A PNG file shrunk so its longest side is at most ``max_px`` (kept as is when smaller)."""
    image = iio.imread(Path(path))
    h, w = image.shape[:2]
    if max(h, w) <= max_px:
        return image
    shape = target_shape(h, w, max_px)
    resized = resize(image, shape + image.shape[2:], order=1, anti_aliasing=True, preserve_range=True)
    return np.clip(np.round(resized), 0, 255).astype(np.uint8)
