"""GUI test of the stack widget (step 14) on slices cut from the phantom's true volume (real viewer, under Xvfb)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from skimage.filters import threshold_otsu

from napari_soct.processing.io.omezarr import create_ome_zarr_image, open_ome_zarr
from napari_soct.processing.stack.transforms import PairTransform, write_pairwise_registration

napari = pytest.importorskip("napari")

T, P, NZ, MARGIN = 15, 26, 32, 8  # tiny: 150 um cuts of 10 um planes; 26 valid planes per slice


def _common_space(acq, tmp_path):
    """The phantom's true volume cut into slices of P planes every T, painted on a canvas with a margin of no
    data (a perfect step 10: the slices are where the motor put them)."""
    truth = np.asarray(acq.true_volume[...], dtype=np.float32)  # 3 slices: 62 planes
    n_slices = len(acq.slice_ids)
    canvas = (truth.shape[1] + 2 * MARGIN, truth.shape[2] + 2 * MARGIN)
    origin = [acq.volume_origin_mm[0] - MARGIN * 0.01, acq.volume_origin_mm[1] - MARGIN * 0.01]
    common = tmp_path / "10_common"
    common.mkdir()
    for k in range(n_slices):
        volume = np.zeros((NZ, *canvas), np.float32)
        volume[:P, MARGIN:-MARGIN, MARGIN:-MARGIN] = truth[k * T:k * T + P]
        soct = {"slice_id": k, "voxel_size_um": [10.0] * 3, "origin_mm": origin, "canvas_origin_mm": origin,
                "stage_z_mm": 5.0 + 0.15 * k}
        arr = create_ome_zarr_image(common / f"slice_z{k:02d}_common.ome.zarr", volume.shape, (0.01,) * 3,
                                    chunks=(8, 64, 64), attributes={"soct": soct})
        arr[...] = volume
    return common, truth, n_slices


def test_stack_widget_stacks_the_slices_and_marks_their_boundaries(make_napari_viewer, qtbot, tiny_acquisition,
                                                                   tmp_path):
    common, truth, n_slices = _common_space(tiny_acquisition, tmp_path)
    write_pairwise_registration(tmp_path / "pairwise_registration.csv",
                                [PairTransform(k, k + 1, z_match_plane=T, confidence=1.0) for k in range(n_slices - 1)])

    viewer = make_napari_viewer(show=True)
    _, widget = viewer.window.add_plugin_dock_widget("napari-soct", "14. Stack slices")
    widget.input_widgets["common_dir"].value = common
    widget.input_widgets["registration_csv"].value = tmp_path / "pairwise_registration.csv"
    widget.input_widgets["out_dir"].value = tmp_path / "14_stack"
    widget.param_widgets["subject"].value = "mouse"
    assert widget.start() is not None
    qtbot.waitUntil(lambda: widget.run_button.enabled, timeout=60_000)
    assert not widget.status.value.startswith("error"), widget.status.value

    volume_layer, boundaries = viewer.layers
    assert volume_layer.name == "mouse" and volume_layer.multiscale
    stacked = open_ome_zarr(tmp_path / "14_stack" / "mouse.ome.zarr").levels[0][...]
    np.testing.assert_array_equal(np.asarray(volume_layer.data[0]), stacked)
    inner = stacked[:, MARGIN:-MARGIN, MARGIN:-MARGIN]
    expected = truth[: inner.shape[0]]
    tissue = expected > threshold_otsu(expected)
    assert np.corrcoef(inner[tissue], expected[tissue])[0, 1] >= 0.99
    assert list(boundaries.features["slice_id"]) == list(range(n_slices))
    assert [int(shape[0, 0]) for shape in boundaries.data] == [k * T for k in range(n_slices)]
    viewer.dims.set_point(0, 20 * 0.01)
    gray = viewer.screenshot(canvas_only=True, flash=False)[..., :3].mean(axis=-1)
    assert gray.std() > 5


def _run(widget, qtbot, out_dir):
    widget.input_widgets["out_dir"].value = out_dir
    assert widget.start() is not None
    qtbot.waitUntil(lambda: widget.run_button.enabled, timeout=60_000)
    assert not widget.status.value.startswith("error"), widget.status.value
    return open_ome_zarr(out_dir / "mouse.ome.zarr").levels[0][...]


def test_stack_widget_with_the_registration_left_empty_places_by_the_motor(make_napari_viewer, qtbot,
                                                                           tiny_acquisition, tmp_path):
    common, truth, n_slices = _common_space(tiny_acquisition, tmp_path)
    viewer = make_napari_viewer(show=True)
    _, widget = viewer.window.add_plugin_dock_widget("napari-soct", "14. Stack slices")
    registration = widget.input_widgets["registration_csv"]
    # An optional input: empty by default, saying what empty means.
    assert registration.value is None
    assert registration.line_edit.native.placeholderText() == "(none: motor-only)"
    widget.input_widgets["common_dir"].value = common
    widget.param_widgets["subject"].value = "mouse"
    motor = _run(widget, qtbot, tmp_path / "motor")

    decisions = list(csv.DictReader((tmp_path / "motor" / "stacking_decisions.csv").open()))
    assert [(d["gate"], d["reason"]) for d in decisions] == [("reference", "")] + [("skip", "no registration")] * (
        n_slices - 1)
    assert json.loads((tmp_path / "motor" / "stack_metrics.json").read_text())["registration_csv"] == ""
    # Motor-only is right here (step 10 was perfect): the slices land where they were cut, z from the NCC search.
    assert [int(d["z0"]) for d in decisions] == [k * T for k in range(n_slices)]
    inner = motor[:, MARGIN:-MARGIN, MARGIN:-MARGIN]
    expected = truth[: inner.shape[0]]
    tissue = expected > threshold_otsu(expected)
    assert np.corrcoef(inner[tissue], expected[tissue])[0, 1] >= 0.99
    gray = viewer.screenshot(canvas_only=True, flash=False)[..., :3].mean(axis=-1)
    assert gray.std() > 5

    # The CSV filled in: slice 1 moves by (tx, ty) = (3, -2) px onto slice 0 (and slice 2, stacked on it, too).
    tx, ty = 3, -2
    write_pairwise_registration(tmp_path / "pairwise_registration.csv", [
        PairTransform(0, 1, z_match_plane=T, tx_px=tx, ty_px=ty, confidence=1.0),
        PairTransform(1, 2, z_match_plane=T, confidence=1.0)])
    registration.value = tmp_path / "pairwise_registration.csv"
    registered = _run(widget, qtbot, tmp_path / "registered")
    decisions = list(csv.DictReader((tmp_path / "registered" / "stacking_decisions.csv").open()))
    assert [d["gate"] for d in decisions] == ["reference", "full", "full"]
    assert registered.shape == motor.shape and not np.allclose(registered, motor)
    # Planes only slice 1 covers (below slice 0's data, above slice 2's top): the motor-only planes moved by t.
    only_1 = slice(P, 2 * T)
    h, w = motor.shape[1:]
    np.testing.assert_allclose(registered[only_1, MARGIN + ty:h - MARGIN + ty, MARGIN + tx:w - MARGIN + tx],
                               motor[only_1, MARGIN:h - MARGIN, MARGIN:w - MARGIN], rtol=1e-5, atol=1e-6)
