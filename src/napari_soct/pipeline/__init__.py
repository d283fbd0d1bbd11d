"""Step registry, config files and the command line; built on :mod:`napari_soct.processing`."""

from .steps import STEPS, Input, Step, get_step, register
from . import reconstruct as _reconstruct  # noqa: F401  (registers the chain step)

__all__ = ["STEPS", "Input", "Step", "get_step", "register"]
