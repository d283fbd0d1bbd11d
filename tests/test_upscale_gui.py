"""GUI test of the label upscaling widget in a real, shown napari viewer (run under xvfb-run with Mesa)."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

napari = pytest.importorskip("napari")


def _reference(src, out_shape):
    idx = [np.minimum([int(Fraction(2 * j + 1, 2) * Fraction(n, o)) for j in range(o)], n - 1)
           for n, o in zip(src.shape, out_shape)]
    return src[np.ix_(*idx)]


def _atlas(shape=(6, 10, 12)) -> np.ndarray:
    """Blocky labels with ids above 2**53 (uint64)."""
    rng = np.random.default_rng(0)
    ids = np.array([0, 3, 2**53 + 1, 2**60 + 5, 17], np.uint64)
    coarse = rng.integers(0, len(ids), (3, 5, 6))
    return ids[coarse[np.ix_(*[np.arange(n) * c // n for n, c in zip(shape, coarse.shape)])]]


def _shown(viewer) -> None:
    shot = viewer.screenshot(canvas_only=True, flash=False)
    assert shot[..., :3].astype(float).mean(axis=-1).std() > 5, "screenshot is blank"


def test_upscale_widget_factors_adds_lazy_multiscale_labels(make_napari_viewer, qtbot, tmp_path):
    viewer = make_napari_viewer(show=True)
    src = _atlas()
    viewer.add_labels(src, name="atlas", scale=(0.025, 0.025, 0.025))
    _, widget = viewer.window.add_plugin_dock_widget("napari-soct", "Upscale labels")
    widget.input_widgets["labels"].value = viewer.layers["atlas"]
    widget.input_widgets["out"].value = tmp_path / "atlas_up.ome.zarr"
    widget.param_widgets["factors"].value = "4,4,5"
    widget.param_widgets["chunk_size"].value = 16
    widget.param_widgets["shard_size"].value = 32
    widget.param_widgets["pyramid_levels"].value = 2
    assert widget.start() is not None
    qtbot.waitUntil(lambda: widget.run_button.enabled and len(viewer.layers) == 2, timeout=60_000)
    layer = viewer.layers[-1]
    assert isinstance(layer, napari.layers.Labels) and layer.multiscale
    assert type(layer.data[0]).__module__.startswith("dask")  # lazy
    level0 = np.asarray(layer.data[0])
    assert level0.shape == (24, 40, 60) and level0.dtype == np.uint64 and len(layer.data) == 3
    np.testing.assert_array_equal(level0, _reference(src, (24, 40, 60)))
    assert layer.scale == pytest.approx((0.025 / 4, 0.025 / 4, 0.005))
    viewer.dims.ndisplay = 2
    viewer.layers["atlas"].visible = False
    viewer.reset_view()
    _shown(viewer)


def test_upscale_widget_match_image_layer(make_napari_viewer, qtbot, tmp_path):
    viewer = make_napari_viewer(show=True)
    src = _atlas()
    viewer.add_labels(src, name="atlas", scale=(0.025, 0.025, 0.025))
    viewer.add_image(np.random.default_rng(1).random((15, 25, 30)).astype(np.float32), name="data",
                     scale=(0.01, 0.01, 0.01))
    _, widget = viewer.window.add_plugin_dock_widget("napari-soct", "Upscale labels")
    widget.input_widgets["labels"].value = viewer.layers["atlas"]
    widget.input_widgets["out"].value = tmp_path / "matched.ome.zarr"
    # Two targets at once is refused with a message, nothing runs.
    widget.match_image.value = viewer.layers["data"]
    widget.param_widgets["factors"].value = "2"
    assert widget.start() is None and "one target" in widget.status.value
    widget.param_widgets["factors"].value = ""
    assert widget.start() is not None
    qtbot.waitUntil(lambda: widget.run_button.enabled and len(viewer.layers) == 3, timeout=60_000)
    layer = viewer.layers[-1]
    level0 = np.asarray(layer.data[0] if layer.multiscale else layer.data)
    np.testing.assert_array_equal(level0, _reference(src, (15, 25, 30)))
    assert layer.scale == pytest.approx((0.01, 0.01, 0.01))
    _shown(viewer)
