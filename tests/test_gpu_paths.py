"""The CuPy code paths, run here without a GPU through a strict stand-in for CuPy (``fake_cupy``).

The stand-in keeps device and host memory apart as CuPy does (no implicit conversion, no host array in device
arithmetic), so these tests catch what breaks GPU code that only ever ran on the CPU; they cannot measure GPU
speed or CuPy's own numerics. Each GPU-path result is compared with the numpy path on the same input:
- illumination (BaSiC): the fit and the whole step on the tiny phantom, flat-fields and corrected tiles;
- tomography: radon, filtered back projection and SART, and the stack step that writes OME-Zarr.
The compiled (numba) kernels are switched off, so the CPU reference is the numpy code the GPU path mirrors.
"""

from __future__ import annotations

import numpy as np
import pytest

import fake_cupy
from napari_soct.processing.correct.illumination import IlluminationParams, basic_fit, correct_illumination
from napari_soct.processing.io.omezarr import open_ome_zarr
from napari_soct.processing.preprocess import preprocess_acquisition
from napari_soct.processing.tomography import _backend, fbp_stack, iradon, iradon_sart, radon, radon_stack


@pytest.fixture
def cupy(monkeypatch):
    """The stand-in installed as ``cupy``, the backends' detection cache cleared before and after."""
    monkeypatch.setenv("NAPARI_SOCT_JIT", "0")
    _backend._cupy.cache_clear()
    module = fake_cupy.install(monkeypatch)
    yield module
    _backend._cupy.cache_clear()


def test_the_stand_in_refuses_what_cupy_refuses(cupy):
    device = cupy.asarray(np.ones(4, np.float32))
    with pytest.raises(TypeError, match="implicit conversion"):
        np.asarray(device)
    with pytest.raises(TypeError, match="host numpy array"):
        device + np.ones(4)
    with pytest.raises(TypeError, match="host numpy array"):
        cupy.maximum(device, np.zeros(4))
    assert isinstance(device * 2 + 1, fake_cupy.DeviceArray) and isinstance(np.mean(device), fake_cupy.DeviceArray)
    np.testing.assert_array_equal((device * 2).get(), np.full(4, 2.0))


def test_basic_fit_on_the_device_equals_the_cpu_fit(cupy):
    rng = np.random.default_rng(0)
    shading = np.outer(np.linspace(0.6, 1.0, 40), np.linspace(0.7, 1.0, 48)).astype(np.float32)
    images = (rng.gamma(2.0, 0.5, (12, 40, 48)) * shading).astype(np.float32)
    cpu = basic_fit(images, backend="numpy")
    gpu = basic_fit(images, backend="auto")
    assert gpu.backend == "cupy" and isinstance(gpu.flatfield, np.ndarray)
    np.testing.assert_allclose(gpu.flatfield, cpu.flatfield, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gpu.baseline, cpu.baseline, rtol=1e-5)


def test_illumination_step_on_the_device_writes_the_cpu_result(cupy, tiny_acquisition, tmp_path):
    grids = tmp_path / "grids"
    preprocess_acquisition(tiny_acquisition.raw_dir, grids, generate_previews=False)
    gpu = correct_illumination(grids, tmp_path / "gpu", IlluminationParams(backend="auto"))
    cpu = correct_illumination(grids, tmp_path / "cpu", IlluminationParams(backend="numpy"))
    for sid in tiny_acquisition.slice_ids:
        assert gpu.metrics[sid]["backend"] == "cupy" and cpu.metrics[sid]["backend"] == "numpy"
        np.testing.assert_allclose(np.load(gpu.metrics[sid]["flatfield_path"]),
                                   np.load(cpu.metrics[sid]["flatfield_path"]), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(open_ome_zarr(gpu.outputs[sid]).levels[0][...],
                                   open_ome_zarr(cpu.outputs[sid]).levels[0][...], rtol=1e-5, atol=1e-7)


@pytest.fixture(scope="module")
def phantom():
    y, x = np.mgrid[-1:1:64j, -1:1:64j]
    image = ((x**2 + y**2 < 0.8) * 1.0 + ((x - 0.2) ** 2 + (y + 0.1) ** 2 < 0.05) * 0.5).astype(np.float32)
    return image, np.linspace(0.0, 180.0, 60, endpoint=False)


def test_projections_on_the_device_equal_the_cpu_ones(cupy, phantom):
    image, theta = phantom
    sinogram = radon(image, theta, backend="cpu")
    on_device = radon(image, theta, backend="cuda")
    assert isinstance(on_device, fake_cupy.DeviceArray)
    np.testing.assert_allclose(_backend.to_numpy(on_device), sinogram, rtol=1e-5, atol=1e-5)
    for reconstruct in (iradon, iradon_sart):
        cpu = reconstruct(sinogram, theta, backend="cpu")
        gpu = _backend.to_numpy(reconstruct(sinogram, theta, backend="cuda"))
        np.testing.assert_allclose(gpu, cpu, rtol=1e-4, atol=1e-5, err_msg=reconstruct.__name__)
        assert np.corrcoef(gpu.ravel(), image.ravel())[0, 1] > 0.9  # a reconstruction, not zeros


def test_tomography_stack_on_the_device_writes_the_cpu_result(cupy, phantom, tmp_path):
    image, _ = phantom
    stack = np.stack([image, image[::-1]])
    sinograms = radon_stack(stack, tmp_path / "sino", angles="0:180:60", backend="cpu")
    gpu = fbp_stack(sinograms.path, tmp_path / "gpu", backend="cuda")
    cpu = fbp_stack(sinograms.path, tmp_path / "cpu", backend="cpu")
    np.testing.assert_allclose(open_ome_zarr(gpu.path).levels[0][...], open_ome_zarr(cpu.path).levels[0][...],
                               rtol=1e-4, atol=1e-5)
