"""The whole in-slice chain (preprocess -> reconstruct, default steps) against the phantom's true tissue.

Each final slice (``07_normalize``) is put in the truth frame by its ``origin_mm`` (the stage reading of pixel
(0, 0); the stage reports tile centres, so the sample-frame corner is half a field of view before it) and
compared with the true tissue over the planes it imaged: plane ``p`` of slice ``k`` lies at block depth
``k * T + p * dz`` below the first cut (per-pixel interface crop). The comparison is the en-face average
(AIP) over those planes, on tissue pixels the slice covers. The measured slices carry speckle (gamma, shape 2,
two repeats per B-scan) that no correction removes; the figure is given raw and with both images smoothed at
the speckle grain (Gaussian, 1 px), which is where the issue's 0.95 applies.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from napari_soct.pipeline.reconstruct import ReconstructParams, reconstruct
from napari_soct.processing.io.omezarr import open_ome_zarr
from napari_soct.processing.preprocess import preprocess_acquisition
from napari_soct.processing.synthetic import make_acquisition


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    root = tmp_path_factory.mktemp("chain")
    acq = make_acquisition(root / "acq", preset="tiny", seed=0, n_slices=4)
    preprocess_acquisition(acq.raw_dir, root / "mosaic", generate_previews=False)
    result = reconstruct(root / "mosaic", root / "rec", ReconstructParams(assemble=False))
    return acq, result


def slice_vs_truth(acq, path, slice_index):
    """(true AIP, measured AIP, mask of tissue pixels the slice covers) in the truth frame."""
    image = open_ome_zarr(path)
    data = np.asarray(image.levels[0])
    origin_mm = np.asarray(image.attributes["soct"]["origin_mm"], dtype=float)
    corner = (origin_mm - np.asarray(acq.fov_mm[::-1]) / 2 - np.asarray(acq.volume_origin_mm)) / np.asarray(acq.pixel_mm)
    y0, x0 = (int(round(v)) for v in corner)
    assert np.allclose(corner, (y0, x0), atol=1e-6)  # stitched canvases sit on whole pixels of the stage grid
    covered_planes = np.flatnonzero((data > 0).mean(axis=(1, 2)) > 0.9)
    n_planes = int(covered_planes[-1]) + 1
    c = acq.config
    z0 = int(round(slice_index * c.slice_thickness_um / c.axial_resolution_um))
    nz, vy, vx = acq.volume_shape_full
    n_planes = min(n_planes, nz - z0)
    ys = slice(max(y0, 0), min(y0 + data.shape[1], vy))
    xs = slice(max(x0, 0), min(x0 + data.shape[2], vx))
    truth = acq.truth_block((slice(z0, z0 + n_planes), ys, xs))
    measured = data[:n_planes, ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0]
    tissue = truth.mean(axis=0) > 0.5 * (c.agarose_level + c.tissue_level)
    mask = tissue & (measured > 0).all(axis=0)
    return truth.mean(axis=0), measured.mean(axis=0), mask


def test_corrected_slices_match_the_true_tissue(chain):
    acq, result = chain
    raw, smoothed = [], []
    for k, (sid, path) in enumerate(sorted(result.outcome("normalize").result.outputs.items())):
        truth, measured, mask = slice_vs_truth(acq, path, acq.slice_ids.index(sid))
        assert mask.mean() > 0.3
        raw.append(np.corrcoef(truth[mask], measured[mask])[0, 1])
        g = lambda a: ndimage.gaussian_filter(a, 1.0)  # noqa: E731 - the speckle grain
        smoothed.append(np.corrcoef(g(truth)[mask], g(measured)[mask])[0, 1])
    print("AIP NCC over tissue per slice, raw:", np.round(raw, 3), "smoothed 1 px:", np.round(smoothed, 3))
    assert min(smoothed) >= 0.95
    assert min(raw) >= 0.92


def test_misplacing_a_slice_breaks_the_match(chain):
    """The measurement can fail: the same slice compared one tile step off is far from the truth."""
    acq, result = chain
    sid, path = sorted(result.outcome("normalize").result.outputs.items())[1]
    truth, measured, mask = slice_vs_truth(acq, path, acq.slice_ids.index(sid))
    shifted = np.roll(measured, 7, axis=1)
    assert np.corrcoef(truth[mask], shifted[mask])[0, 1] < 0.8
