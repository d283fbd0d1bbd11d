"""A dock widget generated from a step declaration: inputs, parameters, Run/Cancel, progress, result layers."""

from __future__ import annotations

import threading
from pathlib import Path

import napari
import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    Label,
    ProgressBar,
    PushButton,
    create_widget,
)
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import QObject, Signal

from .._layers import ome_zarr_layers, stacked_ome_zarr_layer, tile_qc_layer
from ..pipeline.steps import Step
from ..processing.io.images import ImageData
from ..processing.params import ParamInfo, params_from_mapping
from ..processing.progress import Cancelled

__all__ = ["StepWidget"]

_BIG = 1e12


class _ProgressBridge(QObject):
    """Carries progress from the worker thread to the main thread (queued Qt signal)."""

    progressed = Signal(int, int, str)


def _param_widget(info: ParamInfo):
    options: dict = {"tooltip": info.help + (f" [{info.unit}]" if info.unit else "")}
    if info.choices:
        options["choices"] = list(info.choices)
    elif info.type in (int, float):
        options["min"] = info.min if info.min is not None else -_BIG
        options["max"] = info.max if info.max is not None else _BIG
        if info.type is float:
            # Enough decimals for small defaults and minimums (a 1e-3 step must not read as 0).
            smallest = min((abs(v) for v in (info.default, info.min) if isinstance(v, int | float) and v), default=1)
            decimals = max(2, min(8, 2 - int(np.floor(np.log10(smallest))))) if smallest < 1 else 2
            options["step"] = 10.0 ** -decimals
    label = info.name.replace("_", " ")
    widget = create_widget(value=info.default, annotation=info.type, name=info.name, label=label, options=options)
    widget.tooltip = options["tooltip"]
    if info.type is float and not info.choices and hasattr(widget.native, "setDecimals"):
        widget.native.setDecimals(decimals)
        widget.value = info.default
    return widget


def _show_placeholder(widget: FileEdit, text: str) -> None:
    """Grey text in the empty line edit of an optional input, and a button that empties it again."""
    line = widget.line_edit.native
    if hasattr(line, "setPlaceholderText"):  # Qt backend
        line.setPlaceholderText(text)
        line.setClearButtonEnabled(True)


def layer_path_points(layer) -> np.ndarray:
    """Ordered physical points ``(N, 3)`` (``data * scale + translate``) of a Points layer, or of the first
    path or line of a Shapes layer."""
    if isinstance(layer, napari.layers.Shapes):
        paths = [d for d, kind in zip(layer.data, layer.shape_type) if kind in ("path", "line")]
        if not paths:
            raise ValueError(f"layer '{layer.name}' has no path or line shape")
        data = np.asarray(paths[0], dtype=float)
    else:
        data = np.asarray(layer.data, dtype=float)
    if data.ndim != 2 or data.shape[1] != 3:
        raise ValueError(f"layer '{layer.name}': need 3D points (z, y, x), got data of shape {data.shape}")
    return data * np.asarray(layer.scale, float)[-3:] + np.asarray(layer.translate, float)[-3:]


