"""GUI tests of the in-slice reconstruction widgets (steps 1 to 7) on the tiny phantom (real viewer, shown, under
Xvfb): each widget takes its input from a layer or a folder, runs in a thread worker, and adds its result with
the physical scale of its input; stitching and illumination add the per-tile QC as shapes with the metrics in
the features table. The figures checked here are the step's own, against the phantom's truth, at the looser
tolerances of one run (the tight ones are in test_stitch.py, test_illumination.py and test_corrections.py).
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import true_surface_in_mosaic
from napari_soct.processing.correct._slice_io import sample_pixels
from napari_soct.processing.correct.intensity import axial_profile
from napari_soct.processing.correct.interface import detect_interface
from napari_soct.processing.io.mosaic import open_mosaic_grid
from napari_soct.processing.io.omezarr import open_ome_zarr
from napari_soct.processing.preprocess import preprocess_acquisition
from napari_soct.processing.stitch import StitchParams, stitch_slices

napari = pytest.importorskip("napari")


@pytest.fixture(scope="module")
def mosaic_dir(tiny_acquisition, tmp_path_factory):
    out = tmp_path_factory.mktemp("mosaics")
    preprocess_acquisition(tiny_acquisition.raw_dir, out, generate_previews=False)
    return out


@pytest.fixture(scope="module")
def stitched_dir(mosaic_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("stitched")
    stitch_slices(mosaic_dir, out, StitchParams())
    return out


def _not_blank(viewer):
    gray = viewer.screenshot(canvas_only=True, flash=False)[..., :3].astype(float).mean(axis=-1)
    assert gray.std() > 5, "screenshot is blank"


def _extent_mm(layer) -> np.ndarray:
    """Physical size (mm) of a layer's last three axes."""
    return np.asarray(layer.data.shape[-3:] if not layer.multiscale else layer.data[0].shape[-3:]) * layer.scale[-3:]


def _open_and_run(make_napari_viewer, qtbot, title, shown, out_dir, *, source=None, **params):
    """A shown viewer with the image ``shown`` open ("before"), the widget ``title`` docked, its input taken from
    that layer (or ``source``, a folder), run to the end; returns ``(viewer, widget)``."""
    viewer = make_napari_viewer(show=True)
    viewer.open(shown, plugin="napari-soct")
    _, widget = viewer.window.add_plugin_dock_widget("napari-soct", title)
    if source is None:
        widget.layer_pickers["source"].value = shown
    else:
        widget.input_widgets["source"].value = source
    widget.input_widgets["out_dir"].value = out_dir
    for name, value in params.items():
        widget.param_widgets[name].value = value
    _run(widget, qtbot)
    return viewer, widget


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
    # A folder as input: the widget shows it ("before") under the result, on the same physical grid.
    before, after = viewer.layers
    assert before.name == f"normalize input: {mosaic_dir.name}" and after.name == "normalize: norm"
    assert before.data.shape == after.data.shape and tuple(before.scale) == tuple(after.scale)
    assert before.metadata["sources"] == [str(p) for p in sorted(mosaic_dir.glob("mosaic_grid_3d_z*.ome.zarr"))]


def test_resample_widget_keeps_the_physical_extent(make_napari_viewer, qtbot, mosaic_dir, tmp_path):
    source = mosaic_dir / "mosaic_grid_3d_z00.ome.zarr"
    viewer, _ = _open_and_run(make_napari_viewer, qtbot, "1. Resample mosaic grids", source, tmp_path / "resample",
                              resolution_um=20.0)
    before, after = viewer.layers
    assert after.name == "slice_z00_resample.ome.zarr"  # not the temporary it was written under
    assert tuple(after.scale) == pytest.approx((0.02, 0.02, 0.02))
    np.testing.assert_allclose(_extent_mm(after), _extent_mm(before), atol=0.02)  # within one new voxel
    src, dst = open_mosaic_grid(source), open_mosaic_grid(tmp_path / "resample" / "slice_z00_resample.ome.zarr")
    for x, y in src.tile_positions():  # anti-aliased: every tile keeps its mean
        assert dst.read_tile(x, y).mean() == pytest.approx(src.read_tile(x, y).mean(), rel=0.03)
    _not_blank(viewer)


def test_curvature_widget_flattens_the_true_surface(make_napari_viewer, qtbot, curved_cut, tmp_path):
    acq, mosaics = curved_cut
    sid = acq.slice_ids[1]
    viewer, _ = _open_and_run(make_napari_viewer, qtbot, "2. Focal curvature",
                              mosaics / f"mosaic_grid_3d_z{sid:02d}.ome.zarr", tmp_path / "curvature", source=mosaics)
    before, after = viewer.layers
    assert after.data.shape[0] == len(acq.slice_ids)  # every slice of the folder, as one stack
    assert tuple(after.scale[-3:]) == pytest.approx(tuple(before.scale))
    # The phantom's surface, where each tile imaged it, against the surface found in the output.
    grid = open_mosaic_grid(tmp_path / "curvature" / f"slice_z{sid:02d}_curvature.ome.zarr")
    truth = true_surface_in_mosaic(acq, sid, grid)
    depth, strength = detect_interface(grid.array[...])
    tissue = np.isfinite(truth) & (strength > 0.1 * np.percentile(strength, 99.5))
    spread = [np.percentile(v[tissue], 95) - np.percentile(v[tissue], 5) for v in (truth, depth)]
    assert spread[0] > 2.0 and spread[1] < 0.5 * spread[0], spread
    _not_blank(viewer)


