"""Step 10 (common space) against the phantom's ground truth: placement, glitch/re-homing, excluded slices.

Placement is measured independently of the pipeline's own bookkeeping: the true phantom is evaluated on the
canvas grid of a common-space slice (stage mm of canvas pixels from ``canvas_origin_mm``) at the block depths
of the slice's planes (slice ``k`` plane ``p`` at ``k T + p dz``), averaged over planes 2-21 (below the cut
surface, above the partly cropped deepest planes) and phase-correlated (sub-pixel) with the slice's average
projection over the same planes, cropped to the slice's footprint. The only convention used is the known
global placement of the phantom: a tile's stage reading is its centre, so the stitched ``origin_mm`` (the
stage reading at pixel (0, 0)) is half a field of view from the sample position of that pixel - the same
constant for every slice.
"""

from __future__ import annotations

import json
import shutil
import tracemalloc

import numpy as np
import pytest
from skimage.registration import phase_cross_correlation

from napari_soct.pipeline.reconstruct import ReconstructParams, reconstruct
from napari_soct.processing.io.atomic import OutputExistsError
from napari_soct.processing.io.omezarr import create_ome_zarr_pyramid, open_ome_zarr
from napari_soct.processing.io.tables import (
    SliceConfigRow,
    SliceShift,
    read_shifts_xy,
    write_shifts_xy,
    write_slice_config,
)
from napari_soct.processing.preprocess import preprocess_acquisition
from napari_soct.processing.stack.common_space import (
    CommonSpaceParams,
    bring_to_common_space,
    read_common_space_csv,
)
from napari_soct.processing.stack.rehoming import detect_rehoming
from napari_soct.processing.synthetic import make_acquisition

PLANES = slice(2, 22)


def _chain(root, **overrides):
    acq = make_acquisition(root / "acq", preset="tiny", seed=0, n_slices=5, **overrides)
    preprocess_acquisition(acq.raw_dir, root / "mosaic", generate_previews=False)
    reconstruct(root / "mosaic", root / "rec", ReconstructParams(assemble=False))
    return acq, root / "mosaic", root / "rec" / "07_normalize"


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    return _chain(tmp_path_factory.mktemp("clean"))


@pytest.fixture(scope="module")
def injected(tmp_path_factory):
    root = tmp_path_factory.mktemp("injected")
    acq, mosaic, slices = _chain(root, encoder_glitch_slice=2, rehoming_slice=4)
    return acq, mosaic, slices, detect_rehoming(mosaic / "shifts_xy.csv", root / "rehoming")


def content_displacement_px(acq, path) -> np.ndarray:
    """Where the slice's content sits on the canvas relative to the truth, ``(y, x)`` pixels (see the module
    docstring)."""
    image = open_ome_zarr(path)
    soct = image.attributes["soct"]
    k = acq.slice_ids.index(soct["slice_id"])
    data = np.asarray(image.levels[0][PLANES], np.float32)
    ys, xs = np.nonzero((data > 0).all(axis=0))
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    py, px = acq.pixel_mm
    origin = np.array(soct["canvas_origin_mm"]) - np.array(acq.fov_mm[::-1]) / 2  # sample mm of pixel (0, 0)
    y = (origin[0] + np.arange(y0, y1) * py)[None, :, None]
    x = (origin[1] + np.arange(x0, x1) * px)[None, None, :]
    planes = np.arange(PLANES.start, PLANES.stop)
    depth = (k * acq.config.slice_thickness_um + planes * acq.voxel_size_um[0])[:, None, None] / 1000.0
    truth = acq.phantom.evaluate(x, y, depth).mean(axis=0)
    shift, _, _ = phase_cross_correlation(truth, data[:, y0:y1, x0:x1].mean(axis=0), upsample_factor=20)
    return -np.asarray(shift)  # truth(u) = aip(u - shift): the content is displaced by -shift


def errors(acq, result) -> dict[int, np.ndarray]:
    return {sid: content_displacement_px(acq, p) for sid, p in result.outputs.items()}


def canvas_positions_px(result) -> dict[int, np.ndarray]:
    """Exact (unrounded) placement of each slice's pixel (0, 0) in stage pixels: canvas origin + offset + residual."""
    origin = np.array(result.canvas_origin_mm) / 0.01
    return {s: origin + np.array(result.offsets_px[s]) + np.array(result.residuals_px[s]) for s in result.outputs}


