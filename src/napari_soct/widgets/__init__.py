"""Dock widgets, one per registered step, generated from the step declarations."""

from ..pipeline.steps import get_step
from ._step_widget import StepWidget

__all__ = ["StepWidget", "preprocess_widget"]


def preprocess_widget(napari_viewer=None) -> StepWidget:
    """Dock widget of the preprocessing step."""
    return StepWidget(get_step("preprocess"), napari_viewer)
