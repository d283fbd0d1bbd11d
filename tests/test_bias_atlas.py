"""Steps 15 (N4 bias field correction) and 16 (atlas / RAS alignment) against ground truth built from the phantom."""

from __future__ import annotations

import itertools
import json
import math
import tracemalloc

import imageio.v3 as iio
import numpy as np
import pytest
import SimpleITK as sitk
from scipy.ndimage import map_coordinates
from skimage.filters import threshold_otsu

from napari_soct.processing.io.atomic import OutputExistsError
from napari_soct.processing.io.omezarr import create_ome_zarr_pyramid, open_ome_zarr
from napari_soct.processing.stack.atlas import (
    AtlasParams,
    ReorientedVolume,
    align_to_atlas,
    direction_for,
    orientation_transform,
    parse_orientation,
    read_template,
    reorient,
    resample_to_grid,
)
from napari_soct.processing.stack.bias import BiasFieldParams, correct_bias_field

VOXEL_MM = 0.01  # the tiny phantom's truth volume is 10 um isotropic
SECTION = 21  # planes per thick section in the sectioned-bias tests


def write_volume(path, array, scale=(VOXEL_MM,) * 3, n_levels=1, chunks=(16, 64, 64), attributes=None):
    writer = create_ome_zarr_pyramid(path, array.shape, scale, chunks=chunks, n_levels=n_levels,
                                     attributes=attributes)
    writer.write((slice(None),) * 3, array)
    return path


@pytest.fixture(scope="module")
def truth(tiny_acquisition):
    """The phantom's true volume (62, 108, 107) at 10 um."""
    return np.asarray(tiny_acquisition.true_volume[...], dtype=np.float32)


@pytest.fixture(scope="module")
def tissue(truth):
    return truth > threshold_otsu(truth)


def smooth_log_field(shape) -> np.ndarray:
    """A smooth log bias: gradients along all axes and a gentle lateral wave (a factor of about 0.5 to 1.8)."""
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    return (0.35 * x - 0.25 * y + 0.2 * z + 0.2 * np.cos(1.5 * x + 0.5 * y)).astype(np.float32)


def sectioned_log_field(shape, seed=1) -> tuple[np.ndarray, np.ndarray]:
    """Each thick section its own field: attenuation with depth in the section, its own lateral gradient and
    level. Returns the log field and the section index of each voxel."""
    nz, ny, nx = shape
    z, y, x = np.meshgrid(np.arange(nz), np.linspace(-1, 1, ny), np.linspace(-1, 1, nx), indexing="ij")
    section = z // SECTION
    rng = np.random.default_rng(seed)
    gx, gy, level = (rng.uniform(-0.3, 0.3, section.max() + 1) for _ in range(3))
    depth = (z % SECTION) / SECTION
    return (-0.6 * depth + gx[section] * x + gy[section] * y + level[section]).astype(np.float32), section


def within_section_std(log_ratio, tissue, section) -> float:
    """RMS over sections of the std of the log ratio inside each section (levels between sections ignored)."""
    return float(np.sqrt(np.mean([log_ratio[(section == k) & tissue].var() for k in np.unique(section)])))


def corrected(result) -> np.ndarray:
    return open_ome_zarr(result.path).levels[0][...]


# ---------------------------------------------------------------------------------------------------- N4
def test_global_n4_removes_a_smooth_field_and_strength_scales_it(truth, tissue, tmp_path):
    log_bias = smooth_log_field(truth.shape)
    observed = truth * np.exp(log_bias)
    volume = write_volume(tmp_path / "subject.ome.zarr", observed)
    fast = dict(mode="global", shrink_factor=6, n_iterations=30, n_fitting_levels=2, workers=1)
    full = correct_bias_field(volume, tmp_path / "full", BiasFieldParams(**fast))
    before = log_bias[tissue].std()
    after = np.log(corrected(full) / truth)[tissue].std()
    assert after <= 0.5 * before, (after, before)  # measured: 0.22 of the injected variation
    assert full.path.name == "subject_corrected.ome.zarr" and full.shrink_factors == (6, 6, 6)
    metrics = json.loads(full.metrics_path.read_text())
    assert metrics["mode_details"]["global"]["fitted"] and metrics["params"]["mode"] == "global"
    assert metrics["tissue_cv_after"] < metrics["tissue_cv_before"]
    # The injected field spans a factor ~0.5..1.8: the removed one spans most of it.
    low, high = full.field_range
    assert low < 0.8 and high > 1.3

    half = correct_bias_field(volume, tmp_path / "half", BiasFieldParams(**fast, strength=0.5))
    np.testing.assert_allclose(np.log(observed / corrected(half)), 0.5 * np.log(observed / corrected(full)),
                               atol=2e-3)