def test_slices_on_one_canvas_at_their_true_positions(clean, tmp_path):
    acq, mosaic, slices = clean
    result = bring_to_common_space(slices, mosaic / "shifts_xy.csv", tmp_path / "common")
    canvas = result.canvas_shape
    found = errors(acq, result)
    print("placement error (y, x) px:", {s: [round(float(v), 2) for v in e] for s, e in found.items()})
    for sid, error in found.items():
        assert np.hypot(*error) <= 1.0, (sid, error)

    offsets = np.array([result.offsets_px[s] for s in sorted(result.outputs)])
    extents = np.array([result.offsets_px[s] + np.array(open_ome_zarr(slices / f"slice_z{s:02d}_normalize.ome.zarr")
                        .levels[0].shape[1:]) for s in sorted(result.outputs)])
    assert offsets.min(axis=0).tolist() == [0, 0]  # the canvas is the bounding box of the placed slices
    assert extents.max(axis=0).tolist() == list(canvas)
    table = read_common_space_csv(result.csv_path)
    for sid, path in result.outputs.items():
        source = open_ome_zarr(slices / f"slice_z{sid:02d}_normalize.ome.zarr")
        out = open_ome_zarr(path)
        soct = out.attributes["soct"]
        data = np.asarray(out.levels[0][...])
        assert data.shape == (source.shape[0], *canvas)
        (oy, ox), (_, ny, nx) = result.offsets_px[sid], source.shape
        np.testing.assert_array_equal(data[:, oy:oy + ny, ox:ox + nx], source.levels[0][...])  # painted as is
        data[:, oy:oy + ny, ox:ox + nx] = 0
        assert not data.any()  # nothing outside the slice
        # no correction: every slice lands exactly at its stitched origin
        stitched = np.array(source.attributes["soct"]["origin_mm"])
        np.testing.assert_allclose(np.array(result.canvas_origin_mm) + np.array([oy, ox]) * 0.01, stitched, atol=1e-9)
        assert soct["canvas_origin_mm"] == soct["origin_mm"] == list(result.canvas_origin_mm)
        assert soct["offset_px"] == [oy, ox] and soct["position_source"] == "motor"
        assert table[sid] == {"offset_px": (oy, ox), "residual_px": (0.0, 0.0), "position_source": "motor"}
        assert soct["voxel_size_um"] == source.attributes["soct"]["voxel_size_um"]
    metrics = json.loads(result.metrics_path.read_text())
    assert metrics["canvas"]["shape_yx"] == list(canvas) and len(metrics["steps"]) == 4
    assert set(metrics["slices"]) == {str(s) for s in acq.slice_ids}


def test_encoder_glitch_corrected_and_rehoming_jump_kept(injected, tmp_path):
    acq, mosaic, slices, rehoming = injected
    assert [d.kind for d in rehoming.decisions] == ["ordinary", "glitch", "glitch", "rehoming"]

    raw = bring_to_common_space(slices, mosaic / "shifts_xy.csv", tmp_path / "raw")
    raw_err = errors(acq, raw)
    glitch_px = np.array(acq.config.encoder_glitch_mm[::-1]) / 0.01  # (y, x): 30 px along x
    np.testing.assert_allclose(raw_err[2], glitch_px, atol=1.0)  # placed where the glitched encoder said
    for sid in (0, 1, 3, 4):
        assert np.hypot(*raw_err[sid]) <= 1.0, (sid, raw_err[sid])

    # Cleaned shifts: the glitch pair is replaced by its mean (step 9), which keeps every other slice exact and
    # puts the glitched slice halfway: off by half the difference of its two true drift steps.
    cleaned = bring_to_common_space(slices, rehoming.shifts_path, tmp_path / "cleaned")
    cleaned_err = errors(acq, cleaned)
    drift = np.array([acq.stage_drift_mm(s) for s in acq.slice_ids])[:, ::-1] / 0.01  # (y, x) px
    halfway = np.abs((drift[3] - drift[2]) - (drift[2] - drift[1])) / 2
    assert np.all(np.abs(cleaned_err[2]) <= halfway + 0.5), (cleaned_err[2], halfway)
    for sid in (0, 1, 3, 4):
        assert np.hypot(*cleaned_err[sid]) <= 1.0, (sid, cleaned_err[sid])

    # With the image refinement of the unreliable steps, every slice is within 1 px, the glitched one too.
    refined = bring_to_common_space(slices, rehoming.shifts_path, tmp_path / "refined",
                                    CommonSpaceParams(refine_unreliable=True))
    refined_err = errors(acq, refined)
    print("placement error (y, x) px, raw:", {s: [round(float(v), 2) for v in e] for s, e in raw_err.items()},
          "cleaned:", {s: [round(float(v), 2) for v in e] for s, e in cleaned_err.items()},
          "refined:", {s: [round(float(v), 2) for v in e] for s, e in refined_err.items()})
    for sid, error in refined_err.items():
        assert np.hypot(*error) <= 1.0, (sid, error)
    assert [p.source for p in refined.steps] == ["motor", "refined", "refined", "refined"]
    assert refined.position_sources == {0: "motor", 1: "motor", 2: "refined", 3: "refined", 4: "refined"}
    assert all(p.refinement["ncc"] > 0.9 for p in refined.steps[1:])

    # The re-homing jump is kept: slice 4 sits the jump (plus its drift step) away from slice 3.
    jump_px = np.array(acq.config.rehoming_mm[::-1]) / 0.01
    for result in (raw, cleaned, refined):
        pos = canvas_positions_px(result)
        np.testing.assert_allclose(pos[4] - pos[3], jump_px + drift[4] - drift[3], atol=1.0)


