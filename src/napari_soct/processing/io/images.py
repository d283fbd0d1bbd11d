"""Generic image inputs for steps that work on arrays: an array with its physical scale, opened lazily."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import dask.array as da
import numpy as np
import zarr

from .omezarr import is_ome_zarr, open_ome_zarr

__all__ = ["ImageData", "open_image", "IMAGE_SUFFIXES"]

IMAGE_SUFFIXES = (".tif", ".tiff", ".btf", ".zarr", ".npy")


@dataclass
class ImageData:
    """An image or label array with its physical voxel size.

    Attributes
    ----------
    data : array-like
        numpy, dask or zarr array (kept lazy; steps read it block by block).
    scale : tuple of float
        Voxel size per axis (millimetres for spatial axes; 1 where unknown).
    name : str
    axes : tuple of str, optional
    source : Path, optional
        File or folder it was read from.
    """

    data: object
    scale: tuple[float, ...]
    name: str = ""
    axes: tuple[str, ...] | None = None
    source: Path | None = None
    metadata: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.data.dtype)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def as_dask(self) -> da.Array:
        """The data as a dask array (zarr chunks kept)."""
        if isinstance(self.data, da.Array):
            return self.data
        chunks = getattr(self.data, "chunks", None)
        if isinstance(chunks, tuple) and chunks and isinstance(chunks[0], int):
            return da.from_array(self.data, chunks=chunks)
        return da.asarray(self.data)


def _is_zarr_array(path: Path) -> bool:
    meta = path / "zarr.json"
    if meta.is_file():
        return json.loads(meta.read_text()).get("node_type") == "array"
    return (path / ".zarray").is_file()


def open_image(path: str | os.PathLike) -> ImageData:
    """Open an image lazily: OME-Zarr (level 0), a plain zarr array, TIFF/BigTIFF, or ``.npy`` (memory-mapped).

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If the format is not one of those, naming the path.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    name = path.name.split(".")[0]
    if path.is_dir():
        if is_ome_zarr(path):
            image = open_ome_zarr(path)
            return ImageData(image.as_dask(0), image.scales_mm[0], name, image.axes, path, image.attributes)
        if _is_zarr_array(path):
            arr = zarr.open_array(str(path), mode="r")
            return ImageData(da.from_zarr(arr), (1.0,) * arr.ndim, name, None, path)
        raise ValueError(f"{path}: folder is neither an OME-Zarr image nor a zarr array")
    suffix = path.suffix.lower()
    if suffix in (".tif", ".tiff", ".btf"):
        import tifffile

        try:
            store = tifffile.imread(path, aszarr=True)
        except (tifffile.TiffFileError, ValueError) as err:
            raise ValueError(f"{path}: cannot read as TIFF ({err})") from None
        arr = zarr.open(store, mode="r")
        if isinstance(arr, zarr.Group):  # pyramidal TIFF: level 0
            arr = arr["0"]
        return ImageData(da.from_zarr(arr), (1.0,) * arr.ndim, name, None, path)
    if suffix == ".npy":
        arr = np.load(path, mmap_mode="r")
        return ImageData(arr, (1.0,) * arr.ndim, name, None, path)
    raise ValueError(f"{path}: unsupported image format (use OME-Zarr, zarr, TIFF or .npy)")
