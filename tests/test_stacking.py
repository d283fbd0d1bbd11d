"""Step 14 (stacking) against ground truth: slices cut from the phantom's true volume, painted on a common canvas
with known offsets, a known rotation and known cut depths, stacked back and compared with the true volume."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys

import numpy as np
import pytest
from scipy.ndimage import affine_transform
from scipy.ndimage import shift as nd_shift
from skimage.filters import threshold_otsu

from napari_soct.processing.io.atomic import OutputExistsError
from napari_soct.processing.io.omezarr import create_ome_zarr_image, open_ome_zarr
from napari_soct.processing.io.pyramid3d import create_ome_zarr_pyramid3d, pyramid_voxel_sizes
from napari_soct.processing.stack.stacking import StackParams, stack_slices
from napari_soct.processing.stack.transforms import PairTransform, write_pairwise_registration

VOXEL_UM = 10.0  # tiny: 10 um isotropic
T = 15  # planes per cut (150 um)
P = 26  # valid planes per slice, zeros below down to NZ
NZ = 32
MARGIN = 12  # canvas margin around the true volume's footprint
N_SLICES = 5
# Known per-slice displacement on the canvas (dy, dx) - what the stage put wrong - and a known rotation.
OFFSETS = {0: (0, 0), 1: (2, -1), 2: (-1, 3), 3: (1, 1), 4: (-2, -2)}
ROTATION = {2: 3.0}


@pytest.fixture(scope="module")
def acq(tmp_path_factory):
    from napari_soct.processing.synthetic import make_acquisition

    return make_acquisition(tmp_path_factory.mktemp("stack_acq"), preset="tiny", seed=0, n_slices=N_SLICES)


@pytest.fixture(scope="module")
def truth(acq):
    return np.asarray(acq.true_volume[...], dtype=np.float32)


def _rot(theta_deg):
    th = math.radians(theta_deg)
    return np.array([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]])


def canvas_shape(truth, tile=1):
    return (truth.shape[1] * tile + 2 * MARGIN, truth.shape[2] * tile + 2 * MARGIN)


def canvas_centre_xy(shape):
    return ((shape[1] - 1) / 2, (shape[0] - 1) / 2)


def paint_slice(truth, k, offsets, rotation, depth_shift=0, tile=1):
    """Slice k: true planes at block depths k*T + p*dz (p < P), zeros below, at its offset, rotated by its angle
    about the canvas centre (a point q of the unrotated canvas lands at R (q - c) + c)."""
    shape = canvas_shape(truth, tile)
    ny, nx = truth.shape[1] * tile, truth.shape[2] * tile
    vol = np.zeros((NZ, *shape), np.float32)
    planes = truth[k * T + depth_shift: k * T + depth_shift + P]
    if tile > 1:
        planes = np.tile(planes, (1, tile, tile))
    dy, dx = offsets.get(k, (0, 0))
    vol[:len(planes), MARGIN + dy:MARGIN + dy + ny, MARGIN + dx:MARGIN + dx + nx] = planes
    theta = rotation.get(k, 0.0)
    if theta:
        inverse = np.linalg.inv(_rot(theta))[::-1, ::-1]  # (y, x) order
        centre = np.array(canvas_centre_xy(shape)[::-1])
        for p in range(len(planes)):
            vol[p] = affine_transform(vol[p], inverse, offset=centre - inverse @ centre, order=1)
    return vol


def write_slices(folder, truth, acq, offsets=OFFSETS, rotation=ROTATION, depth_shift=None, tile=1,
                 voxel_um=VOXEL_UM, stage_z=True, canvas_pad=None, chunks=(8, 64, 64)):
    """Common-space slices as step 10 writes them (one canvas, the contract's attributes)."""
    folder.mkdir(parents=True, exist_ok=True)
    depth_shift = depth_shift or {}
    origin = [acq.volume_origin_mm[0] - MARGIN * acq.pixel_mm[0], acq.volume_origin_mm[1] - MARGIN * acq.pixel_mm[1]]
    paths = []
    for k in range(N_SLICES):
        vol = paint_slice(truth, k, offsets, rotation, depth_shift.get(k, 0), tile)
        if canvas_pad and k in canvas_pad:
            vol = np.pad(vol, ((0, 0), (0, canvas_pad[k]), (0, 0)))
        soct = {"slice_id": k, "voxel_size_um": [voxel_um] * 3, "origin_mm": origin, "canvas_origin_mm": origin,
                "offset_px": [0, 0], "position_source": "motor"}
        if stage_z:
            soct["stage_z_mm"] = round(5.0 + k * T * VOXEL_UM / 1000.0, 6)
        scale = (voxel_um * 1e-3 if k or voxel_um == VOXEL_UM else VOXEL_UM * 1e-3,) * 3
        path = folder / f"slice_z{k:02d}_common.ome.zarr"
        arr = create_ome_zarr_image(path, vol.shape, scale, chunks=chunks, attributes={"soct": soct})
        arr[...] = vol
        paths.append(path)
    return paths


def true_pairs(offsets=OFFSETS, rotation=ROTATION, shape=None, confidence=0.9, z_match=True, overrides=None):
    """The exact pair transforms (moving -> fixed, canvas pixels) undoing the injected offsets and rotation."""
    centre = canvas_centre_xy(shape)
    pairs = []
    for a in range(N_SLICES - 1):
        b = a + 1
        da = np.array(offsets[a][::-1], float)  # (x, y)
        db = np.array(offsets[b][::-1], float)
        theta = rotation.get(a, 0.0) - rotation.get(b, 0.0)
        t = _rot(rotation.get(a, 0.0)) @ (da - db)
        pair = PairTransform(a, b, z_match_plane=T if z_match else 0, z_match_ncc=0.9, expected_z_plane=T,
                             tx_px=float(t[0]), ty_px=float(t[1]), rotation_deg=theta, center_x_px=centre[0],
                             center_y_px=centre[1], confidence=confidence, status="ok")
        for key, value in (overrides or {}).get(a, {}).items():
            setattr(pair, key, value)
        pairs.append(pair)
    return pairs


def stacked_in_truth_frame(result, acq, truth):
    """The stacked level 0 cropped to the truth grid (via canvas_origin_mm) and the matching truth planes."""
    image = open_ome_zarr(result.path)
    volume = image.levels[0][...]
    oy = round((result.canvas_origin_mm[0] - acq.volume_origin_mm[0]) / acq.pixel_mm[0])
    ox = round((result.canvas_origin_mm[1] - acq.volume_origin_mm[1]) / acq.pixel_mm[1])
    assert oy <= 0 and ox <= 0
    n = min(volume.shape[0], truth.shape[0])
    ny, nx = truth.shape[1:]
    return volume[:n, -oy:-oy + ny, -ox:-ox + nx], truth[:n]


def tissue_ncc(stacked, truth):
    tissue = truth > threshold_otsu(truth)
    return float(np.corrcoef(stacked[tissue], truth[tissue])[0, 1])


def displacement(stacked_plane, truth_plane, y0, x0, side, reach=7):
    """Shift ``s`` (dy, dx) with ``stacked(p) = truth(p - s)`` on a crop, to 0.25 px: least squares over whole
    shifts within ``reach``, then quarter pixels around the best (the truth moved by linear interpolation)."""
    pad = reach + 2
    sub = truth_plane[y0 - pad:y0 + side + pad, x0 - pad:x0 + side + pad]
    target = stacked_plane[y0:y0 + side, x0:x0 + side]

    def cost(s):
        moved = nd_shift(sub, s, order=1, mode="nearest")
        return float(np.mean((moved[pad:pad + side, pad:pad + side] - target) ** 2))

    best = min(((dy, dx) for dy in range(-reach, reach + 1) for dx in range(-reach, reach + 1)), key=cost)
    steps = np.arange(-0.75, 0.76, 0.25)
    return np.array(min(((best[0] + a, best[1] + b) for a in steps for b in steps), key=cost))


def placement_errors(stacked, truth, z0s, side=36):
    """Per slice, the displacement (px) of its own planes against the truth in four quadrant crops (a rotation
    left over shows as different shifts per quadrant). Returns {sid: (4, 2) shifts (dy, dx)}."""
    ny, nx = truth.shape[1:]
    cy, cx = ny // 2, nx // 2
    out = {}
    for sid, z0 in z0s.items():
        z = min(z0 + 12, stacked.shape[0] - 1)  # past the overlap with the slice above, before the next one
        out[sid] = np.array([displacement(stacked[z], truth[z], y0, x0, side)
                             for y0, x0 in ((cy - side - 4, cx - side - 4), (cy - side - 4, cx + 4),
                                            (cy + 4, cx - side - 4), (cy + 4, cx + 4))])
    return out


def read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


# --- accuracy against the truth ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def registered_stack(acq, truth, tmp_path_factory):
    root = tmp_path_factory.mktemp("stack_registered")
    write_slices(root / "common", truth, acq)
    write_pairwise_registration(root / "pairwise_registration.csv", true_pairs(shape=canvas_shape(truth)))
    result = stack_slices(root / "common", root / "pairwise_registration.csv", root / "14_stack",
                          StackParams(confidence_weighted=False))
    return root, result


def test_stack_with_registration_recovers_the_true_volume(registered_stack, acq, truth):
    root, result = registered_stack
    assert result.slice_z0 == {k: k * T for k in range(N_SLICES)}
    stacked, expected = stacked_in_truth_frame(result, acq, truth)
    assert stacked.shape[0] == (N_SLICES - 1) * T + P
    ncc = tissue_ncc(stacked, expected)
    assert ncc >= 0.95, ncc
    errors = placement_errors(stacked, expected, result.slice_z0)
    worst = {sid: float(np.hypot(*e.T).max()) for sid, e in errors.items()}
    assert max(worst.values()) <= 1.0, worst  # the rotated slice 2 included
    drift = np.hypot(*(errors[N_SLICES - 1].mean(axis=0) - errors[0].mean(axis=0)))
    assert drift <= 2.0, drift
    print(f"NCC {ncc:.4f}; worst placement error per slice (px) {worst}; drift {drift:.2f} px")

    # Without the registration (motor only) the injected errors stay: the test would catch a no-op.
    motor = stack_slices(root / "common", "", root / "motor", StackParams())
    stacked_motor, _ = stacked_in_truth_frame(motor, acq, truth)
    motor_errors = placement_errors(stacked_motor, expected, motor.slice_z0)
    assert max(np.hypot(*e.mean(axis=0)) for e in motor_errors.values()) > 2.0

    image = open_ome_zarr(result.path)
    attrs = image.attributes
    assert attrs["section_thickness_planes"] == T
    assert attrs["slice_z0"] == {str(k): k * T for k in range(N_SLICES)}
    assert attrs["canvas_origin_mm"] == pytest.approx(list(result.canvas_origin_mm))
    assert attrs["voxel_size_um"] == [VOXEL_UM] * 3

    decisions = read_csv(root / "14_stack" / "stacking_decisions.csv")
    assert [d["gate"] for d in decisions] == ["reference"] + ["full"] * (N_SLICES - 1)
    assert float(decisions[2]["rotation_deg"]) == pytest.approx(-3.0)
    zm = read_csv(root / "14_stack" / "z_matches.csv")
    assert [(r["pair"], int(r["used"]), r["source"]) for r in zm] == [
        (f"{k}-{k + 1}", T, "registration") for k in range(N_SLICES - 1)]
    metrics = json.loads((root / "14_stack" / "stack_metrics.json").read_text())
    assert metrics["params"]["blend"] == "hann" and len(metrics["slices"]) == N_SLICES


def test_z_from_ncc_finds_the_cut_depths(acq, truth, tmp_path):
    # Slice 3 is cut 2 planes deeper than the nominal thickness: its true offsets are 17 and 13 planes.
    shifts = {3: 2}
    offsets = {k: (0, 0) for k in range(N_SLICES)}
    write_slices(tmp_path / "common", truth, acq, offsets=offsets, rotation={}, depth_shift=shifts)
    result = stack_slices(tmp_path / "common", "", tmp_path / "stack", StackParams(z_search_planes=4))
    true_z0 = {k: k * T + shifts.get(k, 0) for k in range(N_SLICES)}
    rows = read_csv(tmp_path / "stack" / "z_matches.csv")
    assert all(r["source"] == "ncc" for r in rows)
    for r in rows:
        a, b = int(r["fixed_id"]), int(r["moving_id"])
        assert abs(float(r["found"]) - (true_z0[b] - true_z0[a])) <= 1, r
        assert float(r["expected"]) == pytest.approx(T)  # from stage_z_mm
    assert all(abs(result.slice_z0[k] - true_z0[k]) <= 1 for k in true_z0), result.slice_z0
    stacked, expected = stacked_in_truth_frame(result, acq, truth)
    assert tissue_ncc(stacked, expected) >= 0.95


def test_outlier_overlap_is_replaced_unless_confident(acq, truth, tmp_path):
    offsets = {k: (0, 0) for k in range(N_SLICES)}
    write_slices(tmp_path / "common", truth, acq, offsets=offsets, rotation={})
    shape = canvas_shape(truth)
    # Pair 2-3 claims the match at plane 23 (8 planes off): with low confidence it is an outlier, replaced from
    # its neighbours (15); with high confidence it is kept.
    low = true_pairs(offsets, {}, shape, overrides={2: {"z_match_plane": 23, "confidence": 0.2}})
    write_pairwise_registration(tmp_path / "low.csv", low)
    result = stack_slices(tmp_path / "common", tmp_path / "low.csv", tmp_path / "low", StackParams())
    row = read_csv(tmp_path / "low" / "z_matches.csv")[2]
    assert (row["outlier"], row["action"], int(row["used"]), float(row["found"])) == ("1", "replaced", T, 23)
    assert result.slice_z0[3] == 3 * T
    stacked, expected = stacked_in_truth_frame(result, acq, truth)
    assert tissue_ncc(stacked, expected) >= 0.95

    high = true_pairs(offsets, {}, shape, overrides={2: {"z_match_plane": 23, "confidence": 0.95}})
    write_pairwise_registration(tmp_path / "high.csv", high)
    result = stack_slices(tmp_path / "common", tmp_path / "high.csv", tmp_path / "high", StackParams())
    row = read_csv(tmp_path / "high" / "z_matches.csv")[2]
    assert (row["outlier"], row["action"], int(row["used"])) == ("1", "kept_high_confidence", 23)
    assert result.slice_z0[3] == 2 * T + 23


def test_confidence_gates_and_drift_cap(acq, truth, tmp_path):
    write_slices(tmp_path / "common", truth, acq)
    shape = canvas_shape(truth)
    # Pair 1-2 at 0.45: rotation only (its translation is not applied); pair 3-4 at 0.1: skipped; pair 2-3 is
    # duplicated by a manual row with confidence 0, which wins and counts as full confidence.
    pairs = true_pairs(shape=shape, overrides={1: {"confidence": 0.45}, 3: {"confidence": 0.1}})
    manual = true_pairs(shape=shape)[2]
    manual.manual, manual.confidence = True, 0.0
    write_pairwise_registration(tmp_path / "reg.csv", [*pairs, manual])
    result = stack_slices(tmp_path / "common", tmp_path / "reg.csv", tmp_path / "gated",
                          StackParams(confidence_full=0.6, confidence_rotation=0.3, confidence_weighted=False))
    decisions = read_csv(tmp_path / "gated" / "stacking_decisions.csv")
    assert [d["gate"] for d in decisions] == ["reference", "full", "rotation", "full", "skip"]
    assert decisions[3]["manual"] == "1" and float(decisions[3]["confidence"]) == 1.0
    assert float(decisions[2]["tx_px"]) == 0.0 and float(decisions[2]["rotation_deg"]) == pytest.approx(-3.0)
    assert float(decisions[4]["tx_px"]) == 0.0 and float(decisions[4]["rotation_deg"]) == 0.0

    stacked, expected = stacked_in_truth_frame(result, acq, truth)
    errors = {sid: e.mean(axis=0) for sid, e in placement_errors(stacked, expected, result.slice_z0).items()}
    # Where a translation was withheld, the slice keeps exactly the displacement it was not corrected for.
    # Slice 2 (rotation only): the 1->2 translation is missing, so it sits at its offset relative to slice 1.
    d = {k: np.array(v, float) for k, v in OFFSETS.items()}
    np.testing.assert_allclose(errors[1], 0.0, atol=1.0)
    np.testing.assert_allclose(errors[2], d[2] - d[1], atol=1.0)
    np.testing.assert_allclose(errors[3], d[2] - d[1], atol=1.0)  # corrected relative to slice 2
    np.testing.assert_allclose(errors[4], d[2] - d[1] + d[4] - d[3], atol=1.0)  # 3->4 skipped too

    # A drift cap of 1.5 px: every cumulative translation within it, the capped slices marked.
    result = stack_slices(tmp_path / "common", tmp_path / "reg.csv", tmp_path / "capped",
                          StackParams(max_cumulative_drift_px=1.5, confidence_weighted=False, confidence_full=0.0,
                                      confidence_rotation=0.0))
    decisions = read_csv(tmp_path / "capped" / "stacking_decisions.csv")
    cum = [math.hypot(float(d["cumulative_tx_px"]), float(d["cumulative_ty_px"])) for d in decisions]
    assert max(cum) <= 1.5 + 1e-6
    assert [d["capped"] for d in decisions] == ["0", "1", "1", "0", "1"]  # |u| = 0, 2.2, 3.2, 1.4, 2.8 uncapped

    # apply_rotation_only: rotations composed, no translation anywhere.
    result = stack_slices(tmp_path / "common", tmp_path / "reg.csv", tmp_path / "rot_only",
                          StackParams(apply_rotation_only=True, confidence_full=0.0, confidence_rotation=0.0))
    decisions = read_csv(tmp_path / "rot_only" / "stacking_decisions.csv")
    assert all(float(d["cumulative_tx_px"]) == 0 and float(d["cumulative_ty_px"]) == 0 for d in decisions)
    assert [d["gate"] for d in decisions[1:]] == ["rotation"] * 4


def test_blend_refinement_recovers_a_subpixel_offset(acq, truth, tmp_path):
    # No registration, slice 3 displaced by one pixel: the phase correlation of the overlap moves it back (and
    # slice 4 with it, since slice 4 was stacked relative to slice 3).
    offsets = {k: (0, 0) for k in range(N_SLICES)}
    offsets[3] = (1, -1)
    offsets[4] = (1, -1)
    write_slices(tmp_path / "common", truth, acq, offsets=offsets, rotation={})
    result = stack_slices(tmp_path / "common", "", tmp_path / "stack", StackParams(max_blend_refinement_px=2.0))
    decisions = read_csv(tmp_path / "stack" / "stacking_decisions.csv")
    assert float(decisions[3]["refine_ty_px"]) == pytest.approx(-1, abs=0.2)
    assert float(decisions[3]["refine_tx_px"]) == pytest.approx(1, abs=0.2)
    assert abs(float(decisions[4]["refine_tx_px"])) < 0.2
    stacked, expected = stacked_in_truth_frame(result, acq, truth)
    errors = placement_errors(stacked, expected, result.slice_z0)
    assert max(float(np.hypot(*e.T).max()) for e in errors.values()) <= 1.0


# --- the pyramid ----------------------------------------------------------------------------------------------------


def block_means(volume, factor, skip_zeros=False):
    """Reference: the mean of the base voxels each coarse voxel covers, for factors that are multiples of 1/2
    (2.5 included): upsample by 2 by repetition (exact), then plain block means of 2*factor voxels; a trailing
    partial block averages the voxels it has (``skip_zeros``: the voxels with data, 0 where there are none)."""
    k = round(2 * factor)
    up = volume.astype(np.float64)
    for axis in range(3):
        up = np.repeat(up, 2, axis=axis)
    out = [math.ceil(n / factor - 1e-9) for n in volume.shape]
    sums = np.zeros([o * k for o in out])
    counts = np.zeros_like(sums)
    sums[: up.shape[0], : up.shape[1], : up.shape[2]] = up
    counts[: up.shape[0], : up.shape[1], : up.shape[2]] = (up != 0) if skip_zeros else 1
    if skip_zeros:
        shape = (out[0], k, out[1], k, out[2], k)
        n = counts.reshape(shape).sum(axis=(1, 3, 5))
        return np.where(n > 0, sums.reshape(shape).sum(axis=(1, 3, 5)) / np.maximum(n, 1), 0.0)
    shape = (out[0], k, out[1], k, out[2], k)
    return sums.reshape(shape).sum(axis=(1, 3, 5)) / counts.reshape(shape).sum(axis=(1, 3, 5))


def test_pyramid_levels_are_means_of_the_base_voxels(registered_stack):
    _, result = registered_stack
    image = open_ome_zarr(result.path)
    scales_um = [tuple(round(s * 1000, 6) for s in sc) for sc in image.scales_mm]
    assert scales_um == [(v,) * 3 for v in (10.0, 20.0, 25.0, 50.0, 100.0)]  # base, 2x, then 25/50/100 um
    base = image.levels[0][...]
    assert (base == 0).any() and (base != 0).any()  # a canvas with and without data: 0 = no data
    for level, scale in zip(image.levels[1:], scales_um[1:]):
        expected = block_means(base, scale[0] / VOXEL_UM, skip_zeros=True)
        assert level.shape == expected.shape
        np.testing.assert_allclose(level[...], expected, rtol=1e-5, atol=1e-6)


def test_pyramid_writer_streams_irregular_blocks(tmp_path):
    rng = np.random.default_rng(3)
    volume = rng.random((37, 45, 29)).astype(np.float32)
    voxels = pyramid_voxel_sizes((10.0, 10.0, 10.0), volume.shape, [10, 25, 50], min_side=7)
    assert voxels == [(10.0,) * 3, (20.0,) * 3, (25.0,) * 3, (40.0,) * 3, (50.0,) * 3]
    writer = create_ome_zarr_pyramid3d(tmp_path / "v.ome.zarr", volume.shape, voxels, chunks=(4, 16, 16), threads=2)
    for z0, z1 in ((0, 3), (3, 4), (4, 17), (17, 37)):  # not aligned to the chunks
        writer.append(volume[z0:z1])
    writer.close()
    image = open_ome_zarr(tmp_path / "v.ome.zarr")
    np.testing.assert_array_equal(image.levels[0][...], volume)
    for level, voxel in zip(image.levels[1:], voxels[1:]):
        np.testing.assert_allclose(level[...], block_means(volume, voxel[0] / 10.0), rtol=1e-5, atol=1e-6)
    # With skip_zeros (0 = no data), coarse voxels are means over the voxels with data: an edge voxel half on
    # data reads the data's value, not half of it.
    volume[:, :, :11] = 0
    volume[5:9] = 0
    writer = create_ome_zarr_pyramid3d(tmp_path / "z.ome.zarr", volume.shape, voxels, chunks=(4, 16, 16), threads=2,
                                       skip_zeros=True)
    for z0, z1 in ((0, 6), (6, 37)):
        writer.append(volume[z0:z1])
    writer.close()
    image = open_ome_zarr(tmp_path / "z.ome.zarr")
    for level, voxel in zip(image.levels[1:], voxels[1:]):
        np.testing.assert_allclose(level[...], block_means(volume, voxel[0] / 10.0, skip_zeros=True), rtol=1e-5,
                                   atol=1e-6)
    constant = np.where(volume != 0, 3.0, 0.0).astype(np.float32)
    writer = create_ome_zarr_pyramid3d(tmp_path / "c.ome.zarr", volume.shape, voxels, chunks=(4, 16, 16),
                                       skip_zeros=True)
    writer.append(constant)
    writer.close()
    for level in open_ome_zarr(tmp_path / "c.ome.zarr").levels[1:]:
        values = np.asarray(level)
        assert np.allclose(values[values != 0], 3.0, rtol=1e-6)  # no blend with the empty canvas at its edges
    # Anisotropic base: the analysis levels are isotropic, power-of-two levels that would break the order go.
    assert pyramid_voxel_sizes((3.5, 10.0, 10.0), (200, 400, 400), [10, 25]) == [
        (3.5, 10.0, 10.0), (10.0, 10.0, 10.0), (25.0, 25.0, 25.0)]


# --- memory ---------------------------------------------------------------------------------------------------------


def test_peak_memory_stays_within_budget(acq, truth, tmp_path):
    # The true volume tiled 3 x 3 laterally: 5 slices of 32 x 357 x 354 (15 MiB each) stacked into an 86-plane
    # volume of 41 MiB under a 16 MiB budget.
    offsets = {k: (0, 0) for k in range(N_SLICES)}
    write_slices(tmp_path / "common", truth, acq, offsets=offsets, rotation={2: 1.0}, tile=3)
    write_slices(tmp_path / "warm_common", truth[:, :40, :40], acq, offsets=offsets, rotation={2: 1.0})
    shape = canvas_shape(truth, tile=3)
    write_pairwise_registration(tmp_path / "reg.csv", true_pairs(offsets, {2: 1.0}, shape))
    write_pairwise_registration(tmp_path / "warm.csv", true_pairs(offsets, {2: 1.0}, (64, 64)))
    budget = 16 * 2**20
    # Measured in a fresh interpreter after a warm-up run (imports, zarr's thread pools), as test_backproject does.
    script = f"""
import json, tracemalloc
from napari_soct.processing.stack.stacking import StackParams, stack_slices
stack_slices({str(tmp_path / "warm_common")!r}, {str(tmp_path / "warm.csv")!r}, {str(tmp_path / "warm")!r},
             StackParams(workers=2))
tracemalloc.start()
result = stack_slices({str(tmp_path / "common")!r}, {str(tmp_path / "reg.csv")!r}, {str(tmp_path / "low")!r},
                      StackParams(workers=2, memory_budget_gb={budget / 2**30!r}))
_, peak = tracemalloc.get_traced_memory()
print(json.dumps([peak, list(result.shape), result.slab_planes]))
"""
    out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True).stdout
    peak, out_shape, slab = json.loads(out.strip().splitlines()[-1])
    volume_bytes = 4 * math.prod(out_shape)
    print(f"peak {peak / 2**20:.2f} MiB for a {volume_bytes / 2**20:.1f} MiB volume, slabs of {slab} planes")
    assert volume_bytes >= 2.5 * budget and slab < out_shape[0]
    assert peak < budget, f"peak {peak / 2**20:.2f} MiB over the {budget / 2**20:.0f} MiB budget"
    # Streaming changes nothing: the same stack with the default budget (one slab) is identical.
    whole = stack_slices(tmp_path / "common", tmp_path / "reg.csv", tmp_path / "high", StackParams())
    low, high = open_ome_zarr(tmp_path / "low" / "brain.ome.zarr"), open_ome_zarr(whole.path)
    assert whole.slab_planes >= 10 * slab
    for a, b in zip(low.levels, high.levels):
        np.testing.assert_array_equal(a[...], b[...])


