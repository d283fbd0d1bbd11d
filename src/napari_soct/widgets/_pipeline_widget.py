"""The pipeline dock widget: one run from raw tiles to the volume, watched step by step in napari.

The run is :func:`napari_soct.pipeline.runner.run_pipeline` in a separate process, relayed by a thread worker;
the main thread only receives progress and finished steps through queued Qt signals (and shows each step's
outputs in lazy layers updated in place), so the viewer stays responsive during a run.
"""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path

import napari
import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    Label,
    LineEdit,
    ProgressBar,
    PushButton,
    SpinBox,
    TextEdit,
)
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import QObject, QUrl, Signal
from qtpy.QtGui import QDesktopServices

from .._layers import ome_zarr_layers, stacked_ome_zarr_layer
from ..pipeline.config import defaults_toml, load_run_file
from ..pipeline.reconstruct import ASSEMBLY_STAGES, SLICE_STAGES
from ..pipeline.runner import PREPROCESS_STAGE, run_pipeline_in_subprocess
from ..processing.io.omezarr import is_ome_zarr
from ..processing.progress import Cancelled

__all__ = ["PipelineWidget"]

_ALL_STEPS = [s.step for s in (PREPROCESS_STAGE, *SLICE_STAGES, *ASSEMBLY_STAGES)]
_START, _END = "(first step)", "(last step)"


class _Bridge(QObject):
    """Queued signals from the worker thread to the main thread."""

    progressed = Signal(int, int, str)
    stage_done = Signal(object)