def _qc_layers_of_a_folder_run(make_napari_viewer, qtbot, acq, mosaic_dir, title, out_dir):
    """Run a step with a tile QC on every slice of ``mosaic_dir``: ``(viewer, widget, qc layers)``, checking
    the result's scale and one QC layer per slice (the first one visible)."""
    viewer, widget = _open_and_run(make_napari_viewer, qtbot, title, mosaic_dir / "mosaic_grid_3d_z00.ome.zarr",
                                   out_dir, source=mosaic_dir)
    before, after, *qc = viewer.layers
    assert tuple(after.scale[-3:]) == pytest.approx(tuple(before.scale))
    assert [layer.name for layer in qc] == [f"{widget.step.name} QC z{s:02d}" for s in acq.slice_ids]
    assert [layer.visible for layer in qc] == [True] + [False] * (len(qc) - 1)
    for sid, layer in zip(acq.slice_ids, qc):
        assert isinstance(layer, napari.layers.Shapes) and len(layer.data) == len(acq.tiles(sid))
    return viewer, widget, qc


def test_illumination_widget_estimates_the_vignetting_and_shows_tile_qc(
    make_napari_viewer, qtbot, tiny_acquisition, mosaic_dir, tmp_path
):
    acq = tiny_acquisition
    viewer, widget, qc = _qc_layers_of_a_folder_run(make_napari_viewer, qtbot, acq, mosaic_dir,
                                                    "3. Illumination (BaSiC)", tmp_path / "illumination")
    ty, tx = acq.tile_shape[1:]
    for sid, layer in zip(acq.slice_ids, qc):
        assert {"grid_x", "grid_y", "residual", "baseline"} <= set(layer.features.columns)
        # one rectangle per tile, where the mosaic grid holds that tile
        for gx, gy, rect in zip(layer.features["grid_x"], layer.features["grid_y"], layer.data):
            assert rect.min(axis=0) == pytest.approx((gy * ty, gx * tx))
        fields = np.load(widget.result.metrics[sid]["flatfield_path"])
        deepest = acq.interface_range_samples(sid)[1]
        corr = [np.corrcoef(fields[z].ravel(), acq.flatfield.ravel())[0, 1]
                for z in range(int(np.ceil(deepest)) + 1, acq.config.n_z)]
        assert np.mean(corr) >= 0.8  # tiny has too few tiles for 0.98 (test_illumination.py)
    _not_blank(viewer)


def test_stitch_widget_places_tiles_and_colours_them_by_their_metrics(
    make_napari_viewer, qtbot, tiny_acquisition, mosaic_dir, tmp_path
):
    acq = tiny_acquisition
    viewer, _, qc = _qc_layers_of_a_folder_run(make_napari_viewer, qtbot, acq, mosaic_dir, "4. Stitch tiles",
                                               tmp_path / "stitch")
    for sid, layer in zip(acq.slice_ids, qc):
        assert {"overlap_ncc", "residual_px", "pairs_used"} <= set(layer.features.columns)
        # The rectangles are where the tiles were placed: the true positions up to the slice's translation.
        corners = np.array([rect.min(axis=0) for rect in layer.data])
        truth = np.array([acq.true_tile_position_px(sid, x, y)
                          for x, y in zip(layer.features["grid_x"], layer.features["grid_y"])])
        error = corners - truth
        error -= error.mean(axis=0)
        assert np.sqrt((error**2).sum(axis=1).mean()) <= 0.5
        assert np.all(layer.features["overlap_ncc"] > 0.3)
        # edges coloured by the first metric: tiles that differ in it differ in colour
        ncc = np.asarray(layer.features["overlap_ncc"])
        assert not np.allclose(layer.edge_color[np.argmin(ncc)], layer.edge_color[np.argmax(ncc)])
    stitched = open_ome_zarr(tmp_path / "stitch" / "slice_z00_stitch.ome.zarr").levels[0]
    assert stitched.shape[1] > 2.5 * acq.tile_shape[1]  # one canvas, tiles overlapping
    _not_blank(viewer)


def test_beam_widget_flattens_the_tissue_profile(make_napari_viewer, qtbot, stitched_dir, tmp_path):
    source = stitched_dir / "slice_z01_stitch.ome.zarr"
    viewer, widget = _open_and_run(make_napari_viewer, qtbot, "5. Beam profile", source, tmp_path / "beam")
    before, after = viewer.layers
    assert tuple(after.scale) == pytest.approx(tuple(before.scale))
    surface = widget.result.metrics[1]["surface_depth_samples"]
    deep = slice(surface + 3, None)
    written = open_ome_zarr(tmp_path / "beam" / "slice_z01_beam.ome.zarr").levels[0]
    _, profile_before = axial_profile(sample_pixels(open_ome_zarr(source).levels[0]))
    _, profile_after = axial_profile(sample_pixels(written))
    assert profile_before[deep].max() / profile_before[deep].min() > 1.5  # attenuation and focus
    assert profile_after[deep].max() / profile_after[deep].min() < 1.25
    _not_blank(viewer)
