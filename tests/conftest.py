"""Shared fixtures: a minimal, independent writer of the raw tile format, and synthetic acquisitions."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest

# Sample data are cached per test run, never in the user's cache.
os.environ.setdefault("NAPARI_SOCT_CACHE", tempfile.mkdtemp(prefix="napari-soct-cache-"))


def write_raw_tile(
    folder: Path,
    tile: np.ndarray,
    *,
    n_extra: int = 6,
    band_start: int | None = None,
    n_repeat: int = 1,
    n_files: int = 1,
    stage_mm=(0.0, 0.0),
    fov_um=(500.0, 400.0),
    axial_um: float | None = 3.5,
    noise_seed: int = 0,
    info_overrides: dict | None = None,
    drop_keys=(),
) -> np.ndarray:
    """Write ``tile`` (z, y, x) in the lab's raw format; return the exact tile a reader must give back.

    The galvo band (``n_extra`` dark A-lines) starts at A-line ``band_start`` (default: at the end). Repeats
    are ``tile + e`` and ``tile - e`` pairs, so their mean is ``tile`` up to float32 rounding; the returned
    array is that mean as numpy computes it in float32.
    """
    folder.mkdir(parents=True, exist_ok=True)
    nz, ny, nx = tile.shape
    n_alines = nx + n_extra
    band = np.full((nz, ny, n_extra), 0.05 * float(tile.mean()), np.float32)
    full = np.concatenate([tile.astype(np.float32), band], axis=2)  # (z, y, a)
    if band_start is not None:
        full = np.roll(full, band_start - nx, axis=2)
    rng = np.random.default_rng(noise_seed)
    repeats = []
    for r in range(n_repeat):
        if n_repeat == 1:
            repeats.append(full)
        elif r % 2 == 0:
            e = rng.normal(0, 0.01, full.shape).astype(np.float32)
            repeats.append(full + e)
        else:
            repeats.append(full - e)
    frames = np.stack(repeats, axis=2)  # (z, y, r, a): consecutive frames are repeats of one B-scan
    expected_full = frames.mean(axis=2, dtype=np.float32)
    if band_start is not None:
        expected_full = np.roll(expected_full, nx - band_start, axis=2)
    expected = np.ascontiguousarray(expected_full[:, :, :nx])
    # Fortran (n_z, n_alines, n_frames): element [z, a, f] with f = b * n_repeat + r.
    fortran = frames.reshape(nz, ny * n_repeat, n_alines).transpose(0, 2, 1)
    splits = np.array_split(np.arange(ny * n_repeat), n_files)
    for i, idx in enumerate(splits):
        part = np.asarray(fortran[:, :, idx], dtype="<f4")
        (folder / f"image_{i:05d}.bin").write_bytes(part.ravel(order="F").tobytes())
    info = {
        "nx": nx, "ny": ny, "n_repeat": n_repeat, "width": fov_um[0], "height": fov_um[1], "n_extra": n_extra,
        "line_rate": 100000, "exposure": 10, "alinerepeat": 1, "top_z": 0, "bottom_z": nz - 1, "focus_z": nz // 2,
        "stage_x_pos_mm": stage_mm[0], "stage_y_pos_mm": stage_mm[1], "stage_z_pos_mm": 1.0,
    }
    if axial_um is not None:
        info["axial_resolution"] = axial_um
    info.update(info_overrides or {})
    lines = ["Scan info"] + [f"{k}: {v}" for k, v in info.items() if k not in drop_keys]
    (folder / "info.txt").write_text("\n".join(lines) + "\n")
    return expected


def structured_tile(shape, seed: int) -> np.ndarray:
    """A positive tile with structure (blobs and a gradient), distinct per seed."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    base = gaussian_filter(rng.random(shape), 1.5)
    z = np.linspace(1.0, 0.5, shape[0])[:, None, None]
    return (1.0 + 4.0 * base * z).astype(np.float32)


@pytest.fixture(scope="session")
def tiny_acquisition(tmp_path_factory):
    """The ``tiny`` synthetic acquisition, made once per test session."""
    from napari_soct.processing.synthetic import make_acquisition

    return make_acquisition(tmp_path_factory.mktemp("tiny"), preset="tiny", seed=0)


@pytest.fixture(scope="session")
def curved_cut(tmp_path_factory):
    """``(acquisition, mosaic folder)``: the tiny phantom with a strongly tilted and curved cut (the surface spans
    several samples), preprocessed into mosaic grids."""
    from napari_soct.processing.preprocess import preprocess_acquisition
    from napari_soct.processing.synthetic import make_acquisition

    acq = make_acquisition(tmp_path_factory.mktemp("curved"), preset="tiny", seed=5, interface_depth_um=80.0,
                           interface_tilt_um_per_mm=(50.0, -30.0), interface_curvature_um_per_mm2=40.0)
    out = tmp_path_factory.mktemp("curved_mosaics")
    preprocess_acquisition(acq.raw_dir, out, generate_previews=False)
    return acq, out


def true_surface_in_mosaic(acq, sid, mosaic) -> np.ndarray:
    """The phantom's surface depth (samples) at every pixel of a mosaic grid (tiles pasted side by side)."""
    surface = np.full(mosaic.array.shape[1:], np.nan, np.float32)
    full = acq.interface_depth_map(sid)
    _, ty, tx = mosaic.tile_shape
    for x, y in mosaic.tile_positions():
        y0, x0 = (int(round(v)) for v in acq.true_tile_position_px(sid, x, y))
        surface[y * ty : (y + 1) * ty, x * tx : (x + 1) * tx] = full[y0 : y0 + ty, x0 : x0 + tx]
    return surface


@pytest.fixture(params=["numpy", "numba"])
def kernels(request, monkeypatch):
    """Run a test with the numpy code paths and with the compiled (numba) kernels; the latter is skipped where
    numba is not installed."""
    from napari_soct.processing._jit import numba_module

    if request.param == "numba" and numba_module() is None:
        pytest.skip("numba is not installed")
    monkeypatch.setenv("NAPARI_SOCT_JIT", "1" if request.param == "numba" else "0")
    return request.param
