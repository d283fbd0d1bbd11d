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

from .common_space import CommonSpaceParams, CommonSpaceResult, bring_to_common_space  # noqa: E402
from .interpolate import InterpolationParams, InterpolationResult, interpolate_missing_slices  # noqa: E402

__all__ += ["CommonSpaceParams", "CommonSpaceResult", "bring_to_common_space", "InterpolationParams",
            "InterpolationResult", "interpolate_missing_slices"]

from .exclusion import ExclusionParams, ExclusionResult, auto_exclude_slices  # noqa: E402
from .register import RegistrationParams, RegistrationResult, register_pairwise  # noqa: E402

__all__ += ["RegistrationParams", "RegistrationResult", "register_pairwise", "ExclusionParams", "ExclusionResult",
            "auto_exclude_slices"]

from .stacking import StackParams, StackResult, stack_slices  # noqa: E402

__all__ += ["StackParams", "StackResult", "stack_slices"]

from .manual import (  # noqa: E402
    AlignmentSession,
    export_alignment_package,
    import_alignment_transforms,
    open_alignment,
    overlap_ncc,
    warp_moving,
)

__all__ += ["AlignmentSession", "open_alignment", "warp_moving", "overlap_ncc", "export_alignment_package",
            "import_alignment_transforms"]
