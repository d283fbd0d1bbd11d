"""napari reader: raw S-OCT acquisition folders, OME-Zarr images (NGFF 0.4 and 0.5) and folders of per-plane TIFFs.

napari offers every folder to a reader with ``accepts_directories``; anything that is not ours is rejected
cheaply (a directory listing or one small JSON read) by returning None. A folder is read as per-plane TIFFs
only when everything visible in it is a ``*.tif``/``*.tiff`` file (one 2D plane each, natural name order): a
lazy 3D image layer, one plane read at a time.
"""

from __future__ import annotations

import os

from ._layers import ome_zarr_layers, raw_acquisition_layers, tiff_planes_layers
from .processing.io.images import is_tiff_plane_folder
from .processing.io.omezarr import is_ome_zarr
from .processing.io.rawtiles import is_raw_acquisition


def get_reader(path):
    """Return a reader function for ``path`` when it is an S-OCT acquisition, an OME-Zarr image or a folder of
    per-plane TIFFs, else None."""
    if isinstance(path, list | tuple):
        if len(path) != 1:
            return None
        path = path[0]
    path = os.fspath(path)
    if is_raw_acquisition(path):
        return read_raw_acquisition
    if is_ome_zarr(path):
        return read_ome_zarr
    if is_tiff_plane_folder(path):
        return read_tiff_planes
    return None


def _single(path):
    return os.fspath(path[0] if isinstance(path, list | tuple) else path)


def read_raw_acquisition(path):
    """Layer data for a raw acquisition (lazy mosaic of every slice and the tile grid)."""
    return raw_acquisition_layers(_single(path))


def read_ome_zarr(path):
    """Layer data for an OME-Zarr image."""
    return ome_zarr_layers(_single(path))


def read_tiff_planes(path):
    """Layer data for a folder of per-plane TIFFs (one lazy 3D image)."""
    return tiff_planes_layers(_single(path))
