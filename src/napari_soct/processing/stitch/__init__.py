"""Stitching a slice's mosaic grid in 3D: pairwise registration, affine tile placement, blending."""

from .blend import BLENDING_CHOICES, CanvasLayout, canvas_layout, blend_weights, stitch_blocks
from .pairwise import (
    PairEstimate,
    phase_correlation_peaks,
    refine_shift,
    register_grid,
    register_pair,
    tile_projection,
    upsampled_phase_correlation,
)
from .placement import (
    AffineFit,
    Placement,
    affine_parameters,
    fit_stage_affine,
    motor_placement,
    nominal_positions,
    place_tiles,
)
from .step import SlicePlan, StitchParams, plan_placements, stitch_slices

__all__ = [
    "AffineFit",
    "BLENDING_CHOICES",
    "CanvasLayout",
    "PairEstimate",
    "Placement",
    "SlicePlan",
    "StitchParams",
    "affine_parameters",
    "blend_weights",
    "canvas_layout",
    "fit_stage_affine",
    "motor_placement",
    "nominal_positions",
    "phase_correlation_peaks",
    "place_tiles",
    "plan_placements",
    "refine_shift",
    "register_grid",
    "register_pair",
    "stitch_blocks",
    "stitch_slices",
    "tile_projection",
    "upsampled_phase_correlation",
]
