"""Step 12, pairwise registration: z match, sign convention, injected rigid transforms, fallbacks, widget.

Ground truth: the tiny phantom cut into 5 slices, T = 150 um, dz = 10 um, so the moving slice's plane 0 matches
plane 15 of the slice above; slices placed at their stitched ``origin_mm`` are aligned up to sub-pixel
stitching residuals, so a transform injected into one slice must come back as that transform.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from napari_soct.processing.io.atomic import OutputExistsError
from napari_soct.processing.io.omezarr import create_ome_zarr_image, open_ome_zarr
from napari_soct.processing.stack.register import (
    RegistrationParams,
    _sitk_register,
    register_pairwise,
    warp_moving_to_fixed,
)
from napari_soct.processing.stack.transforms import PairTransform, read_pairwise_registration

T_OVER_DZ = 15


def paint_common_space(norm_dir: Path, out_dir: Path) -> dict[int, Path]:
    """Independent stand-in for step 10: each normalised slice painted on one canvas at
    ``round((origin_mm - min origin_mm) / pixel_mm)``, attributes per the assembly contract."""
    from napari_soct.processing.slices import find_slice_files

    images = {sid: open_ome_zarr(p) for sid, p in find_slice_files(norm_dir).items()}
    attrs = {sid: im.attributes["soct"] for sid, im in images.items()}
    pixel_mm = attrs[min(attrs)]["voxel_size_um"][1] * 1e-3
    origin = np.min([a["origin_mm"] for a in attrs.values()], axis=0)
    offsets = {sid: np.round((np.array(a["origin_mm"]) - origin) / pixel_mm).astype(int) for sid, a in attrs.items()}
    ny = max(offsets[s][0] + images[s].shape[1] for s in images)
    nx = max(offsets[s][1] + images[s].shape[2] for s in images)
    out = {}
    for sid, image in images.items():
        oy, ox = offsets[sid]
        data = np.zeros((image.shape[0], ny, nx), np.float32)
        data[:, oy : oy + image.shape[1], ox : ox + image.shape[2]] = image.levels[0][...]
        soct = {**attrs[sid], "canvas_origin_mm": origin.tolist(), "origin_mm": origin.tolist(),
                "offset_px": [int(oy), int(ox)], "offset_residual_px": [0.0, 0.0], "position_source": "motor"}
        out[sid] = out_dir / f"slice_z{sid:02d}_common.ome.zarr"
        write_slice(out[sid], data, image.scales_mm[0], soct)
    return out


def write_slice(path: Path, data: np.ndarray, scale_mm, soct: dict) -> Path:
    if path.exists():
        shutil.rmtree(path)
    array = create_ome_zarr_image(path, data.shape, tuple(scale_mm), chunks=(4, *data.shape[1:]),
                                  attributes={"soct": soct})
    array[...] = data
    return path


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    from napari_soct.pipeline.reconstruct import ReconstructParams, reconstruct
    from napari_soct.processing.preprocess import preprocess_acquisition
    from napari_soct.processing.synthetic import make_acquisition

    root = tmp_path_factory.mktemp("register")
    acq = make_acquisition(root / "acq", preset="tiny", seed=0, n_slices=5)
    preprocess_acquisition(acq.raw_dir, root / "mosaic", generate_previews=False)
    rec = reconstruct(root / "mosaic", root / "rec", ReconstructParams(assemble=False))
    common = root / "common"
    paths = paint_common_space(rec.out_dir / "07_normalize", common)
    return {"root": root, "common": common, "paths": paths, "mosaic": root / "mosaic"}


def _variant(phantom, tmp_path, moving_id: int, make_data) -> Path:
    """A common folder with the fixed slice ``moving_id - 1`` and a modified moving slice."""
    folder = tmp_path / "common"
    folder.mkdir()
    fixed = phantom["paths"][moving_id - 1]
    shutil.copytree(fixed, folder / fixed.name)
    image = open_ome_zarr(phantom["paths"][moving_id])
    data = make_data(np.asarray(image.levels[0][...]))
    write_slice(folder / phantom["paths"][moving_id].name, data, image.scales_mm[0], image.attributes["soct"])
    return folder


def _apply_to_planes(data: np.ndarray, truth: PairTransform) -> np.ndarray:
    """Moving data whose correct registration onto the (aligned) fixed slice is ``truth``: out(p) = data(truth(p))."""
    inverse = np.linalg.inv(truth.matrix())
    angle = math.degrees(math.atan2(inverse[1, 0], inverse[0, 0]))
    warp = PairTransform(0, 1, rotation_deg=angle, tx_px=inverse[0, 2], ty_px=inverse[1, 2])  # about (0, 0)
    out = np.stack([warp_moving_to_fixed(plane, warp) for plane in data])
    out[out < 1e-4] = 0  # no data stays no data
    return out


def test_sitk_result_is_inverted_into_the_file_convention():
    """SimpleITK maps fixed -> moving; the file maps moving -> fixed: a known transform comes back as itself."""
    rng = np.random.default_rng(3)
    fixed = gaussian_filter(rng.random((96, 112)), 3).astype(np.float32)
    fixed = (fixed - fixed.min()) / np.ptp(fixed) + 0.1
    truth = PairTransform(0, 1, rotation_deg=3.0, tx_px=2.5, ty_px=-1.5, center_x_px=50.0, center_y_px=40.0)
    moving = _apply_to_planes(fixed[None], truth)[0]  # moving(p) = fixed(truth(p))
    mask = np.zeros(fixed.shape, bool)
    mask[20:76, 20:92] = True
    rotation, tx, ty, _ = _sitk_register(fixed, moving, mask, moving > 0, (50.0, 40.0), RegistrationParams(), 1)
    assert rotation == pytest.approx(3.0, abs=0.1)
    assert (tx, ty) == pytest.approx((2.5, -1.5), abs=0.1)
    found = PairTransform(0, 1, rotation_deg=rotation, tx_px=tx, ty_px=ty, center_x_px=50.0, center_y_px=40.0)
    corners = np.array([[20.0, 20.0], [91.0, 20.0], [91.0, 75.0], [20.0, 75.0]])
    np.testing.assert_allclose(found.apply(corners), truth.apply(corners), atol=0.2)


def test_consecutive_phantom_slices_match_plane_15_and_stay_aligned(phantom, tmp_path):
    result = register_pairwise(phantom["common"], tmp_path / "reg", RegistrationParams(workers=2))
    pairs = read_pairwise_registration(result.csv_path)
    assert [(p.fixed_id, p.moving_id) for p in pairs] == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert result.slice_thickness_um == pytest.approx(150.0)  # from stage_z_mm
    for p in pairs:
        assert p.expected_z_plane == T_OVER_DZ
        assert abs(p.z_match_plane - T_OVER_DZ) <= 1, p
        assert p.status == "ok" and p.ncc_after >= p.ncc_before
        # Slices placed at their stitched origin are aligned: the refinement stays sub-pixel / sub-degree.
        assert math.hypot(p.tx_px, p.ty_px) < 0.7 and abs(p.rotation_deg) < 1.0, p
        assert 0.7 < p.confidence <= 1.0
    metrics = json.loads(result.metrics_path.read_text())
    assert metrics["summary"]["ok"] == 4 and len(metrics["pairs"]) == 4
    assert all(len(m["z_scores"]) == 11 for m in metrics["pairs"])
    overlay = open_ome_zarr(result.overlay_path)
    assert overlay.shape[:2] == (4, 2) and overlay.attributes["soct"]["pairs"][0] == [0, 1]
    # The overlay's registered moving channel agrees with its fixed channel.
    both = overlay.levels[0][2]
    valid = (both[0] > 0) & (both[1] > 0)
    assert np.corrcoef(both[0][valid], both[1][valid])[0, 1] > 0.9

    # Threads: one worker gives the same transforms (deterministic: every ROI pixel sampled).
    single = register_pairwise(phantom["common"], tmp_path / "reg1", replace(RegistrationParams(), workers=1))
    for a, b in zip(single.pairs, pairs):
        assert (a.z_match_plane, a.status) == (b.z_match_plane, b.status)
        assert a.rotation_deg == pytest.approx(b.rotation_deg, abs=1e-5)
        assert a.tx_px == pytest.approx(b.tx_px, abs=1e-5)

    with pytest.raises(OutputExistsError):
        register_pairwise(phantom["common"], tmp_path / "reg", RegistrationParams())
    kept = register_pairwise(phantom["common"], tmp_path / "reg", replace(RegistrationParams(), if_exists="skip"))
    assert kept.skipped and [p.z_match_plane for p in kept.pairs] == [p.z_match_plane for p in pairs]


def test_injected_rigid_transform_is_recovered_in_the_file_convention(phantom, tmp_path):
    image = open_ome_zarr(phantom["paths"][3])
    _, ny, nx = image.shape
    truth = PairTransform(2, 3, rotation_deg=2.0, tx_px=3.0, ty_px=-2.0, center_x_px=nx / 2, center_y_px=ny / 2)
    folder = _variant(phantom, tmp_path, 3, lambda data: _apply_to_planes(data, truth))
    result = register_pairwise(folder, tmp_path / "reg", RegistrationParams())
    (pair,) = read_pairwise_registration(result.csv_path)
    assert pair.status == "ok" and abs(pair.z_match_plane - T_OVER_DZ) <= 1
    assert pair.rotation_deg == pytest.approx(2.0, abs=0.5)
    centre = np.array([[pair.center_x_px, pair.center_y_px]])
    expected_shift = truth.apply(centre)[0] - centre[0]  # the injected transform, written about the ROI centre
    assert math.hypot(pair.tx_px - expected_shift[0], pair.ty_px - expected_shift[1]) <= 0.7
    # Moving points land where the injected transform sends them (the direction of the convention).
    roi = result.pair_metrics[0]["roi"]
    x0, y0 = roi["x0_px"], roi["y0_px"]
    corners = np.array([[x0, y0], [x0 + roi["width_px"], y0 + roi["height_px"]]], float)
    assert np.abs(pair.apply(corners) - truth.apply(corners)).max() < 1.5
    assert pair.confidence > 0.6


def test_translation_only_recovers_a_pure_shift(phantom, tmp_path):
    truth = PairTransform(2, 3, tx_px=2.5, ty_px=-1.5)
    folder = _variant(phantom, tmp_path, 3, lambda data: _apply_to_planes(data, truth))
    params = replace(RegistrationParams(), transform="translation")
    (pair,) = register_pairwise(folder, tmp_path / "reg", params).pairs
    assert pair.status == "ok" and pair.rotation_deg == 0.0
    assert math.hypot(pair.tx_px - 2.5, pair.ty_px + 1.5) <= 0.5


def test_unrelated_slice_falls_back_to_identity_with_low_confidence(phantom, tmp_path):
    rng = np.random.default_rng(7)

    def noise(data):
        return ((rng.gamma(2.0, 0.25, data.shape) + 1e-3) * (data > 0)).astype(np.float32)

    folder = _variant(phantom, tmp_path, 3, noise)
    shutil.copytree(phantom["paths"][1], folder / phantom["paths"][1].name)  # a good pair too: 1 -> 2
    result = register_pairwise(folder, tmp_path / "reg", RegistrationParams())
    good, bad = result.pairs
    assert (good.fixed_id, good.moving_id, good.status) == (1, 2, "ok") and good.confidence > 0.7
    assert (bad.fixed_id, bad.moving_id) == (2, 3)
    assert bad.status == "fallback_identity" and bad.is_identity
    assert bad.z_match_plane == bad.expected_z_plane == T_OVER_DZ
    assert bad.confidence < 0.1 and bad.z_match_ncc < 0.1
    assert "z-match" in result.pair_metrics[1]["reason"]


def test_cancel_leaves_no_output(phantom, tmp_path):
    import threading

    from napari_soct.processing.progress import Cancelled

    cancel = threading.Event()
    seen = []

    def progress(done, total, message):
        seen.append(message)
        cancel.set()  # after the first pair

    with pytest.raises(Cancelled):
        register_pairwise(phantom["common"], tmp_path / "reg", RegistrationParams(workers=1), progress=progress,
                          cancel=cancel)
    assert len(seen) == 1 and not any((tmp_path / "reg").iterdir())


def test_stack_gate_is_relative_to_the_typical_z_match():
    """No absolute z-match NCC separates related from unrelated slices (it depends on contrast and speckle): the
    gate is a fraction of the stack's 75th percentile, with an absolute floor."""
    from napari_soct.processing.stack.register import _apply_stack_gate

    def stack(values):
        pairs = [PairTransform(k, k + 1, z_match_plane=16, expected_z_plane=15, z_match_ncc=v, tx_px=1.0,
                               rotation_deg=0.5, ncc_before=0.8, ncc_after=0.9) for k, v in enumerate(values)]
        return pairs, [{"sharpness": 1.0} for _ in values]

    params = RegistrationParams()
    pairs, metrics = stack([0.55, 0.60, 0.50, 0.18, 0.57])
    gate = _apply_stack_gate(pairs, metrics, params)
    assert gate == pytest.approx(0.4 * np.percentile([0.55, 0.60, 0.50, 0.18, 0.57], 75))
    assert [p.status for p in pairs] == ["ok", "ok", "ok", "fallback_identity", "ok"]
    demoted = pairs[3]
    assert demoted.is_identity and demoted.z_match_plane == 15 and demoted.ncc_after == 0.8
    assert "typical z-match" in metrics[3]["reason"] and metrics[3]["demoted"]["tx_px"] == 1.0
    assert pairs[0].confidence == pytest.approx(0.9) and demoted.confidence == pytest.approx(0.8 * 0.18 / (2 * gate))
    pairs, metrics = stack([0.17, 0.16, 0.18, 0.15])  # low contrast: every pair is related
    assert _apply_stack_gate(pairs, metrics, params) == pytest.approx(0.4 * np.percentile([0.17, 0.16, 0.18, 0.15], 75))
    assert all(p.status == "ok" for p in pairs)
    pairs, metrics = stack([0.02, 0.03])
    assert _apply_stack_gate(pairs, metrics, params) == params.min_match_ncc
    assert all(p.status == "fallback_identity" for p in pairs)


