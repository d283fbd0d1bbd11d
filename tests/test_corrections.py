"""Resample, focal curvature, interface crop, beam profile and normalisation against the phantom's truth.

The corrections after stitching accept any per-slice 3D OME-Zarr, so they are exercised here directly on the
preprocessed mosaic grids of the ``tiny`` phantom, where every tile's true position and surface are known.
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import true_surface_in_mosaic
from napari_soct.processing.correct.intensity import (
    BeamProfileParams,
    NormalizeParams,
    axial_profile,
    correct_beam_profile,
    normalize_slices,
    slice_reference_level,
)
from napari_soct.processing.correct.interface import (
    CurvatureParams,
    InterfaceCropParams,
    crop_interface,
    detect_interface,
    fix_focal_curvature,
)
from napari_soct.processing.correct.resample import ResampleParams, resample_mosaic_grids
from napari_soct.processing.correct._slice_io import sample_pixels
from napari_soct.processing.io.mosaic import open_mosaic_grid
from napari_soct.processing.io.omezarr import create_ome_zarr_image, open_ome_zarr
from napari_soct.processing.preprocess import preprocess_acquisition


@pytest.fixture(scope="module")
def mosaics(curved_cut):
    """The tiny phantom with a strongly tilted and curved cut, preprocessed (conftest)."""
    return curved_cut


def test_interface_detection_within_a_sample(mosaics):
    acq, out = mosaics
    for sid in acq.slice_ids:
        mosaic = open_mosaic_grid(out / f"mosaic_grid_3d_z{sid:02d}.ome.zarr")
        truth = true_surface_in_mosaic(acq, sid, mosaic)
        depth, strength = detect_interface(mosaic.array[...])
        tissue = np.isfinite(truth) & (strength > 0.1 * np.percentile(strength, 99.5))
        error = np.abs(depth - truth)[tissue]
        assert np.percentile(error, 99) <= 1.0, f"slice {sid}"


def test_per_pixel_crop_follows_the_true_surface(mosaics, tmp_path):
    acq, out = mosaics
    # No median smoothing of the surface here: in a mosaic grid the surface jumps where tiles are pasted
    # side by side (a stitched slice is continuous), and a median across those jumps would blur them.
    params = InterfaceCropParams(depth_um=40.0, mode="per_pixel", surface_smoothing_px=1)
    result = crop_interface(out, tmp_path / "crop", params)
    for sid in acq.slice_ids:
        src = open_mosaic_grid(out / f"mosaic_grid_3d_z{sid:02d}.ome.zarr")
        cropped = open_ome_zarr(result.outputs[sid]).levels[0][...]
        assert cropped.shape[0] == round(40.0 / acq.voxel_size_um[0])
        data = src.array[...]
        truth = true_surface_in_mosaic(acq, sid, src)
        # Recover each A-line's crop start by finding its first kept sample in the input A-line. Pixels near
        # a pasted tile border are left out: there the lateral smoothing sees the neighbour tile's surface.
        _, ty, tx = src.tile_shape
        yy, xx = np.mgrid[0 : truth.shape[0], 0 : truth.shape[1]]
        inner = (yy % ty >= 6) & (yy % ty < ty - 6) & (xx % tx >= 6) & (xx % tx < tx - 6)
        ys, xs = np.nonzero(np.isfinite(truth) & (cropped[0] > 0) & inner)
        pick = np.random.default_rng(0).choice(ys.size, 400, replace=False)
        starts = np.array([np.flatnonzero(data[:, ys[i], xs[i]] == cropped[0, ys[i], xs[i]])[0] for i in pick])
        # The first kept sample is the one holding the surface (the floor of its depth), within one sample.
        error = starts - np.floor(truth[ys[pick], xs[pick]])
        assert np.mean(np.abs(error) <= 1) >= 0.99 and np.mean(error == 0) >= 0.7
    per_slice = crop_interface(out, tmp_path / "crop1", InterfaceCropParams(depth_um=40.0, mode="per_slice"))
    assert per_slice.metrics[acq.slice_ids[0]]["surface_range_samples"] == 0


def _faint_surface_over_deep_blobs(path, seed=0):
    """A slice whose cut surface (tilted, curved; known) is bright over the brain (x < 60) and faint over
    agarose, where bright blobs lie 30 samples deeper: there the steepest rise of an A-line is a blob's top.
    Returns the true surface (samples) and the blob mask."""
    rng = np.random.default_rng(seed)
    nz, ny, nx = 64, 96, 96
    yy, xx = np.mgrid[0:ny, 0:nx]
    surface = 12.0 + 0.05 * xx + 0.03 * yy + 0.0008 * (xx - 48.0) ** 2
    z = np.arange(nz)[:, None, None]
    volume = np.where(z >= surface[None], np.where(xx < 60, 0.5, 0.08)[None], 0.02)
    blobs = np.zeros((ny, nx), bool)
    for cy, cx in ((20, 75), (50, 85), (75, 70), (85, 90)):
        blobs |= (yy - cy) ** 2 + (xx - cx) ** 2 < 30
    volume[45:52, blobs] = 0.8
    volume = (volume * rng.gamma(4.0, 0.25, volume.shape)).astype(np.float32)
    create_ome_zarr_image(path, volume.shape, (0.01, 0.01, 0.01), chunks=(64, 48, 48))[...] = volume
    return volume, surface, blobs


def test_per_pixel_crop_is_not_pulled_down_by_deep_structures_under_a_faint_surface(tmp_path):
    volume, surface, blobs = _faint_surface_over_deep_blobs(tmp_path / "in" / "slice_z00_beam.ome.zarr")
    assert np.mean(blobs) > 0.01
    result = crop_interface(tmp_path / "in", tmp_path / "out",
                            InterfaceCropParams(depth_um=100.0, mode="per_pixel", surface_smoothing_px=3))
    cropped = open_ome_zarr(result.outputs[0]).levels[0][...]
    # Each A-line's first kept sample, found in the input A-line (speckle makes the values unique).
    ys, xs = np.nonzero(np.ones(surface.shape, bool))
    starts = np.array([np.flatnonzero(volume[:, y, x] == cropped[0, y, x])[0] for y, x in zip(ys, xs)])
    error = (starts - np.floor(surface[ys, xs])).reshape(surface.shape)
    assert np.mean(np.abs(error) <= 1) >= 0.99
    assert np.abs(error[blobs]).max() <= 2  # over the blobs too: the fitted surface, not the blobs' tops
    assert result.metrics[0]["surface_range_samples"] < 20  # the true surface spans ~13 samples


def test_crop_blocks_read_only_the_kept_depths_and_equal_the_definition():
    """``out[z] = volume[start + z]`` (zero past the end) for every A-line, from a read of the depths the block
    keeps only: starts before the top, past the bottom, and every A-line past the end included."""
    from napari_soct.processing.correct.interface import _cropped_block

    class Recording(np.ndarray):
        reads: list = []

        def __getitem__(self, key):
            Recording.reads.append(key)
            return np.asarray(self).__getitem__(key)

    rng = np.random.default_rng(1)
    for _ in range(300):
        nz = int(rng.integers(1, 40))
        volume = rng.random((nz, 7, 9)).astype(np.float32)
        low = int(rng.integers(-5, nz + 5))
        start = rng.integers(low, low + 6, (7, 9))
        keep = int(rng.integers(1, nz + 3))
        core = (slice(1, 6), slice(2, 9))
        Recording.reads.clear()
        got = _cropped_block(keep, start, volume.view(Recording), core)
        z = np.arange(keep)[:, None, None] + start[core][None]
        inside = (z >= 0) & (z < nz)
        expected = np.where(inside, np.take_along_axis(volume[(slice(None), *core)], np.clip(z, 0, nz - 1), 0), 0)
        np.testing.assert_array_equal(got, expected)
        (depths, *_), = Recording.reads
        assert depths.stop - depths.start <= max(0, min(nz, start[core].max() + keep) - max(0, start[core].min()))


def test_curvature_flattens_the_surface(mosaics, tmp_path):
    acq, out = mosaics
    sid = acq.slice_ids[1]
    result = fix_focal_curvature(out / f"mosaic_grid_3d_z{sid:02d}.ome.zarr", tmp_path, CurvatureParams())
    before = open_mosaic_grid(out / f"mosaic_grid_3d_z{sid:02d}.ome.zarr")
    after = open_mosaic_grid(result.outputs[sid])
    assert after.tile_shape == before.tile_shape and after.grid_shape == before.grid_shape
    truth = true_surface_in_mosaic(acq, sid, before)
    d_after, s_after = detect_interface(after.array[...])
    tissue = np.isfinite(truth) & (s_after > 0.1 * np.percentile(s_after, 99.5))
    spread_before = np.percentile(truth[tissue], 95) - np.percentile(truth[tissue], 5)
    spread_after = np.percentile(d_after[tissue], 95) - np.percentile(d_after[tissue], 5)
    assert spread_before > 2.0 and spread_after < 0.5 * spread_before


def test_beam_profile_flattens_the_tissue_profile(mosaics, tmp_path):
    acq, out = mosaics
    sid = acq.slice_ids[1]
    src = out / f"mosaic_grid_3d_z{sid:02d}.ome.zarr"
    result = correct_beam_profile(src, tmp_path, BeamProfileParams())
    surface = result.metrics[sid]["surface_depth_samples"]
    _, before = axial_profile(sample_pixels(open_ome_zarr(src).levels[0]))
    _, after = axial_profile(sample_pixels(open_ome_zarr(result.outputs[sid]).levels[0]))
    deep = slice(surface + 3, None)
    assert before[deep].max() / before[deep].min() > 2.0  # attenuation and focus
    assert after[deep].max() / after[deep].min() < 1.25


def test_normalisation_equalises_slice_levels(mosaics, tmp_path):
    acq, out = mosaics
    before = [slice_reference_level(sample_pixels(open_ome_zarr(out / f"mosaic_grid_3d_z{s:02d}.ome.zarr").levels[0]))
              for s in acq.slice_ids]
    result = normalize_slices(out, tmp_path, NormalizeParams(smooth_sigma=0.0))
    after = [slice_reference_level(sample_pixels(open_ome_zarr(result.outputs[s]).levels[0])) for s in acq.slice_ids]
    assert np.ptp(before) / np.mean(before) > 0.02  # the phantom's per-slice gains differ
    assert np.ptp(after) / np.mean(after) < 0.01
    assert open_ome_zarr(result.outputs[acq.slice_ids[0]]).version == "0.5"


def test_resample_keeps_mean_and_geometry(mosaics, tmp_path):
    acq, out = mosaics
    sid = acq.slice_ids[0]
    result = resample_mosaic_grids(out / f"mosaic_grid_3d_z{sid:02d}.ome.zarr", tmp_path, ResampleParams(resolution_um=20.0))
    src, dst = open_mosaic_grid(out / f"mosaic_grid_3d_z{sid:02d}.ome.zarr"), open_mosaic_grid(result.outputs[sid])
    expected = tuple(max(1, round(n * v / 20.0)) for n, v in zip(src.tile_shape, src.voxel_size_um))
    assert dst.tile_shape == expected and dst.voxel_size_um == (20.0, 20.0, 20.0)
    assert dst.array.chunks == expected and dst.grid_shape == src.grid_shape
    for x, y in src.tile_positions():
        assert dst.read_tile(x, y).mean() == pytest.approx(src.read_tile(x, y).mean(), rel=0.03)


def test_reconstruct_chain_runs_every_step_in_order(tiny_acquisition, tmp_path):
    from napari_soct.pipeline.reconstruct import ReconstructParams, reconstruct

    acq = tiny_acquisition
    preprocess_acquisition(acq.raw_dir, tmp_path / "pre", generate_previews=False)
    calls = []
    result = reconstruct(tmp_path / "pre", tmp_path / "rec", ReconstructParams(fix_curvature=True, assemble=False),
                         step_params={"normalize": NormalizeParams(smooth_sigma=0.0)},
                         progress=lambda d, t, m: calls.append((d, t)))
    assert [r.step for r in result.steps] == ["curvature", "illumination", "stitch", "beam", "crop", "normalize"]
    assert all(sorted(r.outputs) == acq.slice_ids for r in result.steps)
    assert calls[-1][0] == calls[-1][1]
    levels = [slice_reference_level(sample_pixels(open_ome_zarr(p).levels[0])) for p in result.paths]
    assert np.ptp(levels) / np.mean(levels) < 0.01
    # Each output names its own step and input (not the stitched slice's, whose attributes it carries on).
    for step, previous in zip(result.steps[3:], result.steps[2:]):
        sid = acq.slice_ids[0]
        soct = open_ome_zarr(step.outputs[sid]).attributes["soct"]
        assert soct["step"] == step.step and soct["source"] == str(previous.outputs[sid])
    stitched = open_ome_zarr(result.steps[2].outputs[acq.slice_ids[0]]).levels[0]
    ny, nx = acq.grid_shape
    assert stitched.shape[1] < ny * acq.tile_shape[1] and stitched.shape[2] < nx * acq.tile_shape[2]  # overlap removed
    # Resume: a second run keeps every finished step (records match); a changed parameter recomputes that step
    # and the ones after it only.
    again = reconstruct(tmp_path / "pre", tmp_path / "rec", ReconstructParams(fix_curvature=True, assemble=False),
                        step_params={"normalize": NormalizeParams(smooth_sigma=0.0)})
    assert [o.action for o in again.outcomes] == ["kept"] * 6
    changed = reconstruct(tmp_path / "pre", tmp_path / "rec", ReconstructParams(fix_curvature=True, assemble=False),
                          step_params={"normalize": NormalizeParams(smooth_sigma=0.0), "crop": InterfaceCropParams(
                              depth_um=200.0)})
    assert [o.action for o in changed.outcomes] == ["kept"] * 4 + ["ran"] * 2
    assert open_ome_zarr(changed.paths[0]).levels[0].shape[0] == 20


def test_corrections_write_in_parts_on_a_cluster_with_the_same_bytes(mosaics, tmp_path):
    """On a dask worker the beam, crop and normalisation steps write a slice in parts that own whole chunks at
    every pyramid level, as sub-tasks that the other worker takes. A LocalCluster of two processes writes the
    same bytes, at every level, as one thread. Slices of 600 x 560 pixels (the tiny phantom's mosaic pasted
    5 x 4 times) so that level 1's chunks can be cut apart."""
    from distributed import Client, LocalCluster

    from napari_soct.processing.io.omezarr import create_ome_zarr_pyramid
    from napari_soct.processing.slices import slices_on_client

    acq, out = mosaics
    slices = tmp_path / "slices"
    for sid in acq.slice_ids[:2]:
        image = open_ome_zarr(out / f"mosaic_grid_3d_z{sid:02d}.ome.zarr")
        big = np.tile(np.asarray(image.levels[0][...]), (1, 5, 5))[:, :600, :560]
        writer = create_ome_zarr_pyramid(slices / f"slice_z{sid:02d}_stitch.ome.zarr", big.shape, image.scales_mm[0],
                                         chunks=(big.shape[0], 256, 256))
        assert writer.n_levels == 2 and len(writer.parts()) == 4
        writer.write((slice(None), slice(0, 600), slice(0, 560)), big)

    def chain(folder):
        common = dict(workers=2, memory_budget_gb=0.01)  # blocks of 64-96 pixels: several per part
        beam = correct_beam_profile(slices, folder / "beam", BeamProfileParams(**common))
        crop = crop_interface(folder / "beam", folder / "crop", InterfaceCropParams(depth_um=60.0, **common))
        return [beam, crop, normalize_slices(folder / "crop", folder / "normalize", NormalizeParams(**common))]

    local = chain(tmp_path / "threads")
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client, slices_on_client(client):
        remote = chain(tmp_path / "cluster")
        prefixes = client.run_on_scheduler(lambda dask_scheduler: sorted(dask_scheduler.task_prefixes))
    for step in ("beam", "crop", "normalize"):
        assert f"soct-{step}-part" in prefixes, prefixes
    for a, b in zip(local, remote):
        assert a.metrics == b.metrics
        for sid, path in a.outputs.items():
            mine, theirs = open_ome_zarr(path), open_ome_zarr(b.outputs[sid])
            assert len(mine.levels) == 2
            for level_a, level_b in zip(mine.levels, theirs.levels):
                np.testing.assert_array_equal(level_a[...], level_b[...])
