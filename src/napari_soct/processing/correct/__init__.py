"""Corrections of mosaic grids and slices (resampling, curvature, illumination, beam profile, crop, normalisation)."""

from .illumination import BasicFit, IlluminationParams, basic_fit, correct_illumination

__all__ = ["BasicFit", "IlluminationParams", "basic_fit", "correct_illumination"]
