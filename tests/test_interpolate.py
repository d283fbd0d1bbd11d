"""Step 11 (zmorph interpolation) against the phantom's ground truth: a removed slice filled, gates, gaps.

The truth of a slot ``k`` is the phantom evaluated on the common canvas (stage mm of canvas pixels from
``canvas_origin_mm``, minus half a field of view: a tile's stage reading is its centre) at the block depths
``k T + p dz`` of the slot's planes ``p``; we compare the planes that lie inside the missing cut,
``[k T, (k + 1) T)``.
"""

from __future__ import annotations

import json
import shutil
import tracemalloc

import numpy as np
import pytest

from napari_soct.pipeline.reconstruct import ReconstructParams, reconstruct
from napari_soct.processing.io.omezarr import create_ome_zarr_pyramid, open_ome_zarr
from napari_soct.processing.io.tables import SliceConfigRow, read_slice_config, write_slice_config
from napari_soct.processing.preprocess import preprocess_acquisition
from napari_soct.processing.stack import interpolate as zmorph
from napari_soct.processing.stack.common_space import bring_to_common_space
from napari_soct.processing.stack.interpolate import (
    InterpolationParams,
    fractional_affine,
    interpolate_missing_slices,
)
from napari_soct.processing.synthetic import make_acquisition


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """The tiny phantom reconstructed, and common spaces of all slices, without slice 2, without 2 and 3."""
    root = tmp_path_factory.mktemp("zmorph")
    acq = make_acquisition(root / "acq", preset="tiny", seed=0, n_slices=5)
    preprocess_acquisition(acq.raw_dir, root / "mosaic", generate_previews=False)
    reconstruct(root / "mosaic", root / "rec", ReconstructParams(assemble=False))
    shifts = root / "mosaic" / "shifts_xy.csv"
    common = {}
    for name, removed in (("all", ()), ("gap", (2,)), ("gap2", (2, 3))):
        slices = root / f"slices_{name}"
        shutil.copytree(root / "rec" / "07_normalize", slices)
        for sid in removed:  # as if the slice had never been imaged
            shutil.rmtree(slices / f"slice_z{sid:02d}_normalize.ome.zarr")
        common[name] = bring_to_common_space(slices, shifts, root / f"common_{name}").out_dir
    return acq, root, common


def truth_of_slot(acq, path, k, planes):
    """The phantom on the canvas of ``path`` at the block depths of slot ``k``'s ``planes``."""
    image = open_ome_zarr(path)
    _, ny, nx = image.shape
    origin = np.array(image.attributes["soct"]["canvas_origin_mm"]) - np.array(acq.fov_mm[::-1]) / 2
    py, px = acq.pixel_mm
    y = (origin[0] + np.arange(ny) * py)[None, :, None]
    x = (origin[1] + np.arange(nx) * px)[None, None, :]
    depth = (k * acq.config.slice_thickness_um + np.asarray(planes) * acq.voxel_size_um[0])[:, None, None] / 1000
    return acq.phantom.evaluate(x, y, depth)


def ncc(a, b, mask) -> float:
    x, y = a[mask] - a[mask].mean(), b[mask] - b[mask].mean()
    return float((x * y).sum() / np.sqrt((x * x).sum() * (y * y).sum()))


def slot_scores(acq, path, k, upper=None):
    """NCC against the truth over the cut's planes: over the sample (all voxels with data), over tissue only
    (truth above midway between agarose and tissue levels), and over the morphed voxels only (no real plane of
    the upper neighbour there; ``upper`` = its common-space file)."""
    t = round(acq.config.slice_thickness_um / acq.voxel_size_um[0])
    planes = np.arange(t)
    data = np.asarray(open_ome_zarr(path).levels[0][:t], np.float32)
    truth = truth_of_slot(acq, path, k, planes)
    sample = data > 0
    tissue = sample & (truth > (acq.config.tissue_level + acq.config.agarose_level) / 2)
    scores = {"sample": ncc(data, truth, sample), "tissue": ncc(data, truth, tissue)}
    if upper is not None:
        real = np.asarray(open_ome_zarr(upper).levels[0][t:2 * t], np.float32) > 0
        real = np.concatenate([real, np.zeros((t - len(real), *real.shape[1:]), bool)])
        morphed = sample & ~real
        scores.update({"morphed": ncc(data, truth, morphed), "morphed_voxels": int(morphed.sum())})
    return scores


