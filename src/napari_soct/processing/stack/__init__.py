"""Volume assembly: slice shifts, common space, registration and stacking (issue 4)."""

from .quality import QualityParams, QualityResult, assess_quality
from .rehoming import RehomingParams, RehomingResult, clean_shifts, detect_rehoming

__all__ = [
    "QualityParams",
    "QualityResult",
    "RehomingParams",
    "RehomingResult",
    "assess_quality",
    "clean_shifts",
    "detect_rehoming",
]
