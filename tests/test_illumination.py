"""Illumination correction (step 3): our BaSiC against ground truth.

Ground truth: the synthetic acquisitions multiply every tile by the same vignetting ``acq.flatfield`` at every
depth. Which planes count for the flat-field figures: the planes that lie entirely below the cut surface in
every tile of the slice (``z >= ceil(deepest true surface) + 1``; the plane holding the surface is left out
because its partial-volume edge follows the tilted cut, a lateral gradient common to all tiles). Above the
surface the tiles see only the faint medium and the noise floor.

Measured (numpy backend, default parameters): on ``tiny`` (3 x 3 tiles of 40 x 40 pixels) the correlation
with the true vignetting over those planes is 0.91 on average, 0.79 at worst. The issue's 0.98 is NOT met on
``tiny``: with nine tiles the tiles' own content (brain against agarose) does not average out and BaSiC cannot
tell it from shading; it comes closer with more tiles (7 x 7: 0.977 on average). basicpy does worse on the same
planes (0.79 on average). On the ``bench`` phantom (4 x 4 tiles of 200 x 200) the step reaches 0.993 on
average and 0.988 at worst; see docs/benchmarks.md, also for basicpy on the same tiles.
"""

from __future__ import annotations

import json
import threading
import tracemalloc

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from napari_soct.processing.correct import BasicFit, IlluminationParams, basic_fit, correct_illumination
from napari_soct.processing.correct.illumination import _dct_synthesis_matrix, _Resampler, flatfield_path_for
from napari_soct.processing.io.atomic import OutputExistsError
from napari_soct.processing.io.mosaic import open_mosaic_grid
from napari_soct.processing.preprocess import preprocess_acquisition
from napari_soct.processing.progress import Cancelled
from napari_soct.processing.synthetic import make_acquisition

MIB = 1024**2


# ----------------------------------------------------------------------------- helpers


def _corr(a, b) -> float:
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


def _tissue_planes(acq, sid) -> range:
    """Planes entirely below the cut surface in every tile (see the module docstring)."""
    deepest = acq.interface_range_samples(sid)[1]
    return range(int(np.ceil(deepest)) + 1, acq.config.n_z)


def _overlap_mismatch(path, planes, overlap_px) -> float:
    """Mean |log| ratio of the column (row) profiles two neighbouring tiles see in their shared strip.

    The strip shows the same tissue in both tiles, so the ratio is the flat-field's at the two ends of the
    tile: the intensity step at the tile border of a mosaic.
    """
    grid = open_mosaic_grid(path)
    present = set(grid.tile_positions())
    ty, tx = grid.tile_shape[1:]
    steps = []
    for x, y in sorted(present):
        a = grid.read_tile(x, y, z=planes)
        if (x + 1, y) in present:
            b = grid.read_tile(x + 1, y, z=planes)
            steps.append(np.abs(np.log(a[:, :, tx - overlap_px:].mean(axis=(0, 1))
                                       / b[:, :, :overlap_px].mean(axis=(0, 1)))).mean())
        if (x, y + 1) in present:
            b = grid.read_tile(x, y + 1, z=planes)
            steps.append(np.abs(np.log(a[:, ty - overlap_px:, :].mean(axis=(0, 2))
                                       / b[:, :overlap_px, :].mean(axis=(0, 2)))).mean())
    return float(np.mean(steps))


