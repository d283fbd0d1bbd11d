"""A folder of single-page 2D TIFFs (one per z plane) as an image input: open_image, direct reads and the napari
reader (no viewer needed)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile

from napari_soct.processing.backproject.arrays import direct_array
from napari_soct.processing.io.images import TiffPages, is_tiff_plane_folder, natural_sort_key, open_image


def _write_planes(folder, volume, names=None, suffix=".tif"):
    folder.mkdir(parents=True, exist_ok=True)
    names = names or [str(z) for z in range(len(volume))]  # unpadded: 10.tif sorts after 9.tif only numerically
    for name, plane in zip(names, volume):
        tifffile.imwrite(folder / f"{name}{suffix}", plane)
    return folder


@pytest.fixture
def volume():
    return np.random.default_rng(3).random((12, 9, 7)).astype(np.float32)


def test_natural_order():
    names = ["10.tif", "2.tif", "z_1.tif", "1.tif", "z_10.tif", "z_9.TIF"]
    assert sorted(names, key=natural_sort_key) == ["1.tif", "2.tif", "10.tif", "z_1.tif", "z_9.TIF", "z_10.tif"]


def test_folder_opens_lazily_in_natural_order(tmp_path, volume, monkeypatch):
    folder = _write_planes(tmp_path / "planes", volume)
    tifffile.imwrite(folder / "12.tiff", volume[0])  # both suffixes count
    (folder / ".12.tif.tmp-0123abcd").write_bytes(b"half written")  # hidden temporaries are skipped
    (folder / "notes.txt").write_text("not a plane")  # other files are ignored by open_image
    expected = np.concatenate([volume, volume[:1]])

    reads = []
    real_imread = tifffile.imread
    monkeypatch.setattr(tifffile, "imread", lambda f, *a, **k: reads.append(str(f)) or real_imread(f, *a, **k))
    image = open_image(folder)
    assert reads == []  # shape and dtype come from the headers, no pixels read
    assert image.shape == expected.shape and image.dtype == np.float32 and image.source == folder
    assert image.data.chunks[0] == (1,) * len(expected)  # one chunk per plane
    np.testing.assert_array_equal(np.asarray(image.data[10]), expected[10])
    assert reads == [str(folder / "10.tif")]  # only the plane asked for
    np.testing.assert_array_equal(np.asarray(image.data[3:6, 2:5, 1:]), expected[3:6, 2:5, 1:])
    np.testing.assert_array_equal(np.asarray(image.data), expected)
    # Direct reads (no dask) see the same planes.
    direct = direct_array(image)
    assert isinstance(direct, TiffPages) and direct.shape == expected.shape
    np.testing.assert_array_equal(direct[2:12:3, 1:4], expected[2:12:3, 1:4])
    np.testing.assert_array_equal(direct[11], expected[11])


def test_folder_errors_name_the_folder_and_file(tmp_path, volume):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"empty.*folder is empty"):
        open_image(empty)
    (empty / "readme.md").write_text("x")
    with pytest.raises(ValueError, match=r"empty.*no \*\.tif/\*\.tiff files"):
        open_image(empty)

    shapes = _write_planes(tmp_path / "shapes", volume[:3])
    tifffile.imwrite(shapes / "3.tif", volume[3, :5])
    with pytest.raises(ValueError, match=r"shapes: planes differ: 3\.tif is \(5, 7\) float32, 0\.tif is \(9, 7\)"):
        open_image(shapes)

    dtypes = _write_planes(tmp_path / "dtypes", volume[:3])
    tifffile.imwrite(dtypes / "1.tif", (volume[1] * 100).astype(np.uint16))
    with pytest.raises(ValueError, match=r"dtypes: planes differ: 1\.tif is \(9, 7\) uint16"):
        open_image(dtypes)

    stack = _write_planes(tmp_path / "stack", volume[:2])
    tifffile.imwrite(stack / "2.tif", volume[:2])
    with pytest.raises(ValueError, match=r"2\.tif: a folder of per-plane TIFFs needs one 2D page per file"):
        open_image(stack)

    broken = _write_planes(tmp_path / "broken", volume[:2])
    (broken / "2.tif").write_bytes(b"not a tiff")
    with pytest.raises(ValueError, match=r"broken.2\.tif: cannot read as TIFF"):
        open_image(broken)

    # A plane replaced after opening is caught when read.
    changed = _write_planes(tmp_path / "changed", volume[:3])
    image = open_image(changed)
    tifffile.imwrite(changed / "1.tif", volume[1, :4])
    with pytest.raises(ValueError, match=r"1\.tif: plane is \(4, 7\)"):
        np.asarray(image.data[1])


def test_napari_reader_claims_only_folders_of_tiffs(tmp_path, volume):
    from napari_soct._reader import get_reader, read_tiff_planes
    from napari_soct.processing.io.omezarr import create_ome_zarr_image

    folder = _write_planes(tmp_path / "vessel-slices", volume)
    assert is_tiff_plane_folder(folder)
    assert get_reader(str(folder)) is read_tiff_planes
    [(data, kwargs, kind)] = read_tiff_planes(str(folder))
    assert kind == "image" and kwargs["name"] == "vessel-slices"
    np.testing.assert_array_equal(np.asarray(data), volume)
    assert kwargs["metadata"] == {"source": str(folder)}
    # A straightened volume written as per-slice TIFFs next to its configuration carries it.
    (tmp_path / "vessel-configuration.json").write_text(json.dumps({"slice_rects": []}))
    [(_, kwargs, _)] = read_tiff_planes(str(folder))
    assert kwargs["metadata"]["soct_configuration"] == str(tmp_path / "vessel-configuration.json")

    mixed = _write_planes(tmp_path / "mixed", volume[:2])
    (mixed / "notes.txt").write_text("x")
    assert not is_tiff_plane_folder(mixed) and get_reader(str(mixed)) is None
    nested = _write_planes(tmp_path / "nested", volume[:2])
    (nested / "sub").mkdir()
    assert get_reader(str(nested)) is None
    empty = tmp_path / "empty"
    empty.mkdir()
    assert get_reader(str(empty)) is None
    assert get_reader(str(folder / "0.tif")) is None  # single files are napari's own
    create_ome_zarr_image(tmp_path / "x.ome.zarr", (2, 8, 8), (1.0, 1.0, 1.0), chunks=(1, 8, 8))
    assert get_reader(str(tmp_path / "x.ome.zarr")).__name__ == "read_ome_zarr"
