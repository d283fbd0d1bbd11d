"""Dock widgets, one per registered step, generated from the step declarations.

napari finds the viewer argument by inspecting ``__init__``, so each contribution is a small class.
"""

from ..pipeline.steps import get_step
from ._step_widget import StepWidget

__all__ = ["StepWidget", "PreprocessWidget"]


class PreprocessWidget(StepWidget):
    """Dock widget of the preprocessing step."""

    def __init__(self, napari_viewer=None):
        super().__init__(get_step("preprocess"), napari_viewer)
