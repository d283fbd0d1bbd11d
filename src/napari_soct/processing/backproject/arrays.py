"""Fast lazy access to the arrays behind an :class:`ImageData` (small reads without dask's per-call overhead)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..io.images import ImageData

__all__ = ["direct_array", "TiffPages"]


class TiffPages:
    """A TIFF stack (or a folder of single-page TIFFs) as a read-only array of pages; slicing reads only the
    pages asked for."""

    def __init__(self, path: Path):
        import tifffile

        self.path = Path(path)
        if self.path.is_dir():
            self.files = sorted(self.path.glob("*.tif")) or sorted(self.path.glob("*.tiff"))
            if not self.files:
                raise ValueError(f"{self.path}: no TIFF files in the folder")
            first = tifffile.imread(self.files[0])
            self._tiff = None
            self.shape = (len(self.files), *first.shape)
            self.dtype = first.dtype
        else:
            self.files = None
            self._tiff = tifffile.TiffFile(self.path)
            # Page objects are not kept: memory must not grow with the number of slices read.
            self._tiff.pages.cache = False
            self._tiff.pages.useframes = True
            series = self._tiff.series[0]
            self.shape, self.dtype = tuple(series.shape), series.dtype
            self._first_page = series.pages[0].index if hasattr(series.pages[0], "index") else 0
            if len(self.shape) == 2:
                self.shape = (1, *self.shape)
        self.ndim = len(self.shape)

    def __getitem__(self, key):
        import tifffile

        if not isinstance(key, tuple):
            key = (key,)
        first, rest = key[0], key[1:]
        indices = range(self.shape[0])[first] if isinstance(first, slice) else [first]
        if self.files is not None:
            pages = [tifffile.imread(self.files[i]) for i in indices]
        else:
            pages = [self._tiff.pages[self._first_page + i].asarray() for i in indices]
        stack = np.stack(pages) if pages else np.empty((0, *self.shape[1:]), self.dtype)
        stack = stack[(slice(None), *rest)]
        return stack if isinstance(first, slice) else stack[0]

    def close(self) -> None:
        if self._tiff is not None:
            self._tiff.close()


def direct_array(image: ImageData):
    """The array to read from: the zarr array or TIFF pages behind a file-backed image, else its data.

    dask adds milliseconds per read, which dominates when reading a few slices at a time.
    """
    source = image.source
    if source is None or not type(image.data).__module__.startswith("dask"):
        return image.data
    source = Path(source)
    try:
        if source.is_dir():
            from ..io.omezarr import is_ome_zarr, open_ome_zarr

            if is_ome_zarr(source):
                level = open_ome_zarr(source).levels[0]
            else:
                import zarr

                level = zarr.open_array(str(source), mode="r")
            return level if tuple(level.shape) == tuple(image.shape) else image.data
        if source.suffix.lower() in (".tif", ".tiff", ".btf"):
            pages = TiffPages(source)
            return pages if pages.shape == tuple(image.shape) else image.data
    except (OSError, ValueError, KeyError):
        return image.data
    return image.data
