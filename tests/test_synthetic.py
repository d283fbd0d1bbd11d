"""Tests of the synthetic S-OCT acquisition generator against independent facts.

The raw files are read back here "by hand" with plain numpy, following the format description
(docs/soct-formats.md section 1), not with the generator's own helpers.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import threading
from pathlib import Path

import numpy as np
import pytest

from napari_soct.processing.synthetic import (
    DEFAULT_STAGE_AFFINE,
    PRESETS,
    SyntheticAcquisition,
    SyntheticConfig,
    make_acquisition,
)

TILE_RE = re.compile(r"tile_x(?P<x>\d+)_y(?P<y>\d+)_z(?P<z>\d+)$")

# A very small acquisition for the tests that need several variants.
MINI = dict(grid_shape=(2, 2), nx=24, ny=20, n_z=24, n_extra=6, width_um=240.0, height_um=200.0,
            missing_tiles=[], stray_files=False)


# ----------------------------------------------------------------------------- by-hand reading
def parse_info(path: Path) -> tuple[str, dict]:
    lines = path.read_text().splitlines()
    out = {}
    for line in lines:
        if ": " in line:
            k, v = line.split(": ", 1)
            out[k] = int(v) if re.fullmatch(r"-?\d+", v) else v
    return lines[0], out


def read_raw(folder: Path) -> tuple[dict, np.ndarray]:
    """All frames of a tile, ``(n_z, nx + n_extra, n_frames)``, from the .bin files (sorted, concatenated)."""
    _, info = parse_info(folder / "info.txt")
    n_z = info["bottom_z"] - info["top_z"] + 1
    n_a = info["nx"] + info["n_extra"]
    parts = [np.fromfile(f, dtype="<f4").reshape((n_z, n_a, -1), order="F")
             for f in sorted(folder.glob("image_*.bin"))]
    return info, np.concatenate(parts, axis=2)


def read_tile(folder: Path, p: int) -> np.ndarray:
    """Repeat mean, galvo roll, crop, as (Z, Y, X)."""
    info, raw = read_raw(folder)
    n_z, n_a, _ = raw.shape
    frames = raw.reshape(n_z, n_a, info["ny"], info["n_repeat"])  # frame = b * n_repeat + r
    mean = np.mean(frames, axis=3, dtype=np.float32)
    fixed = np.roll(mean, info["nx"] - p, axis=1)[:, : info["nx"], :]
    return fixed.transpose(0, 2, 1)


def ncc(a, b) -> float:
    a = np.asarray(a, float).ravel() - np.mean(a)
    b = np.asarray(b, float).ravel() - np.mean(b)
    return float(a @ b / math.sqrt((a @ a) * (b @ b)))


def tree_digest(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> SyntheticAcquisition:
    calls = []
    acq = make_acquisition(tmp_path_factory.mktemp("tiny") / "acq", preset="tiny", seed=0,
                           progress=lambda d, t, m: calls.append((d, t, m)))
    acq._progress_calls = calls
    return acq


@pytest.fixture(scope="module")
def aligned(tmp_path_factory) -> SyntheticAcquisition:
    """Tiny, without stage errors: tiles on the exact nominal grid."""
    return make_acquisition(tmp_path_factory.mktemp("aligned") / "acq", preset="tiny", seed=3, drift_px=0.0,
                            missing_tiles=[], stray_files=False)


# ----------------------------------------------------------------------------- API and files
def test_api_and_layout(tiny):
    cfg = tiny.config
    assert tiny.slice_ids == [0, 1, 2]
    assert tiny.grid_shape == (3, 3)
    assert tiny.tile_shape == (cfg.n_z, cfg.ny, cfg.nx) == (32, 40, 40)
    assert tiny.voxel_size_um == (cfg.axial_resolution_um, cfg.height_um / cfg.ny, cfg.width_um / cfg.nx)
    offsets = [tiny.galvo_offset(s) for s in tiny.slice_ids]
    assert len(set(offsets)) == 3 and cfg.nx in offsets
    assert all(0 <= p < cfg.nx + cfg.n_extra for p in offsets)
    # grouped layout, exactly the present tiles
    dirs = sorted(p for p in tiny.raw_dir.rglob("tile_*") if p.is_dir())
    assert len(dirs) == 3 * 9 - 1
    for d in dirs:
        m = TILE_RE.match(d.name)
        assert m and d.parent.name == f"z{int(m['z']):02d}"
        assert tiny.tile_present(int(m["z"]), int(m["x"]), int(m["y"]))
    sid, ix, iy = cfg.missing_tiles[0]
    assert not tiny.tile_present(sid, ix, iy)
    assert not tiny.tile_dir(sid, ix, iy).exists()
    # stray non-tile entries the reader must ignore
    for name in ("notes.txt", "logs", "tile_preview.png"):
        assert (tiny.raw_dir / name).exists()
    assert (tiny.raw_dir / "tile_preview.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_progress_reported(tiny):
    calls = tiny._progress_calls
    done = [c[0] for c in calls]
    assert done == sorted(done) and done[-1] == calls[-1][1]
    assert sum("tile" in c[2] for c in calls) == 26


def test_bin_file_sizes(tiny):
    c = tiny.config
    expected = c.n_z * (c.nx + c.n_extra) * c.ny * c.n_repeat * 4
    for sid in tiny.slice_ids:
        for ix, iy in tiny.tiles(sid):
            files = sorted(tiny.tile_dir(sid, ix, iy).glob("image_*.bin"))
            assert [f.name for f in files] == ["image_00000.bin", "image_00001.bin"]
            assert sum(f.stat().st_size for f in files) == expected
            # each file holds whole frames
            assert all(f.stat().st_size % (c.n_z * (c.nx + c.n_extra) * 4) == 0 for f in files)


def test_info_txt_by_hand(tiny):
    c = tiny.config
    header, info = parse_info(tiny.tile_dir(2, 1, 2) / "info.txt")
    assert header == "Scan info"
    assert set(info) == {"nx", "ny", "n_repeat", "width", "height", "n_extra", "line_rate", "exposure",
                         "alinerepeat", "top_z", "bottom_z", "focus_z", "stage_x_pos_mm", "stage_y_pos_mm",
                         "stage_z_pos_mm", "axial_resolution"}
    assert (info["nx"], info["ny"], info["n_repeat"], info["n_extra"]) == (40, 40, 2, 8)
    assert info["bottom_z"] - info["top_z"] + 1 == c.n_z
    assert float(info["width"]) / info["nx"] == pytest.approx(tiny.voxel_size_um[2])
    assert float(info["axial_resolution"]) == c.axial_resolution_um
    assert (float(info["stage_x_pos_mm"]), float(info["stage_y_pos_mm"])) == tiny.stage_position_mm(2, 1, 2)
    # nominal grid step between neighbours (drift is per slice, so it cancels)
    _, left = parse_info(tiny.tile_dir(2, 0, 2) / "info.txt")
    step = float(info["stage_x_pos_mm"]) - float(left["stage_x_pos_mm"])
    assert step == pytest.approx(0.8 * c.width_um / 1000, abs=2e-6)
    # the stage rises by one slice thickness per slice
    _, first = parse_info(tiny.tile_dir(0, 1, 2) / "info.txt")
    assert float(info["stage_z_pos_mm"]) - float(first["stage_z_pos_mm"]) == pytest.approx(
        2 * c.slice_thickness_um / 1000)


def test_reader_contract_tiny(tiny):
    """Reading the .bin files by hand gives exactly true_tile (n_repeat=2)."""
    for sid, ix, iy in [(0, 0, 0), (1, 2, 1), (2, 1, 1)]:
        got = read_tile(tiny.tile_dir(sid, ix, iy), tiny.galvo_offset(sid))
        want = tiny.true_tile(sid, ix, iy)
        assert got.dtype == want.dtype == np.float32 and got.shape == want.shape == tiny.tile_shape
        np.testing.assert_array_equal(got, want)
        assert np.all(want > 0)


def test_reader_contract_variants(tmp_path):
    """3 repeats, 3 files, flat layout, ids crossing 100, band wrapping around the A-line axis."""
    nx, n_extra = MINI["nx"], MINI["n_extra"]
    offsets = [nx - 3, 5, nx]  # the first one wraps: band at [21, 27) mod 30
    acq = make_acquisition(tmp_path / "v", preset="tiny", seed=5, n_repeat=3, n_bin_files=3, layout="flat",
                           slice_id_start=98, galvo_offsets=offsets, **MINI)
    assert acq.slice_ids == [98, 99, 100]
    names = sorted(p.name for p in acq.raw_dir.iterdir())
    assert names == sorted(f"tile_x{ix:02d}_y{iy:02d}_z{s}" for s in (98, 99, 100) for ix in (0, 1) for iy in (0, 1))
    for sid, p in zip(acq.slice_ids, offsets):
        assert acq.galvo_offset(sid) == p
        folder = acq.raw_dir / f"tile_x01_y00_z{sid}"
        assert len(list(folder.glob("image_*.bin"))) == 3
        got = read_tile(folder, p)
        np.testing.assert_allclose(got, acq.true_tile(sid, 1, 0), rtol=1e-6, atol=0)
        # band position in the raw A-line profile
        _, raw = read_raw(folder)
        prof = raw.mean(axis=(0, 2))
        band = (np.arange(nx + n_extra) - p) % (nx + n_extra) < n_extra
        assert prof[band].max() < 0.5 * np.median(prof[~band])


def test_grouped_ids_above_100(tmp_path):
    acq = make_acquisition(tmp_path / "g", preset="tiny", seed=1, slice_id_start=99, n_slices=2, **MINI)
    assert (acq.raw_dir / "z99" / "tile_x00_y00_z99" / "info.txt").exists()
    assert (acq.raw_dir / "z100" / "tile_x01_y01_z100" / "image_00001.bin").exists()


def test_galvo_band_dark_and_bright(tiny, tmp_path):
    c = tiny.config
    n_a = c.nx + c.n_extra
    for sid in tiny.slice_ids:
        p = tiny.galvo_offset(sid)
        _, raw = read_raw(tiny.tile_dir(sid, 1, 1))
        prof = raw.mean(axis=(0, 2))  # AIP averaged over B-scans: one value per A-line
        band = (np.arange(n_a) - p) % n_a < c.n_extra
        assert prof[band].max() < 0.5 * np.median(prof[~band])
    acq = make_acquisition(tmp_path / "b", preset="tiny", seed=2, bright_band=True, galvo_offsets=[0, 10, 24],
                           **MINI)
    for sid in acq.slice_ids:
        p = acq.galvo_offset(sid)
        _, raw = read_raw(acq.tile_dir(sid, 0, 1))
        prof = raw.mean(axis=(0, 2))
        band = np.zeros(MINI["nx"] + MINI["n_extra"], bool)
        band[p: p + MINI["n_extra"]] = True
        assert prof[band].min() > 1.5 * np.median(prof[~band])
        assert acq.galvo_band_kind(sid) == "bright"


def test_determinism(tiny, tmp_path):
    again = make_acquisition(tmp_path / "again", preset="tiny", seed=0)
    a, b = tree_digest(tiny.raw_dir), tree_digest(again.raw_dir)
    assert a == b
    np.testing.assert_array_equal(tiny.true_volume[:], again.true_volume[:])
    other = make_acquisition(tmp_path / "other", preset="tiny", seed=1)
    c = tree_digest(other.raw_dir)
    bins = [k for k in a if k.endswith(".bin") and k in c]
    assert bins and all(a[k] != c[k] for k in bins)


def test_refuses_to_overwrite(tiny):
    with pytest.raises(FileExistsError, match=re.escape(str(tiny.raw_dir))):
        make_acquisition(tiny.out_dir, preset="tiny", seed=0)


def test_cancel_removes_output(tmp_path):
    ev = threading.Event()

    def progress(done, total, msg):
        ev.set()

    from napari_soct.processing.progress import Cancelled

    with pytest.raises(Cancelled):
        make_acquisition(tmp_path / "c", preset="tiny", seed=0, progress=progress, cancel=ev, **MINI)
    assert not (tmp_path / "c" / "raw").exists()


def test_tiny_is_small_on_disk(tiny):
    total = sum(p.stat().st_size for p in tiny.out_dir.rglob("*") if p.is_file())
    assert total < 30e6


# ----------------------------------------------------------------------------- geometry
def test_overlap_is_20_percent(aligned):
    c = aligned.config
    for sid in aligned.slice_ids:
        y00, x00 = aligned.true_tile_position_px(sid, 0, 0)
        y10, x10 = aligned.true_tile_position_px(sid, 1, 0)
        y01, x01 = aligned.true_tile_position_px(sid, 0, 1)
        assert (x10 - x00, y10 - y00) == pytest.approx((0.8 * c.nx, 0.0))
        assert (x01 - x00, y01 - y00) == pytest.approx((0.0, 0.8 * c.ny))
        assert 1 - (x10 - x00) / c.nx == pytest.approx(0.2)
    # the overlapping columns image the same tissue ...
    k = int(round(0.8 * c.nx))
    a, b = aligned.tissue_tile(1, 0, 1), aligned.tissue_tile(1, 1, 1)
    np.testing.assert_allclose(a[:, :, k:], b[:, :, : c.nx - k], rtol=1e-5)
    # ... and the noisy tiles agree there once illumination is divided out (all horizontal neighbours)
    ff = aligned.flatfield
    same, other = [], []
    for iy in range(3):
        for ix in range(2):
            aip_a = aligned.true_tile(1, ix, iy)[8:].mean(0) / ff
            aip_b = aligned.true_tile(1, ix + 1, iy)[8:].mean(0) / ff
            same.append(ncc(aip_a[:, k:], aip_b[:, : c.nx - k]))
            other.append(abs(ncc(aip_a[:, k:], aip_b[:, k:])))  # not just any two regions
    assert np.median(same) > 0.8 and min(same) > 0.4
    assert np.median(other) < 0.5


def test_drift_affine_and_reported_positions(tmp_path):
    acq = make_acquisition(tmp_path / "a", preset="tiny", seed=4, drift_px=3.0, stage_affine=True, **MINI)
    c = acq.config
    py, px = acq.voxel_size_um[1] / 1000, acq.voxel_size_um[2] / 1000
    step_x, step_y = 0.8 * c.width_um / 1000, 0.8 * c.height_um / 1000
    for sid in acq.slice_ids:
        y00, x00 = acq.true_tile_position_px(sid, 0, 0)
        y10, x10 = acq.true_tile_position_px(sid, 1, 0)
        y01, x01 = acq.true_tile_position_px(sid, 0, 1)
        row = np.array([(x10 - x00) * px, (y10 - y00) * py])  # true displacement for one step in x
        col = np.array([(x01 - x00) * px, (y01 - y00) * py])
        assert math.degrees(math.atan2(row[1], row[0])) == pytest.approx(DEFAULT_STAGE_AFFINE["rotation_deg"])
        assert np.linalg.norm(row) == pytest.approx(step_x * DEFAULT_STAGE_AFFINE["scale_x"])
        angle = math.degrees(math.acos(row @ col / np.linalg.norm(row) / np.linalg.norm(col)))
        assert angle == pytest.approx(90 - DEFAULT_STAGE_AFFINE["shear_deg"])
        # the reported grid is the perfect nominal one
        rx0, ry0 = acq.stage_position_mm(sid, 0, 0)
        rx1, ry1 = acq.stage_position_mm(sid, 1, 1)
        assert (rx1 - rx0, ry1 - ry0) == pytest.approx((step_x, step_y), abs=2e-6)
    # drift: true and reported positions move together from slice to slice, by a few pixels
    moves = []
    for s0, s1 in zip(acq.slice_ids[:-1], acq.slice_ids[1:]):
        (ty0, tx0), (ty1, tx1) = acq.true_tile_position_px(s0, 1, 1), acq.true_tile_position_px(s1, 1, 1)
        (rx0, ry0), (rx1, ry1) = acq.stage_position_mm(s0, 1, 1), acq.stage_position_mm(s1, 1, 1)
        assert ((tx1 - tx0) * px, (ty1 - ty0) * py) == pytest.approx((rx1 - rx0, ry1 - ry0), abs=2e-6)
        moves.append(math.hypot(tx1 - tx0, ty1 - ty0))
    assert 0 < max(moves) < 20


def test_encoder_glitch_and_rehoming(tmp_path):
    acq = make_acquisition(tmp_path / "gr", preset="tiny", seed=6, n_slices=4, drift_px=0.0,
                           encoder_glitch_slice=1, rehoming_slice=2, **MINI)
    c = acq.config
    py, px = acq.voxel_size_um[1] / 1000, acq.voxel_size_um[2] / 1000
    gx, gy = c.encoder_glitch_mm
    hx, hy = c.rehoming_mm
    for ix, iy in acq.tiles(0):
        r = [np.array(acq.stage_position_mm(s, ix, iy)) for s in acq.slice_ids]
        t = [np.array(acq.true_tile_position_px(s, ix, iy)) for s in acq.slice_ids]
        np.testing.assert_allclose(r[1] - r[0], (gx, gy), atol=2e-6)  # glitch: reported only
        np.testing.assert_allclose(t[1], t[0], atol=1e-9)
        for k in (2, 3):  # re-homing: both, from its slice on
            np.testing.assert_allclose(r[k] - r[0], (hx, hy), atol=2e-6)
            np.testing.assert_allclose((t[k] - t[0]) * (py, px), (hy, hx), atol=1e-9)
    truth = json.loads((acq.truth_dir / "truth.json").read_text())
    flags = [(s["encoder_glitch"], s["rehomed"]) for s in truth["slices"]]
    assert flags == [(False, False), (True, False), (False, True), (False, False)]


def test_expected_shifts_by_hand(tmp_path):
    # The second slice lacks its right column: its max-x bound moves but its min-x bound does not.
    acq = make_acquisition(tmp_path / "s", preset="tiny", seed=7, n_slices=2, drift_px=4.0,
                           **{**MINI, "missing_tiles": [(1, 1, 0), (1, 1, 1)]})
    half = (MINI["width_um"] / 2000, MINI["height_um"] / 2000)
    bounds = []
    for sid in acq.slice_ids:
        pos = []
        for folder in (acq.raw_dir / f"z{sid:02d}").glob("tile_*"):
            _, info = parse_info(folder / "info.txt")
            pos.append((float(info["stage_x_pos_mm"]), float(info["stage_y_pos_mm"])))
        pos = np.array(pos)
        bounds.append((pos.min(0) - half, pos.max(0) + half))
    d_min = bounds[1][0] - bounds[0][0]
    d_max = bounds[1][1] - bounds[0][1]
    want = [d_min[i] if abs(d_min[i]) <= abs(d_max[i]) else d_max[i] for i in range(2)]
    (f, m, x, y), = acq.expected_shifts_mm()
    assert (f, m) == (0, 1)
    assert (x, y) == pytest.approx(want, abs=1e-12)
    # the x shift comes from the min bound (the max bound moved by a whole tile step)
    assert x == pytest.approx(d_min[0], abs=1e-12) and abs(d_max[0] - d_min[0]) > 0.1
    truth = json.loads((acq.truth_dir / "truth.json").read_text())
    assert truth["expected_shifts_mm"] == [[0, 1, x, y]]


# ----------------------------------------------------------------------------- depth and truth
def test_consecutive_slices_overlap_in_depth(aligned):
    c = aligned.config
    dz = c.axial_resolution_um
    truth = json.loads((aligned.truth_dir / "truth.json").read_text())
    assert truth["depth_overlap_um"] > 3 * dz
    ix, iy = 1, 1
    for s0, s1 in zip(aligned.slice_ids[:-1], aligned.slice_ids[1:]):
        upper, lower = aligned.tissue_tile(s0, ix, iy), aligned.tissue_tile(s1, ix, iy)
        i0 = np.load(aligned.truth_dir / f"interface_depth_z{s0:02d}.npy")
        i1 = np.load(aligned.truth_dir / f"interface_depth_z{s1:02d}.npy")
        y0, x0 = (int(round(v)) for v in aligned.true_tile_position_px(s0, ix, iy))
        i0 = i0[y0: y0 + c.ny, x0: x0 + c.nx]
        i1 = i1[y0: y0 + c.ny, x0: x0 + c.nx]
        # block depth: d = k T + (z - I) dz, so sample z' of the lower slice is sample z' + lag of the upper
        lag = c.slice_thickness_um / dz + i0 - i1
        zp = np.arange(int(np.ceil(i1.max())) + 1, c.n_z)
        good, shifted = [], []
        for b in range(0, c.ny, 3):
            for a in range(0, c.nx, 3):
                z_up = zp + lag[b, a]
                keep = z_up <= c.n_z - 1
                if keep.sum() < 4:
                    continue
                good.append((np.interp(z_up[keep], np.arange(c.n_z), upper[:, b, a]), lower[zp[keep], b, a]))
                shifted.append((np.interp(z_up[keep] - 4, np.arange(c.n_z), upper[:, b, a]), lower[zp[keep], b, a]))
        assert len(good) > 50

        def depth_ncc(pairs):  # correlation of the depth profiles (each A-line's mean removed)
            return ncc(np.concatenate([u - u.mean() for u, _ in pairs]),
                       np.concatenate([v - v.mean() for _, v in pairs]))

        assert depth_ncc(good) > 0.95
        assert depth_ncc(shifted) < 0.6


def test_truth_volume_matches_tiles(aligned):
    c = aligned.config
    vol = aligned.true_volume
    assert vol.dtype == np.float32 and vol.shape == aligned.true_volume_shape
    assert tuple(vol.attrs["voxel_size_um"]) == aligned.true_volume_voxel_size_um
    sid, ix, iy = aligned.slice_ids[2], 2, 1
    k = 2
    tissue = aligned.tissue_tile(sid, ix, iy)
    y0, x0 = aligned.true_tile_position_px(sid, ix, iy)
    assert float(y0).is_integer() and float(x0).is_integer()
    y0, x0 = int(y0), int(x0)
    block = vol[:, y0: y0 + c.ny, x0: x0 + c.nx]
    iface = np.load(aligned.truth_dir / f"interface_depth_z{sid:02d}.npy")[y0: y0 + c.ny, x0: x0 + c.nx]
    got, want = [], []
    for b in range(0, c.ny, 2):
        for a in range(0, c.nx, 2):
            z = np.arange(int(np.ceil(iface[b, a])) + 1, c.n_z)
            kz = k * c.slice_thickness_um / c.axial_resolution_um + z - iface[b, a]
            got.append(tissue[z, b, a])
            want.append(np.interp(kz, np.arange(vol.shape[0]), block[:, b, a]))
    got, want = np.concatenate(got), np.concatenate(want)
    assert ncc(got, want) > 0.95
    assert np.median(np.abs(got - want) / want) < 0.05


def test_interface_in_the_data(aligned):
    c = aligned.config
    sid, ix, iy = aligned.slice_ids[1], 1, 1
    iface = np.load(aligned.truth_dir / f"interface_depth_z{sid:02d}.npy")
    assert iface.shape == aligned.volume_shape_full[1:] and iface.dtype == np.float32
    y0, x0 = (int(v) for v in aligned.true_tile_position_px(sid, ix, iy))
    iface = iface[y0: y0 + c.ny, x0: x0 + c.nx]
    # tilted and curved, but gently
    assert 0.1 < iface.max() - iface.min() < 5
    clean = aligned.clean_tile(sid, ix, iy)
    steepest = np.argmax(np.diff(clean, axis=0), axis=0) + 0.5  # between samples z and z+1
    assert np.mean(np.abs(steepest - iface) <= 1.0) > 0.95


def test_flatfield(tiny):
    ff = tiny.flatfield
    assert ff.shape == (tiny.config.ny, tiny.config.nx) and ff.dtype == np.float32
    assert ff.max() == pytest.approx(1.0) and ff.min() == pytest.approx(tiny.config.vignetting_min)
    np.testing.assert_array_equal(np.load(tiny.truth_dir / "flatfield.npy"), ff)


def test_tissue_has_structure(tiny):
    c = tiny.config
    sid = tiny.slice_ids[1]
    folder = tiny.tile_dir(sid, 1, 1)
    _, raw = read_raw(folder)
    n_z, n_a, _ = raw.shape
    frames = raw.reshape(n_z, n_a, c.ny, c.n_repeat)
    keep = (np.arange(n_a) - tiny.galvo_offset(sid)) % n_a >= c.n_extra
    aip0 = frames[..., 0][10:, keep, :].mean(0)  # per-repeat AIPs below the surface, (A-line, B-scan)
    aip1 = frames[..., 1][10:, keep, :].mean(0)
    assert aip0.shape == (c.nx, c.ny)
    structure = 0.5 * (aip0 + aip1)
    noise = 0.5 * (aip0 - aip1)  # the repeats share the tissue, not the speckle
    assert structure.std() > 2.5 * noise.std()
    assert structure.std() / structure.mean() > 0.2
    clean = tiny.tissue_tile(sid, 1, 1)[12]
    gy, gx = np.gradient(clean)
    assert np.mean(np.hypot(gx, gy) > 0.02 * clean.mean()) > 0.2  # edges everywhere, not a flat field
    assert len(np.unique(np.round(clean, 3))) > 200


# ----------------------------------------------------------------------------- truth record and config
def test_truth_json_and_load(tiny):
    truth = json.loads((tiny.truth_dir / "truth.json").read_text())
    c = tiny.config
    assert truth["preset"] == "tiny" and truth["seed"] == 0
    assert truth["config"] == c.to_dict()
    assert truth["tile_shape"] == list(tiny.tile_shape) and truth["grid_shape"] == [3, 3]
    assert truth["voxel_size_um"] == list(tiny.voxel_size_um)
    assert (truth["n_extra"], truth["n_repeat"]) == (c.n_extra, c.n_repeat)
    assert [s["slice_id"] for s in truth["slices"]] == tiny.slice_ids
    s = truth["slices"][2]
    assert s["galvo_offset"] == tiny.galvo_offset(2) and s["galvo_band"] == "dark"
    t = next(t for t in s["tiles"] if (t["ix"], t["iy"]) == (1, 2))
    assert t["reported_stage_mm"] == list(tiny.stage_position_mm(2, 1, 2))
    assert t["true_top_left_px"] == list(tiny.true_tile_position_px(2, 1, 2))
    assert [t["present"] for s in truth["slices"] for t in s["tiles"]].count(False) == 1

    again = SyntheticAcquisition.load(tiny.out_dir)
    assert again.config == c
    np.testing.assert_array_equal(again.true_tile(1, 0, 2), tiny.true_tile(1, 0, 2))
    assert again.expected_shifts_mm() == tiny.expected_shifts_mm()
    np.testing.assert_array_equal(again.true_volume[:4], tiny.true_volume[:4])


def test_config_presets_and_overrides():
    tiny = SyntheticConfig.from_preset("tiny")
    assert tiny == SyntheticConfig()  # the dataclass defaults are the tiny preset
    cfg = SyntheticConfig.from_preset("small", seed=3, slice_id_start=98)
    assert cfg.seed == 3 and cfg.preset == "small" and cfg.slice_ids[0] == 98
    # preset slice references are shifted with the start; explicit ones are ids
    assert cfg.encoder_glitch_slice == 98 + PRESETS["small"]["encoder_glitch_slice"]
    assert cfg.missing_tiles == [(98 + s, ix, iy) for s, ix, iy in PRESETS["small"]["missing_tiles"]]
    assert SyntheticConfig.from_preset("small", slice_id_start=98, missing_tiles=[(99, 0, 0)]).missing_tiles == \
        [(99, 0, 0)]
    with pytest.raises(TypeError):
        SyntheticConfig.from_preset("tiny", not_a_parameter=1)
    with pytest.raises(ValueError, match="unknown synthetic preset"):
        SyntheticConfig.from_preset("huge")
    with pytest.raises(ValueError, match="missing_tiles"):
        SyntheticConfig.from_preset("tiny", missing_tiles=[(7, 0, 0)])
    with pytest.raises(ValueError, match="galvo_offsets"):
        SyntheticConfig.from_preset("tiny", galvo_offsets=[0, 1])


@pytest.mark.parametrize("name, lo, hi", [("tiny", 5e6, 30e6), ("small", 100e6, 300e6), ("bench", 2 * 2**30, 4e9)])
def test_preset_raw_sizes(name, lo, hi):
    c = SyntheticConfig.from_preset(name)
    n_tiles = c.n_slices * c.grid_shape[0] * c.grid_shape[1] - len(c.missing_tiles)
    size = n_tiles * c.n_z * (c.nx + c.n_extra) * c.ny * c.n_repeat * 4
    assert lo <= size <= hi
