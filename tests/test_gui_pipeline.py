"""The pipeline widget in a real, shown napari viewer: a whole run of the tiny phantom, the UI heartbeat,
Cancel and resume (run under xvfb-run with Mesa)."""

from __future__ import annotations

import time

import numpy as np
import pytest

napari = pytest.importorskip("napari")

from napari_soct.processing.synthetic import make_acquisition  # noqa: E402


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    return make_acquisition(tmp_path_factory.mktemp("acq"), preset="tiny", seed=1, n_slices=4).raw_dir


def _widget(make_napari_viewer, raw, out):
    from napari_soct.widgets import PipelineWidget

    viewer = make_napari_viewer(show=True)
    widget = PipelineWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.raw_dir.value, widget.out_dir.value = str(raw), str(out)
    widget.scheduler.value = "threads"
    widget.open_report.value = False
    return viewer, widget


def test_pipeline_widget_runs_the_phantom_end_to_end_without_freezing(make_napari_viewer, qtbot, raw, tmp_path):
    from qtpy.QtCore import QTimer

    viewer, widget = _widget(make_napari_viewer, raw, tmp_path / "run")
    beats = []
    timer = QTimer()
    timer.timeout.connect(lambda: beats.append(time.perf_counter()))
    timer.start(20)
    widget.start()
    qtbot.waitUntil(lambda: widget.run_button.enabled and widget.result is not None, timeout=300_000)
    timer.stop()
    gaps = np.diff(beats)
    print(f"heartbeat: {len(beats)} beats, longest gap {1000 * gaps.max():.0f} ms, "
          f"{beats[int(gaps.argmax())] - beats[0]:.2f} s after the start of {beats[-1] - beats[0]:.1f} s")
    assert len(beats) > 20 and gaps.max() < 0.2  # the main thread never blocked for 200 ms
    result = widget.result
    assert result.volume is not None and result.volume.exists()
    assert result.report is not None and result.report.exists()
    assert widget.finished_steps[0] == "preprocess" and widget.finished_steps[-1] == "report"
    # The run's two live layers show the latest per-slice step and the volume, with the files' data.
    from napari_soct.processing.io.omezarr import open_ome_zarr

    slices, volume = widget._live[("image", 4, False)], widget._live[("image", 3, True)]
    assert slices.name.startswith("normalize") and slices.data.shape[0] == 4
    assert volume.data[0].shape == open_ome_zarr(result.volume).levels[0].shape
    assert volume.scale[-1] == pytest.approx(open_ome_zarr(result.volume).scales_mm[0][-1])
    shot = viewer.screenshot(canvas_only=True, flash=False)
    assert shot[..., :3].astype(float).mean(axis=-1).std() > 5


def test_cancel_then_resume_keeps_finished_steps(make_napari_viewer, qtbot, raw, tmp_path):
    viewer, widget = _widget(make_napari_viewer, raw, tmp_path / "run")
    widget.show_steps.value = False
    widget.start()
    qtbot.waitUntil(lambda: "stitch" in widget.finished_steps, timeout=120_000)
    widget.cancel()
    qtbot.waitUntil(lambda: widget.run_button.enabled, timeout=120_000)
    if widget.result is None:  # cancelled before the end (the usual case on this phantom)
        assert "cancelled" in widget.status.value
    widget.start()
    qtbot.waitUntil(lambda: widget.run_button.enabled and widget.result is not None, timeout=300_000)
    actions = {o.step: o.action for o in widget.result.outcomes}
    assert actions["preprocess"] == "kept" and actions["stitch"] == "kept"
    assert widget.result.volume.exists()


def test_load_and_save_run_file(make_napari_viewer, raw, tmp_path):
    from napari_soct.pipeline.config import load_run_file

    viewer, widget = _widget(make_napari_viewer, raw, tmp_path / "run")
    widget.config_text.value = widget.config_text.value.replace("smooth_sigma = ", "smooth_sigma = 0.5 #", 1)
    widget.workers.value = 3
    widget.run_file.value = str(tmp_path / "run.toml")
    widget.save()
    run, steps = load_run_file(tmp_path / "run.toml")
    assert run.raw_dir == str(raw) and run.workers == 3 and run.scheduler == "threads"
    assert steps["normalize"].smooth_sigma == 0.5
    widget.workers.value, widget.raw_dir.value = 1, ""
    widget.load()
    assert widget.workers.value == 3 and str(widget.raw_dir.value) == str(raw)
    (tmp_path / "bad.toml").write_text("[stitch]\nnot_a_parameter = 1\n")
    widget.run_file.value = str(tmp_path / "bad.toml")
    widget.load()
    assert "stitch.not_a_parameter" in widget.status.value
