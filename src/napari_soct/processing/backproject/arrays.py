"""Fast lazy access to the arrays behind an :class:`ImageData` (small reads without dask's per-call overhead)."""

from __future__ import annotations

from pathlib import Path

# TiffPages lives with open_image (folders of per-plane TIFFs are an input format everywhere); re-exported here.
from ..io.images import ImageData, TiffPages, _is_zarr_array

__all__ = ["direct_array", "TiffPages"]


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
            elif _is_zarr_array(source):
                import zarr

                level = zarr.open_array(str(source), mode="r")
            else:
                # open_image checked every plane's header already; each read still checks its plane.
                level = TiffPages(source, check_headers=False)
            return level if tuple(level.shape) == tuple(image.shape) else image.data
        if source.suffix.lower() in (".tif", ".tiff", ".btf"):
            pages = TiffPages(source)
            return pages if pages.shape == tuple(image.shape) else image.data
    except (OSError, ValueError, KeyError):
        return image.data
    return image.data
