"""Reading boxes of a label volume from the fastest reader its format has.

Inputs arrive as :class:`~napari_soct.processing.io.images.ImageData` (from a napari layer or ``open_image``).
When the image came from a file, the file is reopened here with a direct reader (the zarr array, or a memory map
of an uncompressed TIFF) so a box read costs one slicing call, not a dask graph. N5 and HDF5 need readers that
are not installed (zarr 3 has no N5 store; ``h5py`` is not a dependency); convert such files to OME-Zarr first.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr

from ..io.images import ImageData
from ..io.omezarr import is_ome_zarr, open_ome_zarr

__all__ = ["SourceSpec", "open_source"]

_OPENED: dict[tuple, object] = {}
_LOCK = threading.Lock()


def _tiff_array(path: Path):
    import tifffile

    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        offset = series.dataoffset
        shape, dtype = series.shape, series.dtype
    if offset is not None:  # uncompressed and contiguous: a memory map reads boxes at page-cache speed
        return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)
    store = tifffile.imread(path, aszarr=True)
    arr = zarr.open(store, mode="r")
    return arr["0"] if isinstance(arr, zarr.Group) else arr


def _open_path(path: Path):
    if path.is_dir():
        if is_ome_zarr(path):
            return open_ome_zarr(path).levels[0]
        return zarr.open_array(str(path), mode="r")
    if path.suffix.lower() in (".tif", ".tiff", ".btf"):
        return _tiff_array(path)
    if path.suffix.lower() == ".npy":
        return np.load(path, mmap_mode="r")
    raise ValueError(f"{path}: unsupported label format (OME-Zarr, zarr, TIFF/BigTIFF or .npy)")


@dataclass
class SourceSpec:
    """A picklable handle on the label volume (a path, or a numpy array kept in memory).

    Attributes
    ----------
    path : Path, optional
        File or folder to reopen (in this process or on a dask worker).
    array : array-like, optional
        The data itself when there is no file (napari layer data): numpy, zarr or dask.
    """

    shape: tuple[int, ...]
    dtype: np.dtype
    path: Path | None = None
    array: object = None

    def reader(self):
        """An object with ``shape`` whose slicing returns numpy (cached per process for paths)."""
        if self.array is not None:
            return self.array
        key = (str(self.path),)
        with _LOCK:
            if key not in _OPENED:
                _OPENED[key] = _open_path(self.path)
            return _OPENED[key]

    def read(self, box: tuple[tuple[int, int], ...]) -> np.ndarray:
        """The source voxels ``[start, stop)`` per axis as a C-contiguous numpy array."""
        region = self.reader()[tuple(slice(a, b) for a, b in box)]
        if hasattr(region, "compute"):  # dask: we already run in worker threads
            region = region.compute(scheduler="synchronous")
        return np.ascontiguousarray(region)

    def __getstate__(self):
        state = dict(self.__dict__)
        if state["path"] is not None:
            state["array"] = None
        return state


def open_source(image: ImageData) -> SourceSpec:
    """A :class:`SourceSpec` for an image, reopening its file with a direct reader when it has one.

    Raises
    ------
    ValueError
        If the data are not integers (labels are never floats).
    """
    dtype = np.dtype(image.dtype)
    if dtype.kind not in "ui":
        raise ValueError(f"{image.name or 'labels'}: labels must have an integer dtype, got {dtype}")
    path = Path(image.source) if image.source is not None else None
    if path is not None and path.exists():
        try:
            arr = _open_path(path)
            if tuple(arr.shape) == tuple(image.shape) and np.dtype(arr.dtype) == dtype:
                return SourceSpec(tuple(image.shape), dtype, path=path)
        except (ValueError, OSError, KeyError):
            pass
    return SourceSpec(tuple(image.shape), dtype, array=image.data)
