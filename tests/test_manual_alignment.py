"""Manual slice alignment (issue 9), processing side: the transform convention, the NCC, the views, the undo
history, the saved table (manual rows, automatic results kept), the slice-config notes, the alignment package,
and that the registered stacking step uses a manual row in preference.

Slices are cut from a smooth random field with a known rigid transform between slice 0 and slice 1, so the true
pair transform is known exactly."""

from __future__ import annotations

import csv
import math
import shutil
from dataclasses import replace

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter, map_coordinates

from napari_soct.pipeline.cli import main
from napari_soct.pipeline.steps import STEPS
from napari_soct.processing.io.atomic import OutputExistsError
from napari_soct.processing.io.omezarr import create_ome_zarr_image
from napari_soct.processing.io.tables import SliceConfigRow, read_slice_config, write_slice_config
from napari_soct.processing.params import params_from_mapping
from napari_soct.processing.stack.manual import (
    AUTO_FIELDS,
    EditHistory,
    display_image,
    open_alignment,
    overlap_ncc,
    overlay_image,
    pair_matrix,
    read_alignment_table,
    recentred,
    restack_inputs,
    warp_moving,
    write_alignment_table,
)
from napari_soct.processing.stack.register import warp_moving_to_fixed
from napari_soct.processing.stack.transforms import (
    PAIR_COLUMNS,
    PairTransform,
    read_pairwise_registration,
    write_pairwise_registration,
)

CANVAS = (80, 88)
MARGIN = 8  # no data around the tissue
T = 6  # planes per cut
NZ, VALID = 14, 10  # planes per slice, of which valid (the rest 0)
# True pair 0 -> 1 (moving -> fixed): a point p of slice 1 lands at R (p - c) + c + t in slice 0.
TRUE = PairTransform(0, 1, z_match_plane=T, expected_z_plane=T, tx_px=2.6, ty_px=-1.8, rotation_deg=3.0,
                     center_x_px=43.5, center_y_px=39.5)
WRONG = {"tx_px": 6.1, "ty_px": -4.3, "rotation_deg": 0.5}  # the "automatic" result of pair 0 -> 1


def field_volume(seed=3):
    rng = np.random.default_rng(seed)
    vol = gaussian_filter(rng.normal(size=(3 * T + NZ, *CANVAS)), (1.5, 2.0, 2.0))
    return (1.0 + (vol - vol.min()) / (vol.max() - vol.min())).astype(np.float32)


def tissue_mask():
    mask = np.zeros(CANVAS, bool)
    mask[MARGIN:-MARGIN, MARGIN:-MARGIN] = True
    return mask


def moved(plane: np.ndarray, pair: PairTransform) -> np.ndarray:
    """Content of a moving slice whose true transform is ``pair``: ``M(p) = plane(Q(p))`` (written with
    map_coordinates directly, not with the code under test), cut to the tissue mask of its own frame."""
    yy, xx = np.indices(plane.shape, dtype=float)
    q = pair.apply(np.stack([xx.ravel(), yy.ravel()], axis=1))
    out = map_coordinates(plane, [q[:, 1], q[:, 0]], order=1, mode="nearest").reshape(plane.shape)
    return np.where(tissue_mask(), out, 0.0).astype(np.float32)


def _inverse_params(pair):
    """(tx, ty, rotation, cx, cy) of the inverse transform, about the same centre."""
    m = np.linalg.inv(pair.matrix())
    theta = math.degrees(math.atan2(m[1, 0], m[0, 0]))
    c = np.array([pair.center_x_px, pair.center_y_px])
    t = m[:2, 2] - (c - m[:2, :2] @ c)
    return float(t[0]), float(t[1]), theta, pair.center_x_px, pair.center_y_px


@pytest.fixture(scope="module")
def volume():
    return field_volume()


