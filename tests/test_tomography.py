"""Tomography against scikit-image on the same inputs: radon, filtered back projection, SART; stacks under a
memory budget into OME-Zarr; the steps on the command line."""

from __future__ import annotations

import json
import threading
import tracemalloc
import warnings

import numpy as np
import pytest
import tifffile
import zarr
from skimage.data import shepp_logan_phantom
from skimage.transform import iradon as sk_iradon
from skimage.transform import iradon_sart as sk_iradon_sart
from skimage.transform import radon as sk_radon
from skimage.transform.radon_transform import order_angles_golden_ratio

from napari_soct.processing.io.atomic import OutputExistsError
from napari_soct.processing.io.images import ImageData, open_image
from napari_soct.processing.io.omezarr import open_ome_zarr
from napari_soct.processing.progress import Cancelled
from napari_soct.processing.tomography import (
    golden_ratio_order,
    iradon,
    iradon_sart,
    memory_per_slice,
    parse_angles,
    radon,
    radon_stack,
    reconstruct_stack,
)
from napari_soct.processing.tomography.projectors import backproject
from napari_soct.processing.tomography.stack import fbp_stack

FILTERS = ["ramp", "shepp-logan", "cosine", "hamming", "hann", None]


def rmse(a, b) -> float:
    return float(np.sqrt(np.mean((np.asarray(a, float) - b) ** 2)))


def rel_diff(a, ref) -> float:
    return float(np.linalg.norm(np.asarray(a, float) - ref) / np.linalg.norm(ref))


@pytest.fixture(scope="module")
def phantom():
    """scikit-image's Shepp-Logan phantom (400 x 400), 180 angles, and scikit-image's sinogram of it."""
    image = shepp_logan_phantom()
    theta = np.linspace(0.0, 180.0, 180, endpoint=False)
    return image, theta, sk_radon(image, theta)


# --- accuracy on the phantom (the figures) --------------------------------------------------------------

@pytest.mark.parametrize("name", FILTERS)
def test_fbp_matches_and_is_no_worse_than_scikit_image(kernels, phantom, name):
    image, theta, sino = phantom
    ref = sk_iradon(sino, theta, filter_name=name)
    ours = iradon(sino, theta, filter_name=name)
    assert ours.shape == ref.shape == image.shape and ours.dtype == ref.dtype
    # Same image, up to the interpolation table's 1/128-pixel positions and float32.
    assert np.abs(ours - ref).max() <= 2e-3 * np.abs(ref).max()
    if name is None:
        return  # unfiltered back projection is blurred, not an estimate of the phantom
    # No worse than scikit-image (to 5 significant digits), and the ramp within scikit-image's own figure.
    assert rmse(ours, image) <= rmse(ref, image) * (1 + 2e-5)
    if name == "ramp":
        assert rmse(ours, image) <= 0.0343


def test_radon_matches_scikit_image_and_reconstructs_as_well(phantom):
    image, theta, sino = phantom
    ours = radon(image, theta)
    assert ours.shape == sino.shape == (400, 180) and ours.dtype == sino.dtype
    # Joseph's method vs rotate-and-sum: the same line integrals to 0.3 % of the sinogram's norm.
    assert np.linalg.norm(ours - sino) / np.linalg.norm(sino) < 3e-3
    # Mass (sum over detectors) is preserved at every angle (scikit-image: to 1.5e-4).
    np.testing.assert_allclose(ours.sum(0), image.sum(), rtol=5e-4)
    assert rmse(iradon(ours, theta), image) <= 0.0343


def test_sart_two_iterations_no_worse_than_scikit_image(kernels, phantom):
    image, theta, sino = phantom
    ref = sk_iradon_sart(sino, theta)
    ref = sk_iradon_sart(sino, theta, image=ref.copy())
    ours = iradon_sart(sino, theta, iterations=2)
    assert ours.shape == ref.shape and ours.dtype == ref.dtype
    assert rmse(ours, image) <= rmse(ref, image)
    # The same algorithm (order, weights, relaxation), so the same image within 2 %.
    assert np.linalg.norm(ours - ref) / np.linalg.norm(ref) < 0.02
    # Continuing from an estimate is the same as iterating.
    once = iradon_sart(sino, theta)
    np.testing.assert_allclose(iradon_sart(sino, theta, image=once), ours, atol=1e-5)