def _steps_px(mosaic) -> dict[tuple[int, int], np.ndarray]:
    return {(s.fixed_id, s.moving_id): np.array([s.y_shift_mm, s.x_shift_mm]) / 0.01
            for s in read_shifts_xy(mosaic / "shifts_xy.csv")}


def test_excluded_slice_modes(clean, tmp_path):
    """Slice 1 excluded: steps 0->1 and 1->2 are replaced, slice 0 (the anchor) stays, later slices follow."""
    acq, mosaic, slices = clean
    config = tmp_path / "slice_config.csv"
    write_slice_config(config, [SliceConfigRow(slice_id=s, use=s != 1) for s in acq.slice_ids])
    steps = _steps_px(mosaic)
    run = {mode: bring_to_common_space(slices, mosaic / "shifts_xy.csv", tmp_path / mode,
                                       CommonSpaceParams(excluded_slice_mode=mode, median_window=1),
                                       slice_config=config)
           for mode in ("keep", "local_median", "median", "zero")}
    plain = bring_to_common_space(slices, mosaic / "shifts_xy.csv", tmp_path / "plain")
    keep = canvas_positions_px(run["keep"])
    for sid, p in canvas_positions_px(plain).items():
        np.testing.assert_allclose(keep[sid], p, atol=1e-9)
    assert set(run["keep"].position_sources.values()) == {"motor"}
    # the documented replacement of the two touched steps (usable steps: 2->3 and 3->4)
    expected = {"local_median": steps[(2, 3)],  # window 1: the nearest usable step (after both)
                "median": np.median([steps[(2, 3)], steps[(3, 4)]], axis=0),
                "zero": np.zeros(2)}
    for mode, replacement in expected.items():
        pos = canvas_positions_px(run[mode])
        moved = {s: pos[s] - keep[s] for s in pos}
        np.testing.assert_allclose(moved[0], 0, atol=1e-9)
        np.testing.assert_allclose(moved[1], replacement - steps[(0, 1)], atol=1e-6)
        for sid in (2, 3, 4):
            np.testing.assert_allclose(moved[sid], 2 * replacement - steps[(0, 1)] - steps[(1, 2)], atol=1e-6)
        assert run[mode].position_sources == {0: "motor", 1: mode, 2: mode, 3: "motor", 4: "motor"}
        assert [p.source for p in run[mode].steps] == [mode, mode, "motor", "motor"]

    # The anchor is the first used slice: with slice 0 excluded (as preprocessing marks the calibration
    # slice), the used slices keep their stitched origins and only slice 0 moves.
    write_slice_config(config, [SliceConfigRow(slice_id=s, use=s != 0) for s in acq.slice_ids], if_exists="overwrite")
    first_out = bring_to_common_space(slices, mosaic / "shifts_xy.csv", tmp_path / "first_out", slice_config=config)
    pos = canvas_positions_px(first_out)
    for sid in (1, 2, 3, 4):
        np.testing.assert_allclose(pos[sid] - keep[sid], 0, atol=1e-9)
    assert first_out.position_sources[0] == "local_median"


