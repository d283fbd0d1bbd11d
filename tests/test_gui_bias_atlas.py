"""GUI test of the bias field widget (step 15) on a phantom volume with an injected field (real viewer, under Xvfb)."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.filters import threshold_otsu

from napari_soct.processing.io.omezarr import create_ome_zarr_pyramid, open_ome_zarr

napari = pytest.importorskip("napari")


def test_bias_widget_corrects_the_volume_of_a_layer(make_napari_viewer, qtbot, tiny_acquisition, tmp_path):
    truth = np.asarray(tiny_acquisition.true_volume[...], dtype=np.float32)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in truth.shape], indexing="ij")
    log_bias = (0.35 * x - 0.25 * y + 0.2 * z + 0.2 * np.cos(1.5 * x + 0.5 * y)).astype(np.float32)
    source = tmp_path / "volume.ome.zarr"
    writer = create_ome_zarr_pyramid(source, truth.shape, (0.01,) * 3, chunks=(16, 64, 64), n_levels=1)
    writer.write((slice(None),) * 3, truth * np.exp(log_bias))

    viewer = make_napari_viewer(show=True)
    viewer.open(source, plugin="napari-soct")
    _, widget = viewer.window.add_plugin_dock_widget("napari-soct", "15. Bias field (N4)")
    widget.layer_pickers["volume_path"].value = source  # the input comes from the layer
    assert widget.input_widgets["volume_path"].value == source
    widget.input_widgets["out_dir"].value = tmp_path / "bias"
    for name, value in {"mode": "global", "shrink_factor": 6, "n_iterations": 30, "n_fitting_levels": 2}.items():
        widget.param_widgets[name].value = value
    assert widget.start() is not None
    qtbot.waitUntil(lambda: widget.run_button.enabled, timeout=120_000)
    assert not widget.status.value.startswith("error"), widget.status.value

    before, after = viewer.layers
    assert after.name == "volume_corrected" and tuple(after.scale) == pytest.approx(tuple(before.scale))
    written = open_ome_zarr(tmp_path / "bias" / "volume_corrected.ome.zarr").levels[0][...]
    np.testing.assert_array_equal(np.asarray(after.data), written)
    tissue = truth > threshold_otsu(truth)
    assert np.log(written / truth)[tissue].std() <= 0.5 * log_bias[tissue].std()
    viewer.layers.selection.active = after
    before.visible = False
    gray = viewer.screenshot(canvas_only=True, flash=False)[..., :3].mean(axis=-1)
    assert gray.std() > 5
