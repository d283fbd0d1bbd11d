"""GUI tests in a real, shown napari viewer (run under xvfb-run with Mesa)."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import structured_tile, write_raw_tile

napari = pytest.importorskip("napari")

SHAPE = (8, 24, 32)
BAND = 9


@pytest.fixture
def raw(tmp_path):
    root = tmp_path / "raw_acq"
    truth = {}
    for z in (3, 4):
        for y in range(2):
            for x in range(2):
                if (z, x, y) == (4, 1, 1):
                    continue
                truth[(z, x, y)] = write_raw_tile(
                    root / f"z{z:02d}" / f"tile_x{x:02d}_y{y:02d}_z{z:02d}", structured_tile(SHAPE, 9 * z + 3 * y + x),
                    band_start=BAND, stage_mm=(0.5 * x, 0.4 * y), fov_um=(640, 480), n_repeat=2,
                )
    return root, truth


def _not_blank(viewer) -> np.ndarray:
    shot = viewer.screenshot(canvas_only=True, flash=False)
    gray = shot[..., :3].astype(float).mean(axis=-1)
    assert gray.std() > 5, "screenshot is blank"
    return gray


def test_reader_opens_raw_acquisition_lazily(make_napari_viewer, raw):
    root, truth = raw
    viewer = make_napari_viewer(show=True)
    layers = viewer.open(root, plugin="napari-soct")
    image, grid = layers
    assert image.data.shape == (2, SHAPE[0], 2 * SHAPE[1], 2 * SHAPE[2])
    assert image.scale[1:] == pytest.approx((3.5e-3, 0.02, 0.02))
    assert type(image.data).__module__.startswith("dask")
    # Galvo fixed lazily; a missing tile is zeros.
    block = np.asarray(image.data[0, :, SHAPE[1] :, : SHAPE[2]])
    np.testing.assert_allclose(block, truth[(3, 0, 1)], rtol=1e-6)
    assert not np.asarray(image.data[1, :, SHAPE[1] :, SHAPE[2] :]).any()
    assert grid._type_string == "shapes" and len(grid.data) == 4
    assert list(grid.features["slices_present"]) == [2, 2, 2, 1]
    assert grid.features["stage_x_mm"].tolist() == pytest.approx([0, 0.5, 0, 0.5])
    _not_blank(viewer)


def test_reader_rejects_other_folders(tmp_path):
    from napari_soct._reader import get_reader

    (tmp_path / "some_folder").mkdir()
    assert get_reader(str(tmp_path)) is None
    assert get_reader(str(tmp_path / "some_folder")) is None
    assert get_reader(str(tmp_path / "nothing.zarr")) is None


def test_preprocess_widget_runs_and_adds_layers(make_napari_viewer, qtbot, raw, tmp_path):
    root, truth = raw
    viewer = make_napari_viewer(show=True)
    _, widget = viewer.window.add_plugin_dock_widget("napari-soct", "Preprocess raw tiles")
    widget.input_widgets["raw_dir"].value = root
    widget.input_widgets["out_dir"].value = tmp_path / "out"
    widget.param_widgets["sharding_factor"].value = 0
    progress_seen = []
    widget._bridge.progressed.connect(lambda d, t, m: progress_seen.append((d, t)))
    assert widget.start() is not None
    assert not widget.run_button.enabled  # running
    qtbot.waitUntil(lambda: len(viewer.layers) == 1 and widget.run_button.enabled, timeout=60_000)
    layer = viewer.layers[0]
    assert layer.data.shape == (2, SHAPE[0], 2 * SHAPE[1], 2 * SHAPE[2])
    assert layer.scale[1:] == pytest.approx((3.5e-3, 0.02, 0.02))
    np.testing.assert_allclose(np.asarray(layer.data[1, :, : SHAPE[1], SHAPE[2] :]), truth[(4, 1, 0)], rtol=1e-6)
    assert progress_seen and progress_seen[-1] == (7, 7)
    assert widget.run_button.enabled and "2 mosaic grid(s) written" in widget.status.value
    _not_blank(viewer)


def test_widget_reports_bad_input_without_running(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget("napari-soct", "Preprocess raw tiles")
    widget.input_widgets["raw_dir"].value = tmp_path
    widget.param_widgets["galvo_confidence_threshold"].value = 0.5
    widget.param_widgets["workers"].value = 1
    assert widget.params().galvo_confidence_threshold == 0.5
    assert widget.start() is None  # no output folder chosen yet
    assert "choose the out dir" in widget.status.value


def test_widget_error_is_shown(make_napari_viewer, qtbot, tmp_path):
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget("napari-soct", "Preprocess raw tiles")
    widget.input_widgets["raw_dir"].value = tmp_path
    widget.input_widgets["out_dir"].value = tmp_path / "out"
    assert widget.start() is not None
    qtbot.waitUntil(lambda: widget.run_button.enabled, timeout=30_000)
    assert "not a raw S-OCT acquisition" in widget.status.value
    assert len(viewer.layers) == 0


def test_sample_data_and_ome_zarr_reader(make_napari_viewer, tmp_path):
    from napari_soct.processing.preprocess import preprocess_acquisition
    from napari_soct.processing.synthetic import SyntheticAcquisition

    viewer = make_napari_viewer(show=True)
    layers = viewer.open_sample("napari-soct", "soct_tiny")
    names = [layer.name for layer in layers]
    assert any("raw mosaic" in n for n in names) and any("tile grid" in n for n in names)
    assert any("ground truth" in n for n in names)
    raw_layer = next(layer for layer in layers if "raw mosaic" in layer.name)
    acq = SyntheticAcquisition.load(raw_layer.metadata["source"].rsplit("/raw", 1)[0])
    sid = acq.slice_ids[1]
    tz, ty, tx = acq.tile_shape
    block = np.asarray(raw_layer.data[1, :, ty : 2 * ty, tx : 2 * tx])
    np.testing.assert_allclose(block, acq.true_tile(sid, 1, 1), rtol=1e-5, atol=1e-6)
    _not_blank(viewer)

    result = preprocess_acquisition(acq.raw_dir, tmp_path / "pre")
    (image,) = viewer.open(result.mosaic_paths[0], plugin="napari-soct")
    assert image.data.shape == (tz, acq.grid_shape[0] * ty, acq.grid_shape[1] * tx)
    assert image.scale == pytest.approx(tuple(v * 1e-3 for v in acq.voxel_size_um))


def test_widget_cancel_removes_partial_outputs(make_napari_viewer, qtbot, raw, tmp_path, monkeypatch):
    import time

    from napari_soct.processing.preprocess import run

    real = run.read_corrected_tile

    def slow(*args, **kwargs):  # make the run long enough to cancel mid-way
        time.sleep(0.3)
        return real(*args, **kwargs)

    monkeypatch.setattr(run, "read_corrected_tile", slow)
    root, _ = raw
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget("napari-soct", "Preprocess raw tiles")
    widget.input_widgets["raw_dir"].value = root
    widget.input_widgets["out_dir"].value = tmp_path / "out"
    widget.param_widgets["workers"].value = 1
    widget._bridge.progressed.connect(lambda *_: widget.cancel_button.clicked.emit())
    widget.start()
    qtbot.waitUntil(lambda: widget.run_button.enabled, timeout=30_000)
    assert widget.status.value.startswith("cancelled")
    assert widget.progress.value < widget.progress.max
    assert len(viewer.layers) == 0
    left = list((tmp_path / "out").iterdir()) if (tmp_path / "out").exists() else []
    assert not [p for p in left if p.name.startswith(".") or p.name.endswith(".csv")]
