"""Label upscaling: exactness against an independent reference, formats, restrict/relabel, memory, CLI, dask.

The reference mapping is written here from the definition, with Python integers and ``np.ix_``: output voxel
``j`` of an axis has its centre at ``(j + 1/2) * n_in / n_out`` source voxels and takes the label of the source
voxel containing that point.
"""

from __future__ import annotations

import itertools
import threading
import tracemalloc
from fractions import Fraction

import numpy as np
import pytest
import tifffile
import zarr

from napari_soct.processing.io.atomic import OutputExistsError
from napari_soct.processing.io.images import ImageData
from napari_soct.processing.io.omezarr import create_ome_zarr_image, open_ome_zarr
from napari_soct.processing.progress import Cancelled
from napari_soct.processing.upscale import UpscaleParams, upscale_labels

DTYPES = ["uint8", "uint16", "uint32", "uint64"]


def big_ids(dtype) -> np.ndarray:
    """Label ids that stress exactness: 0, small ids, and for wide types ids above 2**24 and 2**53."""
    info = np.iinfo(dtype)
    ids = [0, 1, 2, 7, info.max, info.max - 1]
    if info.bits >= 32:
        ids += [2**24 + 1, 2**24 + 3, 2**31 + 5]
    if info.bits == 64:
        ids += [2**53 + 1, 2**53 + 3, 2**63 + 11, 2**64 - 3]
    return np.array(sorted(set(ids)), dtype=dtype)