def test_section_modes_follow_fields_that_jump_at_the_cuts(truth, tissue, tmp_path):
    log_bias, section = sectioned_log_field(truth.shape)
    observed = truth * np.exp(log_bias)
    volume = write_volume(tmp_path / "v.ome.zarr", observed, attributes={"section_thickness_planes": SECTION})
    fast = dict(shrink_factor=6, n_iterations=30, n_fitting_levels=2, workers=1)
    before_within = within_section_std(log_bias, tissue, section)
    results = {}
    for mode in ("per_section", "global", "two_pass"):
        # per_section gets the thickness as a parameter; the others read the input's attribute.
        thickness = SECTION if mode == "per_section" else 0
        results[mode] = correct_bias_field(volume, tmp_path / mode, BiasFieldParams(
            mode=mode, section_thickness_planes=thickness, **fast))
    ratio = {mode: np.log(corrected(r) / truth) for mode, r in results.items()}
    within = {mode: within_section_std(v, tissue, section) / before_within for mode, v in ratio.items()}
    # Per section: the field inside every section is removed (measured 0.17); one smooth global field cannot
    # follow the jumps at the cuts (measured 0.78).
    assert within["per_section"] <= 0.5 and within["per_section"] < 0.5 * within["global"], within
    # Two passes also level the sections against each other (measured 0.24 overall).
    overall = np.log(corrected(results["two_pass"]) / truth)[tissue].std() / log_bias[tissue].std()
    assert overall <= 0.5 and within["two_pass"] <= 0.5, (overall, within)
    details = results["two_pass"].report["mode_details"]
    assert [s["z_planes"] for s in details["sections"]] == [[0, 21], [21, 42], [42, 62]] and "global" in details
    assert "global" not in results["per_section"].report["mode_details"]


def test_section_modes_need_a_thickness(truth, tmp_path):
    volume = write_volume(tmp_path / "v.ome.zarr", truth[:8, :32, :32] + 0.1)
    with pytest.raises(ValueError, match="section_thickness_planes"):
        correct_bias_field(volume, tmp_path / "out", BiasFieldParams(mode="per_section"))
    with pytest.raises(ValueError, match="not an OME-Zarr"):
        correct_bias_field(tmp_path, tmp_path / "out", BiasFieldParams(mode="global"))


def test_strength_zero_is_exact_passthrough_and_outputs_are_not_overwritten(truth, tmp_path):
    observed = truth * np.exp(smooth_log_field(truth.shape))
    volume = write_volume(tmp_path / "v.ome.zarr", observed)
    result = correct_bias_field(volume, tmp_path / "out", BiasFieldParams(strength=0.0, mode="per_section"))
    np.testing.assert_array_equal(corrected(result), observed)
    assert result.field_path is None
    with pytest.raises(OutputExistsError):
        correct_bias_field(volume, tmp_path / "out", BiasFieldParams(strength=0.0))
    assert correct_bias_field(volume, tmp_path / "out", BiasFieldParams(strength=0.0, if_exists="skip")).skipped


def test_bias_streams_a_volume_larger_than_the_budget(tmp_path):
    """32 MiB volume, 8 MiB budget: peak traced memory stays under the budget; the output is the input divided by
    the written field, interpolated independently (scipy map_coordinates, order 1)."""
    rng = np.random.default_rng(0)
    shape = (32, 512, 512)
    observed = (1.0 + rng.random(shape, dtype=np.float32)) * np.exp(smooth_log_field(shape))
    volume = write_volume(tmp_path / "big.ome.zarr", observed, chunks=(16, 64, 64))
    budget_gb = 8 / 1024
    params = BiasFieldParams(mode="global", shrink_factor=8, max_fit_voxels=2048, n_iterations=10,
                             n_fitting_levels=1, memory_budget_gb=budget_gb, workers=1)
    tracemalloc.start()
    tracemalloc.reset_peak()
    try:
        result = correct_bias_field(volume, tmp_path / "out", params)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert observed.nbytes >= 4 * budget_gb * 2**30
    assert peak < budget_gb * 2**30, f"peak {peak / 2**20:.1f} MiB over the {budget_gb * 1024:.0f} MiB budget"
    sz, sy, sx = result.shrink_factors
    assert (sz, sy, sx) == (16, 16, 16)  # grown from 8 so N4 fits at most 2048 voxels
    image = open_ome_zarr(result.path)
    assert len(image.levels) == 2 and image.levels[1].shape == (32, 256, 256)
    field = open_ome_zarr(result.field_path).levels[0][...]
    voxels = tuple(rng.integers(0, n, 200_000) for n in shape)  # a sample of voxels, edges included
    coords = [(v - (f - 1) / 2) / f for v, f in zip(voxels, (sz, sy, sx))]  # shrunk voxel i covers i*f..i*f+f-1
    expected_field = np.exp(map_coordinates(np.log(field.astype(np.float64)), coords, order=1, mode="nearest"))
    np.testing.assert_allclose(image.levels[0][...][voxels], observed[voxels] / expected_field, rtol=2e-5)


