"""QC previews of a slice: average intensity projection and orthogonal sections as 8-bit PNGs."""

from __future__ import annotations

from pathlib import Path

import imageio.v3 as iio
import numpy as np
from scipy.ndimage import zoom

from ..io.atomic import atomic_output

__all__ = ["to_uint8", "save_previews"]


def to_uint8(image: np.ndarray, low: float = 0.5, high: float = 99.5) -> np.ndarray:
    """Scale to 8 bits between two percentiles of the non-zero pixels (zeros are missing tiles)."""
    values = image[image != 0]
    if values.size == 0:
        return np.zeros(image.shape, np.uint8)
    lo, hi = np.percentile(values, [low, high])
    if hi <= lo:
        hi = lo + 1e-12
    return (np.clip((image - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)


def _physical_aspect(section: np.ndarray, row_um: float, col_um: float) -> np.ndarray:
    """Stretch rows so a pixel is square in micrometres (depth samples are often finer than lateral)."""
    factor = row_um / col_um
    if abs(factor - 1) < 1e-3:
        return section
    return zoom(section, (factor, 1.0), order=1)


def save_previews(folder, slice_id: int, aip, section_xz, section_yz, voxel_size_um) -> list[Path]:
    """Write ``aip_z{NN}.png``, ``ortho_xz_z{NN}.png`` and ``ortho_yz_z{NN}.png`` (atomic, overwriting)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vz, vy, vx = voxel_size_um
    images = {
        f"aip_z{slice_id:02d}.png": aip,
        f"ortho_xz_z{slice_id:02d}.png": _physical_aspect(section_xz, vz, vx),
        f"ortho_yz_z{slice_id:02d}.png": _physical_aspect(section_yz, vz, vy),
    }
    paths = []
    for name, image in images.items():
        path = folder / name
        with atomic_output(path, "overwrite") as tmp:
            iio.imwrite(tmp, to_uint8(image), extension=".png")
        paths.append(path)
    return paths