def test_removed_slice_is_filled_like_the_truth(chain, tmp_path):
    acq, root, common = chain
    result = interpolate_missing_slices(common["gap"], tmp_path / "interp")
    assert list(result.outputs) == [2] and result.failed == []
    path = result.outputs[2]
    upper = common["gap"] / "slice_z01_common.ome.zarr"
    lower = common["gap"] / "slice_z03_common.ome.zarr"
    filled = open_ome_zarr(path)
    soct = filled.attributes["soct"]
    assert filled.shape == open_ome_zarr(upper).shape and soct["slice_id"] == 2 and soct["interpolated"] is True
    assert soct["canvas_origin_mm"] == open_ome_zarr(upper).attributes["soct"]["canvas_origin_mm"]
    record = soct["interpolation"]
    t = record["slice_thickness_planes"]
    assert t == 15 and record["method"] == "zmorph"
    alphas = record["alphas"]
    assert alphas == sorted(alphas) and all(0 < a < 1 for a in alphas)

    # Geometry: where the upper neighbour imaged the depth, its real planes; deeper, the lower neighbour's.
    data = np.asarray(filled.levels[0][...])
    up = np.asarray(open_ome_zarr(upper).levels[0][...])
    low = np.asarray(open_ome_zarr(lower).levels[0][...])
    real_up = up[t:] > 0
    np.testing.assert_array_equal(data[:len(real_up)][real_up], up[t:][real_up])
    deep = np.arange(record["morph_planes"][-1] + 1, data.shape[0])
    from_low = (low[deep - t] > 0) & ~np.pad(real_up, ((0, data.shape[0] - len(real_up)), (0, 0), (0, 0)))[deep]
    np.testing.assert_array_equal(data[deep][from_low], low[deep - t][from_low])

    scores = slot_scores(acq, path, 2, upper)
    reference = slot_scores(acq, root / "common_all" / "slice_z02_common.ome.zarr", 2)
    print(f"slot 2 vs truth, planes [2T, 3T): NCC over the sample {scores['sample']:.3f} (the real slice 2: "
          f"{reference['sample']:.3f}), over tissue only {scores['tissue']:.3f} (real: {reference['tissue']:.3f}), "
          f"morphed voxels only ({scores['morphed_voxels']}) {scores['morphed']:.3f}")
    assert scores["sample"] >= 0.8
    assert scores["morphed"] >= 0.8 and scores["morphed_voxels"] > 10_000
    assert scores["tissue"] >= reference["tissue"] - 0.05  # speckle limits both over tissue alone

    rows = {r.slice_id: r for r in read_slice_config(result.slice_config_path)}
    assert sorted(rows) == [0, 1, 2, 3, 4]
    assert rows[2].interpolated is True and rows[2].interpolation_failed is False
    assert rows[2].interpolation_method_used == "zmorph" and rows[2].use is False and rows[2].notes == "missing"
    assert rows[1].interpolated is None
    metrics = json.loads(result.metrics_path.read_text())
    assert metrics["slots"]["2"]["ncc_after"] >= metrics["slots"]["2"]["ncc_before"] - 0.02