# --- bad input, existing outputs, later steps ------------------------------------------------------------------------


def test_bad_inputs_are_refused_with_clear_errors(acq, truth, tmp_path):
    small = truth[:, :30, :30]
    write_slices(tmp_path / "voxel", small, acq, voxel_um=5.0)  # slices 1..4 at 5 um, slice 0 at 10 um
    with pytest.raises(ValueError, match="different voxel sizes: slice_z01_common.ome.zarr"):
        stack_slices(tmp_path / "voxel", "", tmp_path / "out", StackParams())
    write_slices(tmp_path / "canvas", small, acq, canvas_pad={3: 5})
    with pytest.raises(ValueError, match="different canvases: slice_z03_common.ome.zarr"):
        stack_slices(tmp_path / "canvas", "", tmp_path / "out", StackParams())
    write_slices(tmp_path / "nostage", small, acq, stage_z=False)
    with pytest.raises(ValueError, match="slice_thickness_um"):
        stack_slices(tmp_path / "nostage", "", tmp_path / "out", StackParams())
    given = StackParams(slice_thickness_um=150.0)
    assert stack_slices(tmp_path / "nostage", "", tmp_path / "out", given).slice_z0[1] == T
    with pytest.raises(FileNotFoundError, match="registration_csv"):
        stack_slices(tmp_path / "nostage", tmp_path / "missing.csv", tmp_path / "o2", given)
    with pytest.raises(ValueError, match="subject"):
        stack_slices(tmp_path / "nostage", "", tmp_path / "o3", StackParams(subject="../x", slice_thickness_um=150))
    with pytest.raises(ValueError, match="memory_budget_gb"):
        stack_slices(tmp_path / "nostage", "", tmp_path / "o4", StackParams(memory_budget_gb=1e-5,
                                                                              slice_thickness_um=150))