# ------------------------------------------------------------------------------------------ orientation
ALL_CODES = ["".join(p) for pair in itertools.product("RL", "AP", "SI") for p in itertools.permutations(pair)]


def test_orientation_codes_match_simpleitk_dicomorient_and_round_trip():
    assert len(set(ALL_CODES)) == 48
    array = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    for source in ALL_CODES:
        image = sitk.GetImageFromArray(array)
        image.SetDirection(direction_for(source))
        assert sitk.DICOMOrientImageFilter_GetOrientationFromDirectionCosines(image.GetDirection()) == source
        for target in ALL_CODES[::6]:  # with all 48 sources, every permutation and flip combination
            ours = reorient(array, source, target)
            reference = sitk.GetArrayFromImage(sitk.DICOMOrient(image, target))
            np.testing.assert_array_equal(ours, reference, err_msg=f"{source} -> {target}")
        for target in ALL_CODES:
            np.testing.assert_array_equal(reorient(reorient(array, source, target), target, source), array)
    assert orientation_transform("RAS", "RAS") == ((0, 1, 2), (False, False, False))
    # The CCF NRRD (PIR) seen as RAS: x <- R (input z), y <- A (input x reversed), z <- S (input y reversed).
    assert orientation_transform("PIR", "RAS") == ((1, 2, 0), (True, True, False))


@pytest.mark.parametrize("code", ["RAX", "RRS", "RA", "RLS", ""])
def test_bad_orientation_codes_are_refused_by_name(code):
    with pytest.raises(ValueError, match="input_orientation"):
        parse_orientation(code, "input_orientation")


def test_read_template_units(tmp_path):
    array = np.ones((4, 5, 6), np.float32)
    np.save(tmp_path / "t.npy", array)
    with pytest.raises(ValueError, match="template_voxel_um"):
        read_template(tmp_path / "t.npy")
    assert read_template(tmp_path / "t.npy", voxel_um=25.0)[1] == pytest.approx((0.025,) * 3)
    write_volume(tmp_path / "t.ome.zarr", array, scale=(0.05, 0.04, 0.03), chunks=(4, 5, 6))
    assert read_template(tmp_path / "t.ome.zarr")[1] == pytest.approx((0.05, 0.04, 0.03))
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((10.0, 20.0, 30.0))  # x, y, z micrometres (a unit-less NRRD)
    sitk.WriteImage(image, str(tmp_path / "t.nrrd"))
    data, spacing = read_template(tmp_path / "t.nrrd")
    assert data.shape == (4, 5, 6) and spacing == pytest.approx((0.03, 0.02, 0.01))


# ------------------------------------------------------------------------------------------ registration
TRUE_ANGLES_DEG = (4.0, -3.0, 5.0)
TRUE_SHIFT_VOXELS = (3.0, -2.0, 2.5)  # template voxels, x y z
TEMPLATE_MM = 0.02


