"""Tomography in a real, shown napari viewer: sample data, the Radon and Reconstruct widgets (run under xvfb-run)."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.data import shepp_logan_phantom
from skimage.transform import radon as sk_radon

napari = pytest.importorskip("napari")


def _not_blank(viewer) -> None:
    shot = viewer.screenshot(canvas_only=True, flash=False)
    assert shot[..., :3].astype(float).mean(axis=-1).std() > 5, "screenshot is blank"


def _rmse(a, b) -> float:
    return float(np.sqrt(np.mean((np.asarray(a, float) - b) ** 2)))


def test_sample_data_phantom_and_its_sinogram(make_napari_viewer):
    viewer = make_napari_viewer(show=True)
    viewer.open_sample("napari-soct", "shepp_logan_sinogram")
    phantom, sinogram = viewer.layers["Shepp-Logan phantom"], viewer.layers["Shepp-Logan sinogram"]
    np.testing.assert_array_equal(phantom.data, shepp_logan_phantom().astype(np.float32))
    assert sinogram.data.shape == (400, 180)
    assert tuple(sinogram.axis_labels) == ("detector", "angle")
    assert tuple(sinogram.scale) == (1.0, 1.0)  # one degree per projection
    assert str(sinogram.units[1]) == "degree"
    theta = np.arange(180.0)
    assert sinogram.metadata["tomography"]["angles_deg"] == pytest.approx(theta.tolist())
    reference = sk_radon(shepp_logan_phantom(), theta)
    assert np.linalg.norm(sinogram.data - reference) / np.linalg.norm(reference) < 3e-3
    _not_blank(viewer)


def test_radon_widget_makes_a_sinogram_layer_with_the_angle_axis(make_napari_viewer, qtbot, tmp_path):
    viewer = make_napari_viewer(show=True)
    image = shepp_logan_phantom()[::4, ::4].astype(np.float32)  # 100 x 100
    viewer.add_image(image, name="phantom", scale=(0.01, 0.01))
    _, widget = viewer.window.add_plugin_dock_widget("napari-soct", "Radon (image -> sinogram)")
    widget.input_widgets["image"].value = viewer.layers["phantom"]
    widget.input_widgets["out_dir"].value = tmp_path / "out"
    widget.param_widgets["angles"].value = "0:180:90"
    assert widget.start() is not None
    qtbot.waitUntil(lambda: widget.run_button.enabled and len(viewer.layers) == 2, timeout=120_000)
    sinogram = viewer.layers[-1]
    assert sinogram.data.shape == (100, 90)
    assert tuple(sinogram.axis_labels) == ("detector", "angle")
    assert tuple(sinogram.scale) == pytest.approx((0.01, 2.0))  # detector in mm, angle step in degrees
    assert [str(u) for u in sinogram.units] == ["millimeter", "degree"]
    reference = sk_radon(image.astype(float), np.linspace(0, 180, 90, endpoint=False))
    data = np.asarray(sinogram.data)
    # Joseph's method vs rotate-and-sum on a coarse (100 px) phantom with sharp edges: within 1 %.
    assert np.linalg.norm(data - reference) / np.linalg.norm(reference) < 1e-2
    assert sinogram.metadata["tomography"]["angles_deg"][:3] == [0.0, 2.0, 4.0]
    viewer.layers["phantom"].visible = False
    _not_blank(viewer)


def test_reconstruct_widget_fbp_and_sart_from_the_sample_sinogram(make_napari_viewer, qtbot, tmp_path):
    viewer = make_napari_viewer(show=True)
    viewer.open_sample("napari-soct", "shepp_logan_sinogram")
    truth = shepp_logan_phantom()
    _, widget = viewer.window.add_plugin_dock_widget("napari-soct", "Reconstruct (sinogram -> image)")
    widget.input_widgets["sinograms"].value = viewer.layers["Shepp-Logan sinogram"]
    widget.input_widgets["out_dir"].value = tmp_path / "out"

    # FBP, ramp filter, angles found in the layer's metadata.
    widget.param_widgets["method"].value = "fbp"
    widget.param_widgets["filter"].value = "ramp"
    assert widget.start() is not None
    qtbot.waitUntil(lambda: widget.run_button.enabled and len(viewer.layers) == 3, timeout=120_000)
    fbp = viewer.layers[-1]
    assert fbp.data.shape == (400, 400) and tuple(fbp.axis_labels) == ("y", "x")
    assert _rmse(fbp.data, truth) <= 0.0343  # scikit-image's own figure for this case

    # SART, one iteration: scikit-image's iradon_sart reaches 0.0476 here.
    widget.param_widgets["method"].value = "sart"
    widget.param_widgets["iterations"].value = 1
    widget.param_widgets["relaxation"].value = 0.15
    assert widget.start() is not None
    qtbot.waitUntil(lambda: widget.run_button.enabled and len(viewer.layers) == 4, timeout=120_000)
    sart = viewer.layers[-1]
    assert sart.name.endswith("_sart") and _rmse(sart.data, truth) < 0.0476
    _not_blank(viewer)

    # Angles that do not match the sinogram: the error names them, nothing is added.
    widget.param_widgets["method"].value = "fbp"
    widget.param_widgets["angles"].value = "0:180:7"
    widget.input_widgets["out_dir"].value = tmp_path / "other"
    widget.start()
    qtbot.waitUntil(lambda: widget.run_button.enabled and widget.status.value.startswith("error"), timeout=60_000)
    assert "7 angle(s) given but the sinogram has 180" in widget.status.value
    assert len(viewer.layers) == 4
