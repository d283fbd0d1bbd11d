"""Slice quality scoring: a damaged slice is found and excluded, manual choices kept."""

from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter

from napari_soct.processing.io.omezarr import create_ome_zarr_image, open_ome_zarr
from napari_soct.processing.io.tables import read_slice_config
from napari_soct.processing.preprocess import preprocess_acquisition
from napari_soct.processing.stack.quality import QualityParams, assess_quality


def test_damaged_slices_score_low_and_manual_exclusion_kept(tmp_path):
    from napari_soct.processing.synthetic import make_acquisition

    acq = make_acquisition(tmp_path / "acq", preset="tiny", seed=4, n_slices=6)
    pre = tmp_path / "pre"
    preprocess_acquisition(acq.raw_dir, pre, generate_previews=False, sharding_factor=0)
    # Damage two slices the way acquisitions fail: a blurred (out of focus) one and a dark, empty one.
    for sid, damage in ((2, "blur"), (4, "empty")):
        path = pre / f"mosaic_grid_3d_z{sid:02d}.ome.zarr"
        data = open_ome_zarr(path).levels[0][...]
        data = gaussian_filter(data, (0, 4, 4)) if damage == "blur" else np.random.default_rng(0).random(
            data.shape, dtype=np.float32) * 0.02
        arr = create_ome_zarr_image(path, data.shape, open_ome_zarr(path).scales_mm[0], chunks=data.shape)
        arr[...] = data
    text = (pre / "slice_config.csv").read_text().replace("\n3,true,", "\n3,false,")  # a manual exclusion
    (pre / "slice_config.csv").write_text(text)
    result = assess_quality(pre, pre / "slice_config.csv", tmp_path / "q", QualityParams(level=0))
    scores = result.scores
    good = [scores[s] for s in (1, 3, 5)]
    assert result.excluded == [2, 4]
    assert min(good) > 0.8 and max(scores[2], scores[4]) < 0.5
    rows = {r.slice_id: r for r in read_slice_config(result.slice_config_path)}
    assert rows[3].use is False and rows[3].auto_excluded is False  # manual choice untouched
    assert rows[0].notes == "calibration_slice" and rows[0].use is False
    assert "low sharpness" in rows[2].auto_exclude_reason and "low" in rows[4].auto_exclude_reason