def test_bounds_and_errors_do_not_stop_the_run(phantom, tmp_path):
    truth = PairTransform(2, 3, tx_px=6.0, ty_px=0.0)
    folder = _variant(phantom, tmp_path, 3, lambda data: _apply_to_planes(data, truth))
    # A slice on another canvas cannot be registered: an error row, and the other pair still runs.
    other = open_ome_zarr(phantom["paths"][4])
    write_slice(folder / "slice_z04_common.ome.zarr", np.asarray(other.levels[0][:, :-3, :]), other.scales_mm[0],
                other.attributes["soct"])
    params = replace(RegistrationParams(), max_translation_px=3.0)
    result = register_pairwise(folder, tmp_path / "reg", params)
    bounded, failed = result.pairs
    assert bounded.status == "fallback_identity" and bounded.is_identity
    assert "max_translation_px" in result.pair_metrics[0]["reason"]
    assert failed.status == "error" and failed.confidence == 0.0
    assert "canvas" in result.pair_metrics[1]["error"]
    with pytest.raises(ValueError, match="memory_budget_gb"):
        register_pairwise(folder, tmp_path / "reg2", replace(RegistrationParams(), memory_budget_gb=1e-5))
    with pytest.raises(ValueError, match="slice_thickness_um"):
        bare = tmp_path / "bare"
        bare.mkdir()
        for sid in (2, 3):
            image = open_ome_zarr(folder / f"slice_z{sid:02d}_common.ome.zarr")
            soct = {k: v for k, v in image.attributes["soct"].items() if k != "stage_z_mm"}
            write_slice(bare / f"slice_z{sid:02d}_common.ome.zarr", image.levels[0][...], image.scales_mm[0], soct)
        register_pairwise(bare, tmp_path / "reg3", RegistrationParams())