def _shaded_stack(n=40, h=64, w=80, dark=0.0, seed=0):
    """Images ``b_i * F * speckle + dark`` with bright square objects, and the truth."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    flat = 0.6 + 0.4 * np.exp(-(((yy - 30) / 30) ** 2 + ((xx - 45) / 35) ** 2))
    flat /= flat.mean()
    base = rng.uniform(0.5, 3.0, n)
    images = base[:, None, None] * flat * rng.gamma(20, 1 / 20, (n, h, w)) + dark
    for i in range(n):
        y, x = rng.integers(0, h - 8), rng.integers(0, w - 8)
        images[i, y : y + 8, x : x + 8] += 3.0
    return images.astype(np.float32), flat, base


@pytest.fixture(scope="module")
def tiny_grids(tiny_acquisition, tmp_path_factory):
    out = tmp_path_factory.mktemp("illum-pre")
    preprocess_acquisition(tiny_acquisition.raw_dir, out, generate_previews=False)
    return out


@pytest.fixture(scope="module")
def tiny_corrected(tiny_grids, tmp_path_factory):
    out = tmp_path_factory.mktemp("illum-out")
    return correct_illumination(tiny_grids, out, IlluminationParams())


# ----------------------------------------------------------------------------- the solver


def test_basic_fit_recovers_a_known_flatfield_and_baselines():
    images, flat, base = _shaded_stack()
    fit = basic_fit(images, backend="numpy")
    assert isinstance(fit, BasicFit) and fit.backend == "numpy"
    assert fit.flatfield.shape == flat.shape and fit.flatfield.dtype == np.float32
    assert fit.flatfield.mean() == pytest.approx(1.0, abs=1e-4)
    assert _corr(fit.flatfield, flat) > 0.99
    assert np.abs(fit.flatfield - flat).max() < 0.1
    # Baselines in image units: image i is about baseline_i * flatfield.
    assert _corr(fit.baseline, base) > 0.999
    assert np.median(fit.baseline / base) == pytest.approx(1.0, rel=0.05)
    assert fit.converged and fit.iterations > 0 and fit.reweight_iterations >= 1
    assert not fit.darkfield.any()


def test_basic_fit_at_a_smaller_working_size_returns_the_full_size_flatfield():
    images, flat, _ = _shaded_stack()
    fit = basic_fit(images, working_size=24, backend="numpy")
    assert fit.flatfield.shape == flat.shape
    assert _corr(fit.flatfield, flat) > 0.99


def test_basic_fit_dark_offset():
    images, flat, _ = _shaded_stack(dark=0.4)
    plain = basic_fit(images, backend="numpy")
    dark = basic_fit(images, get_darkfield=True, backend="numpy")
    assert dark.darkfield.shape == flat.shape and np.ptp(dark.darkfield) == 0  # one constant
    assert dark.darkfield.mean() == pytest.approx(0.4, abs=0.1)
    # Without the offset the shading looks shallower than it is; with it, the values come right.
    assert np.abs(dark.flatfield - flat).max() < 0.6 * np.abs(plain.flatfield - flat).max()


def test_resampling_round_trip():
    field = gaussian_filter(np.random.default_rng(1).random((12, 20)), 3).astype(np.float32)
    same = _Resampler((12, 20), 128)
    assert same.work_shape == (12, 20)
    np.testing.assert_allclose(same.up(field), field, atol=1e-5)  # DCT series at the same pixel centres
    np.testing.assert_allclose(_dct_synthesis_matrix(7, 7).T @ _dct_synthesis_matrix(7, 7), np.eye(7), atol=1e-5)
    down = _Resampler((48, 80), 16)
    assert down.work_shape == (16, 16)
    np.testing.assert_allclose(down.down(np.full((2, 48, 80), 3.0)), 3.0, rtol=1e-5)
    smooth = np.cos(np.linspace(0, np.pi, 48))[:, None] * np.ones((1, 80))
    np.testing.assert_allclose(down.up(down.down(smooth[None]))[0], smooth, atol=0.02)


@pytest.mark.parametrize(
    "images, match",
    [
        (np.ones((8, 8)), "shape"),
        (np.ones((1, 8, 8)), "at least 2 images"),
        (np.ones((3, 1, 8)), "2 x 2"),
        (np.full((3, 8, 8), np.nan), "NaN"),
        (np.zeros((3, 8, 8)), "not positive"),
        (np.ones((3, 8, 8), complex), "real"),
    ],
)
def test_basic_fit_rejects_bad_images(images, match):
    with pytest.raises(ValueError, match=match):
        basic_fit(images)


def test_basic_fit_rejects_bad_settings():
    images, _, _ = _shaded_stack(n=4, h=16, w=16)
    with pytest.raises(ValueError, match="smoothness_flatfield"):
        basic_fit(images, smoothness_flatfield=-1)
    with pytest.raises(ValueError, match="backend"):
        basic_fit(images, backend="torch")
    with pytest.raises(ValueError, match="working_size"):
        basic_fit(images, working_size=1)


def test_basicpy_backend_is_optional():
    try:
        import basicpy  # noqa: F401
    except ImportError:
        images, _, _ = _shaded_stack(n=4, h=16, w=16)
        with pytest.raises(ImportError, match="basicpy"):
            basic_fit(images, backend="basicpy")
    else:  # pragma: no cover - only where basicpy is installed
        images, flat, _ = _shaded_stack()
        assert _corr(basic_fit(images, backend="basicpy").flatfield, flat) > 0.95


# ----------------------------------------------------------------------------- the step on the tiny phantom


def test_flatfield_against_the_true_vignetting(tiny_acquisition, tiny_corrected):
    acq = tiny_acquisition
    result = tiny_corrected
    assert sorted(result.outputs) == acq.slice_ids
    figures = []
    for sid in acq.slice_ids:
        fields = np.load(result.metrics[sid]["flatfield_path"])
        assert fields.shape == acq.tile_shape
        np.testing.assert_allclose(fields.mean(axis=(1, 2)), 1.0, rtol=1e-3)
        corr = [_corr(fields[z], acq.flatfield) for z in _tissue_planes(acq, sid)]
        figures.append((sid, np.mean(corr), np.min(corr)))
    print("\nflat-field vs truth on tiny (slice, mean, min over tissue planes):",
          [(s, round(m, 3), round(lo, 3)) for s, m, lo in figures])
    means = [m for _, m, _ in figures]
    # Measured 0.86 / 0.94 / 0.93 (means), 0.79 at worst: below the 0.98 on tiny (module docstring).
    assert np.mean(means) >= 0.88
    assert min(lo for _, _, lo in figures) >= 0.75


def test_flatfield_beats_the_plain_average_of_tiles(tiny_acquisition, tiny_grids, tiny_corrected):
    """The robust low-rank + sparse model against the obvious estimate: the smoothed mean of normalised tiles."""
    acq = tiny_acquisition
    ours, plain = [], []
    for sid in acq.slice_ids:
        grid = open_mosaic_grid(next(tiny_grids.glob(f"*_z{sid:02d}.ome.zarr")))
        tiles = np.stack([grid.read_tile(x, y) for x, y in grid.tile_positions()])
        fields = np.load(tiny_corrected.metrics[sid]["flatfield_path"])
        for z in _tissue_planes(acq, sid):
            normalised = tiles[:, z] / tiles[:, z].mean(axis=(1, 2), keepdims=True)
            plain.append(_corr(gaussian_filter(normalised.mean(axis=0), 3, mode="nearest"), acq.flatfield))
            ours.append(_corr(fields[z], acq.flatfield))
    print(f"\ntiny: ours {np.mean(ours):.3f}, smoothed mean of tiles {np.mean(plain):.3f}")
    assert np.mean(ours) > np.mean(plain) + 0.03


def test_more_tiles_bring_the_estimate_to_the_truth(tmp_path):
    """With 7 x 7 tiles of the same phantom the tiles' content averages out better."""
    acq = make_acquisition(tmp_path / "acq", preset="tiny", seed=0, grid_shape=(7, 7), n_slices=1, missing_tiles=[])
    tiles = np.stack([acq.true_tile(0, ix, iy) for ix, iy in acq.tiles(0)])
    corr = [_corr(basic_fit(tiles[:, z]).flatfield, acq.flatfield) for z in _tissue_planes(acq, 0)]
    print(f"\n7x7 tiles: mean {np.mean(corr):.3f}, min {np.min(corr):.3f}")
    assert np.mean(corr) >= 0.95 and np.min(corr) >= 0.93


