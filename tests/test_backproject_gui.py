"""GUI tests of the Straighten and Backproject widgets in a real, shown napari viewer (run under xvfb-run)."""

from __future__ import annotations

import numpy as np
import pytest

from test_backproject import LABEL_BASE, make_tube

napari = pytest.importorskip("napari")


def _not_blank(viewer) -> None:
    shot = viewer.screenshot(canvas_only=True, flash=False)
    assert shot[..., :3].astype(float).mean(axis=-1).std() > 5, "screenshot is blank"



def _straighten(viewer, qtbot, widget, path_layer, out_dir, size: int, name: str, n_layers: int):
    """Run the Straighten widget along ``path_layer`` (square slices of ``size``) and return the layer it adds."""
    widget.input_widgets["points"].value = path_layer
    widget.input_widgets["out_dir"].value = out_dir
    widget.param_widgets["width"].value = size
    widget.param_widgets["height"].value = size
    widget.param_widgets["name"].value = name
    assert widget.start() is not None
    qtbot.waitUntil(lambda: widget.run_button.enabled and len(viewer.layers) == n_layers, timeout=60_000)
    return viewer.layers[-1]

def test_straighten_then_backproject_from_the_widgets(make_napari_viewer, qtbot, tmp_path):
    from napari_soct.processing.backproject import straighten_volume
    from napari_soct.processing.io.images import ImageData

    tube = make_tube(shape=(40, 56, 56))
    scale = np.asarray(tube["scale"])
    origin = np.array([0.05, -0.1, 0.2])  # layers placed away from the world origin
    viewer = make_napari_viewer(show=True)
    image = viewer.add_image(tube["image"], scale=scale, translate=origin, name="source")
    labels = viewer.add_labels(tube["labels"], scale=scale, translate=origin, name="mask")
    # Points drawn in world coordinates over the layers: path + origin.
    path = viewer.add_points(tube["points"] + origin, name="path", size=0.01)
    assert isinstance(image, napari.layers.Image)

    _, straighten = viewer.window.add_plugin_dock_widget("napari-soct", "Straighten along a path")
    straighten.input_widgets["image"].value = labels
    assert straighten.param_widgets["value_mode"].value == "labels"  # follows the chosen layer type
    straight = _straighten(viewer, qtbot, straighten, path, tmp_path / "straight", 24, "mask", n_layers=4)
    assert isinstance(straight, napari.layers.Labels), straighten.status.value
    # The widget passed the path in the source's own coordinates: same slices as a direct call without offsets.
    direct = straighten_volume(ImageData(tube["labels"], tube["scale"]), tube["points"], tmp_path / "direct",
                               width=24, height=24, value_mode="labels", name="mask")
    import tifffile

    expected = tifffile.imread(direct.tiff_path)
    assert np.asarray(straight.data).shape == expected.shape
    assert np.array_equal(np.asarray(straight.data), expected)
    assert (expected[:, 12, 12] >= LABEL_BASE).mean() > 0.9

    _, back = viewer.window.add_plugin_dock_widget("napari-soct", "Backproject into the source")
    back.input_widgets["straightened"].value = straight
    back.input_widgets["out_dir"].value = tmp_path / "back"
    back.param_widgets["memory_budget_gb"].value = 0.01
    progress = []
    back._bridge.progressed.connect(lambda d, t, m: progress.append((d, t)))
    assert back.start() is not None  # the configuration comes from the straightened layer's metadata
    qtbot.waitUntil(lambda: back.run_button.enabled and len(viewer.layers) == 5, timeout=60_000)
    placed = viewer.layers[-1]
    assert isinstance(placed, napari.layers.Labels), back.status.value
    assert progress and progress[-1][0] == progress[-1][1] >= 1
    offset = np.asarray(back.result.offset_zyx)
    np.testing.assert_allclose(placed.translate, origin + offset * scale)
    np.testing.assert_allclose(placed.scale, scale)
    # Placed right: read the layer back at each source voxel's world position and compare with the truth.
    data = np.asarray(placed.data)
    full = np.zeros(tube["labels"].shape, data.dtype)
    start = np.round((np.asarray(placed.translate) - origin) / scale).astype(int)
    full[tuple(slice(a, a + n) for a, n in zip(start, data.shape))] = data
    region = (tube["dist"] <= 0.1) & (tube["position"] > 0.015) & (tube["position"] < tube["length"] - 0.015)
    truth, found = (tube["labels"] != 0) & region, (full != 0) & region
    assert 2 * np.count_nonzero(truth & found) / (truth.sum() + found.sum()) >= 0.97
    assert np.mean(full[truth & found] == tube["labels"][truth & found]) > 0.99
    viewer.dims.ndisplay = 2
    viewer.dims.set_point(0, float(origin[0] + tube["points"][3][0]))
    _not_blank(viewer)


def test_widgets_report_bad_input_without_running(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((4, 5, 6), np.float32), name="img")
    viewer.add_points(np.zeros((3, 2)), name="flat")
    _, straighten = viewer.window.add_plugin_dock_widget("napari-soct", "Straighten along a path")
    straighten.input_widgets["points"].value = viewer.layers["flat"]
    straighten.input_widgets["out_dir"].value = tmp_path
    assert straighten.start() is None
    assert "need 3D points" in straighten.status.value
    _, back = viewer.window.add_plugin_dock_widget("napari-soct", "Backproject into the source")
    back.input_widgets["out_dir"].value = tmp_path
    assert back.start() is None
    assert "choose the configuration" in back.status.value


def _writer_named(display_name: str, layer_type: str):
    """The writer contribution File > Save Selected Layer(s) uses when this file type is chosen."""
    from npe2 import PluginManager

    [writer] = [w for w in PluginManager.instance().iter_compatible_writers([layer_type])
                if w.display_name == display_name]
    return writer


