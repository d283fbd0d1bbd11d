"""Step 13, auto-exclusion: DBSCAN, run-length clusters, manual choices kept, and the phantom with noise slices."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from napari_soct.processing.io.atomic import OutputExistsError
from napari_soct.processing.io.tables import read_slice_config
from napari_soct.processing.stack.exclusion import ExclusionParams, auto_exclude_slices, dbscan, poor_pairs
from napari_soct.processing.stack.transforms import PairTransform, write_pairwise_registration

GOOD = {"ncc_after": 0.95, "z_match_ncc": 0.55, "shift": 0.3}


def table(n_slices: int, bad: dict[int, dict] | None = None, seed: int = 0) -> list[PairTransform]:
    """Pairs i -> i+1 with good metrics (small jitter); ``bad`` {moving_id: metrics} replaces some."""
    rng = np.random.default_rng(seed)
    pairs = []
    for moving in range(1, n_slices):
        m = {**GOOD, **(bad or {}).get(moving, {})}
        jitter = rng.normal(0, 1, 3)
        pairs.append(PairTransform(
            moving - 1, moving, z_match_plane=15, expected_z_plane=15,
            z_match_ncc=m["z_match_ncc"] + 0.02 * jitter[0], ncc_after=m["ncc_after"] + 0.01 * jitter[1],
            ncc_before=m["ncc_after"] - 0.01, tx_px=m["shift"] + 0.1 * jitter[2], ty_px=0.1,
            confidence=0.9, status=m.get("status", "ok"), verified=m.get("verified", False)))
    return pairs


def write_inputs(tmp_path, pairs, config_text: str | None = None):
    csv = tmp_path / "pairwise_registration.csv"
    write_pairwise_registration(csv, pairs, if_exists="overwrite")
    config = tmp_path / "slice_config.csv"
    ids = sorted({p.fixed_id for p in pairs} | {p.moving_id for p in pairs})
    config.write_text(config_text or "slice_id,use\n" + "".join(f"{i},true\n" for i in ids))
    return csv, config


def test_dbscan_matches_a_hand_clustering():
    # Two dense groups, a border point reached only from the first group's core, and an isolated point.
    points = np.array([[0.0, 0.0], [0.4, 0.0], [0.0, 0.4], [0.4, 0.4],  # cluster 0 (cores)
                       [0.95, 0.4],                                    # border of cluster 0 (one neighbour)
                       [5.0, 5.0], [5.3, 5.0], [5.0, 5.3],              # cluster 1
                       [9.0, 0.0]])                                     # noise
    labels = dbscan(points, eps=0.6, min_samples=3)
    assert labels.tolist() == [0, 0, 0, 0, 0, 1, 1, 1, -1]
    # With a larger min_samples the small group is noise, and so is the border point.
    assert dbscan(points, eps=0.6, min_samples=4).tolist() == [0, 0, 0, 0, 0, -1, -1, -1, -1]
    assert dbscan(np.zeros((0, 3)), 1.0, 2).size == 0


def test_cluster_of_consecutive_poor_pairs_excludes_its_inner_slices(tmp_path):
    bad = {m: {"ncc_after": 0.12, "z_match_ncc": 0.02, "shift": 0.0} for m in (5, 6, 7)}  # pairs 4->5 .. 6->7
    bad[10] = {"ncc_after": 0.10, "z_match_ncc": 0.01, "shift": 0.0}  # an isolated bad pair 9->10
    pairs = table(12, bad)
    config_text = ("slice_id,use,auto_excluded,auto_exclude_reason\n"
                   + "".join(f"{i},true,,\n" for i in range(12))
                   + "12,true,true,quality 0.31 < 0.5 (low contrast)\n13,false,,\n")
    csv, config = write_inputs(tmp_path, pairs, config_text)
    result = auto_exclude_slices(csv, config, tmp_path / "out", ExclusionParams())
    assert result.excluded == [5, 6]
    assert set(result.poor) == {(4, 5), (5, 6), (6, 7), (9, 10)}
    (cluster,) = result.clusters
    assert cluster["pairs"] == [[4, 5], [5, 6], [6, 7]] and cluster["excluded"] == [5, 6]
    rows = {r.slice_id: r for r in read_slice_config(result.slice_config_path)}
    for sid in (5, 6):
        assert rows[sid].auto_excluded and rows[sid].use
        assert rows[sid].auto_exclude_reason.startswith("registration cluster 5-6 (pairs 4->5 .. 6->7): ncc_after 0.1")
    for sid in (4, 7, 9, 10, 11):  # the cluster's edges and the isolated pair's slices stay
        assert not rows[sid].auto_excluded
    assert rows[12].auto_excluded and rows[12].auto_exclude_reason.startswith("quality 0.31")  # step 8 kept
    assert rows[13].use is False and not rows[13].auto_excluded
    report = json.loads(result.report_path.read_text())
    assert report["excluded"] == [5, 6] and [p["poor"] for p in report["pairs"]].count(True) == 4


def test_dbscan_outliers_above_the_floors_are_poor_and_good_outliers_are_not(tmp_path):
    # Pairs 6->7, 7->8: NCC 0.7, shift 6 px, z NCC 0.35 - above every floor, far from the other registrations.
    bad = {m: {"ncc_after": 0.70, "z_match_ncc": 0.35, "shift": 6.0} for m in (7, 8)}
    bad[3] = {"ncc_after": 0.995, "z_match_ncc": 0.85, "shift": 0.0}  # unusually good: outside, but better
    pairs = table(14, bad, seed=2)
    why, details = poor_pairs(pairs, ExclusionParams())
    assert sorted(why) == [6, 7]  # rows of pairs 6->7 and 7->8
    assert all("outlier (DBSCAN)" in w and "translation" in w for w in why.values())
    assert details["labels"][2] != details["main_cluster"]  # the good outlier is not in the main cluster either
    csv, config = write_inputs(tmp_path, pairs)
    result = auto_exclude_slices(csv, config, tmp_path / "out", ExclusionParams())
    assert result.excluded == [7]


def test_run_length_verified_pairs_errors_and_manual_exclusions(tmp_path):
    bad = {m: {"ncc_after": 0.1, "z_match_ncc": 0.0, "shift": 0.0} for m in (3, 4)}  # a run of 2: slice 3
    pairs = table(10, bad)
    csv, config = write_inputs(tmp_path, pairs)
    assert auto_exclude_slices(csv, config, tmp_path / "a", ExclusionParams()).excluded == [3]
    three = replace(ExclusionParams(), min_consecutive=3)
    assert auto_exclude_slices(csv, config, tmp_path / "b", three).excluded == []
    # A pair verified by hand is never poor; an error row is.
    pairs[3] = replace(pairs[3], verified=True)  # 3->4
    pairs[6] = replace(pairs[6], status="error", ncc_after=float("nan"), z_match_ncc=float("nan"))  # 6->7
    pairs[7] = replace(pairs[7], ncc_after=0.05, z_match_ncc=0.01)  # 7->8: with the error, a run of 2
    csv, _ = write_inputs(tmp_path, pairs)
    manual = tmp_path / "manual.csv"
    manual.write_text("slice_id,use\n" + "".join(f"{i},{'false' if i == 7 else 'true'}\n" for i in range(10)))
    result = auto_exclude_slices(csv, manual, tmp_path / "c", ExclusionParams())
    assert (6, 7) in result.poor and "registration error" in result.poor[(6, 7)] and (3, 4) not in result.poor
    assert result.excluded == []  # 7 would be, but it is excluded by hand: untouched
    rows = {r.slice_id: r for r in read_slice_config(result.slice_config_path)}
    assert rows[7].use is False and not rows[7].auto_excluded and rows[7].auto_exclude_reason == ""
    assert not rows[3].auto_excluded
    with pytest.raises(OutputExistsError):
        auto_exclude_slices(csv, manual, tmp_path / "c", ExclusionParams())
    kept = auto_exclude_slices(csv, manual, tmp_path / "c", replace(ExclusionParams(), if_exists="skip"))
    assert kept.skipped
    with pytest.raises(FileNotFoundError, match="pairwise_registration"):
        auto_exclude_slices(tmp_path / "missing.csv", manual, tmp_path / "d", ExclusionParams())


@pytest.fixture(scope="module")
def noisy_phantom(tmp_path_factory):
    """Eight phantom slices in common space, slices 3 and 4 replaced by speckle noise, registered (step 12)."""
    from test_register import paint_common_space, write_slice

    from napari_soct.pipeline.reconstruct import ReconstructParams, reconstruct
    from napari_soct.processing.io.omezarr import open_ome_zarr
    from napari_soct.processing.preprocess import preprocess_acquisition
    from napari_soct.processing.stack.register import RegistrationParams, register_pairwise
    from napari_soct.processing.synthetic import make_acquisition

    root = tmp_path_factory.mktemp("exclusion")
    acq = make_acquisition(root / "acq", preset="tiny", seed=0, n_slices=8)
    preprocess_acquisition(acq.raw_dir, root / "mosaic", generate_previews=False)
    rec = reconstruct(root / "mosaic", root / "rec", ReconstructParams(assemble=False))
    paths = paint_common_space(rec.out_dir / "07_normalize", root / "common")
    rng = np.random.default_rng(5)
    for sid in (3, 4):
        image = open_ome_zarr(paths[sid])
        data = np.asarray(image.levels[0][...])
        noise = ((rng.gamma(2.0, 0.25, data.shape) + 1e-3) * (data > 0)).astype(np.float32)
        write_slice(paths[sid], noise, image.scales_mm[0], image.attributes["soct"])
    registration = register_pairwise(root / "common", root / "12_register", RegistrationParams())
    return {"root": root, "registration": registration, "config": root / "mosaic" / "slice_config.csv"}


def test_noise_slices_in_the_phantom_are_excluded(noisy_phantom, tmp_path):
    registration = noisy_phantom["registration"]
    status = {(p.fixed_id, p.moving_id): p.status for p in registration.pairs}
    assert all(status[k] == "fallback_identity" for k in [(2, 3), (3, 4), (4, 5)])
    result = auto_exclude_slices(registration.csv_path, noisy_phantom["config"], tmp_path / "13_exclude")
    assert result.excluded == [3, 4]
    assert set(result.poor) == {(2, 3), (3, 4), (4, 5)}
    rows = {r.slice_id: r for r in read_slice_config(result.slice_config_path)}
    assert rows[3].auto_exclude_reason.startswith("registration cluster 3-4 (pairs 2->3 .. 4->5)")
    assert rows[0].use is False and rows[0].notes == "calibration_slice"  # manual, from preprocessing
    assert [s for s, r in rows.items() if r.auto_excluded] == [3, 4]


def test_auto_exclude_widget(make_napari_viewer, qtbot, tmp_path):
    pytest.importorskip("napari")
    bad = {m: {"ncc_after": 0.1, "z_match_ncc": 0.0, "shift": 0.0} for m in (3, 4, 5)}
    csv, config = write_inputs(tmp_path, table(9, bad))
    viewer = make_napari_viewer(show=True)
    _, widget = viewer.window.add_plugin_dock_widget("napari-soct", "13. Auto-exclude clusters")
    widget.input_widgets["registration_csv"].value = csv
    widget.input_widgets["slice_config"].value = config
    widget.input_widgets["out_dir"].value = tmp_path / "out"
    widget.param_widgets["min_consecutive"].value = 3
    assert widget.start() is not None
    qtbot.waitUntil(lambda: widget.run_button.enabled and widget.result is not None, timeout=30_000)
    assert widget.status.value.startswith("auto-exclude: 3 poor pair(s); excluded: [3, 4]"), widget.status.value
    rows = {r.slice_id: r for r in read_slice_config(tmp_path / "out" / "slice_config.csv")}
    assert [s for s, r in rows.items() if r.auto_excluded] == [3, 4]