def test_if_exists_is_respected(acq, truth, tmp_path):
    write_slices(tmp_path / "common", truth[:, :30, :30], acq)
    first = stack_slices(tmp_path / "common", "", tmp_path / "out", StackParams(subject="mouse"))
    assert first.path.name == "mouse.ome.zarr" and first.path.is_dir()
    marker = first.path / "zarr.json"
    before = marker.stat().st_mtime_ns
    with pytest.raises(OutputExistsError):
        stack_slices(tmp_path / "common", "", tmp_path / "out", StackParams(subject="mouse"))
    skipped = stack_slices(tmp_path / "common", "", tmp_path / "out", StackParams(subject="mouse", if_exists="skip"))
    assert skipped.skipped and marker.stat().st_mtime_ns == before
    again = stack_slices(tmp_path / "common", "", tmp_path / "out", StackParams(subject="mouse", if_exists="overwrite",
                                                                                blend="average"))
    assert not again.skipped and json.loads((tmp_path / "out" / "stack_metrics.json").read_text())["params"][
        "blend"] == "average"
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no temporary left


def test_excluded_and_interpolated_slices(acq, truth, tmp_path):
    from napari_soct.processing.io.tables import SliceConfigRow, write_slice_config

    write_slices(tmp_path / "common", truth, acq, offsets={k: (0, 0) for k in range(N_SLICES)}, rotation={})
    # Slice 2 excluded, its slot filled from an "interpolated" folder holding the true slice.
    (tmp_path / "interp").mkdir()
    import shutil

    shutil.move(str(tmp_path / "common" / "slice_z02_common.ome.zarr"),
                str(tmp_path / "interp" / "slice_z02_interpolated.ome.zarr"))
    write_slice_config(tmp_path / "slice_config.csv", [SliceConfigRow(slice_id=k, use=k != 2) for k in range(N_SLICES)])
    gap = stack_slices(tmp_path / "common", "", tmp_path / "gap", StackParams(),
                       slice_config=tmp_path / "slice_config.csv")
    assert gap.slice_z0 == {0: 0, 1: T, 3: 3 * T, 4: 4 * T}  # the gap keeps its depth (2 T from slice 1 to 3)
    filled = stack_slices(tmp_path / "common", "", tmp_path / "filled", StackParams(), interpolated_dir=tmp_path /
                          "interp", slice_config=tmp_path / "slice_config.csv")
    assert filled.slice_z0 == {k: k * T for k in range(N_SLICES)}
    assert [d.source for d in filled.decisions] == ["common", "common", "interpolated", "common", "common"]
    stacked, expected = stacked_in_truth_frame(filled, acq, truth)
    assert tissue_ncc(stacked, expected) >= 0.95