def test_layers_saved_with_their_configuration_and_backprojected(make_napari_viewer, qtbot, tmp_path):
    import json

    import tifffile

    from napari_soct._writer import LayerWriteError
    from napari_soct.processing.backproject import backproject_volume
    from napari_soct.processing.io.images import ImageData

    tube = make_tube(shape=(40, 56, 56))
    viewer = make_napari_viewer(show=True)
    viewer.add_image(tube["image"], scale=tube["scale"], name="source")
    path = viewer.add_points(tube["points"], name="path", size=0.01)
    _, straighten = viewer.window.add_plugin_dock_widget("napari-soct", "Straighten along a path")
    straight = _straighten(viewer, qtbot, straighten, path, tmp_path / "straight", 20, "v", n_layers=3)
    config = tmp_path / "straight" / "v-configuration.json"
    assert isinstance(straight, napari.layers.Image), straighten.status.value
    assert straight.metadata["soct_configuration"] == str(config.resolve())

    image_writer = _writer_named("Straightened volume + Ouroboros configuration (TIFF)", "image")
    labels_writer = _writer_named("Straightened labels + Ouroboros configuration (TIFF)", "labels")
    # The straightened image, saved with its configuration as File > Save Selected Layer(s) does.
    viewer.layers.selection = {straight}
    saved = viewer.layers.save(str(tmp_path / "saved" / "vol.tif"), selected=True, _writer=image_writer)
    assert saved == [str(tmp_path / "saved" / "vol.tif"), str(tmp_path / "saved" / "vol-configuration.json")]

    # A segmentation painted on the straightened volume: a new Labels layer knows no configuration.
    values = np.asarray(straight.data)
    painted = viewer.add_labels(np.where(values > np.percentile(values, 80), 3, 0).astype(np.uint32),
                                scale=straight.scale, translate=straight.translate, name="painted")
    painted.paint((5, 10, 10), 7)  # a brush stroke with another id
    viewer.layers.selection = {painted}
    with pytest.raises(LayerWriteError, match="layer 'painted' has no straightening configuration"):
        viewer.layers.save(str(tmp_path / "saved" / "seg.tif"), selected=True, _writer=labels_writer)
    assert not (tmp_path / "saved" / "seg.tif").exists()

    _, back = viewer.window.add_plugin_dock_widget("napari-soct", "Backproject into the source")
    back.input_widgets["straightened"].value = painted
    back.input_widgets["configuration"].value = tmp_path / "missing-configuration.json"
    back.attach_button.native.click()
    assert "error" in back.status.value and "soct_configuration" not in painted.metadata
    back.input_widgets["configuration"].value = config
    back.attach_button.native.click()
    assert painted.metadata["soct_configuration"] == str(config.resolve()), back.status.value
    # Naming the configuration for a layer and running attaches it too (inputs() is what Run reads).
    other = viewer.add_labels(np.zeros(values.shape, np.uint8), name="other")
    back.input_widgets["straightened"].value = other
    back.input_widgets["out_dir"].value = tmp_path / "bp_widget"
    back.inputs()
    assert other.metadata["soct_configuration"] == str(config.resolve())
    viewer.layers.selection = {painted}
    saved = viewer.layers.save(str(tmp_path / "saved" / "seg.zlib.tif"), selected=True, _writer=labels_writer)
    assert saved == [str(tmp_path / "saved" / "seg.zlib.tif"), str(tmp_path / "saved" / "seg-configuration.json")]
    assert json.loads((tmp_path / "saved" / "seg-configuration.json").read_text())["output_file_path"] == \
        "seg.zlib.tif"

    # The saved pairs backproject exactly as the originals do.
    painted_data = np.asarray(painted.data)
    reference = backproject_volume(ImageData(painted_data, (1.0,) * 3, "painted"), config, tmp_path / "bp_ref",
                                   write_ome_zarr=False)
    again = backproject_volume(tmp_path / "saved" / "seg.zlib.tif", tmp_path / "saved" / "seg-configuration.json",
                               tmp_path / "bp_saved", write_ome_zarr=False)
    expected = tifffile.imread(reference.tiff_path)
    assert set(np.unique(expected)) == {0, 3, 7} and expected.dtype == np.uint32
    assert again.offset_zyx == reference.offset_zyx
    assert np.array_equal(tifffile.imread(again.tiff_path), expected)
    reference = backproject_volume(tmp_path / "straight" / "v.tif", config, tmp_path / "bp_vref",
                                   write_ome_zarr=False)
    again = backproject_volume(tmp_path / "saved" / "vol.tif", tmp_path / "saved" / "vol-configuration.json",
                               tmp_path / "bp_vol", write_ome_zarr=False)
    np.testing.assert_array_equal(tifffile.imread(again.tiff_path), tifffile.imread(reference.tiff_path))

    # A straightened volume as per-slice TIFFs next to its configuration opens (lazily) with it attached.
    slices = tmp_path / "straight" / "v-slices"
    slices.mkdir()
    for i, plane in enumerate(values):
        tifffile.imwrite(slices / f"{i}.tif", plane)
    [opened] = viewer.open(str(slices), plugin="napari-soct")
    assert opened.metadata["soct_configuration"] == str(config)
    np.testing.assert_array_equal(np.asarray(opened.data), values)
    viewer.layers.selection = {opened}
    assert viewer.layers.save(str(tmp_path / "saved" / "from_folder.tif"), selected=True, _writer=image_writer)
    for layer in viewer.layers:  # the folder has no voxel size (pixels): show it alone
        layer.visible = layer is opened
    viewer.dims.ndisplay = 2
    viewer.reset_view()
    viewer.dims.set_point(0, len(values) // 2)
    _not_blank(viewer)