def test_excluded_slices_are_skipped(phantom, tmp_path):
    config = tmp_path / "slice_config.csv"
    config.write_text("slice_id,use\n0,true\n1,true\n2,false\n3,true\n4,true\n")
    result = register_pairwise(phantom["common"], tmp_path / "reg", RegistrationParams(), slice_config=config)
    assert [(p.fixed_id, p.moving_id) for p in result.pairs] == [(0, 1), (1, 3), (3, 4)]
    assert result.pairs[1].expected_z_plane == 2 * T_OVER_DZ  # two cuts apart
    assert result.pairs[0].status == result.pairs[2].status == "ok"


def test_only_planes_are_read(phantom, tmp_path):
    """Deep slices (planes past the imaged depth are 0): registering reads planes, never a slice volume."""
    import tracemalloc

    folder = tmp_path / "deep"
    folder.mkdir()
    for sid in (2, 3):
        image = open_ome_zarr(phantom["paths"][sid])
        data = np.zeros((256, *image.shape[1:]), np.float32)
        data[: image.shape[0]] = image.levels[0][...]
        write_slice(folder / phantom["paths"][sid].name, data, image.scales_mm[0], image.attributes["soct"])
    volume_bytes = data.nbytes
    del data, image
    tracemalloc.start()
    result = register_pairwise(folder, tmp_path / "reg", RegistrationParams(workers=1))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert result.pairs[0].status == "ok"
    assert peak < 0.25 * volume_bytes, (peak, volume_bytes)