def test_failed_gates_leave_a_gap(chain, tmp_path):
    acq, root, common = chain
    out = tmp_path / "interp"
    first = interpolate_missing_slices(common["gap"], out)
    assert first.outputs
    for params, why in ((InterpolationParams(min_overlap_correlation=1.01, if_exists="overwrite"),
                         "min_overlap_correlation"),
                        (InterpolationParams(min_ncc_improvement=1.0, if_exists="overwrite"), "min_ncc_improvement")):
        result = interpolate_missing_slices(common["gap"], out, params)
        assert result.outputs == {} and result.failed == [2]
        assert not (out / "slice_z02_interpolated.ome.zarr").exists()  # the earlier fill is gone too
        assert not [p for p in out.iterdir() if p.name.startswith(".")]
        row = {r.slice_id: r for r in read_slice_config(result.slice_config_path)}[2]
        assert row.interpolated is False and row.interpolation_failed is True
        assert why in row.interpolation_fallback_reason


def test_degenerate_or_failed_registration_is_a_gate(chain, tmp_path, monkeypatch):
    acq, root, common = chain
    monkeypatch.setattr(zmorph, "_register", lambda before, after, params: np.diag([1.0, -1.0, 1.0]))
    result = interpolate_missing_slices(common["gap"], tmp_path / "mirror")
    assert result.outputs == {} and "det(M)" in result.decisions[2].reason

    def broken(before, after, params):
        raise RuntimeError("Exception thrown in SimpleITK ImageRegistrationMethod_Execute: too many samples outside")

    monkeypatch.setattr(zmorph, "_register", broken)
    result = interpolate_missing_slices(common["gap"], tmp_path / "broken")
    assert result.outputs == {} and result.decisions[2].reason.startswith("registration error")


def test_excluded_slice_filled_long_gap_not(chain, tmp_path):
    acq, root, common = chain
    config = tmp_path / "slice_config.csv"
    write_slice_config(config, [SliceConfigRow(slice_id=s, use=s not in (0, 2)) for s in acq.slice_ids])
    result = interpolate_missing_slices(common["all"], tmp_path / "excluded", slice_config=config)
    assert list(result.outputs) == [2] and result.decisions[2].kind == "excluded"
    assert slot_scores(acq, result.outputs[2], 2)["sample"] >= 0.8
    rows = {r.slice_id: r for r in read_slice_config(result.slice_config_path)}
    assert rows[2].interpolated is True and rows[2].use is False  # the manual exclusion is kept
    assert rows[0].interpolated is False and rows[0].interpolation_failed is None
    assert "usable neighbours" in rows[0].interpolation_fallback_reason

    result = interpolate_missing_slices(common["gap2"], tmp_path / "gap2")
    assert result.outputs == {} and not list((tmp_path / "gap2").glob("*.ome.zarr"))
    rows = {r.slice_id: r for r in read_slice_config(result.slice_config_path)}
    for sid in (2, 3):
        assert rows[sid].interpolated is False and rows[sid].use is False
        assert "gap of 2 consecutive slices" in rows[sid].interpolation_fallback_reason


def test_fractional_affine_powers():
    rng = np.random.default_rng(1)
    m = np.eye(3)
    m[:2, :2] += 0.05 * rng.normal(size=(2, 2))
    m[:2, 2] = (3.0, -2.0)
    half, imag = fractional_affine(m, 0.5)
    np.testing.assert_allclose(half @ half, m, atol=1e-10)
    assert imag < 1e-8
    third, _ = fractional_affine(m, -1 / 3)
    np.testing.assert_allclose(np.linalg.matrix_power(third, -3), m, atol=1e-10)
    shift = np.eye(3)
    shift[:2, 2] = (4.0, 1.0)  # pure translation: I - M singular, exact alpha * t
    np.testing.assert_allclose(fractional_affine(shift, 0.25)[0][:2, 2], (1.0, 0.25), atol=1e-10)