def random_labels(shape, dtype, seed=0, blocky=False) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ids = big_ids(dtype)
    if blocky:  # regions of several voxels so some chunks are constant
        cell = int(blocky)
        coarse = rng.integers(0, len(ids), [max(1, s // cell) for s in shape])
        idx = coarse[np.ix_(*[np.minimum(np.arange(s) // cell, c - 1) for s, c in zip(shape, coarse.shape)])]
        return ids[idx]
    return ids[rng.integers(0, len(ids), shape)]


def ref_index(n_in: int, n_out: int, factor: int = 1) -> np.ndarray:
    """Source index of each output voxel of a level downsampled ``factor`` times (level 0: factor 1)."""
    n_level = -(-n_out // factor)
    return np.array([min(int((Fraction(2 * j + 1, 2) * factor * Fraction(n_in, n_out))), n_in - 1)
                     for j in range(n_level)])


def reference(src: np.ndarray, out_shape, factor=None) -> np.ndarray:
    factor = factor or (1,) * src.ndim
    return src[np.ix_(*[ref_index(n, o, f) for n, o, f in zip(src.shape, out_shape, factor)])]


def ref_mode(src: np.ndarray, out_shape, factor=None) -> np.ndarray:
    """Area mode by brute force: per output voxel, sum the overlap volume of each label; ties to the smallest."""
    factor = factor or (1,) * src.ndim
    shape = tuple(-(-o // f) for o, f in zip(out_shape, factor))
    ratios = [Fraction(n, o) * f for n, o, f in zip(src.shape, out_shape, factor)]
    per_axis = []
    for n, r, m in zip(src.shape, ratios, shape):
        rows = []
        for j in range(m):
            lo, hi = j * r, min((j + 1) * r, Fraction(n))
            lo = min(lo, Fraction(n) - Fraction(1, r.denominator))
            rows.append([(s, min(hi, s + 1) - max(lo, s)) for s in range(n) if min(hi, s + 1) - max(lo, s) > 0])
        per_axis.append(rows)
    out = np.empty(shape, src.dtype)
    for j in itertools.product(*map(range, shape)):
        acc = {}
        for combo in itertools.product(*(per_axis[a][j[a]] for a in range(src.ndim))):
            value = int(src[tuple(c[0] for c in combo)])
            acc[value] = acc.get(value, 0) + np.prod([c[1] for c in combo])
        best = max(acc.values())
        out[j] = min(v for v, w in acc.items() if w == best)
    return out


def read_levels(path) -> list[np.ndarray]:
    image = open_ome_zarr(path)
    return [np.asarray(level[...]) for level in image.levels]


# ------------------------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("factors", ["2", "3,2,4", "2.5,1.5,3.3", "1.7"])
def test_every_voxel_exact_all_levels(tmp_path, dtype, factors):
    src = random_labels((7, 9, 11), dtype, seed=len(factors))
    out = tmp_path / "up.ome.zarr"
    result = upscale_labels(src, out, factors=factors, chunk_size=8, shard_size=16, pyramid_levels=2)
    levels = read_levels(out)
    assert levels[0].dtype == np.dtype(dtype)
    expected_shape = tuple(int(Fraction(n) * Fraction(f) + Fraction(1, 2))
                           for n, f in zip(src.shape, (factors.split(",") * 3)[:3] if "," not in factors
                                           else factors.split(",")))
    assert levels[0].shape == result.shape == expected_shape
    np.testing.assert_array_equal(levels[0], reference(src, result.shape))
    assert len(levels) == 3
    for k, level in enumerate(levels[1:], start=1):
        np.testing.assert_array_equal(level, reference(src, result.shape, (2**k,) * 3))
    # Every source label survives at full resolution (upscaling loses nothing).
    assert set(np.unique(levels[0])) == set(np.unique(src))


def test_target_shape_and_centres_aligned(tmp_path):
    src = np.arange(1, 5, dtype=np.uint32)[None, None, :] * np.ones((1, 1, 1), np.uint32)
    out = tmp_path / "up.ome.zarr"
    upscale_labels(src, out, shape="1,1,12", pyramid="none")
    # 4 -> 12 voxels: each source voxel becomes 3, no half-voxel shift, no border.
    np.testing.assert_array_equal(read_levels(out)[0][0, 0], np.repeat([1, 2, 3, 4], 3))
    upscale_labels(src, out, shape="1,1,10", pyramid="none", if_exists="overwrite")
    # 4 -> 10: centres at 0.2, 0.6, 1.0, ..., 3.8 source voxels; a centre on a boundary takes the next voxel.
    np.testing.assert_array_equal(read_levels(out)[0][0, 0], [1, 1, 2, 2, 2, 3, 3, 4, 4, 4])


def test_scipy_zoom_is_not_centred():
    """Why we do not use scipy.ndimage.zoom(order=0): its default grid shifts labels (documented contrast)."""
    from scipy import ndimage

    src = np.arange(1, 5, dtype=np.uint32)
    zoomed = ndimage.zoom(src, 2.5, order=0)
    assert zoomed.tolist() != reference(src, (10,)).tolist()


def test_large_volume_sampled_exact_and_memory_bounded(tmp_path):
    """960 MB of uint64 output (more than the 0.1 GiB budget): checked on random boxes; traced memory bounded."""
    src = random_labels((40, 50, 60), "uint64", seed=3, blocky=10)
    budget_gb = 0.1
    tracemalloc.start()
    try:
        result = upscale_labels(src, tmp_path / "big.ome.zarr", factors="10", memory_budget_gb=budget_gb,
                                workers=2, pyramid_levels=1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.uncompressed_bytes == 400 * 500 * 600 * 8 > 8 * budget_gb * 2**30
    assert peak < budget_gb * 2**30, f"traced peak {peak / 2**20:.0f} MiB over the budget"
    assert result.peak_memory_estimate_bytes <= budget_gb * 2**30
    level0 = zarr.open_array(str(tmp_path / "big.ome.zarr" / "0"), mode="r")
    iz, iy, ix = (ref_index(n, o) for n, o in zip(src.shape, result.shape))
    rng = np.random.default_rng(0)
    for _ in range(25):
        start = [int(rng.integers(0, n - 50)) for n in result.shape]
        box = tuple(slice(s, s + 50) for s in start)
        expected = src[np.ix_(iz[box[0]], iy[box[1]], ix[box[2]])]
        np.testing.assert_array_equal(level0[box], expected)
    assert result.chunks_constant > 0  # the constant-chunk shortcut was exercised


@pytest.mark.parametrize("factors", ["0.5", "0.4,0.5,0.35"])
def test_downscale_mode_matches_brute_force(tmp_path, factors):
    src = random_labels((8, 10, 12), "uint64", seed=5, blocky=3)
    out = tmp_path / "down.ome.zarr"
    result = upscale_labels(src, out, factors=factors, method="mode", pyramid="none")
    np.testing.assert_array_equal(read_levels(out)[0], ref_mode(src, result.shape))


def test_mode_pyramid_matches_brute_force(tmp_path):
    src = random_labels((5, 6, 7), "uint32", seed=6)
    out = tmp_path / "up.ome.zarr"
    result = upscale_labels(src, out, factors="2.5,3,1.5", pyramid="mode", pyramid_levels=2, chunk_size=8,
                            shard_size=16)
    levels = read_levels(out)
    np.testing.assert_array_equal(levels[0], reference(src, result.shape))
    for k in (1, 2):
        np.testing.assert_array_equal(levels[k], ref_mode(src, result.shape, (2**k,) * 3))


def test_mode_ties_go_to_smallest_label():
    from napari_soct.processing.upscale import weighted_mode

    values = np.array([[9, 3, 9, 3], [5, 5, 1, 2]], np.uint64)
    weights = np.array([[1, 1, 1, 1], [1, 1, 3, 0]], np.int64)
    assert weighted_mode(values, weights).tolist() == [3, 1]


# ------------------------------------------------------------------------------------------- restrict / relabel


def test_keep_and_relabel_in_one_pass(tmp_path):
    src = random_labels((6, 7, 8), "uint64", seed=7)
    ids = np.unique(src)
    keep = ids[1::2]
    table = {int(keep[0]): 5, int(keep[1]): 2**60 + 1, int(ids[0]): 9}  # ids[0] is not kept: stays 0
    csv = tmp_path / "relabel.csv"
    csv.write_text("old,new\n" + "".join(f"{k},{v}\n" for k, v in table.items()))
    keep_file = tmp_path / "keep.txt"
    keep_file.write_text("\n".join(map(str, keep)) + "\n")
    out = tmp_path / "r.ome.zarr"
    result = upscale_labels(src, out, factors="2,3,2.5", keep_labels=str(keep_file), relabel=str(csv),
                            pyramid="none")
    expected_src = np.where(np.isin(src, keep), src, 0).astype(np.uint64)
    for old, new in table.items():
        if old in keep:
            expected_src[src == old] = new
    np.testing.assert_array_equal(read_levels(out)[0], reference(expected_src, result.shape))


def test_relabel_to_narrower_dtype_and_overflow_error(tmp_path):
    src = np.array([[[2**40, 2**41], [0, 2**40]]], np.uint64)
    out = tmp_path / "n.ome.zarr"
    upscale_labels(src, out, factors="1,2,2", relabel={2**40: 1, 2**41: 2}, dtype="uint8", pyramid="none")
    level = read_levels(out)[0]
    assert level.dtype == np.uint8
    np.testing.assert_array_equal(level, reference(np.array([[[1, 2], [0, 1]]], np.uint8), (1, 4, 4)))
    with pytest.raises(ValueError, match="does not fit the output dtype uint8"):
        upscale_labels(src, tmp_path / "bad.ome.zarr", factors="2", dtype="uint8")
    assert not (tmp_path / "bad.ome.zarr").exists()


# ------------------------------------------------------------------------------------------- formats


def _inputs(tmp_path, src):
    tifffile.imwrite(tmp_path / "plain.tif", src, photometric="minisblack")
    tifffile.imwrite(tmp_path / "packed.tif", src, photometric="minisblack", compression="zlib", tile=(16, 16))
    arr = zarr.create_array(str(tmp_path / "plain.zarr"), shape=src.shape, chunks=(3, 4, 5), dtype=src.dtype)
    arr[...] = src
    img = create_ome_zarr_image(tmp_path / "ome.ome.zarr", src.shape, (0.025, 0.025, 0.025), chunks=(4, 4, 4),
                                dtype=src.dtype)
    img[...] = src
    np.save(tmp_path / "arr.npy", src)
    return ["plain.tif", "packed.tif", "plain.zarr", "ome.ome.zarr", "arr.npy"]


def test_inputs_tiff_zarr_omezarr_npy(tmp_path):
    src = random_labels((6, 20, 18), "uint32", seed=8)
    for name in _inputs(tmp_path, src):
        out = tmp_path / f"out_{name.replace('.', '_')}.ome.zarr"
        result = upscale_labels(tmp_path / name, out, factors="2,1.5,2", pyramid="none")
        np.testing.assert_array_equal(read_levels(out)[0], reference(src, result.shape), err_msg=name)
    # The OME-Zarr input's voxel size carries over: 25 um -> 12.5 um along z.
    assert open_ome_zarr(tmp_path / "out_ome_ome_zarr.ome.zarr").scales_mm[0][0] == pytest.approx(0.0125)


@pytest.mark.parametrize("compression", ["blosc", "blosc-lz4", "zstd", "none"])
def test_omezarr_compressions_read_back_by_zarr(tmp_path, compression):
    src = random_labels((5, 6, 7), "uint64", seed=15)
    out = tmp_path / "c.ome.zarr"
    result = upscale_labels(src, out, factors="3,2.5,4", compression=compression, chunk_size=8, shard_size=16)
    meta = zarr.open_array(str(out / "0"), mode="r").metadata.to_dict()
    inner = meta["codecs"][0]["configuration"]["codecs"]
    assert [c["name"] for c in inner] == ["bytes"] + ({"none": [], "zstd": ["zstd"]}.get(compression, ["blosc"]))
    np.testing.assert_array_equal(read_levels(out)[0], reference(src, result.shape))


@pytest.mark.parametrize("compression", ["none", "zlib", "zstd"])
def test_bigtiff_output(tmp_path, compression):
    src = random_labels((4, 9, 7), "uint64", seed=9)
    out = tmp_path / "up.tif"
    result = upscale_labels(src, out, factors="2.5,3,40", compression=compression)
    with tifffile.TiffFile(out) as tif:
        assert tif.is_bigtiff
        assert len(tif.pages) == result.shape[0]
        data = tif.asarray()
    np.testing.assert_array_equal(data, reference(src, result.shape))


def test_2d_labels_both_formats(tmp_path):
    src = random_labels((9, 13), "uint16", seed=10)
    r1 = upscale_labels(src, tmp_path / "a.ome.zarr", factors="3,2.5", chunk_size=8, shard_size=16)
    np.testing.assert_array_equal(read_levels(tmp_path / "a.ome.zarr")[0], reference(src, r1.shape))
    r2 = upscale_labels(src, tmp_path / "a.tif", factors="3,2.5")
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "a.tif"), reference(src, r2.shape))


def test_like_reference_grid(tmp_path):
    src = random_labels((5, 6, 7), "uint32", seed=11)
    labels = ImageData(src, (0.025, 0.025, 0.025), "atlas")
    ref = create_ome_zarr_image(tmp_path / "ref.ome.zarr", (12, 15, 17), (0.01, 0.01, 0.01), chunks=(8, 8, 8))
    ref[...] = 0
    out = tmp_path / "like.ome.zarr"
    result = upscale_labels(labels, out, like=str(tmp_path / "ref.ome.zarr"), pyramid="none")
    assert result.shape == (12, 15, 17)
    assert open_ome_zarr(out).scales_mm[0] == pytest.approx((0.01, 0.01, 0.01))
    np.testing.assert_array_equal(read_levels(out)[0], reference(src, (12, 15, 17)))
    # Origins aligned by voxel size: 10 um voxel j centre at (j + 0.5) * 0.4 source voxels, clamped at the end.
    out2 = tmp_path / "like_scale.ome.zarr"
    upscale_labels(labels, out2, like=str(tmp_path / "ref.ome.zarr"), align="scale", pyramid="none")
    idx = [np.minimum(((2 * np.arange(n) + 1) * 2) // 10, s - 1) for n, s in zip((12, 15, 17), src.shape)]
    np.testing.assert_array_equal(read_levels(out2)[0], src[np.ix_(*idx)])
    # A reference with another field of view is matched too, and the result says the labels were stretched.
    ref2 = create_ome_zarr_image(tmp_path / "ref2.ome.zarr", (20, 15, 17), (0.01, 0.01, 0.01), chunks=(8, 8, 8))
    ref2[...] = 0
    r3 = upscale_labels(labels, tmp_path / "like2.ome.zarr", like=str(tmp_path / "ref2.ome.zarr"), pyramid="none")
    assert len(r3.notes) == 1 and r3.notes[0].startswith("axis 0: the labels cover 0.125 mm, the reference 0.2 mm")


# ------------------------------------------------------------------------------------------- errors, safety


def test_exactly_one_target_and_bad_input(tmp_path):
    src = np.zeros((2, 3, 4), np.uint8)
    with pytest.raises(ValueError, match="exactly one target"):
        upscale_labels(src, tmp_path / "a.ome.zarr")
    with pytest.raises(ValueError, match="exactly one target.*factors, shape"):
        upscale_labels(src, tmp_path / "a.ome.zarr", factors="2", shape="4,6,8")
    with pytest.raises(ValueError, match="factors: 'x' is not a number"):
        upscale_labels(src, tmp_path / "a.ome.zarr", factors="2,x,2")
    with pytest.raises(ValueError, match="expected 3 comma-separated"):
        upscale_labels(src, tmp_path / "a.ome.zarr", factors="2,2")
    with pytest.raises(ValueError, match="integer dtype"):
        upscale_labels(src.astype(np.float32), tmp_path / "a.ome.zarr", factors="2")
    with pytest.raises(ValueError, match="memory_budget_gb"):
        upscale_labels(src, tmp_path / "a.ome.zarr", factors="100", memory_budget_gb=0.01, chunk_size=512)
    assert not (tmp_path / "a.ome.zarr").exists()


def test_if_exists_and_cancel_leave_no_partial_output(tmp_path):
    src = random_labels((6, 6, 6), "uint16", seed=12)
    out = tmp_path / "o.ome.zarr"
    upscale_labels(src, out, factors="2")
    with pytest.raises(OutputExistsError):
        upscale_labels(src, out, factors="3")
    assert upscale_labels(src, out, factors="3", if_exists="skip").skipped
    assert read_levels(out)[0].shape == (12, 12, 12)
    cancel = threading.Event()
    calls = []

    def progress(done, total, message):
        calls.append((done, total))
        cancel.set()

    with pytest.raises(Cancelled):
        upscale_labels(src, tmp_path / "c.ome.zarr", factors="8", chunk_size=8, shard_size=8, progress=progress,
                       cancel=cancel)
    assert calls and not list(tmp_path.glob("*c.ome.zarr*"))
    seen = []
    upscale_labels(src, out, factors="3", if_exists="overwrite", progress=lambda d, t, m: seen.append((d, t)))
    assert seen[-1][0] == seen[-1][1] and read_levels(out)[0].shape == (18, 18, 18)


def test_params_declared_for_cli_and_widget():
    from napari_soct.pipeline.steps import get_step

    step = get_step("upscale-labels")
    names = [i.name for i in step.param_infos]
    assert {"factors", "shape", "like", "keep_labels", "relabel", "memory_budget_gb", "workers"} <= set(names)
    assert step.params is UpscaleParams


def test_cli_upscale_labels(tmp_path, capsys):
    from napari_soct.pipeline.cli import main

    src = random_labels((4, 5, 6), "uint32", seed=13)
    tifffile.imwrite(tmp_path / "atlas.tif", src, photometric="minisblack")
    code = main(["upscale-labels", str(tmp_path / "atlas.tif"), str(tmp_path / "up.ome.zarr"), "--factors", "2,2,2.5",
                 "--quiet"])
    assert code == 0
    assert "upscale-labels: 8x10x15 uint32" in capsys.readouterr().out
    np.testing.assert_array_equal(read_levels(tmp_path / "up.ome.zarr")[0], reference(src, (8, 10, 15)))
    code = main(["upscale-labels", str(tmp_path / "atlas.tif"), str(tmp_path / "x.ome.zarr"), "--factors", "2",
                 "--shape", "8,10,12", "--quiet"])
    assert code == 2 and "exactly one target" in capsys.readouterr().err


def test_dask_cluster_matches_threads(tmp_path):
    distributed = pytest.importorskip("distributed")
    src = random_labels((6, 7, 8), "uint64", seed=14)
    np.save(tmp_path / "src.npy", src)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cl, \
            distributed.Client(cl) as client:
        result = upscale_labels(tmp_path / "src.npy", tmp_path / "d.ome.zarr", factors="3,2.5,2", chunk_size=8,
                                shard_size=8, client=client)
        # The same through the scheduler address (what --dask-scheduler gives on the command line).
        by_address = upscale_labels(tmp_path / "src.npy", tmp_path / "e.ome.zarr", factors="3,2.5,2", chunk_size=8,
                                    shard_size=8, dask_scheduler=cl.scheduler_address)
    assert result.workers_used == by_address.workers_used == 2
    for name in ("d.ome.zarr", "e.ome.zarr"):
        levels = read_levels(tmp_path / name)
        np.testing.assert_array_equal(levels[0], reference(src, result.shape))
        for k, level in enumerate(levels[1:], start=1):
            np.testing.assert_array_equal(level, reference(src, result.shape, (2**k,) * 3))
