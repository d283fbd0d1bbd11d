"""Straighten along a path and backproject: geometry, round trips on a synthetic tube, Ouroboros configuration
files, output formats, memory bounds and bad input (no napari)."""

from __future__ import annotations

import json
import tracemalloc

import dask.array as da
import subprocess
import sys

import numpy as np
import pytest
import tifffile
import zarr
from scipy.spatial import cKDTree

from napari_soct.processing.backproject import (
    SliceGeometry,
    backproject_volume,
    read_configuration,
    sample_path,
    straighten_volume,
)
from napari_soct.processing.backproject.geometry import rotation_minimising_frames
from napari_soct.processing.io.atomic import OutputExistsError
from napari_soct.processing.io.images import ImageData, open_image

LABEL_BASE = np.uint64(2**53 + 12345)  # ids above 2**53 are not exact in float64


def tube_path(t):
    """A curved 3D path, physical (z, y, x) in mm, for t in [0, 1]."""
    t = np.asarray(t, float)
    return np.stack([0.07 + 0.08 * t + 0.03 * np.sin(3 * t),
                     0.28 + 0.16 * np.sin(2.4 * t),
                     0.10 + 0.40 * t], axis=-1)


def make_tube(shape=(48, 64, 60), scale=(0.005, 0.01, 0.01), radius=0.045, n_segments=4, seed=0):
    """Source volume, binary and multi-label masks of a tube along :func:`tube_path`, with the distance of each
    voxel to the path and its arc position (ground truth computed independently of the code under test)."""
    from scipy.ndimage import gaussian_filter

    dense = tube_path(np.linspace(0, 1, 800))
    arc = np.concatenate([[0], np.cumsum(np.linalg.norm(np.diff(dense, axis=0), axis=1))])
    grid = np.indices(shape, dtype=np.float32).reshape(3, -1).T * np.asarray(scale, np.float32)
    dist, nearest = cKDTree(dense).query(grid, workers=-1)
    dist, position = dist.reshape(shape), arc[nearest].reshape(shape)
    inside = dist <= radius
    texture = gaussian_filter(np.random.default_rng(seed).standard_normal(shape).astype(np.float32), 1.5)
    image = (1.0 + 0.4 * texture / texture.std() + 2.0 * np.exp(-2 * (dist / radius) ** 2)).astype(np.float32)
    segment = np.minimum((position / arc[-1] * n_segments).astype(np.uint64), n_segments - 1)
    labels = np.where(inside, LABEL_BASE + segment * np.uint64(1_000_003), np.uint64(0))
    return {"image": image, "labels": labels, "mask": inside.astype(np.uint8), "dist": dist, "position": position,
            "length": arc[-1], "scale": tuple(scale), "points": tube_path(np.linspace(0, 1, 6))}


@pytest.fixture(scope="module")
def tube():
    return make_tube()


def _swept(tube, half_width_mm, margin_mm=0.015):
    """Voxels surely inside the swept region: near the path, away from its ends."""
    return ((tube["dist"] <= half_width_mm - margin_mm) & (tube["position"] > margin_mm)
            & (tube["position"] < tube["length"] - margin_mm))


def _place(result, shape):
    """The backprojection (read from its TIFF) placed in a source-sized array at its offset."""
    data = tifffile.imread(result.tiff_path)
    full = np.zeros(shape, data.dtype)
    z, y, x = result.offset_zyx
    full[z : z + data.shape[0], y : y + data.shape[1], x : x + data.shape[2]] = data
    return full


def _dice(a, b):
    return 2 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def _lazy(array, scale, name):
    return ImageData(da.from_array(array, chunks=(16, 32, 32)), scale, name)


# --- geometry ---------------------------------------------------------------------------------------------------


def test_samples_are_at_true_arc_length_spacing():
    samples = sample_path(tube_path(np.linspace(0, 1, 6)), 0.004)
    steps = np.linalg.norm(np.diff(samples.points, axis=0), axis=1)
    # Chords of a smooth curve are shorter than the arc by O(h^3 k^2): tiny at this spacing.
    np.testing.assert_allclose(steps, 0.004, rtol=2e-4)
    np.testing.assert_allclose(np.diff(samples.arc_length), 0.004, rtol=1e-9)
    # The interpolating spline passes through every given point.
    fine = sample_path(tube_path(np.linspace(0, 1, 6)), 0.0002).points
    gaps = cKDTree(fine).query(tube_path(np.linspace(0, 1, 6)))[0]
    assert gaps.max() < 2e-4
    frames = np.stack([samples.tangents, samples.rows, samples.columns], axis=1)
    np.testing.assert_allclose(frames @ frames.transpose(0, 2, 1), np.broadcast_to(np.eye(3), frames.shape), atol=1e-9)