@pytest.fixture(scope="module")
def built(tmp_path_factory, volume):
    """A reconstruction folder: 10_common (3 slices), 12_register (pair 0->1 misregistered, pair 1->2 an error
    row without centre), 13_exclude/slice_config.csv."""
    root = tmp_path_factory.mktemp("manual_rec")
    mask = tissue_mask()
    origin = [7.0, 11.0]
    for k in range(3):
        data = np.zeros((NZ, *CANVAS), np.float32)
        for p in range(VALID):
            data[p] = moved(volume[k * T + p], TRUE) if k == 1 else np.where(mask, volume[k * T + p], 0.0)
        soct = {"slice_id": k, "voxel_size_um": [10.0] * 3, "origin_mm": origin, "canvas_origin_mm": origin,
                "stage_z_mm": round(5.0 + k * T * 0.01, 6)}
        arr = create_ome_zarr_image(root / "10_common" / f"slice_z{k:02d}_common.ome.zarr", data.shape, (0.01,) * 3,
                                    chunks=(4, 40, 44), attributes={"soct": soct})
        arr[...] = data
    pairs = [replace(TRUE, **WRONG, confidence=0.8, ncc_before=0.5, ncc_after=0.6, z_match_ncc=0.7),
             PairTransform(1, 2, z_match_plane=T, expected_z_plane=T, status="error")]
    write_pairwise_registration(root / "12_register" / "pairwise_registration.csv", pairs)
    write_slice_config(root / "13_exclude" / "slice_config.csv",
                       [SliceConfigRow(k, notes="calibration_slice" if k == 0 else "") for k in range(3)])
    (root / "11_interpolate").mkdir()  # step 11 ran and filled no slot
    return root


@pytest.fixture
def reconstruction(built, tmp_path):
    """A fresh copy of the reconstruction folder for each test (tests edit it)."""
    shutil.copytree(built, tmp_path / "rec")
    return tmp_path / "rec"


def test_warp_follows_the_moving_to_fixed_convention(volume):
    plane = volume[2]
    moving = moved(plane, TRUE)
    warped, valid = warp_moving(moving, TRUE)
    inner = valid & tissue_mask()
    inner[:MARGIN + 4] = inner[-MARGIN - 4:] = False
    inner[:, :MARGIN + 4] = inner[:, -MARGIN - 4:] = False
    assert inner.sum() > 1500
    error = np.abs(warped[inner] - plane[inner])
    span = np.ptp(plane[inner])
    assert error.mean() < 0.01 * span and error.max() < 0.05 * span  # linear interpolation twice
    # The other direction (fixed -> moving) would be far off.
    backwards = PairTransform(0, 1, **dict(zip(("tx_px", "ty_px", "rotation_deg", "center_x_px", "center_y_px"),
                                               _inverse_params(TRUE))))
    wrong, _ = warp_moving(moving, backwards)
    assert np.abs(wrong[inner] - plane[inner]).mean() > 5 * error.mean()
    # The shared helper of step 12 resamples the same way.
    other = warp_moving_to_fixed(moving, TRUE)
    np.testing.assert_allclose(warped[inner], other[inner], atol=1e-5)

    # A landmark: a blob at moving point p lands at pair.apply(p).
    blob = np.zeros(CANVAS, np.float32)
    p = np.array([30.0, 25.0])  # (x, y)
    yy, xx = np.indices(CANVAS)
    blob[:] = np.exp(-((xx - p[0]) ** 2 + (yy - p[1]) ** 2) / (2 * 2.0**2)) + 1e-3
    out, _ = warp_moving(blob, TRUE)
    w = np.clip(out - 1e-3, 0, None)
    centroid = np.array([(w * xx).sum(), (w * yy).sum()]) / w.sum()
    np.testing.assert_allclose(centroid, TRUE.apply(p), atol=0.05)