def test_bad_inputs_are_named(chain, tmp_path):
    acq, root, common = chain
    with pytest.raises(ValueError, match="no canvas_origin_mm"):
        interpolate_missing_slices(root / "rec" / "07_normalize", tmp_path / "out")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    shutil.copytree(common["all"] / "slice_z01_common.ome.zarr", mixed / "slice_z01_common.ome.zarr")
    shutil.copytree(common["gap2"] / "slice_z04_common.ome.zarr", mixed / "slice_z04_common.ome.zarr")
    meta_path = mixed / "slice_z04_common.ome.zarr" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["attributes"]["soct"]["canvas_origin_mm"] = [0.0, 0.0]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="slice_z04_common.ome.zarr has canvas origin"):
        interpolate_missing_slices(mixed, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="slice_config"):
        interpolate_missing_slices(common["gap"], tmp_path / "out", slice_config=tmp_path / "none.csv")


def test_streams_a_slot_larger_than_the_memory_budget(tmp_path):
    """A 32 MiB slot filled under a 12 MiB budget (registration on a coarser level): traced peak below it."""
    rng = np.random.default_rng(0)
    from scipy.ndimage import gaussian_filter

    texture = gaussian_filter(rng.random((60, 512, 512), dtype=np.float32), (2, 3, 3)) * 10 + 0.5
    source = tmp_path / "common"
    for sid, top in ((0, 0), (2, 30)):  # neighbours of slot 1, T = 15 planes: slice 2 starts 30 planes down
        data = texture[top:top + 30]
        writer = create_ome_zarr_pyramid(source / f"slice_z{sid:02d}_common.ome.zarr", (30, 512, 512), (0.01,) * 3,
                                         chunks=(16, 128, 128), n_levels=2,
                                         attributes={"soct": {"slice_id": sid, "canvas_origin_mm": [1.0, 2.0],
                                                              "voxel_size_um": [10.0, 10.0, 10.0],
                                                              "stage_z_mm": 0.15 * sid}})
        writer.write((slice(None),) * 3, data)
    budget_gb = 12 / 1024
    tracemalloc.start()
    try:
        result = interpolate_missing_slices(source, tmp_path / "interp", InterpolationParams(
            memory_budget_gb=budget_gb, registration_max_size_px=256, workers=1))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    print(f"traced peak {peak / 2**20:.1f} MiB for a {budget_gb * 1024:.0f} MiB budget, slot of "
          f"{30 * 512 * 512 * 4 / 2**20:.0f} MiB")
    assert list(result.outputs) == [1], result.decisions[1].reason
    assert peak < budget_gb * 2**30
    filled = np.asarray(open_ome_zarr(result.outputs[1]).levels[0][...])
    np.testing.assert_array_equal(filled[:15], texture[15:30])  # the upper neighbour's real planes
    np.testing.assert_array_equal(filled[16:30], texture[31:45])  # the lower neighbour's, below its surface plane
    middle = filled[15]  # the one morphed plane (between plane 29 of slice 0 and plane 1 of slice 2)
    assert np.corrcoef(middle[32:-32, 32:-32].ravel(), texture[30, 32:-32, 32:-32].ravel())[0, 1] > 0.95


@pytest.mark.gui
def test_interpolate_widget_shows_the_filled_slot(make_napari_viewer, qtbot, chain, tmp_path):
    pytest.importorskip("napari")
    acq, root, common = chain
    viewer = make_napari_viewer(show=True)
    _, widget = viewer.window.add_plugin_dock_widget("napari-soct", "11. Interpolate missing slices")
    widget.input_widgets["common_dir"].value = common["gap"]
    widget.input_widgets["out_dir"].value = tmp_path / "interp"
    assert widget.start() is not None
    qtbot.waitUntil(lambda: widget.run_button.enabled, timeout=60_000)
    assert widget.status.value.startswith("interpolate: filled slot(s) 2"), widget.status.value
    (layer,) = viewer.layers
    assert layer.name == "slice_z02_interpolated"
    np.testing.assert_array_equal(np.asarray(layer.data), open_ome_zarr(widget.result.outputs[2]).levels[0][...])
    viewer.dims.set_point(0, 13 * 0.01)  # a morphed plane
    gray = viewer.screenshot(canvas_only=True, flash=False)[..., :3].mean(axis=-1)
    assert gray.std() > 5