def test_correction_reduces_tile_border_steps(tiny_acquisition, tiny_grids, tiny_corrected, tmp_path):
    from napari_soct.processing.io.mosaic import create_mosaic_grid_like

    acq = tiny_acquisition
    overlap = round(acq.config.nx * acq.config.overlap)
    before, after, floor = [], [], []
    for sid in acq.slice_ids:
        planes = slice(_tissue_planes(acq, sid).start, None)
        raw_path = next(tiny_grids.glob(f"*_z{sid:02d}.ome.zarr"))
        before.append(_overlap_mismatch(raw_path, planes, overlap))
        after.append(_overlap_mismatch(tiny_corrected.outputs[sid], planes, overlap))
        # Floor: the same measure after dividing by the true flat-field (the speckle noise remains).
        grid = open_mosaic_grid(raw_path)
        ideal_path = tmp_path / f"ideal_z{sid:02d}.ome.zarr"
        ideal = create_mosaic_grid_like(ideal_path, grid)
        for x, y in grid.tile_positions():
            ideal[grid.tile_region(x, y)] = grid.read_tile(x, y) / acq.flatfield
        floor.append(_overlap_mismatch(ideal_path, planes, overlap))
    print("\nborder step per slice (|log| ratio in the overlaps): raw", np.round(before, 3), "corrected",
          np.round(after, 3), "true flat-field", np.round(floor, 3))
    # Measured: 0.083/0.079/0.081 -> 0.078/0.050/0.046 (true flat-field 0.021/0.024/0.022).
    assert all(a < b for a, b in zip(after, before))
    assert np.mean(after) < 0.8 * np.mean(before)
    assert np.mean(after) - np.mean(floor) < 0.7 * (np.mean(before) - np.mean(floor))


