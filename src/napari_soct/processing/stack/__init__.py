"""Volume assembly: slice shifts, common space, registration and stacking (issue 4)."""

from .rehoming import RehomingParams, RehomingResult, clean_shifts, detect_rehoming

__all__ = ["RehomingParams", "RehomingResult", "clean_shifts", "detect_rehoming"]