@pytest.fixture(scope="module")
def atlas_case(truth, tmp_path_factory):
    """Template: the phantom padded with background, smoothed and sampled at 20 um (NRRD, spacing in um).
    Subject: the phantom at 10 um through a known rigid transform G, stored in orientation PIR."""
    root = tmp_path_factory.mktemp("atlas")
    padded = np.pad(truth, 16)
    phantom = sitk.GetImageFromArray(padded)
    phantom.SetSpacing((VOXEL_MM,) * 3)
    template_shape = tuple(n // 2 for n in padded.shape)
    grid = sitk.Image(template_shape[::-1], sitk.sitkFloat32)
    grid.SetSpacing((TEMPLATE_MM,) * 3)
    template = sitk.GetArrayFromImage(sitk.Resample(sitk.SmoothingRecursiveGaussian(phantom, VOXEL_MM), grid,
                                                    sitk.Transform(), sitk.sitkLinear, 0.0))
    nrrd = sitk.GetImageFromArray(template)
    nrrd.SetSpacing((TEMPLATE_MM * 1000,) * 3)
    sitk.WriteImage(nrrd, str(root / "template.nrrd"))
    g = sitk.Euler3DTransform()
    g.SetCenter([(n - 1) * TEMPLATE_MM / 2 for n in template_shape[::-1]])
    g.SetRotation(*np.radians(TRUE_ANGLES_DEG))
    g.SetTranslation(tuple(v * TEMPLATE_MM for v in TRUE_SHIFT_VOXELS))
    fine = sitk.Image(padded.shape[::-1], sitk.sitkFloat32)
    fine.SetSpacing((VOXEL_MM,) * 3)
    moved_ras = sitk.GetArrayFromImage(sitk.Resample(phantom, fine, g, sitk.sitkLinear, 0.0))
    subject = np.ascontiguousarray(reorient(moved_ras, "RAS", "PIR"))
    write_volume(root / "subject.ome.zarr", subject, n_levels=2, chunks=(32, 64, 64))
    return {"root": root, "g": g, "template_shape": template_shape, "padded": padded, "subject": subject}


def test_atlas_alignment_recovers_a_known_rigid_transform(atlas_case):
    case = atlas_case
    result = align_to_atlas(case["root"] / "subject.ome.zarr", case["root"] / "template.nrrd", case["root"] / "out",
                            AtlasParams(input_orientation="PIR", level=1, workers=1))
    found = sitk.ReadTransform(str(result.transform_path))
    g = case["g"]
    # The found transform maps template points into the subject: G o found must be the identity.
    rotation = np.array(g.GetMatrix()).reshape(3, 3) @ np.array(sitk.Euler3DTransform(found).GetMatrix()).reshape(3, 3)
    angle = math.degrees(math.acos(min(1.0, (np.trace(rotation) - 1) / 2)))
    extent = [(n - 1) * TEMPLATE_MM for n in case["template_shape"][::-1]]
    corners = [tuple(f * e for f, e in zip(c, extent)) for c in itertools.product((0.2, 0.8), repeat=3)]
    shift = max(np.linalg.norm(np.subtract(g.TransformPoint(found.TransformPoint(p)), p)) for p in corners)
    assert angle <= 2.0, angle  # measured: 0.03 deg
    assert shift / TEMPLATE_MM <= 2.0, shift / TEMPLATE_MM  # measured: 0.4 voxel
    assert result.ncc > 0.95 and result.level == 1

    # Output: the template's field of view at the voxel size of every input level (axes as in the template).
    image = open_ome_zarr(result.path)
    assert image.scales_mm == [(0.01, 0.01, 0.01), (0.02, 0.02, 0.01)]  # PIR level 1 halves input y, x = R... z, y
    assert [lv.shape for lv in image.levels] == [(94, 140, 138), (47, 70, 138)]
    level0 = image.levels[0][...]
    placed = case["padded"][:94, :140, :138]  # the unmoved phantom in the template frame at 10 um
    both = (placed > 0) | (level0 > 0)
    assert np.corrcoef(placed[both], level0[both])[0, 1] >= 0.95

    # template_to_input_xyz maps template points to the stored input: the output samples the input there.
    matrix = np.array(result.report["template_to_input_xyz"])
    rng = np.random.default_rng(0)
    index = np.stack([rng.integers(20, n - 20, 300) for n in level0.shape])  # zyx output voxels
    xyz = np.vstack([index[::-1] * VOXEL_MM, np.ones(300)])
    source_index = (matrix @ xyz)[:3][::-1] / VOXEL_MM  # zyx voxels of the stored input
    expected = map_coordinates(case["subject"], source_index, order=1)
    np.testing.assert_allclose(level0[tuple(index)], expected, atol=1e-3 * float(case["subject"].max()))

    preview = iio.imread(result.preview_path)
    assert preview.ndim == 3 and preview.shape[1] > 2 * preview.shape[0] and preview.std() > 5
    metrics = json.loads(result.metrics_path.read_text())
    assert metrics["permutation"] == [1, 2, 0] and metrics["registered_level"] == 1


def test_block_resampling_equals_one_block(atlas_case):
    level = open_ome_zarr(atlas_case["root"] / "subject.ome.zarr").levels[0]
    geometry = ReorientedVolume((1, 2, 0), (True, True, False), [tuple(level.shape)], [(VOXEL_MM,) * 3])
    transform = sitk.Euler3DTransform((0.5, 0.4, 0.3), 0.05, -0.04, 0.03, (0.02, -0.01, 0.015))
    shape = (70, 90, 80)
    outputs = []
    for max_voxels, chunk in ((10**9, 64), (16**3, 16)):
        out = np.full(shape, -1.0, np.float32)

        def write(region, block, out=out):
            out[region] = block

        n = resample_to_grid(level, geometry, 0, transform, shape, (VOXEL_MM,) * 3, write,
                             max_block_voxels=max_voxels, chunk=chunk)
        outputs.append((out, n))
    (one, n_one), (many, n_many) = outputs
    assert n_one == 1 and n_many > 50
    unwritten = many == -1  # blocks whose preimage misses the volume are left at the fill value
    np.testing.assert_array_equal(one[unwritten], 0)
    np.testing.assert_allclose(many[~unwritten], one[~unwritten], atol=1e-6)