def test_frames_are_rotation_minimising():
    # Planar curve in z = const: the frame must not twist, rows stay along z.
    theta = np.linspace(0, 2.5, 9)
    planar = np.stack([np.full_like(theta, 0.3), 0.2 * np.sin(theta), 0.2 * np.cos(theta)], axis=1)
    samples = sample_path(planar, 0.005)
    np.testing.assert_allclose(samples.rows, np.broadcast_to([1.0, 0, 0], samples.rows.shape), atol=1e-9)
    # Helix: compare with the rotation-minimising (Bishop) frame integrated independently with tiny steps,
    # dr/ds = -(r . dT/ds) T.
    t = np.linspace(0, 4 * np.pi, 20001)
    helix = np.stack([0.05 * t, np.cos(t), np.sin(t)], axis=1)
    tangent = np.stack([np.full_like(t, 0.05), -np.sin(t), np.cos(t)], axis=1)
    tangent /= np.linalg.norm(tangent, axis=1, keepdims=True)
    r = np.cross(tangent[0], [0, 0, 1.0])
    r /= np.linalg.norm(r)
    for i in range(len(t) - 1):
        r = r - r.dot(tangent[i + 1] - tangent[i]) * tangent[i]
        r -= r.dot(tangent[i + 1]) * tangent[i + 1]
        r /= np.linalg.norm(r)
    coarse = slice(None, None, 500)
    rows, _ = rotation_minimising_frames(helix[coarse], tangent[coarse],
                                         reference_axis=np.cross(tangent[0], [0, 0, 1.0]))
    angle = np.degrees(np.arccos(np.clip(rows[-1].dot(r), -1, 1)))
    assert angle < 0.5
    # A frame that twists with the Frenet normal would be far off after two turns.
    assert np.degrees(np.arccos(np.clip(rows[0].dot(rows[-1]), -1, 1))) > 5


# --- round trips on the synthetic tube ----------------------------------------------------------------------------


