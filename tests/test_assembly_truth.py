"""``reconstruct`` from mosaic grids to the stacked volume (steps 1-14 and the report) against the phantom.

The phantom (tiny, 6 slices) carries stage drift, an encoder glitch (slice 2: its reported position jumps 0.3 mm,
the true one does not) and a re-homing (from slice 4 on, true and reported positions jump). The final volume is
put in the truth frame by its attributes: ``canvas_origin_mm`` (stage reading of canvas pixel (0, 0); the stage
reports tile centres, so the truth-frame corner is half a field of view before it) and plane 0 = the first
slice's cut surface = block depth ``k0 * T``.

Per-voxel agreement is limited by speckle (gamma, shape 2, two repeats), which no step removes, so the volume is
compared with the truth at the analysis resolutions of its own pyramid (a level's voxel is the mean of the base
voxels it covers, and the truth is averaged the same way); the figure at the base resolution is printed too.
"""

from __future__ import annotations

import csv

import numpy as np
import pytest
from scipy import ndimage
from skimage.registration import phase_cross_correlation

from napari_soct.pipeline.reconstruct import reconstruct
from napari_soct.processing.io.omezarr import open_ome_zarr
from napari_soct.processing.preprocess import preprocess_acquisition
from napari_soct.processing.synthetic import make_acquisition


@pytest.fixture(scope="module")
def assembled(tmp_path_factory):
    root = tmp_path_factory.mktemp("assembly")
    acq = make_acquisition(root / "acq", preset="tiny", seed=0, n_slices=6, encoder_glitch_slice=2,
                           rehoming_slice=4)
    preprocess_acquisition(acq.raw_dir, root / "mosaic", generate_previews=False, exclude_first_slices=0)
    result = reconstruct(root / "mosaic", root / "rec")
    return acq, result, root / "rec"


def _truth_frame(acq, image):
    """(z0 block plane, y0, x0) of the volume's voxel (0, 0, 0) in the truth frame (full-resolution pixels)."""
    soct = image.attributes.get("soct", image.attributes)
    origin = np.asarray(soct["canvas_origin_mm"], float)
    corner = (origin - np.asarray(acq.fov_mm[::-1]) / 2 - np.asarray(acq.volume_origin_mm)) / np.asarray(acq.pixel_mm)
    first = min(int(s) for s in soct["slice_z0"])
    c = acq.config
    z0 = acq.slice_ids.index(first) * c.slice_thickness_um / c.axial_resolution_um
    return z0, corner[0], corner[1]


def _level_vs_truth(acq, image, level):
    """(measured level, truth averaged onto the same grid) over the part of the volume inside the truth."""
    data = np.asarray(image.levels[level])
    base = np.asarray(image.scales_mm[0]) * 1e3
    voxel = np.asarray(image.scales_mm[level]) * 1e3
    factor = voxel / base
    z0, y0, x0 = _truth_frame(acq, image)
    nz, vy, vx = acq.volume_shape_full
    # Truth at base resolution over the volume's extent, then averaged per output voxel like the pyramid.
    zz = np.arange(int(np.ceil(data.shape[0] * factor[0])))
    yy = np.arange(int(np.ceil(data.shape[1] * factor[1])))
    xx = np.arange(int(np.ceil(data.shape[2] * factor[2])))
    tz, ty, tx = z0 + zz, y0 + yy, x0 + xx
    inside = [(t >= 0) & (t <= n - 1) for t, n in zip((tz, ty, tx), (nz, vy, vx))]
    truth = np.zeros((len(zz), len(yy), len(xx)), np.float32)
    z_idx, y_idx, x_idx = (np.clip(np.round(t).astype(int), 0, n - 1) for t, n in zip((tz, ty, tx), (nz, vy, vx)))
    block = acq.truth_block((slice(z_idx.min(), z_idx.max() + 1), slice(y_idx.min(), y_idx.max() + 1),
                             slice(x_idx.min(), x_idx.max() + 1)))
    truth = block[np.ix_(z_idx - z_idx.min(), y_idx - y_idx.min(), x_idx - x_idx.min())]
    valid = inside[0][:, None, None] & inside[1][None, :, None] & inside[2][None, None, :]
    if level:
        def down(a):
            out = np.zeros(data.shape, np.float64)
            cnt = np.zeros(data.shape, np.float64)
            # each base voxel counts for the output voxel its start falls in
            iz = np.minimum((zz / factor[0]).astype(int), data.shape[0] - 1)
            iy = np.minimum((yy / factor[1]).astype(int), data.shape[1] - 1)
            ix = np.minimum((xx / factor[2]).astype(int), data.shape[2] - 1)
            np.add.at(out, np.ix_(iz, iy, ix), a)
            np.add.at(cnt, np.ix_(iz, iy, ix), 1.0)
            return out / np.maximum(cnt, 1)
        truth = down(truth * valid)
        valid = down(valid.astype(np.float32)) > 0.99
    return data, truth, valid