class StepWidget(Container):
    """Dock widget for one :class:`~napari_soct.pipeline.steps.Step`.

    The step runs in a napari thread worker; the viewer is touched only from the main thread (in the
    worker's ``returned`` handler).
    """

    def __init__(self, step: Step, napari_viewer=None):
        super().__init__(labels=True)
        self.step = step
        self.viewer = napari_viewer
        self.input_widgets = {}
        self.layer_pickers = {}
        for inp in step.inputs:
            label = inp.name.replace("_", " ")
            if inp.is_array:
                layer_type = napari.layers.Labels if inp.mode == "labels" else napari.layers.Image
                w = create_widget(annotation=layer_type, name=inp.name, label=label)
            elif inp.mode == "points":
                w = ComboBox(name=inp.name, label=label, choices=self._path_layer_choices)
            else:
                mode = {"dir": "d", "out_dir": "d", "file": "r", "out_file": "w"}[inp.mode]
                # nullable: an optional input left empty reads as None (not Path("."), the working folder).
                w = FileEdit(name=inp.name, label=label, mode=mode, nullable=inp.optional)
                if inp.optional:
                    _show_placeholder(w, inp.placeholder)
            w.tooltip = inp.help + ("\nOptional: may be left empty." if inp.optional else "")
            self.input_widgets[inp.name] = w
            if inp.mode == "dir" and napari_viewer is not None:
                # Inputs can also come from a layer this plugin opened or produced (it knows its files).
                picker = ComboBox(name=f"{inp.name}_from_layer", label="  or from layer",
                                  choices=self._source_layer_choices, nullable=True, value=None)
                picker.changed.connect(lambda value, target=w: self._use_layer_source(value, target))
                self.layer_pickers[inp.name] = picker
        self.param_widgets = {info.name: _param_widget(info) for info in step.param_infos}
        self._advanced = {i.name for i in step.param_infos if i.advanced}
        self.show_advanced = CheckBox(value=False, label="advanced", name="show_advanced")
        self.run_button = PushButton(text="Run", name="run")
        self.cancel_button = PushButton(text="Cancel", name="cancel", enabled=False)
        self.progress = ProgressBar(value=0, min=0, max=1, name="progress", label="progress")
        self.status = Label(value=step.help, name="status", label="")
        inputs = []
        for name, widget in self.input_widgets.items():
            inputs += [widget, self.layer_pickers[name]] if name in self.layer_pickers else [widget]
        self.extend([*inputs, *self.param_widgets.values(), self.show_advanced,
                     self.run_button, self.cancel_button, self.progress, self.status])
        self._set_advanced_visible(False)
        self.show_advanced.changed.connect(self._set_advanced_visible)
        self.run_button.changed.connect(self.start)
        self.cancel_button.changed.connect(self.cancel)
        self._bridge = _ProgressBridge()
        self._bridge.progressed.connect(self._on_progress)
        self._cancel_event = threading.Event()
        self.worker = None
        self.result = None

        if napari_viewer is not None and self.layer_pickers:
            napari_viewer.layers.events.inserted.connect(lambda *_: self._refresh_layer_pickers())
            napari_viewer.layers.events.removed.connect(lambda *_: self._refresh_layer_pickers())

    def _refresh_layer_pickers(self) -> None:
        for picker in self.layer_pickers.values():
            picker.reset_choices()

    def _source_layer_choices(self, *_):
        """Layers that know the files they show: (name, path) for the per-slice files behind them."""
        if self.viewer is None:
            return []
        choices = []
        for layer in self.viewer.layers:
            meta = layer.metadata or {}
            if meta.get("sources"):
                choices.append((layer.name, Path(meta["sources"][0]).parent))
            elif meta.get("source") and Path(meta["source"]).exists():
                choices.append((layer.name, Path(meta["source"])))
        return choices

    @staticmethod
    def _use_layer_source(path, target) -> None:
        if path is not None:
            target.value = path

    def _set_advanced_visible(self, visible: bool) -> None:
        for name in self._advanced:
            self.param_widgets[name].visible = bool(visible)

    def _path_layer_choices(self, _widget=None) -> list:
        """Points and Shapes layers of the viewer (the choices of a "points" input)."""
        if self.viewer is None:
            return []
        return [(layer.name, layer) for layer in self.viewer.layers
                if isinstance(layer, napari.layers.Points | napari.layers.Shapes)]

    def params(self):
        """The step's parameter dataclass from the widget values (validated; errors name the parameter)."""
        return params_from_mapping(self.step.params, {n: w.value for n, w in self.param_widgets.items()})

    def inputs(self) -> list:
        """The step's inputs: paths, or :class:`ImageData` for layer inputs (layer data stay lazy)."""
        values = []
        for inp in self.step.inputs:
            value = self.input_widgets[inp.name].value
            label = inp.name.replace("_", " ")
            if inp.is_array:
                if value is None:
                    raise ValueError(f"choose the {label} layer ({inp.help})")
                data = value.data[0] if getattr(value, "multiscale", False) else value.data
                values.append(ImageData(data, tuple(value.scale), value.name, metadata=dict(value.metadata)))
                continue
            if inp.mode == "points":
                if value is None:
                    raise ValueError(f"choose the {label} layer ({inp.help})")
                values.append(layer_path_points(value))
                continue
            if value is None or str(value) in ("", "."):
                if inp.optional:
                    values.append("")  # the step function's "none"
                    continue
                raise ValueError(f"choose the {label} ({inp.help})")
            values.append(Path(value))
        return values

    def start(self, *_):
        """Validate and run the step in a thread worker."""
        try:
            params, inputs = self.params(), self.inputs()
        except ValueError as err:
            self.status.value = f"error: {err}"
            show_error(str(err))
            return None
        self._cancel_event.clear()
        emit = self._bridge.progressed.emit
        # Connecting `errored` here tells napari the error is handled (shown in the widget), not re-raised.
        self.worker = create_worker(
            self.step.run, *inputs, params=params, progress=lambda d, t, m: emit(d, t, m),
            cancel=self._cancel_event, _start_thread=False,
            _connect={"returned": self._on_returned, "errored": self._on_error, "finished": self._on_finished},
        )
        self.run_button.enabled, self.cancel_button.enabled = False, True
        self.progress.value = 0
        self.status.value = f"running {self.step.title}..."
        self.worker.start()
        return self.worker

    def cancel(self, *_):
        self._cancel_event.set()
        self.status.value = "cancelling..."

    def _on_progress(self, done: int, total: int, message: str) -> None:
        self.progress.max = max(total, 1)
        self.progress.value = min(done, max(total, 1))
        self.status.value = message

    def _on_returned(self, result) -> None:
        self.result = result
        self.status.value = self.step.summary(result).splitlines()[0]
        if self.viewer is not None:
            for data, kwargs, kind in self._output_layers(result):
                self.viewer.add_layer(napari.layers.Layer.create(data, kwargs, kind))
        show_info(self.status.value)

    def _output_layers(self, result) -> list[tuple]:
        """Layer data of the step's inputs ("before", unless shown already), its outputs and per-tile QC."""
        layers = self._image_layers(self.step.outputs(result), self.step.name)
        inputs = self.step.before(result) if self.step.before is not None else []
        shown = not inputs or self._shows_any(p for p, _ in inputs)
        before = [] if shown else self._image_layers(inputs, f"{self.step.name} input")
        return before + layers + self._qc_layers(result, layers)

    @staticmethod
    def _image_layers(items: list[tuple], name: str) -> list[tuple]:
        """One layer per kind: the image itself, or several as one stack named after their folder."""
        layers = []
        for kind in ("image", "labels"):
            paths = [p for p, k in items if k == kind]
            if len(paths) > 1:
                layers.append(stacked_ome_zarr_layer(paths, f"{name}: {Path(paths[0]).parent.name}", kind))
            elif paths:
                layers.extend(ome_zarr_layers(paths[0], kind))
        return layers

    def _shows_any(self, paths) -> bool:
        """Whether a layer of the viewer shows one of ``paths`` (by the files recorded in its metadata)."""
        wanted = {Path(p).resolve() for p in paths}
        for layer in self.viewer.layers if self.viewer is not None else []:
            meta = layer.metadata or {}
            shown = [*(meta.get("sources") or []), *([meta["source"]] if meta.get("source") else [])]
            if wanted & {Path(p).resolve() for p in shown}:
                return True
        return False

    def _qc_layers(self, result, image_layers) -> list[tuple]:
        """Per-tile QC shapes (one 2D layer per slice) when the step reported ``tiles`` in its metrics."""
        metrics = getattr(result, "metrics", None) or {}
        if not image_layers:
            return []
        scale = image_layers[0][1].get("scale", (1.0, 1.0))[-2:]
        return [
            tile_qc_layer(m["tiles"], f"{self.step.name} QC z{sid:02d}", scale, visible=i == 0)
            for i, (sid, m) in enumerate(sorted(metrics.items()))
            if isinstance(m, dict) and m.get("tiles")
        ]

    def _on_error(self, err: Exception) -> None:
        if isinstance(err, Cancelled):
            self.status.value = "cancelled; partial outputs removed"
            return
        self.status.value = f"error: {err}"
        show_error(f"{self.step.title}: {err}")

    def _on_finished(self) -> None:
        self.run_button.enabled, self.cancel_button.enabled = True, False