def test_warp_at_a_reduced_level_matches_the_full_resolution(volume):
    """Transforms that map pixel centres onto pixel centres at both resolutions (a quarter turn about the canvas
    centre, an even translation) give exactly the block means of the full-resolution result; a reduced pixel
    centred elsewhere than ``2 i + 0.5`` would not."""
    image = volume[4, :80, :80]  # square, data everywhere
    half = image.reshape(40, 2, 40, 2).mean(axis=(1, 3))
    for pair in (PairTransform(0, 1, rotation_deg=90.0, center_x_px=39.5, center_y_px=39.5),
                 PairTransform(0, 1, tx_px=4.0, ty_px=-2.0, center_x_px=10.0, center_y_px=50.0)):
        full, full_valid = warp_moving(image, pair)
        reduced, valid = warp_moving(half, pair, factor=2.0)
        expected = full.reshape(40, 2, 40, 2).mean(axis=(1, 3))
        valid &= full_valid.reshape(40, 2, 40, 2).all(axis=(1, 3))
        assert valid.sum() >= 38 * 39
        np.testing.assert_allclose(reduced[valid], expected[valid], atol=1e-5)
    quarter, _ = warp_moving(image, PairTransform(0, 1, rotation_deg=90.0, center_x_px=39.5, center_y_px=39.5))
    np.testing.assert_allclose(quarter[1:-1, 1:-1], np.rot90(image, -1)[1:-1, 1:-1], atol=1e-5)  # clockwise
    # The matrix at factor f maps reduced pixel centres like the canvas transform does.
    m = pair_matrix(TRUE, 2.0)
    x_img = np.array([10.0, 7.0, 1.0])
    canvas = np.array([2 * 10 + 0.5, 2 * 7 + 0.5])
    np.testing.assert_allclose(m @ x_img, [*((TRUE.apply(canvas) - 0.5) / 2), 1.0], atol=1e-9)


def test_recentred_is_the_same_transform():
    other = recentred(TRUE, 10.0, 70.0)
    pts = np.array([[0.0, 0.0], [40.0, 12.0], [80.0, 75.0]])
    np.testing.assert_allclose(other.apply(pts), TRUE.apply(pts), atol=1e-9)
    assert (other.center_x_px, other.center_y_px) == (10.0, 70.0)


def test_ncc_peaks_at_the_true_transform(volume):
    fixed = np.where(tissue_mask(), volume[3], 0.0)
    moving = moved(volume[3], TRUE)
    best = overlap_ncc(fixed, moving, TRUE)
    assert best > 0.99
    for change in ({"tx_px": TRUE.tx_px + 1}, {"ty_px": TRUE.ty_px - 1}, {"rotation_deg": TRUE.rotation_deg + 1}):
        assert overlap_ncc(fixed, moving, replace(TRUE, **change)) < best - 0.01
    grid = [(dx, dy) for dx in np.arange(-2, 2.01, 0.5) for dy in np.arange(-2, 2.01, 0.5)]
    found = max(grid, key=lambda d: overlap_ncc(fixed, moving, replace(TRUE, tx_px=TRUE.tx_px + d[0],
                                                                      ty_px=TRUE.ty_px + d[1])))
    assert found == (0.0, 0.0)
    assert math.isnan(overlap_ncc(fixed, np.zeros_like(fixed), TRUE))  # no overlap: no number


def test_display_and_overlays():
    rng = np.random.default_rng(0)
    image = np.where(tissue_mask(), rng.uniform(1, 5, CANVAS), 0).astype(np.float32)
    for enhancement in ("none", "clahe", "sharpen"):
        shown = display_image(image, enhancement)
        assert shown.dtype == np.float32 and shown.min() >= 0 and shown.max() <= 1
        assert np.all(shown[~tissue_mask()] == 0)
    with pytest.raises(ValueError, match="enhancement"):
        display_image(image, "gamma")
    a, b = display_image(image), display_image(image[::-1])
    rgb = overlay_image(a, b, "two-colour")
    np.testing.assert_array_equal(rgb[..., 0], a)
    np.testing.assert_array_equal(rgb[..., 1], b)
    np.testing.assert_array_equal(rgb[..., 2], a)
    np.testing.assert_array_equal(overlay_image(a, b, "difference"), a - b)
    board = overlay_image(a, b, "checkerboard", tile_px=10)
    np.testing.assert_array_equal(board[:10, :10], a[:10, :10])
    np.testing.assert_array_equal(board[:10, 10:20], b[:10, 10:20])
    np.testing.assert_array_equal(board[10:20, 10:20], a[10:20, 10:20])


