"""GUI test of the report widget on the tiny chain (real viewer, under Xvfb): the report is written and opened."""

from __future__ import annotations

from html.parser import HTMLParser

import pytest

from napari_soct.pipeline.steps import STEPS

napari = pytest.importorskip("napari")


class _Summary(HTMLParser):
    def __init__(self):
        super().__init__()
        self.status = {}

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "tr" and "data-status" in a:
            self.status[a["data-step"]] = a["data-status"]


def test_report_widget_writes_the_report_and_opens_it(make_napari_viewer, qtbot, tmp_path, monkeypatch):
    from qtpy.QtGui import QDesktopServices

    from napari_soct.processing.preprocess import preprocess_acquisition
    from napari_soct.processing.synthetic import make_acquisition

    acq = make_acquisition(tmp_path / "acq", preset="tiny", seed=0, n_slices=3)
    preprocess_acquisition(acq.raw_dir, tmp_path / "mosaic")
    rec, source = tmp_path / "rec", tmp_path / "mosaic"
    for name, folder in (("stitch", "04_stitch"), ("beam", "05_beam"), ("crop", "06_crop"),
                         ("normalize", "07_normalize")):
        STEPS[name].run(source, rec / folder)
        source = rec / folder

    opened = []
    monkeypatch.setattr(QDesktopServices, "openUrl", lambda url: opened.append(url.toLocalFile()) or True)
    viewer = make_napari_viewer(show=True)
    viewer.open(next((rec / "07_normalize").glob("slice_z01_*.ome.zarr")), plugin="napari-soct")
    _, widget = viewer.window.add_plugin_dock_widget("napari-soct", "Quality report")
    widget.input_widgets["out_dir"].value = rec
    widget.param_widgets["preview_size_px"].value = 96
    assert widget.open_when_done.value
    assert widget.start() is not None
    qtbot.waitUntil(lambda: widget.run_button.enabled and widget.result is not None, timeout=60_000)
    report = rec / "report.html"
    assert widget.status.value.startswith("report: warning") and report.is_file()  # the phantom's missing tile
    assert opened == [str(report.resolve())]
    page = _Summary()
    page.feed(report.read_text())
    ran = {k for k, v in page.status.items() if v != "not run"}
    assert ran == {"preprocess", "stitch", "beam", "crop", "normalize"}
    assert page.status["preprocess"] == "warning" and page.status["normalize"] == "ok"
    assert len(viewer.layers) == 1  # the report adds no layer
    gray = viewer.screenshot(canvas_only=True, flash=False)[..., :3].mean(axis=-1)
    assert gray.std() > 5

    # Run again: the report exists; with "error" (the default) the widget shows the refusal and opens nothing.
    opened.clear()
    widget.result = None
    assert widget.start() is not None
    qtbot.waitUntil(lambda: widget.run_button.enabled and widget.status.value.startswith("error"), timeout=30_000)
    assert "already exists" in widget.status.value and not opened
