"""Re-homing detection against the phantom's injected encoder glitch and re-homing jump."""

from __future__ import annotations

import numpy as np
import pytest

from napari_soct.processing.io.tables import SliceShift, read_shifts_xy, read_slice_config
from napari_soct.processing.preprocess import preprocess_acquisition
from napari_soct.processing.stack.rehoming import RehomingParams, clean_shifts, detect_rehoming
from napari_soct.processing.synthetic import make_acquisition


def test_glitch_corrected_and_rehoming_kept_on_the_phantom(tmp_path):
    acq = make_acquisition(tmp_path / "acq", preset="tiny", seed=2, n_slices=6, encoder_glitch_slice=2,
                           rehoming_slice=4)
    preprocess_acquisition(acq.raw_dir, tmp_path / "pre", generate_previews=False)
    result = detect_rehoming(tmp_path / "pre" / "shifts_xy.csv", tmp_path / "clean")
    kinds = {(d.fixed_id, d.moving_id): d.kind for d in result.decisions}
    assert kinds == {(0, 1): "ordinary", (1, 2): "glitch", (2, 3): "glitch", (3, 4): "rehoming", (4, 5): "ordinary"}
    cleaned = read_shifts_xy(result.shifts_path)
    # Cumulative positions from the cleaned steps against the truth: drift plus the re-homing jump, no glitch.
    ids = acq.slice_ids
    true_pos = np.array([acq.stage_drift_mm(s) for s in ids])
    true_pos[ids.index(4):] += np.array(acq.config.rehoming_mm)
    est = np.vstack([[0.0, 0.0], np.cumsum([[s.x_shift_mm, s.y_shift_mm] for s in cleaned], axis=0)])
    error_px = np.abs(est - (true_pos - true_pos[0])) / (acq.voxel_size_um[1] * 1e-3)
    assert error_px[ids.index(2)].max() <= 2.0  # the glitched slice: halfway between its neighbours' steps
    np.testing.assert_array_less(np.delete(error_px, ids.index(2), axis=0), 1e-3)  # every other slice exact
    assert [s.reliable for s in cleaned] == [True, False, False, False, True]
    rows = {r.slice_id: r for r in read_slice_config(result.slice_config_path)}
    assert rows[4].rehomed is True and rows[1].rehomed is False
    assert "encoder_glitch_corrected" in rows[2].notes and rows[0].notes == "calibration_slice"


def test_fov_multiple_jump_removed():
    fov = 0.875
    steps = [(0.01, 0.0), (fov + 0.012, 0.003), (0.008, -0.002)]
    shifts = [SliceShift(i, i + 1, 0, 0, x, y) for i, (x, y) in enumerate(steps)]
    decisions = clean_shifts(shifts, RehomingParams(tile_fov_mm=fov))
    assert [d.kind for d in decisions] == ["ordinary", "fov_jump", "ordinary"]
    assert decisions[1].cleaned_mm == pytest.approx((0.012, 0.003))
    assert [d.kind for d in clean_shifts(shifts, RehomingParams())] == ["ordinary", "rehoming", "ordinary"]