def test_round_trip_labels_and_intensity(kernels, tube, tmp_path):
    width = height = 24
    pixel = min(tube["scale"])
    straightened = straighten_volume(_lazy(tube["image"], tube["scale"], "tube"), tube["points"], tmp_path,
                                     name="image", width=width, height=height, memory_budget_gb=0.002)
    labels = straighten_volume(_lazy(tube["labels"], tube["scale"], "mask"), tube["points"], tmp_path,
                               name="labels", width=width, height=height, value_mode="labels",
                               memory_budget_gb=0.002)
    n = straightened.shape[0]
    assert n == int(np.floor(straightened.path_length / pixel)) + 1 and straightened.shape[1:] == (height, width)
    # The straightened tube runs along the slice centres.
    stack = tifffile.imread(labels.tiff_path)
    assert stack.dtype == np.uint64 and (stack[:, height // 2, width // 2] >= LABEL_BASE).all()
    assert np.array_equal(open_image(labels.zarr_path).data.compute(), stack)

    back = backproject_volume(labels.tiff_path, labels.config_path, tmp_path, name="labels",
                              memory_budget_gb=0.002)
    assert back.value_mode == "labels" and back.kind == "labels"
    result = _place(back, tube["labels"].shape)
    region = _swept(tube, (width - 1) / 2 * pixel)
    truth, found = (tube["labels"] != 0) & region, (result != 0) & region
    assert _dice(truth, found) >= 0.97
    # Ids are never averaged: every labelled voxel holds one of the true ids, exactly (uint64 above 2**53).
    ids = np.unique(tube["labels"][tube["labels"] != 0])
    assert result.dtype == np.uint64 and set(np.unique(result[result != 0])) <= set(ids)
    both = truth & found
    assert np.mean(result[both] == tube["labels"][both]) > 0.99

    back_image = backproject_volume(straightened.tiff_path, straightened.config_path, tmp_path, name="image",
                                    memory_budget_gb=0.002)
    assert back_image.value_mode == "intensity"
    values = _place(back_image, tube["image"].shape)
    assert np.corrcoef(values[region], tube["image"][region])[0, 1] >= 0.95


def test_no_holes_between_slices_far_apart(kernels, tube, tmp_path):
    # Slices 2.5 voxels apart along the path: every voxel between them is still filled.
    spacing = 2.5 * min(tube["scale"])
    labels = straighten_volume(_lazy(tube["mask"], tube["scale"], "mask"), tube["points"], tmp_path, name="far",
                               width=20, height=20, slice_spacing=spacing, value_mode="labels")
    back = backproject_volume(labels.tiff_path, labels.config_path, tmp_path, name="far")
    result = _place(back, tube["mask"].shape)
    core = (tube["dist"] <= 0.03) & (tube["position"] > 0.02) & (tube["position"] < tube["length"] - 0.02)
    assert np.count_nonzero(core) > 1000
    assert result[core].all()
    assert _dice(tube["mask"].astype(bool) & _swept(tube, 0.09), (result != 0) & _swept(tube, 0.09)) >= 0.97


def test_result_does_not_depend_on_memory_budget(tube, tmp_path):
    labels = straighten_volume(tube["labels"], tube["points"] / np.asarray(tube["scale"]), tmp_path,
                               name="lab", width=16, height=16, value_mode="labels", points_in_voxels=True)
    results = []
    for budget, workers in ((0.0008, 1), (1.0, 1), (0.004, 2)):
        back = backproject_volume(labels.tiff_path, labels.config_path, tmp_path / str(budget), name="lab",
                                  memory_budget_gb=budget, workers=workers)
        results.append(tifffile.imread(back.tiff_path))
    assert np.array_equal(results[0], results[1])
    # Threads: the same but perhaps for voxels exactly on a plane two batches share (either label is right).
    assert np.mean(results[0] == results[2]) > 0.9999 and np.count_nonzero(results[2]) > 1000
    assert json.loads((tmp_path / "0.0008" / "lab-backprojected_metrics.json").read_text())["slab_planes"] < \
        results[0].shape[0]


# --- folds ------------------------------------------------------------------------------------------------------


def _reference_pull(rects, height, width, shape):
    """Per voxel, the slice coordinate ``s`` of the documented rule, by a plain per-slab search in float64:
    a voxel belongs to slab j when it lies on or after plane j and before plane j + 1 and its blended in-plane
    position is inside the slice (half a pixel beyond the edge pixels); ``t``, its position across the slab, is
    linear along the voxel axis closest to the slab normal; the claim nearest the slice centre wins.
    Returns ``s``, whether each voxel is covered, and how many slabs bracket it."""
    g = SliceGeometry.from_rects(rects, height, width)
    voxels = np.indices(shape).reshape(3, -1).T.astype(float)
    best = np.full(len(voxels), np.inf)
    s_of = np.zeros(len(voxels))
    brackets = np.zeros(len(voxels), int)
    centre = np.array([(width - 1) / 2, (height - 1) / 2])
    for j in range(g.n_slabs):
        axis = np.argmax(np.abs(g.normals[j] + g.normals[j + 1]))
        uvw = [(voxels - g.origins[p]) @ g.inverse[p].T for p in (j, j + 1)]
        inside = (uvw[0][:, 2] >= 0) & (uvw[1][:, 2] < 0)
        brackets += inside
        # Distance to each plane along the column, in voxels of that axis.
        d0, d1 = uvw[0][:, 2] / g.normals[j, axis], uvw[1][:, 2] / g.normals[j + 1, axis]
        t = np.where(inside, d0 / np.where(inside, d0 - d1, 1), 0)
        uv = uvw[0][:, :2] + t[:, None] * (uvw[1][:, :2] - uvw[0][:, :2])
        inside &= (np.abs(uv - centre) <= [width / 2, height / 2]).all(axis=1)
        distance = ((uv - centre) ** 2).sum(axis=1)
        take = inside & (distance < best)
        best[take] = distance[take]
        s_of[take] = np.clip(g.slice_of_plane[j] + t[take] * (g.slice_of_plane[j + 1] - g.slice_of_plane[j]),
                             0, g.n_slices - 1)
    return s_of.reshape(shape), np.isfinite(best).reshape(shape), brackets.reshape(shape)


def test_folding_slices_take_the_nearest_slab(kernels, tmp_path):
    # A U-turn of radius 4 voxels with slices 14 voxels wide: slices overlap inside the bend.
    theta = np.linspace(0, np.pi, 40)
    centre = np.array([12.0, 12.0, 14.0])
    path = np.stack([np.full_like(theta, centre[0]), centre[1] + 4 * np.sin(theta),
                     centre[2] + 4 * np.cos(theta)], axis=1)
    path = np.concatenate([[centre + [0, -6, 4]], path[1:-1], [centre + [0, -6, -4]]])
    shape = (24, 26, 28)
    source = np.zeros(shape, np.float32)
    result = straighten_volume(source, path, tmp_path, width=14, height=9, slice_spacing=1.0,
                               points_in_voxels=True)
    n, h, w = result.shape
    # Slice i holds the value i: the backprojection then reads the slice coordinate of each voxel.
    ramp = np.broadcast_to(np.arange(n, dtype=np.float32)[:, None, None], (n, h, w)).copy()
    back = backproject_volume(ramp, result.config_path, tmp_path, name="ramp", value_mode="intensity")
    found = _place(back, shape)
    config = read_configuration(result.config_path)
    s_ref, covered, brackets = _reference_pull(config.slice_rects, h, w, shape)
    fold = covered & (brackets > 1)
    assert fold.sum() > 50  # the geometry really folds: voxels between two pairs of planes
    # Same voxels covered and the same slice coordinate, up to float32 rounding at the edges of regions.
    found_covered = json.loads(back.metrics_path.read_text())["voxels_swept"]
    assert abs(found_covered - covered.sum()) <= 0.01 * covered.sum()
    close = np.abs(found - s_ref) < 0.02
    assert close[covered].mean() > 0.99 and close[fold].mean() > 0.97
    assert not found[~covered & (s_ref == 0)].any()


# --- Ouroboros configuration files --------------------------------------------------------------------------------


def _ouroboros_config(path, n, height, width, x0, y0, z0, *, links_at_top=False):
    """A configuration in Ouroboros's layout (no napari_soct section): slices perpendicular to x at
    x0, x0 + 1, ...; columns (width) along z, rows (height) along y."""
    rects = []
    for i in range(n):
        x = x0 + i
        rects.append([[x, y0, z0], [x, y0, z0 + width - 1], [x, y0 + height - 1, z0 + width - 1],
                      [x, y0 + height - 1, z0]])
    box = {"x_min": x0, "x_max": x0 + n - 1, "y_min": y0, "y_max": y0 + height - 1, "z_min": z0,
           "z_max": z0 + width - 1}
    config = {
        "json_path": "./neuroglancer.json", "source_url": "precomputed://example",
        "slice_options": {"slice_width": width, "slice_height": height, "output_file_folder": "./out",
                          "output_file_name": "ouro", "dist_between_slices": 1, "output_mip_level": 0,
                          "make_single_file": True, "max_ram_gb": 0, "flush_cache": False,
                          "neuroglancer_json": "./neuroglancer.json", "neuroglancer_image_layer": "img",
                          "neuroglancer_annotation_layer": "ann", "bounding_box_params":
                              {"max_depth": 10, "target_slices_per_box": 128},
                          "connect_start_and_end": False, "annotation_mip_level": 0},
        "backproject_options": None, "sample_points": [[x0 + i, y0, z0] for i in range(n)], "slice_rects": rects,
        "volume_cache": {"bounding_boxes": [box], "cv": {"source_url": "precomputed://example"}, "mip": 0,
                         "flush_cache": False},
        "output_file_path": "ouro.tif", "backprojected_folder_path": None, "config_file_path": str(path),
        "backprojection_offset": None,
    }
    if links_at_top:
        config["link_rects"] = [0] * n
    else:
        config["volume_cache"]["link_rects"] = [0] * n
    path.write_text(json.dumps(config))
    return config


@pytest.mark.parametrize("links_at_top", [False, True])
def test_ouroboros_configuration_is_read_and_backprojected(tmp_path, links_at_top):
    n, height, width, x0, y0, z0 = 7, 5, 6, 10, 3, 4
    config_path = tmp_path / "ouro-configuration.json"
    _ouroboros_config(config_path, n, height, width, x0, y0, z0, links_at_top=links_at_top)
    slices = (np.random.default_rng(1).integers(1, 2**62, (n, height, width), dtype=np.uint64)
              + np.uint64(2**62))
    tifffile.imwrite(tmp_path / "ouro.tif", slices)
    config = read_configuration(config_path)
    assert (config.width, config.height, config.n_slices) == (width, height, n)
    assert config.link_rects == [0] * n and config.bounding_boxes[0]["x_max"] == x0 + n - 1
    back = backproject_volume(tmp_path / "ouro.tif", config_path, tmp_path / "bp")
    data = tifffile.imread(back.tiff_path)
    # Axis-aligned slices on the voxel grid: every voxel is one slice pixel, exactly.
    assert back.offset_zyx == (z0, y0, x0) and data.shape == (width, height, n)
    expected = slices.transpose(2, 1, 0)  # (slice, row=y, column=z) -> (z, y, x)
    assert data.dtype == np.uint64 and np.array_equal(data, expected)
    with tifffile.TiffFile(back.tiff_path) as tif:
        assert json.loads(tif.pages[0].description)["backprojection_offset_min_xyz"] == f"{x0},{y0},{z0}"
    written = json.loads(back.config_path.read_text())
    assert written["backprojection_offset"] == f"{x0},{y0},{z0}"
    assert written["backproject_options"]["backproject_min_bounding_box"] is True
    assert written["slice_rects"] == json.loads(config_path.read_text())["slice_rects"]
    # The OME-Zarr is placed at the offset (NGFF translation after the scale).
    ome = zarr.open_group(str(back.zarr_path), mode="r").attrs["ome"]
    transforms = ome["multiscales"][0]["datasets"][0]["coordinateTransformations"]
    assert transforms[1] == {"type": "translation", "translation": [float(z0), float(y0), float(x0)]}


def test_output_options(tmp_path):
    n, height, width, x0, y0, z0 = 6, 4, 5, 3, 2, 1
    config_path = tmp_path / "o-configuration.json"
    _ouroboros_config(config_path, n, height, width, x0, y0, z0)
    slices = np.random.default_rng(2).random((n, height, width)).astype(np.float32) + 0.5
    slices[:, 0] = 0
    reference = slices.transpose(2, 1, 0)
    for compression in ("none", "zlib", "zstd"):
        back = backproject_volume(slices, config_path, tmp_path / compression, compression=compression,
                                  make_single_file=False, write_ome_zarr=False)
        planes = sorted(back.tiff_path.glob("*.tif"))
        assert [p.name for p in planes] == [f"{z}.tif" for z in range(z0, z0 + width)]
        stack = np.stack([tifffile.imread(p) for p in planes])
        np.testing.assert_allclose(stack, reference, rtol=1e-6)
        assert back.zarr_path is None
    full = backproject_volume(slices, config_path, tmp_path / "full", min_bounding_box=False, binary=True)
    data = tifffile.imread(full.tiff_path)
    assert full.offset_zyx == (0, 0, 0) and data.shape == (z0 + width, y0 + height, x0 + n)
    assert data.dtype == np.uint8 and full.kind == "labels"
    expected = np.zeros(data.shape, np.uint8)
    expected[z0:, y0:, x0:] = reference > 0
    assert np.array_equal(data, expected)
    assert any("source extent" in note for note in full.notes)
    assert json.loads(full.config_path.read_text())["backprojection_offset"] is None


def test_upsampling_to_a_finer_level(tube, tmp_path):
    # A two-level OME-Zarr source; slice level 1, backproject to level 0.
    from scipy.ndimage import zoom

    from napari_soct.processing.io.omezarr import create_ome_zarr_image

    source = tmp_path / "src.ome.zarr"
    fine = tube["labels"]
    array = create_ome_zarr_image(source, fine.shape, tube["scale"], chunks=(16, 32, 32), dtype=fine.dtype)
    array[:] = fine
    group = zarr.open_group(str(source), mode="r+")
    coarse = fine[::2, ::2, ::2]
    group.create_array("1", shape=coarse.shape, chunks=(16, 32, 32), dtype=coarse.dtype)[:] = coarse
    ome = group.attrs["ome"]
    ome["multiscales"][0]["datasets"].append(
        {"path": "1", "coordinateTransformations": [{"type": "scale", "scale": [2 * s for s in tube["scale"]]}]})
    group.attrs["ome"] = ome
    labels = straighten_volume(open_image(source), tube["points"], tmp_path, name="l1", width=12, height=12,
                               value_mode="labels", mip_level=1)
    level1 = backproject_volume(labels.tiff_path, labels.config_path, tmp_path / "a", name="l1",
                                output_mip_level=1)
    level0 = backproject_volume(labels.tiff_path, labels.config_path, tmp_path / "b", name="l1",
                                memory_budget_gb=0.001)
    small, big = tifffile.imread(level1.tiff_path), tifffile.imread(level0.tiff_path)
    assert level0.offset_zyx == tuple(2 * o for o in level1.offset_zyx)
    assert np.array_equal(big, small.repeat(2, 0).repeat(2, 1).repeat(2, 2))
    assert level0.scale == pytest.approx(tube["scale"]) and level1.scale == pytest.approx(
        tuple(2 * s for s in tube["scale"]))
    # Intensities: linear upsampling, slab by slab, equals one zoom of the whole level-1 result.
    ramp = np.broadcast_to(np.linspace(0, 1, labels.shape[0], dtype=np.float32)[:, None, None], labels.shape)
    coarse_i = backproject_volume(ramp, labels.config_path, tmp_path / "c", name="r", output_mip_level=1)
    fine_i = backproject_volume(ramp, labels.config_path, tmp_path / "d", name="r", upsample_order=1,
                                memory_budget_gb=0.001)
    reference = zoom(tifffile.imread(coarse_i.tiff_path), 2, order=1, mode="nearest", grid_mode=True)
    np.testing.assert_allclose(tifffile.imread(fine_i.tiff_path), reference, atol=1e-5)


# --- memory --------------------------------------------------------------------------------------------------------


def test_peak_memory_stays_within_budget(kernels, tmp_path):
    # A path down a 400 x 100 x 132 zarr volume (21 MB of float32, ten times the 2 MiB budget): straightening
    # reads it batch by batch, and the backprojection's full-extent output is as large.
    shape = (400, 100, 132)
    store = zarr.create_array(str(tmp_path / "source.zarr"), shape=shape, chunks=(16, 16, 16), dtype=np.float32)
    rng = np.random.default_rng(0)
    for z in range(0, shape[0], 16):
        store[z : z + 16] = rng.random((min(16, shape[0] - z), *shape[1:]), dtype=np.float32)
    source = open_image(tmp_path / "source.zarr")
    points = np.array([[2.0, 50.0, 60.0], [200.0, 54.0, 70.0], [397.0, 50.0, 66.0]])
    budget = 2 * 2**20
    # Measured in a fresh interpreter: in the test process, threads left by earlier tests (napari, dask) would
    # allocate while tracemalloc counts.
    script = f"""
import json, tracemalloc, numpy as np
from napari_soct.processing.io.images import open_image
from napari_soct.processing.backproject import straighten_volume, backproject_volume
source = open_image({str(tmp_path / "source.zarr")!r})
points = np.array({points.tolist()!r})
# A first run imports everything the steps use lazily, so the traced run counts the steps' own buffers.
warm = straighten_volume(source, points, {str(tmp_path / "warm")!r}, width=16, height=16, points_in_voxels=True)
backproject_volume(warm.tiff_path, warm.config_path, {str(tmp_path / "warm")!r}, min_bounding_box=False)
tracemalloc.start()
result = straighten_volume(source, points, {str(tmp_path)!r}, width=16, height=16,
                           memory_budget_gb={budget / 2**30!r}, points_in_voxels=True)
_, peak_straighten = tracemalloc.get_traced_memory()
tracemalloc.reset_peak()
back = backproject_volume(result.tiff_path, result.config_path, {str(tmp_path)!r}, min_bounding_box=False,
                          memory_budget_gb={budget / 2**30!r})
_, peak_back = tracemalloc.get_traced_memory()
print(json.dumps([peak_straighten, peak_back, str(result.tiff_path), str(result.config_path), list(back.shape)]))
"""
    out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True).stdout
    peak_straighten, peak_back, tiff_path, config_path, back_shape = json.loads(out.strip().splitlines()[-1])
    assert tuple(back_shape) == shape and int(np.prod(shape)) * 4 >= 10 * budget
    print(f"peaks: straighten {peak_straighten / 2**20:.2f} MiB, backproject {peak_back / 2**20:.2f} MiB")
    assert peak_back < budget, f"backprojection peak {peak_back / 2**20:.2f} MiB"
    assert peak_straighten < budget, f"straightening peak {peak_straighten / 2**20:.2f} MiB"
    # And it is right: the slices equal linear interpolation of the whole source at the configuration's pixels.
    from scipy.ndimage import map_coordinates

    stack = tifffile.imread(tiff_path)
    rects = read_configuration(config_path).slice_rects[..., ::-1]  # (n, 4, 3) as (z, y, x)
    rows, cols = np.meshgrid(np.arange(16) / 15, np.arange(16) / 15, indexing="ij")
    for i in (0, len(stack) // 2, len(stack) - 1):
        o, du, dv = rects[i, 0], rects[i, 1] - rects[i, 0], rects[i, 3] - rects[i, 0]
        coords = o[:, None, None] + du[:, None, None] * cols + dv[:, None, None] * rows
        expected = map_coordinates(np.asarray(store[:]), coords, order=1, mode="nearest")
        np.testing.assert_allclose(stack[i], expected, rtol=1e-5, atol=1e-6)


# --- outputs and bad input ---------------------------------------------------------------------------------------


def test_existing_outputs_and_bad_input(tube, tmp_path):
    points = tube["points"]
    first = straighten_volume(tube["image"][:, :32, :32], points[:2] * 0.2, tmp_path, width=8, height=8,
                              points_in_voxels=False)
    with pytest.raises(OutputExistsError, match="already exists"):
        straighten_volume(tube["image"][:, :32, :32], points[:2] * 0.2, tmp_path, width=8, height=8)
    assert straighten_volume(tube["image"], points, tmp_path, if_exists="skip").skipped
    again = straighten_volume(tube["image"][:, :32, :32], points[:2] * 0.2, tmp_path, width=8, height=8,
                              if_exists="overwrite")
    assert again.shape == first.shape
    with pytest.raises(ValueError, match=r"points.*\(N, 3\)"):
        straighten_volume(tube["image"], points[:, :2], tmp_path / "x")
    with pytest.raises(ValueError, match="labels.*integer"):
        straighten_volume(tube["image"], points, tmp_path / "x", value_mode="labels")
    with pytest.raises(ValueError, match="3D"):
        straighten_volume(tube["image"][0], points, tmp_path / "x")
    with pytest.raises(ValueError, match=r"is \(3, 8, 8\), but .* describes"):
        backproject_volume(np.zeros((3, 8, 8), np.float32), first.config_path, tmp_path / "y")
    bad = tmp_path / "bad-configuration.json"
    bad.write_text(json.dumps({"slice_options": {"slice_width": 4, "slice_height": 4}}))
    with pytest.raises(ValueError, match="missing 'slice_rects'"):
        backproject_volume(np.zeros((1, 4, 4)), bad, tmp_path / "y")
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not a JSON"):
        read_configuration(bad)
    with pytest.raises(ValueError, match="coarser than the sliced level"):
        backproject_volume(tifffile.imread(first.tiff_path), first.config_path, tmp_path / "y", output_mip_level=1)
    csv = tmp_path / "points.csv"
    csv.write_text("index,axis-0,axis-1,axis-2\n0,1,2,3\n1,1,5,9\n")
    from napari_soct.processing.backproject import read_points

    assert read_points(csv).tolist() == [[1, 2, 3], [1, 5, 9]]


def test_cli_straighten_and_backproject(tube, tmp_path):
    from napari_soct.pipeline.cli import main

    source = tmp_path / "mask.tif"
    tifffile.imwrite(source, tube["mask"])
    points = tmp_path / "path.csv"
    voxels = tube["points"] / np.asarray(tube["scale"])
    points.write_text("z,y,x\n" + "\n".join(",".join(map(str, p)) for p in voxels))
    assert main(["straighten", str(source), str(points), str(tmp_path / "out"), "--points-in-voxels",
                 "--value-mode", "labels", "--width", "20", "--height", "20", "--name", "m", "--quiet"]) == 0
    assert main(["backproject", str(tmp_path / "out" / "m.tif"), str(tmp_path / "out" / "m-configuration.json"),
                 str(tmp_path / "out"), "--memory-budget-gb", "0.01", "--quiet"]) == 0
    data = tifffile.imread(tmp_path / "out" / "m-backprojected.tif")
    config = json.loads((tmp_path / "out" / "m-configuration.json").read_text())
    x, y, z = (int(v) for v in config["backprojection_offset"].split(","))
    full = np.zeros(tube["mask"].shape, np.uint8)
    full[z : z + data.shape[0], y : y + data.shape[1], x : x + data.shape[2]] = data
    # TIFF sources have no scale: voxel units, spacing 1 voxel.
    region = _swept(tube, 0.09) & (tube["dist"] < 0.08)
    assert _dice(tube["mask"].astype(bool) & region, (full != 0) & region) >= 0.97
    assert main(["backproject", str(tmp_path / "out" / "m.tif"), str(tmp_path / "missing.json"),
                 str(tmp_path / "out2"), "--quiet"]) == 2


# --- folders of per-plane TIFFs as inputs, and the straightened-volume writer ------------------------------------


def _write_planes(folder, volume, digits=0):
    """One single-page TIFF per plane; unpadded names by default (2.tif must come before 10.tif)."""
    folder.mkdir(parents=True)
    for z, plane in enumerate(volume):
        tifffile.imwrite(folder / f"{str(z).zfill(digits)}.tif", plane)
    return folder


def test_cli_takes_folders_of_per_plane_tiffs(tube, tmp_path, capsys):
    from napari_soct.pipeline.cli import main

    points = tmp_path / "path.csv"
    voxels = tube["points"] / np.asarray(tube["scale"])
    points.write_text("z,y,x\n" + "\n".join(",".join(map(str, p)) for p in voxels))
    options = ["--points-in-voxels", "--width", "18", "--height", "14", "--name", "v", "--quiet"]
    # The same source as one TIFF stack and as a folder of planes (48 planes: 10..47 after 9 only numerically).
    tifffile.imwrite(tmp_path / "source.tif", tube["image"])
    folder = _write_planes(tmp_path / "source_planes", tube["image"])
    assert main(["straighten", str(tmp_path / "source.tif"), str(points), str(tmp_path / "file"), *options]) == 0
    assert main(["straighten", str(folder), str(points), str(tmp_path / "folder"), *options]) == 0
    from_file = tifffile.imread(tmp_path / "file" / "v.tif")
    from_folder = tifffile.imread(tmp_path / "folder" / "v.tif")
    assert from_file.shape[1:] == (14, 18) and from_file.shape[0] > 40
    assert np.array_equal(from_folder, from_file)
    # The straightened volume as a folder of per-slice TIFFs (unpadded names) is backprojected identically.
    slices = _write_planes(tmp_path / "v-planes", from_file)
    config = str(tmp_path / "file" / "v-configuration.json")
    assert main(["backproject", str(tmp_path / "file" / "v.tif"), config, str(tmp_path / "bp_file"),
                 "--memory-budget-gb", "0.01", "--quiet"]) == 0
    assert main(["backproject", str(slices), config, str(tmp_path / "bp_folder"), "--memory-budget-gb", "0.01",
                 "--quiet"]) == 0
    expected = tifffile.imread(tmp_path / "bp_file" / "v-backprojected.tif")
    assert expected.any()
    assert np.array_equal(tifffile.imread(tmp_path / "bp_folder" / "v-backprojected.tif"), expected)
    offsets = [json.loads((tmp_path / d / "v-configuration.json").read_text())["backprojection_offset"]
               for d in ("bp_file", "bp_folder")]
    assert offsets[0] == offsets[1] is not None
    # The straighten step's own per-slice folder output is an input too.
    assert main(["straighten", str(folder), str(points), str(tmp_path / "own"), "--no-make-single-file",
                 *options]) == 0
    assert main(["backproject", str(tmp_path / "own" / "v-slices"), str(tmp_path / "own" / "v-configuration.json"),
                 str(tmp_path / "own"), "--quiet"]) == 0
    assert np.array_equal(tifffile.imread(tmp_path / "own" / "v-backprojected.tif"), expected)
    # Planes that do not fit: a clear error (exit code 2), naming the file.
    tifffile.imwrite(slices / "3.tif", from_file[3, :5])
    assert main(["backproject", str(slices), config, str(tmp_path / "bad"), "--quiet"]) == 2
    assert "v-planes: planes differ: 3.tif is (5, 18) float32" in capsys.readouterr().err


def _straightened_layer(result):
    """The layer tuple the reader / Straighten widget make for a straightened OME-Zarr."""
    from napari_soct._layers import ome_zarr_layers

    [(data, kwargs, kind)] = ome_zarr_layers(result.zarr_path)
    meta = {"scale": kwargs["scale"], "translate": kwargs["translate"], "units": kwargs["units"],
            "axis_labels": kwargs["axis_labels"], "name": kwargs["name"], "metadata": kwargs["metadata"],
            "multiscale": kwargs["multiscale"], "rgb": False}
    return data, meta


def test_straightened_layer_saved_with_its_configuration(tube, tmp_path):
    from napari_soct import _writer

    labels = _lazy(tube["labels"], tube["scale"], "mask")
    straight = straighten_volume(labels, tube["points"], tmp_path / "s", width=20, height=20, name="m",
                                 value_mode="labels")
    data, meta = _straightened_layer(straight)
    written = _writer.write_straightened_labels_tiff(str(tmp_path / "saved" / "seg.zstd.tif"), data, meta)
    tiff, config = tmp_path / "saved" / "seg.zstd.tif", tmp_path / "saved" / "seg-configuration.json"
    assert written == [str(tiff), str(config)]
    with tifffile.TiffFile(tiff) as tif:
        assert tif.pages[0].compression == 50000  # zstd, from the file name
    saved = tifffile.imread(tiff)
    assert saved.dtype == np.uint64 and np.array_equal(saved, tifffile.imread(straight.tiff_path))
    record, original = json.loads(config.read_text()), json.loads(straight.config_path.read_text())
    assert record["output_file_path"] == "seg.zstd.tif" and record["config_file_path"] == str(config.resolve())
    assert record["slice_options"]["output_file_folder"] == str(tiff.parent.resolve())
    assert record["slice_options"]["output_file_name"] == "seg"
    assert record["napari_soct"]["straightened_zarr"] is None and record["napari_soct"]["value_mode"] == "labels"
    assert record["slice_rects"] == original["slice_rects"] and record["volume_cache"] == original["volume_cache"]

    # Backprojecting the saved pair gives what the original outputs give.
    reference = backproject_volume(straight.tiff_path, straight.config_path, tmp_path / "bp_original",
                                   write_ome_zarr=False)
    again = backproject_volume(tiff, config, tmp_path / "bp_saved", write_ome_zarr=False)
    assert again.offset_zyx == reference.offset_zyx and again.tiff_path.name == "seg-backprojected.tif"
    expected = tifffile.imread(reference.tiff_path)
    assert (expected >= LABEL_BASE).any()
    assert np.array_equal(tifffile.imread(again.tiff_path), expected)

    # An intensity layer (the straightened image) through the image writer, same check.
    image = straighten_volume(_lazy(tube["image"], tube["scale"], "img"), tube["points"], tmp_path / "i",
                              width=20, height=20, name="img")
    data, meta = _straightened_layer(image)
    tiff2, config2 = _writer.write_straightened_image_tiff(str(tmp_path / "saved" / "vol"), data, meta)
    assert tiff2.endswith("vol.tif") and config2.endswith("vol-configuration.json")
    reference = backproject_volume(image.tiff_path, image.config_path, tmp_path / "bp_i1", write_ome_zarr=False)
    again = backproject_volume(tiff2, config2, tmp_path / "bp_i2", write_ome_zarr=False)
    np.testing.assert_array_equal(tifffile.imread(again.tiff_path), tifffile.imread(reference.tiff_path))


def test_straightened_writer_refuses_missing_configuration_and_existing_files(tube, tmp_path):
    from napari_soct import _writer
    from napari_soct.processing.backproject.config import configuration_from_metadata

    straight = straighten_volume(tube["labels"], tube["points"][:3] * 0.5, tmp_path / "s", width=8, height=8,
                                 name="m", value_mode="labels")
    data, meta = _straightened_layer(straight)
    out = tmp_path / "out"
    # A layer without a configuration (e.g. painted by hand): a clear error, nothing written.
    painted = {"name": "painted", "scale": meta["scale"], "metadata": {}}
    with pytest.raises(_writer.LayerWriteError, match="layer 'painted' has no straightening configuration"):
        _writer.write_straightened_labels_tiff(str(out / "p.tif"), np.asarray(data), painted)
    # ... given one (what the Backproject widget's "attach" does), it is saved.
    painted["metadata"] = {"soct_configuration": str(straight.config_path)}
    assert configuration_from_metadata(painted["metadata"]) == straight.config_path
    _writer.write_straightened_labels_tiff(str(out / "p.tif"), np.asarray(data), painted)
    # A configuration that does not describe the layer's shape, or that is gone: refused, nothing written.
    with pytest.raises(_writer.LayerWriteError, match=r"layer 'painted'.* is \(.*\), but .* describes"):
        _writer.write_straightened_labels_tiff(str(out / "q.tif"), np.asarray(data)[:-1], painted)
    gone = {**painted, "metadata": {"soct_configuration": str(tmp_path / "gone-configuration.json")}}
    with pytest.raises(_writer.LayerWriteError, match="does not exist"):
        _writer.write_straightened_labels_tiff(str(out / "q.tif"), np.asarray(data), gone)
    assert sorted(p.name for p in out.iterdir()) == ["p-configuration.json", "p.tif"]
    # Existing outputs are never replaced silently; either file of the pair stops the save before writing.
    before = (out / "p.tif").read_bytes()
    with pytest.raises(OutputExistsError, match="p.tif: already exists"):
        _writer.write_straightened_labels_tiff(str(out / "p.tif"), np.zeros_like(np.asarray(data)), painted)
    assert (out / "p.tif").read_bytes() == before
    (out / "r-configuration.json").write_text("{}")
    with pytest.raises(OutputExistsError, match="r-configuration.json: already exists"):
        _writer.write_straightened_labels_tiff(str(out / "r.tif"), np.asarray(data), painted)
    assert not (out / "r.tif").exists() and (out / "r-configuration.json").read_text() == "{}"
    # The straightened OME-Zarr's own attributes name the configuration (reader and widget layers).
    assert configuration_from_metadata(meta["metadata"]) == straight.config_path
