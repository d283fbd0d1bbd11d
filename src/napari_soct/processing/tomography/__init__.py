"""Parallel-beam tomography: Radon transform, filtered back projection and SART.

Drop-in, faster versions of ``skimage.transform.radon``, ``iradon`` and ``iradon_sart`` (same arguments,
axes, sizes and scaling; CuPy arrays run on the GPU), and steps that process stacks of slices under a memory
budget into OME-Zarr (:func:`radon_stack`, :func:`fbp_stack`, :func:`reconstruct_stack`).
"""

from .angles import golden_ratio_order, parse_angles
from .filters import FILTER_CHOICES, fourier_filter
from .sart import SartGeometry, iradon_sart
from .stack import (
    METHOD_CHOICES,
    FbpParams,
    RadonParams,
    ReconstructParams,
    TomographyResult,
    fbp_stack,
    memory_per_slice,
    radon_stack,
    reconstruct_stack,
)
from .transforms import iradon, radon

__all__ = [
    "radon",
    "iradon",
    "iradon_sart",
    "SartGeometry",
    "fourier_filter",
    "FILTER_CHOICES",
    "METHOD_CHOICES",
    "parse_angles",
    "golden_ratio_order",
    "RadonParams",
    "FbpParams",
    "ReconstructParams",
    "TomographyResult",
    "radon_stack",
    "fbp_stack",
    "reconstruct_stack",
    "memory_per_slice",
]
