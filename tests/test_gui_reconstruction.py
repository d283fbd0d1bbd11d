"""GUI tests of the in-slice reconstruction widgets on the tiny phantom (real viewer, shown, under Xvfb)."""

from __future__ import annotations

import numpy as np
import pytest

from napari_soct.processing.io.omezarr import open_ome_zarr
from napari_soct.processing.preprocess import preprocess_acquisition

napari = pytest.importorskip("napari")


@pytest.fixture(scope="module")
def mosaic_dir(tiny_acquisition, tmp_path_factory):
    out = tmp_path_factory.mktemp("mosaics")
    preprocess_acquisition(tiny_acquisition.raw_dir, out, generate_previews=False)
    return out


def _run(widget, qtbot, timeout=60_000):
    assert widget.start() is not None
    qtbot.waitUntil(lambda: widget.run_button.enabled, timeout=timeout)
    assert not widget.status.value.startswith("error"), widget.status.value


def test_crop_widget_shows_before_and_after_with_physical_scale(make_napari_viewer, qtbot, mosaic_dir, tmp_path):
    viewer = make_napari_viewer(show=True)
    viewer.open(mosaic_dir / "mosaic_grid_3d_z01.ome.zarr", plugin="napari-soct")  # "before"
    _, widget = viewer.window.add_plugin_dock_widget("napari-soct", "6. Interface crop")
    # The input comes from the layer: the widget knows the file behind it.
    picker = widget.layer_pickers["source"]
    assert [c for c in picker.choices if c is not None] == [mosaic_dir / "mosaic_grid_3d_z01.ome.zarr"]
    picker.value = mosaic_dir / "mosaic_grid_3d_z01.ome.zarr"
    assert widget.input_widgets["source"].value == mosaic_dir / "mosaic_grid_3d_z01.ome.zarr"
    widget.input_widgets["out_dir"].value = tmp_path / "crop"
    widget.param_widgets["depth_um"].value = 100.0
    _run(widget, qtbot)
    before, after = viewer.layers
    written = open_ome_zarr(tmp_path / "crop" / "slice_z01_crop.ome.zarr").levels[0][...]
    assert written.shape[0] == 10  # 100 um at 10 um
    assert tuple(after.scale) == pytest.approx(tuple(before.scale))
    np.testing.assert_array_equal(np.asarray(after.data), written)
    gray = viewer.screenshot(canvas_only=True, flash=False)[..., :3].mean(axis=-1)
    assert gray.std() > 5


def test_normalize_widget_equalises_levels(make_napari_viewer, qtbot, mosaic_dir, tmp_path):
    from napari_soct.processing.correct._slice_io import sample_pixels
    from napari_soct.processing.correct.intensity import slice_reference_level

    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget("napari-soct", "7. Normalise slices")
    widget.input_widgets["source"].value = mosaic_dir
    widget.input_widgets["out_dir"].value = tmp_path / "norm"
    widget.param_widgets["smooth_sigma"].value = 0.0
    _run(widget, qtbot)
    levels = [slice_reference_level(sample_pixels(open_ome_zarr(p).levels[0]))
              for p in sorted((tmp_path / "norm").glob("slice_z*_normalize.ome.zarr"))]
    assert len(levels) == 3 and np.ptp(levels) / np.mean(levels) < 0.01
    assert len(viewer.layers) == 1