def _ncc_over_tissue(acq, data, truth, valid):
    c = acq.config
    mask = valid & (data > 0) & (truth > 0.5 * (c.agarose_level + c.tissue_level))
    return float(np.corrcoef(truth[mask], data[mask])[0, 1]), int(mask.sum())


def test_final_volume_matches_the_true_volume(assembled):
    acq, result, _ = assembled
    image = open_ome_zarr(result.volume)
    sizes = [round(s[-1] * 1e3, 3) for s in image.scales_mm]
    assert 25.0 in sizes and 50.0 in sizes  # analysis resolutions in the pyramid
    figures = {}
    for level, size in enumerate(sizes):
        if size > 50:
            break
        data, truth, valid = _level_vs_truth(acq, image, level)
        figures[size] = _ncc_over_tissue(acq, data, truth, valid)
    print("final volume vs truth, NCC over tissue per level (um: ncc, voxels):", figures)
    # Speckle alone (the truth times the phantom's gamma noise, averaged the same way) caps the NCC at about
    # 0.46 / 0.88 / 0.98 at 10 / 25 / 50 um on this phantom (see docs/benchmarks.md, "Volume assembly").
    assert figures[50.0][0] >= 0.90
    assert figures[25.0][0] >= 0.85
    assert figures[sizes[0]][0] >= 0.5  # a misplaced volume gives ~0


def test_every_slice_is_placed_within_a_pixel_without_drift(assembled):
    """Each slice's section of the volume (its own planes) against the truth at the same depths, by sub-pixel
    phase correlation of the depth averages: the residual shift is the slice's placement error."""
    acq, result, _ = assembled
    image = open_ome_zarr(result.volume)
    soct = image.attributes.get("soct", image.attributes)
    data, truth, valid = _level_vs_truth(acq, image, 0)
    z0s = {int(s): int(z) for s, z in soct["slice_z0"].items()}
    ids = sorted(z0s)
    errors = {}
    for i, sid in enumerate(ids):
        start = z0s[sid] + 2
        stop = z0s[ids[i + 1]] if i + 1 < len(ids) else min(data.shape[0], start + 12)
        m = data[start:stop].mean(axis=0)
        t = truth[start:stop].mean(axis=0)
        keep = (data[start:stop] > 0).all(axis=0) & valid[start:stop].all(axis=0)
        ys, xs = np.nonzero(keep)
        box = (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
        shift, _, _ = phase_cross_correlation(ndimage.gaussian_filter(t[box], 1),
                                              ndimage.gaussian_filter(m[box], 1), upsample_factor=20)
        errors[sid] = shift
    print("placement error per slice (y, x) px:", {s: np.round(e, 2).tolist() for s, e in errors.items()})
    norms = {s: float(np.hypot(*e)) for s, e in errors.items()}
    assert max(norms.values()) <= 1.0
    drift = np.array([errors[s] for s in ids])
    assert np.hypot(*(drift[-1] - drift[0])) <= 2.0


def test_z_overlaps_glitch_and_rehoming(assembled):
    acq, result, rec = assembled
    c = acq.config
    expected = c.slice_thickness_um / c.axial_resolution_um
    with open(rec / "14_stack" / "z_matches.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows
    for row in rows:
        gap = int(row["moving_id"]) - int(row["fixed_id"])
        assert abs(float(row["used"]) - gap * expected) <= 1.0, row
    import json

    report = json.loads((rec / "09_rehoming" / "rehoming_report.json").read_text())
    kinds = {(s["fixed_id"], s["moving_id"]): s["kind"] for s in report["steps"]}
    assert kinds[(1, 2)] == kinds[(2, 3)] == "glitch" and kinds[(3, 4)] == "rehoming"


def test_report_covers_every_step(assembled):
    _, result, rec = assembled
    text = result.report.read_text()
    for step in ("stitch", "quality", "rehoming", "common", "regist", "stack"):
        assert step.lower() in text.lower()
