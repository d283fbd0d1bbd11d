"""Preprocessing: raw tiles to mosaic grids, slice shifts from stage metadata, slice config and previews."""

from .galvo import GalvoDecision, GalvoDetection, decide_galvo_shift, detect_galvo_band
from .mosaic import lazy_raw_mosaic, mosaic_grid_name, slice_geometry
from .run import PreprocessParams, PreprocessResult, SliceResult, preprocess_acquisition
from .shifts import shifts_from_stage_positions

__all__ = [
    "GalvoDecision",
    "GalvoDetection",
    "PreprocessParams",
    "PreprocessResult",
    "SliceResult",
    "decide_galvo_shift",
    "detect_galvo_band",
    "lazy_raw_mosaic",
    "mosaic_grid_name",
    "preprocess_acquisition",
    "shifts_from_stage_positions",
    "slice_geometry",
]