# --- conventions on other shapes and angles -----------------------------------------------------------------

@pytest.mark.parametrize("shape", [(37, 52), (41, 41), (64, 50)])
@pytest.mark.parametrize("circle", [True, False])
def test_radon_shapes_and_values_follow_scikit_image(shape, circle):
    rng = np.random.default_rng(sum(shape))
    image = rng.random(shape)
    if circle:  # zero outside the inscribed circle, as circle=True assumes
        yy, xx = np.ogrid[: shape[0], : shape[1]]
        image[(yy - shape[0] // 2) ** 2 + (xx - shape[1] // 2) ** 2 > (min(shape) // 2) ** 2] = 0
    theta = np.array([-30.0, 0.0, 12.5, 45.0, 90.0, 133.0, 180.0, 250.0])
    ref = sk_radon(image, theta, circle=circle)
    ours = radon(image, theta, circle=circle)
    assert ours.shape == ref.shape
    assert rel_diff(ours, ref) < 0.02  # random pixels: the interpolations differ most


def test_radon_warns_and_keeps_everything_when_not_zero_outside_the_circle():
    image = np.ones((32, 32))
    with pytest.warns(UserWarning, match="zero outside"):
        ours = radon(image, [0.0, 30.0, 90.0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = sk_radon(image, [0.0, 30.0, 90.0])
    assert ours.shape == ref.shape == (32, 3)
    np.testing.assert_allclose(ours[:, [0, 2]], ref[:, [0, 2]], rtol=1e-5)  # axis-aligned rays: identical


@pytest.mark.parametrize("circle", [True, False])
@pytest.mark.parametrize("output_size", [None, 30, 45])
def test_iradon_sizes_and_arbitrary_angles_follow_scikit_image(kernels, circle, output_size):
    rng = np.random.default_rng(3)
    theta = np.sort(rng.uniform(-90, 270, 23))  # no symmetric pairs: the general path
    sino = rng.random((43 if circle else 61, theta.size))
    ref = sk_iradon(sino, theta, output_size=output_size, circle=circle)
    ours = iradon(sino, theta, output_size=output_size, circle=circle)
    assert ours.shape == ref.shape
    # Random projections have the steepest slopes there are: the 1/256-pixel interpolation positions show
    # most here (on the phantom the difference is 100 times smaller, see above).
    assert rel_diff(ours, ref) < 1e-2


def _interp_back_projection(q, theta, n, center):
    """The definition, angle by angle: ``np.interp`` of each projection at every pixel's detector position."""
    yy, xx = np.mgrid[:n, :n] - n // 2
    detectors = np.arange(q.shape[1])
    return sum(np.interp(center + xx * np.cos(a) - yy * np.sin(a), detectors, row, left=0, right=0)
               for a, row in zip(theta, q))


def test_back_projection_where_the_detectors_do_not_cover_the_image(kernels):
    # 40 detectors, a 64 x 64 image without the circle: pixels beyond the detectors' reach must read zeros
    # (the numpy path once read other projections' values there).
    rng = np.random.default_rng(5)
    u = np.arange(40)
    q = np.stack([np.exp(-(((u - c) / w) ** 2)) for c, w in zip(rng.uniform(12, 28, 7), rng.uniform(3, 6, 7))])
    theta = np.deg2rad(np.sort(rng.uniform(0, 360, 7)))
    expected = _interp_back_projection(q, theta, 64, 20)
    ours = backproject(q.astype(np.float32), theta, 64, 20, circle=False, threads=2)
    tolerance = 1e-6 if kernels == "numba" else 2e-3  # numpy: positions on a 1/128-pixel grid
    assert np.abs(ours - expected).max() <= tolerance * np.abs(expected).max()


def test_iradon_regular_angles_use_grid_symmetries_exactly():
    rng = np.random.default_rng(4)
    sino = rng.random((64, 48)).astype(np.float32)
    theta = np.linspace(0, 180, 48, endpoint=False)  # theta, 90 +- theta, 180 - theta all present
    shuffled = rng.permutation(48)
    ours = iradon(sino, theta)
    np.testing.assert_allclose(iradon(sino[:, shuffled], theta[shuffled]), ours, atol=1e-5)
    ref = sk_iradon(sino.astype(float), theta)
    assert rel_diff(ours, ref) < 1e-2


@pytest.mark.parametrize("theta", [[10.0, 100, 190, 80, 170], [10.0, 100, 190, 80, 170, 280, 350, 260, 10, 33],
                                   [0.0, 0.0, 90.0, 90.0]])
def test_symmetry_groups_edge_cases(theta):
    """Five symmetries of one base angle (a group of four and one of one), repeated angles."""
    image = shepp_logan_phantom()[::4, ::4]
    sino = sk_radon(image, theta)
    ref = sk_iradon(sino, theta)
    assert rel_diff(iradon(sino, theta), ref) < 5e-3
    assert rel_diff(radon(image, theta), sino) < 1e-2


def test_float_and_integer_inputs_keep_scikit_image_types():
    image = (shepp_logan_phantom()[::8, ::8] * 200).astype(np.uint8)
    theta = np.arange(0, 180, 4.0)
    ours, ref = radon(image, theta), sk_radon(image, theta)
    assert ours.dtype == ref.dtype == np.float64
    assert rel_diff(ours, ref) < 0.03  # both scaled to [0, 1] first (unscaled would be 255 times off)
    single = iradon(ours.astype(np.float32), theta)
    assert single.dtype == np.float32


def test_invalid_arguments_are_named():
    with pytest.raises(ValueError, match="2-D"):
        radon(np.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match="projection"):
        iradon(np.zeros((10, 5)), theta=[0, 1, 2])
    with pytest.raises(ValueError, match="filter"):
        iradon(np.zeros((10, 5)), filter_name="gauss")
    with pytest.raises(ValueError, match="interpolation"):
        iradon(np.zeros((10, 5)), interpolation="cubic")
    with pytest.raises(ValueError, match="iterations"):
        iradon_sart(np.zeros((10, 5)), iterations=0)


def test_gpu_backend_is_optional():
    from napari_soct.processing.tomography._backend import _cupy, array_module

    if _cupy() is not None:
        pytest.skip("a GPU is present")
    assert array_module("auto") is np  # silent CPU fallback
    with pytest.raises(ValueError, match="backend 'cuda' needs CuPy"):
        radon(np.zeros((8, 8)), backend="cuda")


def test_golden_ratio_order_is_scikit_images():
    rng = np.random.default_rng(0)
    for theta in (np.linspace(0, 180, 180, endpoint=False), rng.uniform(0, 360, 50), rng.uniform(-30, 200, 77)):
        assert golden_ratio_order(theta) == list(order_angles_golden_ratio(theta))


def test_sart_options_follow_scikit_image(kernels):
    image = shepp_logan_phantom()[::4, ::4]
    theta = np.linspace(0, 180, 60, endpoint=False)
    sino = sk_radon(image, theta)
    shifts = np.full(60, 0.5)
    clipped = iradon_sart(sino, theta, clip=(0, 0.3), projection_shifts=shifts, relaxation=0.3)
    assert clipped.min() >= 0 and clipped.max() <= 0.3 + 1e-7  # clipped in float32
    ref = sk_iradon_sart(sino, theta, clip=(0, 0.3), projection_shifts=shifts, relaxation=0.3)
    assert np.linalg.norm(clipped - ref) / np.linalg.norm(ref) < 0.05
    assert iradon_sart(sino.astype(np.float32), theta).dtype == np.float32


# --- angles -----------------------------------------------------------------------------------------------------

def test_parse_angles_ranges_lists_and_errors():
    np.testing.assert_array_equal(parse_angles("0:180:4"), [0, 45, 90, 135])
    np.testing.assert_array_equal(parse_angles(" 0, 1.5 ,3 "), [0, 1.5, 3])
    np.testing.assert_array_equal(parse_angles("auto", 3), [0, 60, 120])
    np.testing.assert_array_equal(parse_angles("180:0:2"), [180, 90])
    for spec, message in [("0:180", "three numbers"), ("0:180:x", "count"), ("0:180:2.5", "whole number"),
                          ("0:0:5", "equal"), ("0,,1", "empty item"), ("0,a", "'a' is not a number"),
                          ("0,inf", "not finite"), ("auto", "sinogram")]:
        with pytest.raises(ValueError, match=message):
            parse_angles(spec)
    with pytest.raises(ValueError, match="0:180:5"):
        parse_angles("0:180:4", 5)


# --- stacks, OME-Zarr, memory budget ------------------------------------------------------------------------------

@pytest.fixture
def volume(tmp_path):
    """Three different 48 x 48 slices in a TIFF stack (zero outside the inscribed circle)."""
    base = shepp_logan_phantom()[::8, ::8][1:49, 1:49].astype(np.float32)
    yy, xx = np.ogrid[:48, :48]
    base[(yy - 24) ** 2 + (xx - 24) ** 2 > 24**2] = 0  # zero outside the inscribed circle
    stack = np.stack([base, base[::-1], 0.5 * base.T])
    path = tmp_path / "vol.tif"
    tifffile.imwrite(path, stack, photometric="minisblack")
    return path, stack


def test_volume_to_sinograms_to_volume(volume, tmp_path):
    path, stack = volume
    theta = np.linspace(0, 180, 60, endpoint=False)
    calls = []
    sino = radon_stack(path, tmp_path / "out", angles="0:180:60", workers=2,
                       progress=lambda d, t, m: calls.append((d, t)))
    assert sino.path.name == "vol_sinogram.ome.zarr" and sino.shape == (3, 48, 60)
    assert calls[-1] == (3, 3)
    written = open_ome_zarr(sino.path)
    assert written.axes == ("z", "detector", "angle") and written.version == "0.5"
    assert written.scales_mm[0] == pytest.approx((1.0, 1.0, 3.0))  # angle axis: the step in degrees
    meta = json.loads((sino.path / "zarr.json").read_text())["attributes"]
    assert meta["ome"]["multiscales"][0]["axes"][2] == {"name": "angle", "type": "angle", "unit": "degree"}
    assert meta["tomography"]["angles_deg"] == pytest.approx(theta.tolist())
    data = written.levels[0][...]
    for k in range(3):
        np.testing.assert_allclose(data[k], radon(stack[k], theta), atol=1e-5)
    # Reconstruct: the angles come from the sinogram's attributes.
    fbp = reconstruct_stack(sino.path, tmp_path / "out", filter="hann")
    sart = reconstruct_stack(sino.path, tmp_path / "out", method="sart", iterations=2, workers=3)
    assert fbp.path.name == "vol_fbp.ome.zarr" and sart.path.name == "vol_sart.ome.zarr"
    volume_fbp = open_ome_zarr(fbp.path)
    assert volume_fbp.axes == ("z", "y", "x") and volume_fbp.levels[0].shape == (3, 48, 48)
    for k in range(3):
        np.testing.assert_allclose(volume_fbp.levels[0][k], iradon(data[k], theta, filter_name="hann"), atol=1e-5)
        np.testing.assert_allclose(open_ome_zarr(sart.path).levels[0][k], iradon_sart(data[k], theta, iterations=2),
                                   atol=1e-5)
    record = json.loads(fbp.metrics_path.read_text())
    assert record["params"]["filter"] == "hann" and record["n_slices"] == 3


def test_explicit_angle_list_and_non_circle(tmp_path):
    image = shepp_logan_phantom()[::10, ::10].astype(np.float32)  # 40 x 40
    angles = "0,10,25,60,90,100,150,170"
    theta = parse_angles(angles)
    sino = radon_stack(image, tmp_path, angles=angles, circle=False)
    assert sino.shape == (57, 8)  # ceil(40 sqrt 2) detectors
    assert open_ome_zarr(sino.path).scales_mm[0] == pytest.approx((1.0, 1.0))  # irregular: index axis
    rec = fbp_stack(sino.path, tmp_path, circle=False)
    assert rec.shape == (40, 40)
    expected = iradon(open_ome_zarr(sino.path).levels[0][...], theta, circle=False)
    np.testing.assert_allclose(open_ome_zarr(rec.path).levels[0][...], expected, atol=1e-5)
    with pytest.raises(ValueError, match="8 projection"):
        fbp_stack(sino.path, tmp_path / "x", angles="0:180:9")


def test_stack_larger_than_budget_stays_within_it(kernels, tmp_path):
    """256 sinograms (6 MiB) reconstructed under a budget of 2/3 of that: two slices in parallel, and the peak
    measured by tracemalloc stays below the budget."""
    n_slices, n_det, n_angles = 256, 96, 64
    theta = np.linspace(0, 180, n_angles, endpoint=False)
    store = zarr.create_array(str(tmp_path / "sinos.zarr"), shape=(n_slices, n_det, n_angles),
                              chunks=(1, n_det, n_angles), dtype=np.float32)
    one = sk_radon(shepp_logan_phantom()[::4, ::4][2:98, 2:98], theta).astype(np.float32)
    gains = np.linspace(0.5, 1.5, n_slices, dtype=np.float32)
    store[...] = one[None] * gains[:, None, None]
    per_slice = memory_per_slice("fbp", (n_det, n_angles), n_angles, threads=1)
    budget = 2 * per_slice + (64 << 10)
    assert store.nbytes > 1.4 * budget
    sinograms = open_image(tmp_path / "sinos.zarr")
    # Imports (code objects) are not data: load them before measuring, on two slices.
    reconstruct_stack(ImageData(sinograms.data[:2], sinograms.scale, "warm-up"), tmp_path / "warm-up")
    tracemalloc.start()
    result = reconstruct_stack(sinograms, tmp_path / "out", workers=4, memory_budget_gb=budget / 2**30,
                               compression="none")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert result.workers_used == 2 and result.peak_memory_estimate_bytes <= budget
    assert peak <= budget, f"peak {peak / 2**20:.2f} MiB above the {budget / 2**20:.2f} MiB budget"
    out = open_ome_zarr(result.path).levels[0]
    assert out.shape == (256, 96, 96)
    expected = iradon(one, theta)
    for z in (0, 100, 255):
        np.testing.assert_allclose(out[z], gains[z] * expected, atol=1e-4)


def test_budget_too_small_is_named(tmp_path):
    with pytest.raises(ValueError, match="memory_budget_gb"):
        radon_stack(np.zeros((64, 64), np.float32), tmp_path, memory_budget_gb=1e-5)


def test_existing_output_error_skip_overwrite_and_cancel(tmp_path):
    image = shepp_logan_phantom()[::10, ::10].astype(np.float32)
    first = radon_stack(image, tmp_path, angles="0:180:30")
    with pytest.raises(OutputExistsError):
        radon_stack(image, tmp_path, angles="0:180:30")
    kept = radon_stack(image, tmp_path, angles="0:180:30", if_exists="skip")
    assert kept.skipped and kept.path == first.path
    again = radon_stack(2 * image, tmp_path, angles="0:180:30", if_exists="overwrite")
    np.testing.assert_allclose(open_ome_zarr(again.path).levels[0][...], radon(2 * image, parse_angles("0:180:30")),
                               atol=1e-5)
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        reconstruct_stack(again.path, tmp_path / "c", cancel=cancel)
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir())


# --- command line ---------------------------------------------------------------------------------------------

def test_cli_radon_fbp_and_sart(volume, tmp_path, capsys):
    from napari_soct.pipeline.cli import main

    path, stack = volume
    assert main(["radon", str(path), str(tmp_path / "o"), "--angles", "0:180:45", "--quiet"]) == 0
    sino = tmp_path / "o" / "vol_sinogram.ome.zarr"
    assert main(["fbp", str(sino), str(tmp_path / "o"), "--filter", "shepp-logan", "--quiet"]) == 0
    theta = parse_angles("0:180:45")
    data = open_ome_zarr(sino).levels[0][...]
    np.testing.assert_allclose(open_ome_zarr(tmp_path / "o" / "vol_fbp.ome.zarr").levels[0][1],
                               iradon(data[1], theta, filter_name="shepp-logan"), atol=1e-5)
    assert main(["ct-reconstruct", str(sino), str(tmp_path / "o"), "--method", "sart", "--iterations", "2",
                 "--quiet"]) == 0
    capsys.readouterr()
    assert main(["fbp", str(sino), str(tmp_path / "p"), "--angles", "0:180"]) == 2
    assert "angles '0:180': a range is 'start:stop:count'" in capsys.readouterr().err
    assert main(["fbp", str(sino), str(tmp_path / "p"), "--angles", "0:180:44"]) == 2
    assert "44 angle(s) given but the sinogram has 45" in capsys.readouterr().err


def test_kernel_warm_up_follows_the_switch(monkeypatch):
    from napari_soct.processing._jit import numba_module, warm_up

    monkeypatch.setenv("NAPARI_SOCT_JIT", "0")
    assert warm_up() is False
    monkeypatch.setenv("NAPARI_SOCT_JIT", "1")
    assert warm_up() is (numba_module() is not None)