def test_outputs_layout_metrics_and_exact_division(tiny_grids, tiny_corrected):
    result = tiny_corrected
    record = json.loads(result.metrics_path.read_text())
    assert record["step"] == "illumination" and set(record["slices"]) == {str(s) for s in result.outputs}
    for sid, path in result.outputs.items():
        assert path.name == f"slice_z{sid:02d}_illumination.ome.zarr"
        src = open_mosaic_grid(next(tiny_grids.glob(f"*_z{sid:02d}.ome.zarr")))
        out = open_mosaic_grid(path)
        assert out.array.shape == src.array.shape and out.array.chunks == src.array.chunks
        assert out.tile_positions() == src.tile_positions() and out.voxel_size_um == src.voxel_size_um
        assert out.attributes["illumination"]["method"] == "BaSiC"
        fields = np.load(flatfield_path_for(path))
        for x, y in src.tile_positions()[:3]:
            np.testing.assert_allclose(out.read_tile(x, y), src.read_tile(x, y) / fields, rtol=1e-5)
        metrics = result.metrics[sid]
        assert metrics["planes_fitted"] == src.tile_shape[0] and metrics["backend"] == "numpy"
        assert 0 < metrics["flatfield_min"] < 1 < metrics["flatfield_max"]
        assert len(metrics["planes"]["iterations"]) == src.tile_shape[0]
        tiles = metrics["tiles"]
        assert len(tiles) == len(src.tile_positions())
        ty, tx = src.tile_shape[1:]
        for t in tiles:
            assert (t["y0_px"], t["x0_px"], t["height_px"], t["width_px"]) == (t["y"] * ty, t["x"] * tx, ty, tx)
            assert np.isfinite(t["residual"]) and t["baseline"] > 0


def test_warm_start_gives_the_same_flatfields(tiny_grids, tiny_corrected, tmp_path):
    cold = correct_illumination(tiny_grids, tmp_path, IlluminationParams(warm_start=False))
    for sid in cold.outputs:
        a = np.load(cold.metrics[sid]["flatfield_path"])
        b = np.load(tiny_corrected.metrics[sid]["flatfield_path"])
        corr = [_corr(a[z], b[z]) for z in range(4, a.shape[0])]
        assert np.median(corr) > 0.97


def test_existing_outputs_cancel_and_missing_input(tiny_grids, tiny_corrected, tmp_path):
    with pytest.raises(OutputExistsError):
        correct_illumination(tiny_grids, tiny_corrected.out_dir, IlluminationParams())
    kept = correct_illumination(tiny_grids, tiny_corrected.out_dir, IlluminationParams(if_exists="skip"))
    assert sorted(kept.skipped) == sorted(tiny_corrected.outputs)
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        correct_illumination(tiny_grids, tmp_path / "cancelled", IlluminationParams(), cancel=cancel)
    assert not any(p.name.endswith(".ome.zarr") for p in (tmp_path / "cancelled").glob("*"))
    with pytest.raises(FileNotFoundError):
        correct_illumination(tmp_path / "nothing-here", tmp_path / "out", IlluminationParams())
    try:
        import basicpy  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="basicpy"):
            correct_illumination(tiny_grids, tmp_path / "bp", IlluminationParams(backend="basicpy"))


# ----------------------------------------------------------------------------- memory


@pytest.fixture(scope="module")
def deep_grid(tmp_path_factory):
    """One slice of 4 x 4 tiles, 96 planes deep: 9.4 MiB of float32, more than the budgets below."""
    root = tmp_path_factory.mktemp("deep")
    acq = make_acquisition(root / "acq", preset="tiny", seed=1, n_slices=1, n_z=96, grid_shape=(4, 4),
                           missing_tiles=[])
    preprocess_acquisition(acq.raw_dir, root / "pre", generate_previews=False)
    return acq, next((root / "pre").glob("*.ome.zarr"))


