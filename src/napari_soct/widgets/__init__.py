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
    "IlluminationWidget",
    "StitchWidget",
    "BeamProfileWidget",
    "InterfaceCropWidget",
    "NormalizeWidget",
    "RehomingWidget",
    "QualityWidget",
]


def step_widget_class(step_name: str, class_name: str) -> type[StepWidget]:
    """A :class:`StepWidget` subclass for one registered step, constructible as ``cls(napari_viewer)``."""

    def __init__(self, napari_viewer=None):
        StepWidget.__init__(self, get_step(step_name), napari_viewer)

    return type(class_name, (StepWidget,), {"__init__": __init__, "__doc__": f"Dock widget of the {step_name} step."})


PreprocessWidget = step_widget_class("preprocess", "PreprocessWidget")
ResampleWidget = step_widget_class("resample", "ResampleWidget")
CurvatureWidget = step_widget_class("curvature", "CurvatureWidget")
IlluminationWidget = step_widget_class("illumination", "IlluminationWidget")
StitchWidget = step_widget_class("stitch", "StitchWidget")
BeamProfileWidget = step_widget_class("beam", "BeamProfileWidget")
InterfaceCropWidget = step_widget_class("crop", "InterfaceCropWidget")
NormalizeWidget = step_widget_class("normalize", "NormalizeWidget")
RehomingWidget = step_widget_class("rehoming", "RehomingWidget")
QualityWidget = step_widget_class("quality", "QualityWidget")


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


# --- straighten and backproject (issue 6): layer pickers accepting Image and Labels, output placed in source space --
def _image_or_labels_picker(widget: StepWidget, name: str):
    """Replace the layer picker of input ``name`` by one listing Image and Labels layers."""
    import napari
    from magicgui.widgets import ComboBox

    old = widget.input_widgets[name]

    def choices(_w=None):
        if widget.viewer is None:
            return []
        return [(layer.name, layer) for layer in widget.viewer.layers
                if isinstance(layer, napari.layers.Image | napari.layers.Labels)]

    picker = ComboBox(name=name, label=old.label, choices=choices, tooltip=old.tooltip)
    index = list(widget).index(old)
    widget.remove(old)
    widget.insert(index, picker)
    widget.input_widgets[name] = picker
    return picker


class StraightenWidget(StepWidget):
    """Dock widget of the straighten step: a source Image or Labels layer and a Points (or Shapes path) layer."""

    def __init__(self, napari_viewer=None):
        import napari

        super().__init__(get_step("straighten"), napari_viewer)
        picker = _image_or_labels_picker(self, "image")
        mode = self.param_widgets["value_mode"]

        def follow_layer(layer):  # a Labels source is straightened as labels (ids kept), an Image as intensities
            if layer is not None:
                mode.value = "labels" if isinstance(layer, napari.layers.Labels) else "intensity"

        picker.changed.connect(follow_layer)
        follow_layer(picker.value)

    def inputs(self) -> list:
        values = super().inputs()
        layer = self.input_widgets["image"].value
        # Points are physical (data * scale + translate): the source's origin relates them to its voxels.
        values[0].metadata["translate"] = tuple(float(t) for t in layer.translate[-3:])
        return values


class BackprojectWidget(StepWidget):
    """Dock widget of the backproject step; the result is shown at its place in the source volume."""

    def __init__(self, napari_viewer=None):
        super().__init__(get_step("backproject"), napari_viewer)
        _image_or_labels_picker(self, "straightened")

    def inputs(self) -> list:
        config = self.input_widgets["configuration"]
        layer = self.input_widgets["straightened"].value
        straightened = (getattr(layer, "metadata", None) or {}).get("soct_straighten") or {}
        source = (getattr(layer, "metadata", None) or {}).get("source")
        if str(config.value) in ("", ".") and source and straightened.get("configuration"):
            # A straightened volume this plugin wrote knows its configuration file.
            from pathlib import Path

            config.value = Path(source).parent / straightened["configuration"]
        return super().inputs()

    def _output_layers(self, result) -> list[tuple]:
        layers = super()._output_layers(result)
        for _, kwargs, _ in layers:
            kwargs["scale"], kwargs["translate"] = tuple(result.scale), tuple(result.translate)
        return layers


__all__ += ["StraightenWidget", "BackprojectWidget"]


# --- CT tomography (issue 7): Radon (image -> sinogram) and Reconstruct (sinogram -> image, FBP or SART) ------------
class _TomographyWidget(StepWidget):
    """Tomography outputs read in their own units: a sinogram's angle axis in degrees from its first angle."""

    def _output_layers(self, result) -> list[tuple]:
        layers = super()._output_layers(result)
        for _, kwargs, _ in layers:
            labels = tuple(kwargs.get("axis_labels") or ())
            kwargs["units"] = tuple("degree" if a == "angle" else "mm" for a in labels)
            if "angle" in labels and len(result.angles) > 1:
                translate = [0.0] * len(labels)
                translate[labels.index("angle")] = float(result.angles[0])
                kwargs["translate"] = tuple(translate)
        return layers


class RadonWidget(_TomographyWidget):
    """Dock widget of the radon step (image layer -> sinogram layer)."""

    def __init__(self, napari_viewer=None):
        super().__init__(get_step("radon"), napari_viewer)


class ReconstructWidget(_TomographyWidget):
    """Dock widget of the ct-reconstruct step (sinogram layer -> image layer, FBP or SART)."""

    def __init__(self, napari_viewer=None):
        super().__init__(get_step("ct-reconstruct"), napari_viewer)


__all__ += ["RadonWidget", "ReconstructWidget"]


# --- bias field correction and atlas alignment (issue 4, steps 15 and 16) ---------------------------------------
BiasFieldWidget = step_widget_class("bias", "BiasFieldWidget")
AtlasWidget = step_widget_class("atlas", "AtlasWidget")
__all__ += ["BiasFieldWidget", "AtlasWidget"]
