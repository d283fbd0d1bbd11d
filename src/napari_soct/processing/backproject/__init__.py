"""Straighten a volume along a path and backproject (segmentations of) the straightened volume into the source
volume, with configuration files in Ouroboros's layout."""

from .backproject import BackprojectParams, BackprojectResult, backproject_volume
from .config import StraightenConfiguration, read_configuration
from .geometry import PathSamples, SliceGeometry, sample_path
from .points import read_points
from .straighten import StraightenParams, StraightenResult, straighten_volume

__all__ = [
    "BackprojectParams",
    "BackprojectResult",
    "PathSamples",
    "SliceGeometry",
    "StraightenConfiguration",
    "StraightenParams",
    "StraightenResult",
    "backproject_volume",
    "read_configuration",
    "read_points",
    "sample_path",
    "straighten_volume",
]