def test_bias_and_atlas_steps_read_the_stack(registered_stack, tmp_path):
    from napari_soct.processing.stack.atlas import AtlasParams, align_to_atlas
    from napari_soct.processing.stack.bias import BiasFieldParams, correct_bias_field

    _, result = registered_stack
    bias = correct_bias_field(result.path, tmp_path / "bias", BiasFieldParams(
        mode="per_section", shrink_factor=4, n_iterations=5, n_fitting_levels=1))
    sections = [row["z_planes"] for row in bias.report["mode_details"]["sections"]]
    assert sections == [[k * T, min((k + 1) * T, result.shape[0])] for k in range(math.ceil(result.shape[0] / T))]
    # Atlas: a template that is the stack's own 25 um level; every pyramid level is resampled.
    image = open_ome_zarr(result.path)
    np.save(tmp_path / "template.npy", image.levels[2][...])
    atlas = align_to_atlas(result.path, tmp_path / "template.npy", tmp_path / "atlas", AtlasParams(
        input_orientation="RAS", template_orientation="RAS", template_voxel_um=25.0, max_iterations=20))
    ras = open_ome_zarr(atlas.path)
    assert len(ras.levels) == len(image.levels)
    assert atlas.ncc > 0.9


def test_cancel_leaves_no_output(acq, truth, tmp_path):
    import threading

    from napari_soct.processing.progress import Cancelled

    write_slices(tmp_path / "common", truth, acq)
    cancel = threading.Event()
    messages = []

    def progress(done, total, message):
        messages.append(message)
        if message.startswith("stacking planes"):
            cancel.set()  # after the first slab

    with pytest.raises(Cancelled):
        stack_slices(tmp_path / "common", "", tmp_path / "out", StackParams(memory_budget_gb=0.02), progress=progress,
                     cancel=cancel)
    assert sum(m.startswith("stacking planes") for m in messages) == 1
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