def test_bad_inputs_are_named(clean, tmp_path):
    acq, mosaic, slices = clean
    shifts = read_shifts_xy(mosaic / "shifts_xy.csv")
    short = tmp_path / "short" / "shifts_xy.csv"
    short.parent.mkdir()
    write_shifts_xy(short, shifts[:-1])
    with pytest.raises(ValueError, match=r"no shift for slice\(s\) 4"):
        bring_to_common_space(slices, short, tmp_path / "out")
    broken = tmp_path / "broken" / "shifts_xy.csv"
    broken.parent.mkdir()
    write_shifts_xy(broken, [shifts[0], SliceShift(7, 2, 0, 0, 0.0, 0.0), *shifts[2:]])
    with pytest.raises(ValueError, match="do not form a chain"):
        bring_to_common_space(slices, broken, tmp_path / "out")
    cleaned = tmp_path / "cleaned" / "shifts_xy_clean.csv"
    cleaned.parent.mkdir()
    shutil.copy(mosaic / "shifts_xy.csv", cleaned)
    with pytest.raises(ValueError, match="raw_shifts_csv"):
        bring_to_common_space(slices, cleaned, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="slice_config"):
        bring_to_common_space(slices, mosaic / "shifts_xy.csv", tmp_path / "out", slice_config=tmp_path / "nope.csv")

    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for sid in (0, 1):
        shutil.copytree(slices / f"slice_z{sid:02d}_normalize.ome.zarr", mixed / f"slice_z{sid:02d}_normalize.ome.zarr")
    meta_path = mixed / "slice_z01_normalize.ome.zarr" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["attributes"]["soct"]["voxel_size_um"] = [10.0, 12.0, 12.0]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"voxel sizes differ: slice_z01_normalize.ome.zarr has \[10.0, 12.0, 12.0\]"):
        bring_to_common_space(mixed, mosaic / "shifts_xy.csv", tmp_path / "out")
    assert not (tmp_path / "out").exists()

    first = bring_to_common_space(slices, mosaic / "shifts_xy.csv", tmp_path / "twice")
    with pytest.raises(OutputExistsError):
        bring_to_common_space(slices, mosaic / "shifts_xy.csv", tmp_path / "twice")
    kept = bring_to_common_space(slices, mosaic / "shifts_xy.csv", tmp_path / "twice",
                                 CommonSpaceParams(if_exists="skip"))
    assert kept.skipped == sorted(first.outputs) and kept.offsets_px == first.offsets_px


def test_streams_slices_larger_than_the_memory_budget(tmp_path):
    """Two 33.5 MB slices painted with a 12 MiB budget: traced peak below the budget, content exact."""
    rng = np.random.default_rng(0)
    shape = (32, 512, 512)
    source = tmp_path / "slices"
    volumes = {}
    for sid, origin in ((0, (5.0, 7.0)), (1, (5.0 + 0.37, 7.0 - 1.21))):
        data = rng.random(shape, dtype=np.float32) + 0.1
        writer = create_ome_zarr_pyramid(source / f"slice_z{sid:02d}_normalize.ome.zarr", shape, (0.01,) * 3,
                                         chunks=(16, 128, 128), n_levels=1,
                                         attributes={"soct": {"slice_id": sid, "voxel_size_um": [10.0, 10.0, 10.0],
                                                              "origin_mm": list(origin),
                                                              "stage_z_mm": 1.0 + 0.15 * sid}})
        writer.write((slice(None),) * 3, data)
        volumes[sid] = data
    shifts = tmp_path / "shifts_xy.csv"
    write_shifts_xy(shifts, [SliceShift(0, 1, -121.0, 37.0, -1.21, 0.37)])
    budget_gb = 12 / 1024
    tracemalloc.start()
    try:
        result = bring_to_common_space(source, shifts, tmp_path / "common",
                                       CommonSpaceParams(memory_budget_gb=budget_gb, workers=2))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    print(f"traced peak {peak / 2**20:.1f} MiB for a {budget_gb * 1024:.0f} MiB budget, slices of "
          f"{volumes[0].nbytes / 2**20:.1f} MiB")
    assert peak < budget_gb * 2**30
    assert result.canvas_shape == (512 + 37, 512 + 121)
    for sid, data in volumes.items():
        (oy, ox) = result.offsets_px[sid]
        out = open_ome_zarr(result.outputs[sid]).levels[0]
        np.testing.assert_array_equal(out[:, oy:oy + 512, ox:ox + 512], data)


@pytest.mark.gui
def test_common_space_widget_shows_the_aligned_slices(make_napari_viewer, qtbot, clean, tmp_path):
    pytest.importorskip("napari")
    acq, mosaic, slices = clean
    viewer = make_napari_viewer(show=True)
    _, widget = viewer.window.add_plugin_dock_widget("napari-soct", "10. Common space")
    widget.input_widgets["source"].value = slices
    widget.input_widgets["shifts_csv"].value = mosaic / "shifts_xy.csv"
    widget.input_widgets["out_dir"].value = tmp_path / "common"
    widget.param_widgets["slice_config"].value = str(mosaic / "slice_config.csv")
    assert widget.start() is not None
    qtbot.waitUntil(lambda: widget.run_button.enabled, timeout=60_000)
    assert widget.status.value.startswith("common-space: 5 slice(s) written"), widget.status.value
    (layer,) = viewer.layers
    table = read_common_space_csv(tmp_path / "common" / "common_space.csv")
    assert layer.data.shape == (5, 32, *widget.result.canvas_shape)
    assert table[0]["position_source"] == "local_median"  # slice 0 is the calibration slice (use=false)
    np.testing.assert_array_equal(np.asarray(layer.data[2]),
                                  open_ome_zarr(widget.result.outputs[2]).levels[0][...])
    viewer.dims.set_point(1, 10 * 0.01)
    gray = viewer.screenshot(canvas_only=True, flash=False)[..., :3].mean(axis=-1)
    assert gray.std() > 5
