"""The whole preprocessing job on synthetic acquisitions, checked against the phantom's ground truth."""

from __future__ import annotations

import numpy as np
import pytest

from napari_soct.processing.io.omezarr import open_ome_zarr
from napari_soct.processing.io.rawtiles import open_raw_acquisition
from napari_soct.processing.io.tables import read_shifts_xy, read_slice_config
from napari_soct.processing.preprocess import preprocess_acquisition
from napari_soct.processing.preprocess.mosaic import galvo_decision_for_slice
from napari_soct.processing.synthetic import make_acquisition


def _check_against_truth(acq, out):
    tz, ty, tx = acq.tile_shape
    n_checked = 0
    for sid in acq.slice_ids:
        image = open_ome_zarr(out / f"mosaic_grid_3d_z{sid:02d}.ome.zarr")
        assert image.levels[0].chunks == acq.tile_shape
        assert image.scales_mm[0] == pytest.approx(tuple(v * 1e-3 for v in acq.voxel_size_um))
        data = image.levels[0][...]
        ny, nx = acq.grid_shape
        assert data.shape == (tz, ny * ty, nx * tx)
        for iy in range(ny):
            for ix in range(nx):
                block = data[:, iy * ty : (iy + 1) * ty, ix * tx : (ix + 1) * tx]
                if acq.tile_present(sid, ix, iy):
                    np.testing.assert_allclose(block, acq.true_tile(sid, ix, iy), rtol=1e-6, atol=1e-7)
                    n_checked += 1
                else:
                    assert not block.any()
        galvo = image.attributes["soct"]["galvo"]
        assert galvo["band_start"] == acq.galvo_offset(sid) and galvo["applied"]
    shifts = read_shifts_xy(out / "shifts_xy.csv")
    expected = acq.expected_shifts_mm()
    assert [(s.fixed_id, s.moving_id) for s in shifts] == [(f, m) for f, m, _, _ in expected]
    for s, (_, _, x_mm, y_mm) in zip(shifts, expected):
        assert (s.x_shift_mm, s.y_shift_mm) == pytest.approx((x_mm, y_mm), abs=1e-9)
    rows = read_slice_config(out / "slice_config.csv")
    assert [r.slice_id for r in rows] == acq.slice_ids
    assert all(r.galvo_fix for r in rows) and rows[0].use is False
    return n_checked


def test_tiny_preset_every_tile_equals_truth(tiny_acquisition, tmp_path):
    acq = tiny_acquisition
    result = preprocess_acquisition(acq.raw_dir, tmp_path / "out")
    n = _check_against_truth(acq, tmp_path / "out")
    n_absent = sum(not acq.tile_present(s, x, y) for s in acq.slice_ids for y in range(acq.grid_shape[0])
                   for x in range(acq.grid_shape[1]))
    assert n_absent >= 1 and n == len(acq.slice_ids) * acq.grid_shape[0] * acq.grid_shape[1] - n_absent
    assert sum(len(s.missing_tiles) for s in result.slices) == n_absent


@pytest.mark.parametrize(
    "overrides",
    [
        dict(layout="flat", slice_id_start=98, n_bin_files=3, n_repeat=3),
        dict(layout="grouped", slice_id_start=7, n_repeat=1, n_bin_files=1, bright_band=True),
        dict(encoder_glitch_slice=1, rehoming_slice=2, stage_affine=True, stray_files=True),
    ],
    ids=["flat-ids-past-99-three-files-three-repeats", "bright-band", "glitch-rehoming-affine"],
)
def test_variants_every_tile_equals_truth(tmp_path, overrides):
    acq = make_acquisition(tmp_path / "acq", preset="tiny", seed=3, **overrides)
    preprocess_acquisition(acq.raw_dir, tmp_path / "out", sharding_factor=2)
    _check_against_truth(acq, tmp_path / "out")


@pytest.mark.parametrize("seed", range(6))
def test_galvo_offset_found_in_every_slice(tmp_path, seed):
    acq = make_acquisition(tmp_path / "acq", preset="tiny", seed=seed, bright_band=seed % 2 == 1)
    raw = open_raw_acquisition(acq.raw_dir)
    for sid in raw.slice_ids:
        decision = galvo_decision_for_slice(raw, sid)
        assert decision.band_start == acq.galvo_offset(sid), f"seed {seed} slice {sid}"
        assert decision.applied and decision.confidence >= 0.6