def test_history_undo_redo_round_trips_exactly():
    history = EditHistory(0.1)
    values = [0.1 + 0.2, 1 / 3, -2.5e-7, 7.0]
    for v in values:
        assert history.push(v)
    assert not history.push(7.0)  # no step for no change
    seen = [history.undo() for _ in range(5)]
    assert seen == [-2.5e-7, 1 / 3, 0.1 + 0.2, 0.1, 0.1] and not history.can_undo
    assert [history.redo() for _ in range(4)] == values and not history.can_redo
    history.undo()
    history.push(42.0)  # a new edit drops the redo branch
    assert not history.can_redo and history.undo() == -2.5e-7


def test_session_views_read_the_right_planes(reconstruction):
    session = open_alignment(reconstruction)
    assert session.keys == [(0, 1), (1, 2)] and session.images.factor == 1.0
    # Or the two folders given apart (no slice config then).
    apart = open_alignment(reconstruction / "12_register", common_dir=reconstruction / "10_common")
    assert apart.keys == session.keys and apart.slice_config is None and apart.reconstruction is None
    with pytest.raises(ValueError, match="10_common"):
        open_alignment(reconstruction / "12_register" / "pairwise_registration.csv")
    import zarr

    common = reconstruction / "10_common"
    raw = {k: np.asarray(zarr.open_array(str(common / f"slice_z{k:02d}_common.ome.zarr" / "0"))[...]) for k in (0, 1)}
    fixed, moving = session.view_images((0, 1), "plane", plane=2)
    np.testing.assert_array_equal(fixed, raw[0][T + 2])
    np.testing.assert_array_equal(moving, raw[1][2])
    fixed, moving = session.view_images((0, 1), "overlap")
    stack = raw[0][T:T + session.overlap_planes]
    count = (stack > 0).sum(axis=0)
    expected = np.where(count > 0, np.where(stack > 0, stack, 0).sum(axis=0) / np.maximum(count, 1), 0)
    np.testing.assert_allclose(fixed, expected, rtol=1e-6)
    aip = raw[1][:VALID].mean(axis=0)
    np.testing.assert_allclose(session.images.aip(1)[tissue_mask()], aip[tissue_mask()], rtol=1e-5)
    # Enhancement is for viewing only: the NCC does not change.
    nccs = {e: session.render((0, 1), "overlap", "two-colour", 0, e).ncc for e in ("none", "clahe", "sharpen")}
    assert len(set(nccs.values())) == 1
    # The identity/error row got a centre (the moving slice's data centre) so rotations are about the tissue.
    pair = session.pair((1, 2))
    assert abs(pair.center_x_px - (CANVAS[1] - 1) / 2) < 2 and abs(pair.center_y_px - (CANVAS[0] - 1) / 2) < 2


