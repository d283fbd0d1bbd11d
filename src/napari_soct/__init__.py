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

# Saving arrays and layers' data as OME-Zarr (NGFF 0.5, pyramid) or TIFF, with every option (the napari writers
# in _writer.py use these with defaults).
from .processing.io.writers import save_ome_zarr, save_tiff

__all__ += ["save_ome_zarr", "save_tiff"]

# The pipeline and every step as plain functions (imported on first use, so `import napari_soct` stays light).
_LAZY = {
    "run_pipeline": "napari_soct.pipeline.runner",
    "RunParams": "napari_soct.pipeline.runner",
    "reconstruct": "napari_soct.pipeline.reconstruct",
    "ReconstructParams": "napari_soct.pipeline.reconstruct",
    "load_run_file": "napari_soct.pipeline.config",
    "STEPS": "napari_soct.pipeline.steps",
    "make_acquisition": "napari_soct.processing.synthetic",
}
__all__ += list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module = importlib.import_module(_LAZY[name])
        if name == "STEPS":
            importlib.import_module("napari_soct.pipeline.runner")  # registers every step
        return getattr(module, name)
    raise AttributeError(f"module 'napari_soct' has no attribute {name!r}")