class PipelineWidget(Container):
    """Run the whole pipeline (raw tiles -> volume -> report) from a run file, with resume and Cancel."""

    def __init__(self, napari_viewer=None):
        super().__init__(labels=True)
        self.viewer = napari_viewer
        self.raw_dir = FileEdit(mode="d", label="raw folder")
        self.out_dir = FileEdit(mode="d", label="output folder")
        self.run_file = FileEdit(mode="r", label="run file", filter="*.toml")
        self.load_button = PushButton(text="Load")
        self.save_button = PushButton(text="Save as...")
        self.config_text = TextEdit(value=_strip_folders(defaults_toml()), label="parameters")
        self.from_step = ComboBox(choices=[_START, *_ALL_STEPS], value=_START, label="recompute from")
        self.until_step = ComboBox(choices=[*_ALL_STEPS, _END], value=_END, label="stop after")
        self.workers = SpinBox(value=2, min=1, max=256, label="workers")
        self.scheduler = LineEdit(value="local", label="scheduler")
        self.show_steps = CheckBox(value=True, text="show each step's output as it finishes")
        self.open_report = CheckBox(value=True, text="open the report at the end")
        self.run_button = PushButton(text="Run / resume")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.progress = ProgressBar(value=0, min=0, max=1, label="run")
        self.step_progress = ProgressBar(value=0, min=0, max=1000, label="step")
        self.status = Label(value="choose the raw and output folders, then Run")
        self.extend([self.raw_dir, self.out_dir, self.run_file, self.load_button, self.save_button,
                     self.config_text, self.from_step, self.until_step, self.workers, self.scheduler,
                     self.show_steps, self.open_report, self.run_button, self.cancel_button, self.progress,
                     self.step_progress, self.status])
        self._cancel = threading.Event()
        self._bridge = _Bridge()
        self._bridge.progressed.connect(self._on_progress)
        self._bridge.stage_done.connect(self._on_stage_done)
        self.load_button.changed.connect(self.load)
        self.save_button.changed.connect(self.save)
        self.run_button.changed.connect(self.start)
        self.cancel_button.changed.connect(self.cancel)
        self.worker = None
        self.result = None
        self.finished_steps: list[str] = []
        self._live: dict = {}  # (kind, ndim) -> the layer showing the latest step's output
        self._live_names: dict = {}
        if self.viewer is not None:
            self._add_live_layers()

    # ------------------------------------------------------------------------------------------ run file
    def load(self, *_):
        """Show the chosen run file's text; its folders fill the folder fields."""
        path = Path(self.run_file.value)
        try:
            run, _ = load_run_file(path)
        except (ValueError, FileNotFoundError) as err:
            self._fail(err)
            return
        self.config_text.value = path.read_text()
        if run.raw_dir:
            self.raw_dir.value = run.raw_dir
        if run.out_dir:
            self.out_dir.value = run.out_dir
        self.workers.value, self.scheduler.value = run.workers, run.scheduler
        self.status.value = f"loaded {path.name}"

    def save(self, *_):
        """Write the parameters (with the folders and run options of the form) to the run file path."""
        path = Path(self.run_file.value)
        if str(self.run_file.value) in ("", "."):
            self._fail(ValueError("choose the run file to save to"))
            return
        path.write_text(self._run_text())
        self.status.value = f"saved {path}"

    def _run_text(self) -> str:
        """The editor's TOML with the form's folders and run options set in its [run] section."""
        import tomllib

        text = self.config_text.value
        data = tomllib.loads(text)
        run = data.get("run", {})
        run.update(raw_dir=str(self.raw_dir.value), out_dir=str(self.out_dir.value), workers=int(self.workers.value),
                   scheduler=str(self.scheduler.value))
        lines = ["[run]"] + [f"{k} = {_toml(v)}" for k, v in run.items()]
        body = _drop_section(text, "run")
        return "\n".join(lines) + "\n\n" + body

    # ------------------------------------------------------------------------------------------ running
    def start(self, *_):
        """Validate the form and run (or resume) in a thread worker."""
        import tempfile

        if str(self.raw_dir.value) in ("", ".") or str(self.out_dir.value) in ("", "."):
            self._fail(ValueError("choose the raw folder and the output folder"))
            return None
        try:
            with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as fh:
                fh.write(self._run_text())
            run, steps = load_run_file(fh.name)
        except ValueError as err:
            self._fail(err)
            return None
        finally:
            Path(fh.name).unlink(missing_ok=True)
        rerun_from = None if self.from_step.value == _START else self.from_step.value
        until = None if self.until_step.value == _END else self.until_step.value
        self._cancel.clear()
        self.finished_steps = []
        emit_progress, emit_stage = self._bridge.progressed.emit, self._bridge.stage_done.emit
        # The run goes to its own process (this thread only relays its messages): the computation never holds
        # the GIL the viewer's thread needs.
        self.worker = create_worker(
            run_pipeline_in_subprocess, replace(run), step_params=steps, rerun_from=rerun_from, until=until,
            progress=_Throttled(emit_progress), cancel=self._cancel,
            on_stage=lambda outcome, state: emit_stage((outcome, self._layer_data(outcome))), nice=10,
            _start_thread=False,
            _connect={"returned": self._on_returned, "errored": self._on_error, "finished": self._on_finished},
        )
        self.run_button.enabled, self.cancel_button.enabled = False, True
        self.progress.value = 0
        self.status.value = "running..."
        self.worker.start()
        return self.worker

    def cancel(self, *_):
        self._cancel.set()
        self.status.value = "cancelling (the current slice finishes, nothing half-written is kept)..."

    def _on_progress(self, done: int, total: int, message: str) -> None:
        self.progress.max = max(total // 1000, 1)
        self.progress.value = min(done // 1000, self.progress.max)
        self.step_progress.value = done % 1000
        self.status.value = message

    def _layer_data(self, outcome) -> list[tuple]:
        """Layer tuples of a finished step's images, prepared in the worker thread (opening the files and
        sampling contrast limits reads data: never on the main thread)."""
        if self.viewer is None or not self.show_steps.value:
            return []
        images = [p for p in outcome.outputs if Path(p).suffix == ".zarr" and is_ome_zarr(p)]
        if len(images) > 1:
            layers = [stacked_ome_zarr_layer(images, f"{outcome.step}: {Path(images[0]).parent.name}", "image")]
        else:
            layers = ome_zarr_layers(images[0]) if images else []
        prepared = []
        for data, kwargs, kind in layers:
            # Compute one small piece here: dask imports its scheduler modules on the first compute, which
            # would otherwise happen on the main thread when napari slices the new layer.
            coarsest = data[-1] if isinstance(data, list) else data
            np.asarray(coarsest[(0,) * (coarsest.ndim - 2)][:1, :1])
            prepared.append((data, kwargs, kind))
        return prepared

    def _on_stage_done(self, done) -> None:
        outcome, layers = done
        self.finished_steps.append(outcome.step)
        if self.viewer is None:
            return
        for data, kwargs, kind in layers:
            self._show(data, kwargs, kind)

    def _add_live_layers(self) -> None:
        """The run's two views (per-slice results, 4D; the volume, 3D), empty until a step fills them.

        Made now, when the widget opens: a new layer's controls and first draw cost the main thread far more
        than updating a layer, and during a run the main thread must stay free.
        """
        for name, ndim, levels in (("pipeline: slices", 4, 1), ("pipeline: volume", 3, 2)):
            data = [np.zeros((2 ** (levels - 1 - i),) * ndim, np.float32) for i in range(levels)]
            layer = self.viewer.add_image(data if levels > 1 else data[0], name=name, contrast_limits=(0, 1),
                                          multiscale=levels > 1)
            key = ("image", ndim, levels > 1)
            self._live[key], self._live_names[key] = layer, name

    def _show(self, data, kwargs: dict, kind: str) -> None:
        """Show a step's output in the run's live layer of its kind and dimensionality (updated in place, so a
        step's result costs one re-slice, not a new layer's controls), or in a new layer the first time.

        A live layer the user renamed or removed is left alone and a new one made: it is theirs to keep.
        """
        multiscale = isinstance(data, list)
        ndim = len(kwargs.get("scale", ())) or (data[0] if multiscale else data).ndim
        key = (kind, ndim, multiscale)
        layer = self._live.get(key)
        if layer is None or layer not in self.viewer.layers or layer.name != self._live_names.get(key):
            layer = self.viewer.add_layer(napari.layers.Layer.create(data, kwargs, kind))
        else:
            with layer.events.blocker_all():
                layer.data = data
                for name in ("scale", "translate", "contrast_limits", "metadata"):
                    if name in kwargs:
                        setattr(layer, name, kwargs[name])
                layer.name = kwargs.get("name", layer.name)
            layer.refresh()
            layer.events.name()
        self._live[key], self._live_names[key] = layer, layer.name

    def _on_returned(self, result) -> None:
        self.result = result
        kept = sum(o.action == "kept" for o in result.outcomes)
        self.status.value = (f"finished in {result.seconds:.0f} s: {len(result.outcomes) - kept} step(s) run, "
                             f"{kept} kept from earlier")
        show_info(self.status.value)
        if result.report is not None and self.open_report.value:
            QDesktopServices.openUrl(QUrl.fromLocalFile(str(result.report)))

    def _on_error(self, err: Exception) -> None:
        if isinstance(err, Cancelled):
            self.status.value = "cancelled; finished steps are kept, Run resumes"
            return
        self._fail(err)

    def _on_finished(self) -> None:
        self.run_button.enabled, self.cancel_button.enabled = True, False

    def _fail(self, err: Exception) -> None:
        self.status.value = f"error: {err}"
        show_error(str(err))


class _Throttled:
    """Forwards progress at most every 0.1 s (and the last unit of each step): the main thread repaints the
    bar and label per message, so a fast step must not flood it."""

    def __init__(self, emit, interval: float = 0.1):
        self.emit, self.interval, self._last = emit, interval, 0.0

    def __call__(self, done: int, total: int, message: str) -> None:
        import time

        now = time.monotonic()
        if now - self._last >= self.interval or done % 1000 == 0 or done >= total:
            self._last = now
            self.emit(done, total, message if len(message) <= 90 else message[:87] + "...")


def _toml(value) -> str:
    import json

    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))


def _drop_section(text: str, name: str) -> str:
    """``text`` without its ``[name]`` section."""
    out, skipping = [], False
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("[") and stripped.endswith("]"):
            skipping = stripped == f"[{name}]"
        if not skipping:
            out.append(line)
    return "\n".join(out).strip() + "\n"


def _strip_folders(text: str) -> str:
    """The defaults without the [run] section (the form holds folders and run options)."""
    return _drop_section(text, "run")
