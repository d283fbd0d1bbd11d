"""Volume assembly: slice shifts, common space, registration and stacking (issue 4)."""

from .atlas import AtlasParams, AtlasResult, align_to_atlas, parse_orientation, reorient
from .bias import BiasFieldParams, BiasFieldResult, correct_bias_field
from .quality import QualityParams, QualityResult, assess_quality
from .rehoming import RehomingParams, RehomingResult, clean_shifts, detect_rehoming

__all__ = [
    "AtlasParams",
    "AtlasResult",
    "BiasFieldParams",
    "BiasFieldResult",
    "align_to_atlas",
    "correct_bias_field",
    "parse_orientation",
    "reorient",
    "QualityParams",
    "QualityResult",
    "RehomingParams",
    "RehomingResult",
    "assess_quality",
    "clean_shifts",
    "detect_rehoming",
]