def test_peak_memory_stays_within_a_budget_smaller_than_the_slice(deep_grid, tmp_path):
    acq, path = deep_grid
    slice_bytes = 4 * acq.config.n_z * 16 * acq.config.ny * acq.config.nx
    budget = 6 * MIB
    assert slice_bytes > 1.5 * budget
    params = IlluminationParams(memory_budget_gb=budget / 1024**3, workers=1, warm_start=False)
    tracemalloc.start()
    try:
        small = correct_illumination(path, tmp_path / "small", params)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    metrics = small.metrics[acq.slice_ids[0]]
    print(f"\nslice {slice_bytes / MIB:.1f} MiB, budget {budget / MIB:.1f} MiB, peak {peak / MIB:.2f} MiB, "
          f"z_block {metrics['z_block']} of {acq.config.n_z}")
    assert metrics["z_block"] < acq.config.n_z
    assert peak <= budget
    # Same flat-fields as with all planes in memory at once (planes are fitted independently when cold).
    big = correct_illumination(path, tmp_path / "big", IlluminationParams(workers=1, warm_start=False))
    assert big.metrics[acq.slice_ids[0]]["z_block"] == acq.config.n_z
    np.testing.assert_array_equal(np.load(metrics["flatfield_path"]),
                                  np.load(big.metrics[acq.slice_ids[0]]["flatfield_path"]))


def test_budget_below_one_plane_of_all_tiles_is_refused(deep_grid, tmp_path):
    _, path = deep_grid
    with pytest.raises(ValueError, match="one depth plane of all 16 tiles"):
        correct_illumination(path, tmp_path, IlluminationParams(memory_budget_gb=2 * MIB / 1024**3, workers=1))


def test_plane_step_fits_every_nth_plane_and_interpolates(tiny_grids, tmp_path):
    full = correct_illumination(tiny_grids, tmp_path / "full", IlluminationParams(warm_start=False))
    strided = correct_illumination(tiny_grids, tmp_path / "step", IlluminationParams(warm_start=False, plane_step=4))
    for sid in full.outputs:
        a = np.load(full.metrics[sid]["flatfield_path"])
        b = np.load(strided.metrics[sid]["flatfield_path"])
        nz = a.shape[0]
        fitted = sorted(set(range(0, nz, 4)) | {nz - 1})
        assert strided.metrics[sid]["planes_interpolated"] == nz - len(fitted)
        assert strided.metrics[sid]["planes"]["fitted"] == [z in fitted for z in range(nz)]
        np.testing.assert_allclose(b[fitted], a[fitted], rtol=1e-5, atol=1e-6)  # planes are fitted independently
        # In between: the linear interpolation of the neighbouring fitted planes (at working size = tile size).
        np.testing.assert_allclose(b[2], 0.5 * (b[0] + b[4]), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------- plane groups as sub-tasks on a cluster
def test_plane_groups_run_as_cluster_subtasks_with_the_same_result(tiny_acquisition, tiny_grids, tmp_path):
    """With ``planes_per_task`` the planes of a slice are fitted in groups; on a dask worker each group is a
    sub-task that the other worker can take. The groups depend on the parameters only: a LocalCluster of two
    processes writes the same bytes as one thread, and the grouped fit stays as close to the truth."""
    from distributed import Client, LocalCluster

    from napari_soct.processing.correct.illumination import plane_groups
    from napari_soct.processing.slices import slices_on_client

    groups = plane_groups(np.arange(0, 32, 1), 10)
    assert [g.size for g in groups] == [8, 8, 8, 8] and np.array_equal(np.concatenate(groups), np.arange(32))
    assert len(plane_groups(np.arange(32), 0)) == 1

    params = IlluminationParams(workers=2, planes_per_task=10)
    local = correct_illumination(tiny_grids, tmp_path / "threads", params)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client, slices_on_client(client):
        remote = correct_illumination(tiny_grids, tmp_path / "cluster", params)
        prefixes = client.run_on_scheduler(lambda dask_scheduler: sorted(dask_scheduler.task_prefixes))
    assert {"soct-illumination-fit", "soct-illumination-apply", "soct-illumination"} <= set(prefixes), prefixes
    one_group = correct_illumination(tiny_grids, tmp_path / "one", IlluminationParams(workers=2, planes_per_task=0))
    acq = tiny_acquisition
    for sid in acq.slice_ids:
        a = open_mosaic_grid(local.outputs[sid])
        b = open_mosaic_grid(remote.outputs[sid])
        for x, y in a.tile_positions():
            np.testing.assert_array_equal(a.read_tile(x, y), b.read_tile(x, y))
        grouped = np.load(local.metrics[sid]["flatfield_path"])
        whole = np.load(one_group.metrics[sid]["flatfield_path"])
        planes = _tissue_planes(acq, sid)
        corr_grouped = np.mean([_corr(grouped[z], acq.flatfield) for z in planes])
        corr_whole = np.mean([_corr(whole[z], acq.flatfield) for z in planes])
        assert corr_grouped >= corr_whole - 0.02, (sid, corr_grouped, corr_whole)