def test_register_widget_shows_pair_overlays_and_confidence(make_napari_viewer, qtbot, phantom, tmp_path):
    pytest.importorskip("napari")
    viewer = make_napari_viewer(show=True)
    _, widget = viewer.window.add_plugin_dock_widget("napari-soct", "12. Pairwise registration")
    widget.input_widgets["common_dir"].value = phantom["common"]
    widget.input_widgets["out_dir"].value = tmp_path / "reg"
    widget.param_widgets["transform"].value = "translation"
    assert widget.start() is not None
    qtbot.waitUntil(lambda: widget.run_button.enabled and widget.result is not None, timeout=60_000)
    assert not widget.status.value.startswith("error"), widget.status.value
    names = [layer.name for layer in viewer.layers]
    assert names == ["register: fixed", "register: moving registered", "register: difference",
                     "register: ROI by confidence"]
    fixed, moving, _, rois = viewer.layers
    assert fixed.data.shape[0] == 4 and fixed.colormap.name == "magenta" and moving.colormap.name == "green"
    pairs = read_pairwise_registration(tmp_path / "reg" / "pairwise_registration.csv")
    assert all(p.rotation_deg == 0 for p in pairs)
    np.testing.assert_allclose(rois.features["confidence"], [p.confidence for p in pairs], rtol=1e-6)
    assert list(rois.features["pair"]) == ["0->1", "1->2", "2->3", "3->4"]
    rois.visible = False
    gray = viewer.screenshot(canvas_only=True, flash=False)[..., :3].mean(axis=-1)
    assert gray.std() > 5
