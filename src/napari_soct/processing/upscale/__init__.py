"""Label-preserving resampling of huge label volumes (atlas annotations), out of core.

Upscale (or downscale) integer labels by factors, to a shape or to the grid of a reference image, with
centred nearest-neighbour (or area-mode) mapping in exact integer arithmetic, block by block, into sharded
OME-Zarr with a label pyramid or into tiled BigTIFF.
"""

from .mapping import AxisMap, LevelGeometry, pyramid_geometry, resolve_target
from .resample import LabelMap, read_relabel_csv, resample_labels, weighted_mode
from .run import UpscaleParams, UpscaleResult, upscale_labels

__all__ = [
    "AxisMap",
    "LabelMap",
    "LevelGeometry",
    "UpscaleParams",
    "UpscaleResult",
    "pyramid_geometry",
    "read_relabel_csv",
    "resample_labels",
    "resolve_target",
    "upscale_labels",
    "weighted_mode",
]
