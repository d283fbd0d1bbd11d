"""OME-Zarr reading (NGFF 0.4 on zarr v2, 0.5 on zarr v3) and the lab's CSV tables."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from napari_soct.processing.io.atomic import OutputExistsError, atomic_output
from napari_soct.processing.io.omezarr import (
    create_ome_zarr_image,
    create_ome_zarr_pyramid,
    is_ome_zarr,
    open_ome_zarr,
)
from napari_soct.processing.io.tables import (
    SliceConfigRow,
    SliceShift,
    read_shifts_xy,
    read_slice_config,
    write_shifts_xy,
    write_slice_config,
)


def test_ngff05_roundtrip(tmp_path):
    data = np.random.default_rng(0).random((4, 6, 8), dtype=np.float32)
    arr = create_ome_zarr_image(tmp_path / "a.ome.zarr", data.shape, (0.0035, 0.01, 0.02), chunks=(4, 3, 4),
                                shards=(4, 6, 8), attributes={"soct": {"k": 1}})
    arr[...] = data
    assert is_ome_zarr(tmp_path / "a.ome.zarr")
    image = open_ome_zarr(tmp_path / "a.ome.zarr")
    assert image.version == "0.5" and image.axes == ("z", "y", "x")
    assert image.scales_mm == [(0.0035, 0.01, 0.02)]
    assert image.attributes == {"soct": {"k": 1}}
    np.testing.assert_array_equal(image.as_dask().compute(), data)


def test_ngff04_multiscale_written_by_ome_zarr_micrometres(tmp_path):
    from ome_zarr.format import FormatV04
    from ome_zarr.writer import write_multiscale

    level0 = np.arange(4 * 8 * 8, dtype=np.uint16).reshape(4, 8, 8)
    level1 = level0[:, ::2, ::2].copy()
    group = zarr.open_group(str(tmp_path / "v04.zarr"), mode="w", zarr_format=2)
    axes = [{"name": n, "type": "space", "unit": "micrometer"} for n in "zyx"]
    transforms = [[{"type": "scale", "scale": [3.5, 10.0, 10.0]}], [{"type": "scale", "scale": [3.5, 20.0, 20.0]}]]
    write_multiscale([level0, level1], group, axes=axes, fmt=FormatV04(), coordinate_transformations=transforms)
    assert is_ome_zarr(tmp_path / "v04.zarr")
    image = open_ome_zarr(tmp_path / "v04.zarr")
    assert image.version == "0.4" and len(image.levels) == 2
    assert image.scales_mm[1] == pytest.approx((0.0035, 0.02, 0.02))
    np.testing.assert_array_equal(image.pyramid()[1].compute(), level1)


def test_not_ome_zarr(tmp_path):
    zarr.open_group(str(tmp_path / "plain.zarr"), mode="w")
    assert not is_ome_zarr(tmp_path / "plain.zarr")
    assert not is_ome_zarr(tmp_path)
    with pytest.raises(ValueError, match="multiscales"):
        open_ome_zarr(tmp_path / "plain.zarr")


def test_shifts_roundtrip_and_float_ids(tmp_path):
    shifts = [SliceShift(0, 1, 2.5, -1.0, 0.0025, -0.001, True), SliceShift(1, 3, 0, 0, 0, 0, False)]
    write_shifts_xy(tmp_path / "s.csv", shifts)
    assert read_shifts_xy(tmp_path / "s.csv") == shifts
    (tmp_path / "old.csv").write_text(
        "fixed_id,moving_id,x_shift,y_shift,x_shift_mm,y_shift_mm\n0.0,1.0,1,2,0.1,0.2\n"
    )
    old = read_shifts_xy(tmp_path / "old.csv")
    assert (old[0].fixed_id, old[0].moving_id, old[0].reliable) == (0, 1, True)
    (tmp_path / "bad.csv").write_text("fixed_id,moving_id,x_shift_mm,y_shift_mm\n0.5,1,0,0\n")
    with pytest.raises(ValueError, match=r"bad.csv, line 2.*0.5"):
        read_shifts_xy(tmp_path / "bad.csv")


def test_slice_config_minimal_and_full(tmp_path):
    (tmp_path / "min.csv").write_text("slice_id,use,notes\n0,no,calibration_slice\n1,YES,\n2,1,my note\n")
    rows = read_slice_config(tmp_path / "min.csv")
    assert [(r.slice_id, r.use, r.notes) for r in rows] == [(0, False, "calibration_slice"), (1, True, ""),
                                                            (2, True, "my note")]
    assert rows[1].galvo_fix is None
    rows[1].galvo_fix, rows[1].galvo_confidence = True, 0.91
    write_slice_config(tmp_path / "full.csv", rows)
    again = read_slice_config(tmp_path / "full.csv")
    assert again[1].galvo_fix is True and again[1].galvo_confidence == pytest.approx(0.91)
    (tmp_path / "bad.csv").write_text("slice_id,use\n0,maybe\n")
    with pytest.raises(ValueError, match=r"bad.csv, line 2.*'maybe'"):
        read_slice_config(tmp_path / "bad.csv")


def test_atomic_output_keeps_old_result_on_failure(tmp_path):
    target = tmp_path / "r.txt"
    target.write_text("old")
    with pytest.raises(OutputExistsError):
        with atomic_output(target):
            pass
    with pytest.raises(RuntimeError):
        with atomic_output(target, "overwrite") as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["r.txt"]
    with atomic_output(target, "overwrite") as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new"
    write_slice_config(tmp_path / "c.csv", [SliceConfigRow(0)])
    with pytest.raises(OutputExistsError, match="c.csv"):
        write_slice_config(tmp_path / "c.csv", [SliceConfigRow(0)])


def test_images_written_under_a_temporary_name_record_their_final_name(tmp_path):
    """The name in the metadata (napari's layer name) is the output's, not that of the temporary it was
    written under; files of older versions that recorded their temporary open under the final name."""
    target = tmp_path / "slice_z03_beam.ome.zarr"
    with atomic_output(target) as tmp:
        assert tmp.name != target.name
        writer = create_ome_zarr_pyramid(tmp, (2, 8, 8), (0.01,) * 3, chunks=(2, 8, 8))
        writer.write((slice(0, 2), slice(0, 8), slice(0, 8)), np.ones((2, 8, 8), np.float32))
    assert zarr.open_group(target, mode="r").attrs["ome"]["multiscales"][0]["name"] == target.name
    old = tmp_path / "old.ome.zarr"
    create_ome_zarr_image(old, (2, 4, 4), (0.01,) * 3, chunks=(2, 4, 4), name=".old.ome.zarr.tmp-0123abcd")
    assert open_ome_zarr(old).name == "old.ome.zarr"
    assert open_ome_zarr(target).name == target.name


def test_pyramid_written_in_one_pass(tmp_path):

    rng = np.random.default_rng(1)
    data = rng.random((3, 37, 50), dtype=np.float32)  # odd sizes: edge blocks end at the array edge
    writer = create_ome_zarr_pyramid(tmp_path / "p.ome.zarr", data.shape, (0.004, 0.01, 0.01), chunks=(3, 16, 16),
                                     n_levels=3)
    for y0 in range(0, 37, 16):
        for x0 in range(0, 50, 24):
            region = (slice(None), slice(y0, min(y0 + 16, 37)), slice(x0, min(x0 + 24, 50)))
            writer.write(region, data[region])
    with pytest.raises(ValueError, match="aligned"):
        writer.write((slice(None), slice(2, 10), slice(0, 8)), data[:, 2:10, :8])
    image = open_ome_zarr(tmp_path / "p.ome.zarr")
    assert [lvl.shape for lvl in image.levels] == [(3, 37, 50), (3, 19, 25), (3, 10, 13)]
    assert image.scales_mm[2] == pytest.approx((0.004, 0.04, 0.04))
    np.testing.assert_array_equal(image.levels[0][...], data)
    # Level 1 is the 2x2 mean of level 0 (edge replicated), independent of how the blocks were cut.
    padded = np.pad(data, ((0, 0), (0, 1), (0, 0)), mode="edge")
    expected = padded.reshape(3, 19, 2, 25, 2).mean(axis=(2, 4))
    np.testing.assert_allclose(image.levels[1][...], expected, rtol=1e-6)


def test_pyramid_parts_own_whole_chunks_at_every_level(tmp_path):
    """Parts that different processes write at the same time must not share a chunk at any level (zarr rewrites
    a whole chunk for a partial write: one of two concurrent writers would be lost)."""
    from napari_soct.processing.io.omezarr import open_pyramid_writer

    two = create_ome_zarr_pyramid(tmp_path / "two.ome.zarr", (4, 700, 300), (0.004, 0.01, 0.01), chunks=(4, 256, 256),
                                  n_levels=2)
    # Level 1 is (350, 150): one chunk spans its x axis, so no x cut; in y its chunks cover 512 rows of level 0.
    assert two.chunk_cuts(-2) == [512] and two.chunk_cuts(-1) == []
    assert two.parts() == [(slice(0, 512), slice(0, 300)), (slice(512, 700), slice(0, 300))]
    one = create_ome_zarr_pyramid(tmp_path / "one.ome.zarr", (4, 700, 300), (0.004, 0.01, 0.01), chunks=(4, 256, 256),
                                  n_levels=1)
    assert one.chunk_cuts(-2) == [256, 512] and one.chunk_cuts(-1) == [256]
    assert len(one.parts()) == 4 and len(one.parts(per_axis=3)) == 6
    three = create_ome_zarr_pyramid(tmp_path / "three.ome.zarr", (2, 2000, 1500), (0.004, 0.01, 0.01),
                                    chunks=(2, 128, 128), n_levels=3)
    for per_axis in (2, 3, 5):
        parts = three.parts(per_axis)
        covered = np.zeros(three.shape[1:], np.int8)
        for ys, xs in parts:
            covered[ys, xs] += 1
            for k, level in enumerate(three.levels):
                for axis, s in zip((-2, -1), (ys, xs)):
                    span = level.chunks[axis] * 2**k
                    assert s.start % span == 0 and (s.stop % span == 0 or s.stop == three.shape[axis])
        assert (covered == 1).all()  # the parts tile the image
    assert len(three.parts(3)) == 9
    # A second process reopens the same levels.
    assert [lvl.shape for lvl in open_pyramid_writer(tmp_path / "three.ome.zarr").levels] == [
        lvl.shape for lvl in three.levels]
