"""Dock widgets, one per registered step, generated from the step declarations.

napari finds the viewer argument by inspecting a contribution's ``__init__``, so each step gets a small
class made by :func:`step_widget_class`.
"""

from ..pipeline.steps import get_step
from ._pipeline_widget import PipelineWidget
from ._step_widget import StepWidget

__all__ = [
    "StepWidget",
    "PipelineWidget",
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

    def _output_layers(self, result) -> list[tuple]:
        from ..processing.backproject.config import CONFIG_METADATA_KEY

        layers = super()._output_layers(result)
        for _, kwargs, _ in layers:
            # The straightened layer names its configuration (absolute), for Backproject and the TIFF writer.
            kwargs.setdefault("metadata", {})[CONFIG_METADATA_KEY] = str(result.config_path.resolve())
        return layers


class BackprojectWidget(StepWidget):
    """Dock widget of the backproject step; the result is shown at its place in the source volume.

    "attach configuration to layer" stores the chosen configuration in the chosen layer's metadata (e.g. a
    Labels layer painted on the straightened volume), so that *File > Save Selected Layer(s)* with
    "Straightened ... + Ouroboros configuration (TIFF)" saves the pair; running a backprojection attaches it too.
    """

    def __init__(self, napari_viewer=None):
        from magicgui.widgets import PushButton

        super().__init__(get_step("backproject"), napari_viewer)
        _image_or_labels_picker(self, "straightened")
        self.attach_button = PushButton(text="attach configuration to layer", name="attach_configuration")
        self.attach_button.tooltip = (
            "Remember this configuration in the straightened layer's metadata (e.g. a Labels layer you painted), "
            "so that File > Save Selected Layer(s) > 'Straightened ... + Ouroboros configuration (TIFF)' "
            "writes the layer with its configuration")
        self.attach_button.changed.connect(lambda *_: self.attach_configuration())
        self.insert(list(self).index(self.input_widgets["configuration"]) + 1, self.attach_button)

    def _layer_configuration(self, layer):
        from ..processing.backproject.config import configuration_from_metadata

        return configuration_from_metadata(getattr(layer, "metadata", None))

    def attach_configuration(self) -> bool:
        """Store the configuration file in the chosen layer's metadata after checking that it describes the
        layer's shape; the status line says what happened. Returns whether it was attached."""
        from ..processing.backproject.config import (
            CONFIG_METADATA_KEY,
            check_configuration_shape,
            read_configuration,
        )

        layer = self.input_widgets["straightened"].value
        path = self.input_widgets["configuration"].value
        try:
            if layer is None:
                raise ValueError("choose the straightened layer first")
            if str(path) in ("", "."):
                raise ValueError("choose the configuration file first")
            config = read_configuration(path)
            data = layer.data[0] if getattr(layer, "multiscale", False) else layer.data
            check_configuration_shape(config, data.shape, f"layer '{layer.name}'")
        except (ValueError, OSError) as err:
            self.status.value = f"error: {err}"
            return False
        layer.metadata = {**layer.metadata, CONFIG_METADATA_KEY: str(config.path.resolve())}
        self.status.value = f"layer '{layer.name}' now carries {config.path.name}"
        return True

    def inputs(self) -> list:
        config = self.input_widgets["configuration"]
        layer = self.input_widgets["straightened"].value
        known = self._layer_configuration(layer)
        if str(config.value) in ("", "."):
            if known is not None:
                # A straightened volume this plugin wrote (or one given a configuration) knows its file.
                config.value = known
        elif known is None and layer is not None:
            self.attach_configuration()  # the user named it for this layer: remember it for saving
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


# --- common space and interpolation (issue 4, steps 10 and 11) ---------------------------------------------------
CommonSpaceWidget = step_widget_class("common-space", "CommonSpaceWidget")
InterpolateWidget = step_widget_class("interpolate", "InterpolateWidget")
__all__ += ["CommonSpaceWidget", "InterpolateWidget"]


# --- quality report (issue 4): the written HTML opens in the web browser ----------------------------------------
class ReportWidget(StepWidget):
    """Dock widget of the report step; the HTML report opens in the default browser when it is written."""

    def __init__(self, napari_viewer=None):
        from magicgui.widgets import CheckBox

        super().__init__(get_step("report"), napari_viewer)
        self.open_when_done = CheckBox(value=True, label="open when done", name="open_when_done",
                                       tooltip="Open the HTML report in the web browser when it is written")
        self.insert(list(self).index(self.run_button), self.open_when_done)

    def _on_returned(self, result) -> None:
        super()._on_returned(result)
        if self.open_when_done.value and result.format == "html" and result.path.is_file():
            from qtpy.QtCore import QUrl
            from qtpy.QtGui import QDesktopServices

            QDesktopServices.openUrl(QUrl.fromLocalFile(str(result.path.resolve())))


__all__ += ["ReportWidget"]


# --- pairwise registration (step 12) and auto-exclusion (step 13), issue 4 ---
def _registration_layers(result) -> list[tuple]:
    """Per pair (slider "pair"): matched fixed plane (magenta) and registered moving top (green) added, their
    difference (hidden), and the compared ROI outlined from red (confidence 0) to green (1), metrics as features."""
    import numpy as np

    from .._layers import contrast_limits_of
    from ..processing.io.omezarr import open_ome_zarr

    if result.overlay_path is None or not result.overlay_path.exists():
        return []
    image = open_ome_zarr(result.overlay_path)
    data, scale = image.as_dask(0), tuple(image.scales_mm[0][-2:])
    common = {"scale": (1.0, *scale), "units": ("pixel", "mm", "mm"), "axis_labels": ("pair", "y", "x"),
              "metadata": {"source": str(result.overlay_path), "pairs": image.attributes["soct"]["pairs"]}}
    limits = contrast_limits_of(np.asarray(data[0]))
    layers = [(data[:, c], {**common, "name": f"register: {name}", "colormap": colour, "blending": "additive",
                            "contrast_limits": limits}, "image")
              for c, (name, colour) in enumerate((("fixed", "magenta"), ("moving registered", "green")))]
    spread = float(limits[1] - limits[0])
    layers.append((data[:, 0] - data[:, 1], {**common, "name": "register: difference", "colormap": "PiYG",
                                             "contrast_limits": [-spread / 2, spread / 2], "visible": False}, "image"))
    factor = result.overlay_factor
    rows = [(i, p, m) for i, (p, m) in enumerate(zip(result.pairs, result.pair_metrics)) if "roi" in m]
    if rows:
        rects = []
        for i, _, m in rows:
            r = m["roi"]
            y0, x0 = r["y0_px"] / factor, r["x0_px"] / factor
            y1, x1 = y0 + r["height_px"] / factor - 1, x0 + r["width_px"] / factor - 1
            rects.append(np.array([[i, y0, x0], [i, y0, x1], [i, y1, x1], [i, y1, x0]], float))
        conf = np.array([p.confidence for _, p, _ in rows])
        features = {"pair": [f"{p.fixed_id}->{p.moving_id}" for _, p, _ in rows], "confidence": conf,
                    "status": [p.status for _, p, _ in rows], "ncc_after": [p.ncc_after for _, p, _ in rows],
                    "z_match_plane": [p.z_match_plane for _, p, _ in rows]}
        layers.append((rects, {**common, "name": "register: ROI by confidence", "shape_type": "rectangle",
                               "features": features, "face_color": "transparent", "edge_width": 1.5,
                               "edge_color": np.column_stack([1 - conf, conf, 0.1 + 0 * conf, 1 + 0 * conf]),
                               "text": {"string": "{pair} conf {confidence:.2f} {status}", "size": 9,
                                        "color": "white", "anchor": "upper_left"}}, "shapes"))
    return layers


class RegisterWidget(StepWidget):
    """Dock widget of the register step, with per-pair overlays and the confidence of each pair."""

    def __init__(self, napari_viewer=None):
        super().__init__(get_step("register"), napari_viewer)
        min_step = self.param_widgets["min_step"]  # 1e-3: more decimals than the generic 2 (it would read 0)
        min_step.native.setDecimals(6)
        min_step.native.setSingleStep(1e-3)
        min_step.value = self.step.params().min_step

    def _output_layers(self, result) -> list[tuple]:
        return _registration_layers(result)


AutoExcludeWidget = step_widget_class("auto-exclude", "AutoExcludeWidget")
__all__ += ["RegisterWidget", "AutoExcludeWidget"]


# --- stacking (issue 4, step 14): the volume plus its slice boundaries -------------------------------------------
def _slice_boundary_layer(result) -> list[tuple]:
    """One outline per slice at its first plane of the stacked volume (its cut surface), labelled with the slice
    id and the transform gate used, in the volume's scale."""
    import numpy as np

    from ..processing.io.omezarr import open_ome_zarr

    if result.skipped or not result.decisions:
        return []
    scale = tuple(open_ome_zarr(result.path).scales_mm[0])
    _, ny, nx = result.shape
    rects = [np.array([[d.z0, 0, 0], [d.z0, 0, nx - 1], [d.z0, ny - 1, nx - 1], [d.z0, ny - 1, 0]], float)
             for d in result.decisions]
    features = {"slice_id": [d.slice_id for d in result.decisions], "gate": [d.gate for d in result.decisions],
                "z0": [d.z0 for d in result.decisions]}
    return [(rects, {"name": "stack: slice boundaries", "scale": scale, "units": ("mm", "mm", "mm"),
                     "shape_type": "rectangle", "features": features, "face_color": "transparent",
                     "edge_color": "yellow", "edge_width": 1.5,
                     "text": {"string": "slice {slice_id} ({gate})", "size": 9, "color": "yellow",
                              "anchor": "upper_left"}}, "shapes")]


class StackWidget(StepWidget):
    """Dock widget of the stack step: the stacked volume and its slice boundaries."""

    def __init__(self, napari_viewer=None):
        super().__init__(get_step("stack"), napari_viewer)

    def _output_layers(self, result) -> list[tuple]:
        return super()._output_layers(result) + _slice_boundary_layer(result)


__all__ += ["StackWidget"]


# --- manual slice alignment (issue 9): a hand-made dock widget (not generated from a step) ----------------------
from ._alignment_widget import SliceAlignmentWidget  # noqa: E402

__all__ += ["SliceAlignmentWidget"]
