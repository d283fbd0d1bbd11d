"""Sample data for tomography: scikit-image's Shepp-Logan phantom and its sinogram."""

from __future__ import annotations

import numpy as np

from .processing.tomography import radon
from .processing.tomography.angles import default_angles

__all__ = ["shepp_logan_phantom_layer", "shepp_logan_sinogram_layers", "SINOGRAM_ANGLES"]

SINOGRAM_ANGLES = 180


def shepp_logan_phantom_layer() -> list[tuple]:
    """The 400 x 400 Shepp-Logan phantom that scikit-image ships (``skimage.data.shepp_logan_phantom``)."""
    from skimage.data import shepp_logan_phantom

    image = shepp_logan_phantom().astype(np.float32)
    return [(image, {"name": "Shepp-Logan phantom", "colormap": "gray", "contrast_limits": [0.0, 1.0],
                     "axis_labels": ("y", "x")}, "image")]


def shepp_logan_sinogram_layers() -> list[tuple]:
    """The phantom and its sinogram (180 angles over [0, 180) degrees), shown as ``(detector, angle)`` with
    the angle axis in degrees; the angles are in the layer metadata, where Reconstruct finds them."""
    (image, image_kwargs, _), = shepp_logan_phantom_layer()
    angles = default_angles(SINOGRAM_ANGLES)
    sinogram = radon(image, angles, circle=True)
    step = float(angles[1] - angles[0])
    kwargs = {
        "name": "Shepp-Logan sinogram",
        "colormap": "gray",
        "scale": (1.0, step),
        "axis_labels": ("detector", "angle"),
        "units": ("pixel", "degree"),
        "contrast_limits": [0.0, float(sinogram.max())],
        "metadata": {"tomography": {"kind": "sinogram", "angles_deg": [float(a) for a in angles], "circle": True,
                                    "source": "skimage.data.shepp_logan_phantom"}},
    }
    image_kwargs = {**image_kwargs, "visible": False}
    return [(image, image_kwargs, "image"), (sinogram, kwargs, "image")]
