"""napari-soct: serial optical coherence tomography (S-OCT) reconstruction in napari and on the command line.

The steps are plain functions, usable from the napari console, scripts and notebooks::

    from napari_soct import open_raw_acquisition, preprocess_acquisition
    acq = open_raw_acquisition("raw_tiles/")
    result = preprocess_acquisition("raw_tiles/", "out/")
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("napari-soct")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+unknown"

from .processing.io import open_ome_zarr, open_raw_acquisition
from .processing.preprocess import PreprocessParams, preprocess_acquisition

__all__ = ["__version__", "open_ome_zarr", "open_raw_acquisition", "PreprocessParams", "preprocess_acquisition"]
