"""``reconstruct`` from mosaic grids to the stacked volume (steps 1-14 and the report) against the phantom.

The phantom (tiny, 6 slices) carries stage drift, an encoder glitch (slice 2: its reported position jumps 0.3 mm,
the true one does not) and a re-homing (from slice 4 on, true and reported positions jump). The final volume is
put in the truth frame by its attributes: ``canvas_origin_mm`` (stage reading of canvas pixel (0, 0); the stage
reports tile centres, so the truth-frame corner is half a field of view before it) and plane 0 = the first
slice's cut surface = block depth ``k0 * T``.

Per-voxel agreement is limited by speckle (gamma, shape 2, two repeats), which no step removes, so the volume is
compared with the truth at the analysis resolutions of its own pyramid (a level's voxel is the mean of the base
voxels it covers, and the truth is averaged the same way); the figure at the base resolution is printed too.
The measurements are those of :mod:`napari_soct.processing.synthetic.evaluate` (also used on bench by
``benchmarks/bench_assembly.py``).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_soct.pipeline.reconstruct import reconstruct
from napari_soct.processing.io.omezarr import open_ome_zarr
from napari_soct.processing.preprocess import preprocess_acquisition
from napari_soct.processing.synthetic import (TruthOnVolumeGrid, level_ncc, make_acquisition,
                                              placement_drift_px, slice_placement_errors, z_overlap_errors)


@pytest.fixture(scope="module")
def assembled(tmp_path_factory):
    root = tmp_path_factory.mktemp("assembly")
    acq = make_acquisition(root / "acq", preset="tiny", seed=0, n_slices=6, encoder_glitch_slice=2,
                           rehoming_slice=4)
    preprocess_acquisition(acq.raw_dir, root / "mosaic", generate_previews=False, exclude_first_slices=0)
    result = reconstruct(root / "mosaic", root / "rec")
    return acq, result, root / "rec"


def test_final_volume_matches_the_true_volume(assembled):
    acq, result, _ = assembled
    image = open_ome_zarr(result.volume)
    sizes = [round(s[-1] * 1e3, 3) for s in image.scales_mm]
    assert 25.0 in sizes and 50.0 in sizes  # analysis resolutions in the pyramid
    truth = TruthOnVolumeGrid(acq, image)
    figures, covered = {}, {}
    for level, size in enumerate(sizes):
        if size > 50:
            break
        f = level_ncc(acq, image, level, truth=truth, min_coverage=0.99)
        figures[size] = (f.ncc, f.n_voxels)
        covered[size] = (f.ncc_covered, f.n_covered)
    print("final volume vs truth, NCC over tissue per level (um: ncc, voxels):", figures)
    print("the same over voxels wholly covered by data:", covered)
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
    errors = slice_placement_errors(acq, image)
    print("placement error per slice (y, x) px:", {s: np.round(e, 2).tolist() for s, e in errors.items()})
    assert sorted(errors) == acq.slice_ids  # every slice of the phantom is stacked and measured
    norms = {s: float(np.hypot(*e)) for s, e in errors.items()}
    assert max(norms.values()) <= 1.0
    assert placement_drift_px(errors) <= 2.0


def test_z_overlaps_glitch_and_rehoming(assembled):
    acq, result, rec = assembled
    errors = z_overlap_errors(acq, rec / "14_stack" / "z_matches.csv")
    assert errors
    for pair, error in errors.items():
        assert abs(error) <= 1.0, (pair, error)
    report = json.loads((rec / "09_rehoming" / "rehoming_report.json").read_text())
    kinds = {(s["fixed_id"], s["moving_id"]): s["kind"] for s in report["steps"]}
    assert kinds[(1, 2)] == kinds[(2, 3)] == "glitch" and kinds[(3, 4)] == "rehoming"


def test_report_covers_every_step(assembled):
    _, result, rec = assembled
    text = result.report.read_text()
    for step in ("stitch", "quality", "rehoming", "common", "regist", "stack"):
        assert step.lower() in text.lower()


def test_truth_is_averaged_like_the_pyramid(assembled):
    """The evaluation averages the truth onto a coarse level with its own box means over the voxels with data;
    applied to the volume's level 0 they must give the volume's own coarser levels (else the comparison mixes
    resolutions)."""
    from napari_soct.processing.synthetic.evaluate import _box_mean, _edges, _factors

    _, result, _ = assembled
    image = open_ome_zarr(result.volume)
    base = np.asarray(image.levels[0])
    assert len(image.levels) > 2
    for level in range(1, len(image.levels)):
        f, shape = _factors(image, level), image.levels[level].shape
        edges = [_edges(base.shape[a], shape[a], f[a], 0, shape[a]) for a in range(3)]
        def reduce(a):
            return _box_mean(_box_mean(_box_mean(a, 2, edges[2]), 1, edges[1]), 0, edges[0])

        # Means over the voxels with data (0 = no data), as the stacked volume's pyramid computes them.
        covered = reduce((base != 0).astype(np.float32))
        mine = np.where(covered > 0, reduce(base) / np.maximum(covered, 1e-12), 0)
        np.testing.assert_allclose(mine, np.asarray(image.levels[level]), atol=1e-5)