def test_session_edits_save_reset_and_notes(reconstruction, tmp_path):
    table = reconstruction / "12_register" / "pairwise_registration.csv"
    original = table.read_text()
    session = open_alignment(reconstruction)
    key = (0, 1)
    auto = session.pair(key)
    ncc_wrong = session.ncc(key)
    session.nudge(key, dx_px=-2.0)
    session.set_transform(key, tx_px=TRUE.tx_px, ty_px=TRUE.ty_px)
    session.nudge(key, drotation_deg=1.5)
    session.set_transform(key, rotation_deg=TRUE.rotation_deg)
    session.set_verified(key)
    final = session.state(key)
    assert final.manual and final.verified and session.dirty
    assert session.ncc(key) > ncc_wrong + 0.5 and session.ncc(key) > 0.9
    for _ in range(5):
        session.undo(key)
    assert session.state(key) == replace(final, tx_px=auto.tx_px, ty_px=auto.ty_px, rotation_deg=auto.rotation_deg,
                                         manual=False, verified=False)
    for _ in range(5):
        session.redo(key)
    assert session.state(key) == final
    with pytest.raises(ValueError, match="z overlap"):
        session.set_transform(key, z_match_plane=0)

    session.save()
    assert not session.dirty
    pairs, automatic = read_alignment_table(table)
    shared = read_pairwise_registration(table)  # what stacking, exclusion and the report read
    flags = [(p.fixed_id, p.moving_id, p.manual, p.verified) for p in shared]
    assert flags == [(0, 1, True, True), (1, 2, False, False)]
    row = shared[0]
    assert (row.tx_px, row.ty_px, row.rotation_deg) == (TRUE.tx_px, TRUE.ty_px, TRUE.rotation_deg)
    assert row.confidence == 1.0 and row.status == "ok" and row.ncc_after > row.ncc_before
    assert (automatic[key].tx_px, automatic[key].ty_px, automatic[key].rotation_deg) == (
        WRONG["tx_px"], WRONG["ty_px"], WRONG["rotation_deg"])
    assert automatic[key].confidence == 0.8 and not automatic[key].manual
    lines = table.read_text().splitlines()
    assert lines[0].split(",") == list(PAIR_COLUMNS) + [f"auto_{n}" for n in AUTO_FIELDS]
    assert lines[2] == original.splitlines()[2] + "," * len(AUTO_FIELDS)  # an untouched row is kept as it was
    assert not [p for p in table.parent.iterdir() if p.name.startswith(".")]  # no temporary left
    notes = {r.slice_id: r.notes for r in read_slice_config(reconstruction / "13_exclude" / "slice_config.csv")}
    assert notes == {0: "calibration_slice", 1: "manual alignment 0->1", 2: ""}

    # Reload: reset to automatic works from the saved columns, and undoes to the manual values exactly.
    again = open_alignment(reconstruction)
    assert again.state(key) == final
    again.reset_to_automatic(key)
    assert again.pair(key).tx_px == WRONG["tx_px"] and not again.state(key).manual
    again.undo(key)
    assert again.state(key) == final
    again.redo(key)
    again.set_verified((1, 2))
    again.save()
    commas = "," * len(AUTO_FIELDS)
    expected = [line + commas for line in original.splitlines()[1:]]
    assert expected[1].endswith(",0,0" + commas)
    expected[1] = expected[1][: -len(",0,0" + commas)] + ",0,1" + commas
    assert table.read_text().splitlines()[1:] == expected
    notes = {r.slice_id: r.notes for r in read_slice_config(reconstruction / "13_exclude" / "slice_config.csv")}
    assert notes == {0: "calibration_slice", 1: "", 2: "alignment verified 1->2"}

    with pytest.raises(OutputExistsError):
        write_alignment_table(table, [TRUE], if_exists="error")
    assert table.read_text().splitlines()[1:] == expected

    # The error row (no centre in the file) set by hand: saved about the centre it was shown with.
    centre = (again.pair((1, 2)).center_x_px, again.pair((1, 2)).center_y_px)
    again.set_transform((1, 2), rotation_deg=1.0, z_match_plane=T + 1)
    again.save()
    row = read_pairwise_registration(table)[1]
    assert row.manual and row.status == "ok" and (row.center_x_px, row.center_y_px) == centre
    assert (row.rotation_deg, row.z_match_plane) == (1.0, T + 1)
    assert read_alignment_table(table)[1][(1, 2)].status == "error"  # the automatic result, kept


