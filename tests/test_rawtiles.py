"""Raw tile reader against the format contract (an independent writer in conftest) and bad inputs."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from conftest import structured_tile, write_raw_tile
from napari_soct.processing.io.rawtiles import (
    BadTileWarning,
    RawFormatError,
    is_raw_acquisition,
    open_raw_acquisition,
    parse_info_txt,
    read_raw_frames,
)
from napari_soct.processing.preprocess.galvo import detect_galvo_band
from napari_soct.processing.preprocess.mosaic import galvo_decision_for_slice

SHAPE = (12, 20, 30)  # z, y (B-scans), x (A-lines)


def _tile_dir(root, x, y, z, grouped):
    name = f"tile_x{x:02d}_y{y:02d}_z{z:02d}"
    return root / f"z{z:02d}" / name if grouped else root / name


@pytest.mark.parametrize("grouped", [False, True], ids=["flat", "grouped"])
def test_reads_both_layouts_wide_ids_several_files_and_repeats(tmp_path, grouped):
    expected = {}
    for z in (99, 100, 101):
        for y in range(2):
            for x in range(2):
                tile = structured_tile(SHAPE, seed=1000 * z + 10 * y + x)
                expected[(z, x, y)] = write_raw_tile(
                    _tile_dir(tmp_path, x, y, z, grouped), tile, n_repeat=3 if z == 100 else 2, n_files=3,
                    stage_mm=(0.4 * x, 0.32 * y), noise_seed=z,
                )
    (tmp_path / "notes.txt").write_text("not a tile")
    (tmp_path / "logs").mkdir()
    (tmp_path / "tile_preview.png").write_bytes(b"\x89PNG")
    acq = open_raw_acquisition(tmp_path)
    assert acq.slice_ids == [99, 100, 101]
    assert acq.layout == ("grouped" if grouped else "flat")
    assert acq.tile_shape == SHAPE
    assert acq.voxel_size_um == pytest.approx((3.5, 400 / 20, 500 / 30))
    assert acq.grid_shape(100) == (2, 2)
    for (z, x, y), want in expected.items():
        got = acq.tile(z, x, y).read()
        assert got.dtype == np.float32 and got.shape == SHAPE
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_repeat_averaging_uses_consecutive_frames(tmp_path):
    tile = structured_tile(SHAPE, 3)
    want = write_raw_tile(tmp_path / "tile_x00_y00_z00", tile, n_repeat=2, noise_seed=5)
    got = open_raw_acquisition(tmp_path).tile(0, 0, 0).read()
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    # The pairs cancel only when consecutive frames are averaged: the result equals the clean tile.
    np.testing.assert_allclose(got, tile, atol=1e-5)


@pytest.mark.parametrize("band_start", [0, 7, 24, 30, 33])
def test_galvo_band_found_and_rolled_out(tmp_path, band_start):
    tile = structured_tile(SHAPE, band_start)
    want = write_raw_tile(tmp_path / "tile_x00_y00_z00", tile, n_extra=6, band_start=band_start)
    acq = open_raw_acquisition(tmp_path)
    decision = galvo_decision_for_slice(acq, 0, threshold=0.6)
    assert decision.band_start == band_start
    assert decision.applied and decision.confidence > 0.8
    np.testing.assert_allclose(acq.tile(0, 0, 0).read(decision.shift), want, rtol=1e-6, atol=1e-6)


def test_galvo_confidence_low_without_band():
    rng = np.random.default_rng(0)
    aip = 1 + 0.02 * rng.standard_normal((40, 36))
    assert detect_galvo_band(aip, 30, 6).confidence < 0.3


def test_axial_resolution_from_keys_or_parameter(tmp_path):
    write_raw_tile(tmp_path / "a" / "tile_x00_y00_z00", structured_tile(SHAPE, 0), axial_um=None,
                   info_overrides={"dz": 2.5})
    assert open_raw_acquisition(tmp_path / "a").axial_resolution_um == 2.5
    assert open_raw_acquisition(tmp_path / "a", axial_resolution_um=1.36).axial_resolution_um == 1.36
    write_raw_tile(tmp_path / "b" / "tile_x00_y00_z00", structured_tile(SHAPE, 0), axial_um=None)
    with pytest.raises(RawFormatError, match="axial resolution"):
        open_raw_acquisition(tmp_path / "b")


def test_depth_inferred_from_file_size_when_range_missing(tmp_path):
    want = write_raw_tile(tmp_path / "tile_x00_y00_z00", structured_tile(SHAPE, 0), drop_keys=("top_z", "bottom_z"))
    acq = open_raw_acquisition(tmp_path)
    assert acq.tile_shape == SHAPE
    np.testing.assert_allclose(acq.tile(0, 0, 0).read(), want, rtol=1e-6)


def test_info_txt_parsing(tmp_path):
    path = tmp_path / "info.txt"
    path.write_text("Scan info\nnx: 40\nwidth: 750.5\nname: a: b\nbroken line\n")
    assert parse_info_txt(path) == {"nx": 40, "width": "750.5", "name": "a: b"}


# --- bad input: a clear error naming the file and the problem, never a bare reshape traceback ------------


def _one_tile(tmp_path, **kwargs):
    folder = tmp_path / "tile_x00_y00_z00"
    write_raw_tile(folder, structured_tile(SHAPE, 0), **kwargs)
    return folder


def test_missing_key_names_file_and_key(tmp_path):
    folder = _one_tile(tmp_path, drop_keys=("nx",))
    with pytest.raises(RawFormatError, match=r"info\.txt: key 'nx' is missing"):
        open_raw_acquisition(tmp_path, on_bad_tile="error")


def test_garbled_value_names_file_and_key(tmp_path):
    _one_tile(tmp_path, info_overrides={"width": "seven hundred"})
    with pytest.raises(RawFormatError, match=r"info\.txt: key 'width' has value 'seven hundred'"):
        open_raw_acquisition(tmp_path, on_bad_tile="error")


def test_missing_info_txt(tmp_path):
    folder = _one_tile(tmp_path)
    (folder / "info.txt").unlink()
    with pytest.raises(RawFormatError, match="missing info.txt"):
        open_raw_acquisition(tmp_path, on_bad_tile="error")


def test_bin_size_mismatch_names_file_and_sizes(tmp_path):
    folder = _one_tile(tmp_path)
    data = (folder / "image_00000.bin").read_bytes()
    (folder / "image_00000.bin").write_bytes(data[:-400])
    with pytest.raises(RawFormatError, match=r"tile_x00_y00_z00.*hold \d+ bytes but info.txt describes"):
        open_raw_acquisition(tmp_path, on_bad_tile="error")


def test_tiles_of_different_shapes_name_both(tmp_path):
    write_raw_tile(tmp_path / "tile_x00_y00_z00", structured_tile(SHAPE, 0))
    write_raw_tile(tmp_path / "tile_x01_y00_z00", structured_tile((12, 20, 28), 1))
    with pytest.raises(RawFormatError, match=r"tile_x01_y00_z00.*differs from .*tile_x00_y00_z00"):
        open_raw_acquisition(tmp_path)


def test_empty_tile_folder_is_a_warning_and_missing_tile(tmp_path):
    write_raw_tile(tmp_path / "tile_x00_y00_z00", structured_tile(SHAPE, 0))
    (tmp_path / "tile_x01_y00_z00").mkdir()
    with pytest.warns(BadTileWarning, match=r"tile_x01_y00_z00: no image_\*\.bin files"):
        acq = open_raw_acquisition(tmp_path)
    assert acq.tile(0, 1, 0) is None
    assert (1, 0) in acq.bad_tiles[0]
    assert acq.grid_shape(0) == (1, 2)  # the broken position still belongs to the grid
    with pytest.raises(RawFormatError, match="no image"):
        open_raw_acquisition(tmp_path, on_bad_tile="error")


def test_nan_values_are_reported_with_the_file(tmp_path):
    tile = structured_tile(SHAPE, 0)
    tile[3, 4, 5] = np.nan
    _ = write_raw_tile(tmp_path / "tile_x00_y00_z00", tile)
    acq = open_raw_acquisition(tmp_path)
    with pytest.raises(RawFormatError, match=r"tile_x00_y00_z00: 1 NaN/inf values"):
        acq.tile(0, 0, 0).read()


@pytest.mark.parametrize("content", ["empty", "other_folders", "file"])
def test_not_an_acquisition(tmp_path, content):
    target = tmp_path
    if content == "other_folders":
        (tmp_path / "images").mkdir()
        (tmp_path / "z00").mkdir()
    elif content == "file":
        target = tmp_path / "x.txt"
        target.write_text("x")
    assert not is_raw_acquisition(target)
    with pytest.raises(RawFormatError, match="not a"):
        open_raw_acquisition(target)


def test_opening_reads_no_pixel_data(tmp_path, monkeypatch):
    for x in range(3):
        write_raw_tile(tmp_path / f"tile_x{x:02d}_y00_z00", structured_tile(SHAPE, x))
    calls = []
    real = np.fromfile
    monkeypatch.setattr(np, "fromfile", lambda *a, **k: calls.append(a) or real(*a, **k))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        acq = open_raw_acquisition(tmp_path)
    assert acq.n_tiles == 3 and calls == []


def test_legacy_orientation_swaps_and_reverses_lateral_axes(tmp_path):
    tile = structured_tile(SHAPE, 4)
    want = write_raw_tile(tmp_path / "tile_x00_y00_z00", tile)
    got = open_raw_acquisition(tmp_path).tile(0, 0, 0).read(legacy_orientation=True)
    assert got.shape == (SHAPE[0], SHAPE[2], SHAPE[1])
    np.testing.assert_allclose(got, want.transpose(0, 2, 1)[:, ::-1, ::-1], rtol=1e-6)


def test_camera_shift_rolls_saturated_aline_first(tmp_path):
    tile = structured_tile(SHAPE, 5)
    tile[:, :, 17] += 50.0  # over-exposed A-line at index 17
    write_raw_tile(tmp_path / "tile_x00_y00_z00", tile, n_extra=6)
    got = open_raw_acquisition(tmp_path).tile(0, 0, 0).read(camera_shift=True)
    # A-line 17 is now first; its saturated first depth sample is replaced by the next one.
    np.testing.assert_allclose(got[1:, :, 0], tile[1:, :, 17], rtol=1e-6)
    np.testing.assert_allclose(got[0, :, 0], tile[1, :, 17], rtol=1e-6)
    np.testing.assert_allclose(got[:, :, 1:5], tile[:, :, 18:22], rtol=1e-6)
    off = open_raw_acquisition(tmp_path).tile(0, 0, 0).read()
    np.testing.assert_allclose(off, tile, rtol=1e-6)


def test_reading_a_subset_of_bscans_across_files(tmp_path):
    write_raw_tile(tmp_path / "tile_x00_y00_z00", structured_tile(SHAPE, 6), n_repeat=2, n_files=3, band_start=4)
    tile = open_raw_acquisition(tmp_path).tile(0, 0, 0)
    full = read_raw_frames(tile)
    subset = np.array([0, 6, 7, 13, 19])  # B-scans in each of the three files
    np.testing.assert_array_equal(read_raw_frames(tile, subset), full[subset])
