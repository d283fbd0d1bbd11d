"""Dock widgets, one per registered step, generated from the step declarations.

napari finds the viewer argument by inspecting a contribution's ``__init__``, so each step gets a small
class made by :func:`step_widget_class`.
"""

from ..pipeline.steps import get_step
from ._step_widget import StepWidget

__all__ = [
    "StepWidget",
    "step_widget_class",
    "PreprocessWidget",
    "ResampleWidget",
    "CurvatureWidget",
    "BeamProfileWidget",
    "InterfaceCropWidget",
    "NormalizeWidget",
    "RehomingWidget",
]


def step_widget_class(step_name: str, class_name: str) -> type[StepWidget]:
    """A :class:`StepWidget` subclass for one registered step, constructible as ``cls(napari_viewer)``."""

    def __init__(self, napari_viewer=None):
        StepWidget.__init__(self, get_step(step_name), napari_viewer)

    return type(class_name, (StepWidget,), {"__init__": __init__, "__doc__": f"Dock widget of the {step_name} step."})


PreprocessWidget = step_widget_class("preprocess", "PreprocessWidget")
ResampleWidget = step_widget_class("resample", "ResampleWidget")
CurvatureWidget = step_widget_class("curvature", "CurvatureWidget")
BeamProfileWidget = step_widget_class("beam", "BeamProfileWidget")
InterfaceCropWidget = step_widget_class("crop", "InterfaceCropWidget")
NormalizeWidget = step_widget_class("normalize", "NormalizeWidget")
RehomingWidget = step_widget_class("rehoming", "RehomingWidget")


# --- label upscaling (issue 8): the generated widget plus a picker for an image layer whose grid to match ------
class UpscaleLabelsWidget(StepWidget):
    """Dock widget of the upscale-labels step; "match image" takes the target shape and voxel size from a layer."""

    def __init__(self, napari_viewer=None):
        from typing import Optional

        import napari
        from magicgui.widgets import create_widget

        super().__init__(get_step("upscale-labels"), napari_viewer)
        self.match_image = create_widget(annotation=Optional[napari.layers.Image], name="match_image",  # noqa: UP045
                                         label="match image")
        self.match_image.tooltip = ("Image layer whose grid (shape and voxel size) the labels are resampled to; "
                                    "leave empty to use factors or shape")
        self.insert(len(self.input_widgets), self.match_image)

    def params(self):
        from dataclasses import replace

        params = super().params()
        layer = self.match_image.value
        if layer is None:
            return params
        if params.factors or params.shape or params.like:
            raise ValueError("give one target: 'match image' or factors, shape or like, not both")
        data = layer.data[0] if getattr(layer, "multiscale", False) else layer.data
        ndim = layer.ndim
        return replace(params, shape=",".join(str(int(n)) for n in data.shape[-ndim:]),
                       out_scale=",".join(repr(float(s)) for s in layer.scale[-ndim:]))


__all__ += ["UpscaleLabelsWidget"]