def test_alignment_package_round_trip(reconstruction, tmp_path):
    table = reconstruction / "12_register" / "pairwise_registration.csv"
    original = table.read_text()
    # Server: export with the CLI (the registered step), as a zip and as a folder.
    assert main(["alignment-package", str(reconstruction), str(tmp_path / "pkg.zip"), "--quiet"]) == 0
    server = open_alignment(reconstruction)
    folder = server.export_package(tmp_path / "pkg")
    with pytest.raises(OutputExistsError):
        server.export_package(tmp_path / "pkg")
    for package in (tmp_path / "pkg.zip", folder):
        laptop = open_alignment(package)
        assert laptop.keys == server.keys and laptop.views == ("aip",)
        for sid in (0, 1, 2):
            np.testing.assert_array_equal(laptop.images.aip(sid), server.images.aip(sid))
        assert laptop.ncc((0, 1), "aip") == pytest.approx(server.ncc((0, 1), "aip"), abs=1e-9)
        with pytest.raises(ValueError, match="AIP"):
            laptop.view_images((0, 1), "overlap")
    # Laptop: align pair 0->1 on the zip's AIPs, save (the table lies next to the zip), send it back.
    laptop = open_alignment(tmp_path / "pkg.zip")
    laptop.set_transform((0, 1), tx_px=TRUE.tx_px, ty_px=TRUE.ty_px, rotation_deg=TRUE.rotation_deg)
    laptop.set_verified((1, 2))
    returned = laptop.save()
    assert returned == tmp_path / "pkg_pairwise_registration.csv" and table.read_text() == original
    # Server: import (the registered step) and check the pairs arrived exactly, the automatic results kept.
    result = STEPS["alignment-import"].run(returned, reconstruction)
    assert result.imported == [(0, 1), (1, 2)]
    merged = open_alignment(reconstruction)
    assert merged.state((0, 1)) == laptop.state((0, 1)) and merged.state((1, 2)).verified
    assert merged.automatic[(0, 1)].tx_px == WRONG["tx_px"]

    # A table aligned against another automatic result is refused unless forced.
    pairs = read_pairwise_registration(table)
    pairs[0] = replace(pairs[0], manual=False, tx_px=9.0)
    write_alignment_table(table, pairs)
    with pytest.raises(ValueError, match="another automatic result"):
        open_alignment(reconstruction).import_table(returned)
    assert open_alignment(reconstruction).import_table(returned, force=True) == [(0, 1), (1, 2)]


def test_stacking_uses_a_manual_row_at_full_confidence(reconstruction, tmp_path):
    """The registered stack step: a manual row is applied in full even when its confidence says to skip it."""
    table = reconstruction / "12_register" / "pairwise_registration.csv"
    pairs = read_pairwise_registration(table)
    low = [replace(pairs[0], tx_px=TRUE.tx_px, ty_px=TRUE.ty_px, rotation_deg=TRUE.rotation_deg, confidence=0.05),
           pairs[1]]
    step = STEPS["stack"]
    (common, _, _), mapping = restack_inputs(reconstruction)
    assert mapping["slice_config"] == str(reconstruction / "13_exclude" / "slice_config.csv")
    params = params_from_mapping(step.params, {**mapping, "blend": "none"})
    decisions = {}
    for manual in (False, True):
        write_pairwise_registration(table, [replace(low[0], manual=manual), low[1]], if_exists="overwrite")
        result = step.run(common, table, tmp_path / f"stack_{manual}", params=params)
        decisions[manual] = result.decisions[1]
        with open(result.decisions_path, newline="") as fh:
            rows = list(csv.DictReader(fh))
        assert rows[1]["manual"] == str(int(manual))
    assert decisions[False].gate == "skip"
    assert decisions[True].gate == "full" and decisions[True].reason == "manual"
    assert decisions[True].rotation_deg == pytest.approx(TRUE.rotation_deg)
    assert (decisions[True].tx_px, decisions[True].ty_px) == pytest.approx((TRUE.tx_px, TRUE.ty_px))
