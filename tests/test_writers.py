"""Writers: OME-Zarr (NGFF 0.5) and TIFF round trips, memory-bounded writing, and the napari writer plugin."""

from __future__ import annotations

import json
import subprocess
import sys
from xml.etree import ElementTree

import dask.array as da
import numpy as np
import pytest
import tifffile
import zarr
from skimage.measure import block_reduce

from napari_soct.processing.io import writers
from napari_soct.processing.io.atomic import OutputExistsError
from napari_soct.processing.io.omezarr import open_ome_zarr
from napari_soct.processing.io.writers import save_ome_zarr, save_tiff, tiff_needs_bigtiff

# Ids a float64 cannot tell apart (2**53 + 1 rounds to 2**53): any float conversion would show.
BIG_ID = 2**60 + 1


def _ome_attrs(path) -> dict:
    """The group's ``ome`` attributes, read from zarr.json directly (not through our reader)."""
    return json.loads((path / "zarr.json").read_text())["attributes"]["ome"]


def _transforms(dataset: dict) -> tuple[list[float], list[float]]:
    by_type = {t["type"]: t for t in dataset["coordinateTransformations"]}
    return by_type["scale"]["scale"], by_type["translation"]["translation"]


def _mean_2x2_reference(a: np.ndarray) -> np.ndarray:
    """Independent 2x2 mean in y/x with an odd edge repeated (scikit-image block_reduce on an edge-padded copy)."""
    pad = [(0, 0)] * (a.ndim - 2) + [(0, a.shape[-2] % 2), (0, a.shape[-1] % 2)]
    return block_reduce(np.pad(a.astype(np.float64), pad, mode="edge"), (1,) * (a.ndim - 2) + (2, 2), np.mean)


def _labels_volume(shape, seed=0) -> np.ndarray:
    """Blocky uint64 labels with ids above 2**53 next to ids one apart."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 6, size=(shape[0], -(-shape[1] // 7), -(-shape[2] // 5)))
    ids = np.array([0, BIG_ID, BIG_ID + 1, 2**64 - 1, 2**53 + 1, 7], dtype=np.uint64)
    return ids[coarse.repeat(7, axis=1).repeat(5, axis=2)[:, : shape[1], : shape[2]]]


# ----------------------------------------------------------------------------------------------- OME-Zarr


def test_ome_zarr_image_round_trip_scale_translation_units_and_mean_pyramid(tmp_path):
    rng = np.random.default_rng(1)
    image = rng.random((5, 133, 150)).astype(np.float32)
    scale, translate = (0.01, 2.0, 3.0), (1.5, -20.0, 7.0)
    path = save_ome_zarr(tmp_path / "img.ome.zarr", da.from_array(image, chunks=(2, 50, 64)), scale=scale,
                         translate=translate, units=("mm", "um", "µm"), n_levels=3, chunks=(2, 32, 32),
                         memory_budget_gb=64 * 1024 / 2**30)  # 64 KiB: many blocks, each aligned to 4 pixels
    ome = _ome_attrs(path)
    assert ome["version"] == "0.5"
    ms = ome["multiscales"][0]
    assert ms["axes"] == [{"name": "z", "type": "space", "unit": "millimeter"},
                          {"name": "y", "type": "space", "unit": "micrometer"},
                          {"name": "x", "type": "space", "unit": "micrometer"}]
    assert ms["type"] == "mean" and "image-label" not in ome
    expected = image.astype(np.float64)
    for k, dataset in enumerate(ms["datasets"]):
        level_scale, level_translate = _transforms(dataset)
        f = 2**k
        assert level_scale == pytest.approx([0.01, 2.0 * f, 3.0 * f])
        # The centre of a 2x2-mean pixel lies between the pixels it averages.
        assert level_translate == pytest.approx([1.5, -20.0 + 2.0 * (f - 1) / 2, 7.0 + 3.0 * (f - 1) / 2])
        stored = zarr.open_array(str(path / dataset["path"]), mode="r")
        assert stored.dtype == np.float32 and stored.shape == expected.shape
        if k == 0:
            np.testing.assert_array_equal(stored[...], image)  # exact
        else:
            np.testing.assert_allclose(stored[...], expected, rtol=2e-6)
        expected = _mean_2x2_reference(expected)
    assert k == 2
    # Our reader converts to millimetres.
    opened = open_ome_zarr(path)
    assert opened.scales_mm[0] == pytest.approx((0.01, 2e-3, 3e-3)) and opened.axes == ("z", "y", "x")


def test_ome_zarr_float64_and_integer_image_levels(tmp_path):
    rng = np.random.default_rng(2)
    image = rng.normal(size=(33, 47)) * 1e300  # float64 values float32 cannot hold
    path = save_ome_zarr(tmp_path / "f64.ome.zarr", image, n_levels=2)
    level0 = zarr.open_array(str(path / "0"), mode="r")
    assert level0.dtype == np.float64
    np.testing.assert_array_equal(level0[...], image)
    counts = rng.integers(0, 60000, size=(3, 41, 39), dtype=np.uint16)
    path = save_ome_zarr(tmp_path / "u16.ome.zarr", counts, n_levels=2)
    level1 = zarr.open_array(str(path / "1"), mode="r")[...]
    assert level1.dtype == np.uint16
    np.testing.assert_array_equal(level1, np.rint(_mean_2x2_reference(counts)).astype(np.uint16))


def test_ome_zarr_labels_exact_uint64_and_subsampled_levels(tmp_path):
    labels = _labels_volume((4, 301, 257))
    path = save_ome_zarr(tmp_path / "labels.ome.zarr", da.from_array(labels, chunks=(1, 37, 41)), kind="labels",
                         scale=(0.02, 0.005, 0.005), translate=(1.0, 2.0, 3.0), units="mm", n_levels=4,
                         memory_budget_gb=256 * 1024 / 2**30)
    ome = _ome_attrs(path)
    assert "image-label" in ome and ome["multiscales"][0]["type"] == "nearest"
    for k, dataset in enumerate(ome["multiscales"][0]["datasets"]):
        stored = zarr.open_array(str(path / dataset["path"]), mode="r")[...]
        assert stored.dtype == np.uint64
        # Every other pixel: the exact ids, none invented by averaging.
        np.testing.assert_array_equal(stored, labels[:, :: 2**k, :: 2**k])
        level_scale, level_translate = _transforms(dataset)
        assert level_scale == pytest.approx([0.02, 0.005 * 2**k, 0.005 * 2**k])
        assert level_translate == pytest.approx([1.0, 2.0, 3.0])  # pixel j is level-0 pixel j * 2**k
    assert k == 3
    assert {BIG_ID, BIG_ID + 1, 2**64 - 1} <= set(np.unique(zarr.open_array(str(path / "0"))[...]).tolist())
    with pytest.raises(ValueError, match="integer dtype"):
        save_ome_zarr(tmp_path / "bad.ome.zarr", labels.astype(np.float32), kind="labels")
    # Our reader gives it back as a labels layer at the same place.
    from napari_soct._layers import ome_zarr_layers

    (data, kwargs, kind), = ome_zarr_layers(path)
    assert kind == "labels" and "contrast_limits" not in kwargs
    assert kwargs["translate"] == pytest.approx((1.0, 2.0, 3.0)) and kwargs["scale"] == pytest.approx(
        (0.02, 0.005, 0.005))


def test_ome_zarr_multiscale_levels_written_as_given(tmp_path):
    rng = np.random.default_rng(3)
    level0 = rng.random((3, 64, 80)).astype(np.float32)
    level1 = rng.random((3, 32, 40)).astype(np.float32)  # not a reduction we would compute: must be kept as is
    level2 = rng.random((3, 16, 20)).astype(np.float32)
    path = save_ome_zarr(tmp_path / "ms.ome.zarr", [da.from_array(level0, chunks=(1, 30, 30)), level1,
                                                     zarr.array(level2)],
                         scale=(0.1, 0.01, 0.02), translate=(0.0, 5.0, 6.0), units="mm")
    datasets = _ome_attrs(path)["multiscales"][0]["datasets"]
    assert len(datasets) == 3
    for k, expected in enumerate((level0, level1, level2)):
        np.testing.assert_array_equal(zarr.open_array(str(path / str(k)), mode="r")[...], expected)
        level_scale, level_translate = _transforms(datasets[k])
        assert level_scale == pytest.approx([0.1, 0.01 * 2**k, 0.02 * 2**k])
        assert level_translate == pytest.approx([0.0, 5.0, 6.0])
    assert [lv.shape for lv in open_ome_zarr(path).levels] == [(3, 64, 80), (3, 32, 40), (3, 16, 20)]


def test_ome_zarr_rgb_and_axis_rules(tmp_path):
    rng = np.random.default_rng(4)
    rgb = rng.integers(0, 255, size=(40, 50, 3), dtype=np.uint8)
    path = save_ome_zarr(tmp_path / "rgb.ome.zarr", rgb, rgb=True, scale=(0.5, 0.25), units="um", n_levels=1)
    ms = _ome_attrs(path)["multiscales"][0]
    assert [a["name"] for a in ms["axes"]] == ["c", "y", "x"] and ms["axes"][0]["type"] == "channel"
    np.testing.assert_array_equal(zarr.open_array(str(path / "0"), mode="r")[...], np.moveaxis(rgb, -1, 0))
    assert _transforms(ms["datasets"][0])[0] == pytest.approx([1.0, 0.5, 0.25])
    # A custom leading axis is allowed once; six axes are not NGFF 0.5.
    path = save_ome_zarr(tmp_path / "slices.ome.zarr", np.zeros((2, 3, 16, 16), np.float32),
                         axes=("slice", "z", "y", "x"))
    assert [a.get("type") for a in _ome_attrs(path)["multiscales"][0]["axes"]] == [None, "space", "space", "space"]
    with pytest.raises(ValueError, match="save as TIFF"):
        save_ome_zarr(tmp_path / "six.ome.zarr", np.zeros((2,) * 6, np.float32))


def test_ome_zarr_read_by_ome_zarr_py(tmp_path):
    # An independent NGFF reader finds the pyramid, its transformations, and the labels.
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Reader

    image = np.random.default_rng(8).random((2, 520, 530)).astype(np.float32)
    save_ome_zarr(tmp_path / "img.ome.zarr", image, scale=(0.01, 0.002, 0.003), translate=(1, 2, 3), units="mm")
    save_ome_zarr(tmp_path / "lab.ome.zarr", _labels_volume((2, 520, 530)), kind="labels", units="mm")
    [node] = list(Reader(parse_url(str(tmp_path / "img.ome.zarr")))())
    assert [d.shape for d in node.data] == [(2, 520, 530), (2, 260, 265)]
    np.testing.assert_array_equal(np.asarray(node.data[0]), image)
    assert node.metadata["coordinateTransformations"][0] == [
        {"type": "scale", "scale": [0.01, 0.002, 0.003]}, {"type": "translation", "translation": [1.0, 2.0, 3.0]}]
    assert [a["unit"] for a in node.metadata["axes"]] == ["millimeter"] * 3
    [node] = list(Reader(parse_url(str(tmp_path / "lab.ome.zarr")))())
    assert any(isinstance(spec, Label) for spec in node.specs)


def test_existing_outputs_are_refused_kept_or_replaced(tmp_path):
    first, second = np.ones((20, 30), np.float32), np.full((20, 30), 2, np.float32)
    for save, name in ((save_ome_zarr, "a.ome.zarr"), (save_tiff, "a.tif")):
        path = save(tmp_path / name, first)
        with pytest.raises(OutputExistsError, match="already exists"):
            save(path, second)
        save(path, second, if_exists="skip")
        read = (lambda p: zarr.open_array(str(p / "0"))[...]) if name.endswith("zarr") else tifffile.imread
        np.testing.assert_array_equal(read(path), first)  # untouched
        save(path, second, if_exists="overwrite")
        np.testing.assert_array_equal(read(path), second)
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporaries left


# ----------------------------------------------------------------------------------------------- TIFF


@pytest.mark.parametrize("compression, tag", [("none", 1), ("zlib", 8), ("zstd", 50000)])
def test_tiff_round_trip_compression_and_ome_metadata(tmp_path, compression, tag):
    rng = np.random.default_rng(5)
    image = rng.random((4, 70, 90)).astype(np.float32)
    path = save_tiff(tmp_path / "img.tif", da.from_array(image, chunks=(1, 33, 40)), scale=(0.01, 0.002, 0.004),
                     translate=(1.0, 2.0, 3.0), units=("mm", "mm", "mm"), compression=compression, tile=32)
    with tifffile.TiffFile(path) as tif:
        assert tif.is_ome and not tif.is_bigtiff
        assert all(page.compression == tag and page.is_tiled for page in tif.pages)
        np.testing.assert_array_equal(tif.asarray(), image)
        pixels = tifffile.xml2dict(tif.ome_metadata)["OME"]["Image"]["Pixels"]
        assert (pixels["PhysicalSizeX"], pixels["PhysicalSizeY"], pixels["PhysicalSizeZ"]) == (0.004, 0.002, 0.01)
        assert pixels["PhysicalSizeXUnit"] == "mm"
        assert [p["PositionZ"] for p in pixels["Plane"]] == pytest.approx([1.0, 1.01, 1.02, 1.03])
        assert {p["PositionY"] for p in pixels["Plane"]} == {2.0}
        assert tif.pages[0].tags["XResolution"].value == pytest.approx((2500, 1), rel=1e-6)  # px per cm
        # The exact values, in the map annotation (read with ElementTree, not tifffile's converter).
        root = ElementTree.fromstring(tif.ome_metadata)
        record = {m.get("K"): json.loads(m.text) for m in root.iter() if m.tag.endswith("}M")}
        assert record["translate"] == [1.0, 2.0, 3.0] and record["units"] == ["millimeter"] * 3


def test_tiff_labels_uint64_exact_in_shaped_metadata(tmp_path):
    labels = _labels_volume((3, 100, 77))
    path = save_tiff(tmp_path / "labels.tif", labels, scale=(0.02, 0.005, 0.005), units="mm", compression="zstd",
                     axes=("z", "y", "x"))
    with tifffile.TiffFile(path) as tif:
        assert not tif.is_ome  # OME has no 64-bit integers: tifffile's JSON description instead
        assert tif.pages[0].compression == 50000
        stored = tif.asarray()
        meta = tif.shaped_metadata[0]
    assert stored.dtype == np.uint64
    np.testing.assert_array_equal(stored, labels)
    assert meta["scale"] == [0.02, 0.005, 0.005] and meta["units"] == ["millimeter"] * 3
    assert meta["axis_labels"] == ["z", "y", "x"]


def test_tiff_pyramid_levels_in_subifds(tmp_path):
    rng = np.random.default_rng(6)
    levels = [rng.random((2, 64, 96)).astype(np.float32), rng.random((2, 32, 48)).astype(np.float32)]
    path = save_tiff(tmp_path / "pyr.tif", levels, scale=(1.0, 0.01, 0.01), units="mm", tile=16)
    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        assert len(series.levels) == 2
        for level, expected in zip(series.levels, levels):
            np.testing.assert_array_equal(level.asarray(), expected)


def test_bigtiff_decision():
    limit = writers.BIGTIFF_THRESHOLD_BYTES
    assert not tiff_needs_bigtiff(2**20)
    assert tiff_needs_bigtiff(2**32)
    assert tiff_needs_bigtiff(limit)
    # Just under the limit: the tile offsets, page tags and (for compressed data) possible growth count.
    under = limit - 2**20
    assert not tiff_needs_bigtiff(under, n_segments=10, n_pages=1)
    assert tiff_needs_bigtiff(under, n_segments=100_000, n_pages=1)
    assert tiff_needs_bigtiff(under, n_segments=10, n_pages=1, compressed=True)
    assert not tiff_needs_bigtiff(int(limit / 1.02), n_segments=10, n_pages=1, compressed=True)


def test_save_tiff_uses_the_decision(tmp_path, monkeypatch):
    data = np.zeros((64, 64), np.uint16)
    with tifffile.TiffFile(save_tiff(tmp_path / "small.tif", data)) as tif:
        assert not tif.is_bigtiff
    monkeypatch.setattr(writers, "BIGTIFF_THRESHOLD_BYTES", data.nbytes)  # as if 8 KiB were 4 GiB
    with tifffile.TiffFile(save_tiff(tmp_path / "big.tif", data)) as tif:
        assert tif.is_bigtiff
        np.testing.assert_array_equal(tif.asarray(), data)


# ----------------------------------------------------------------------------------------------- memory

_MEMORY_SCRIPT = """
import json, sys, tracemalloc
import dask.array as da, numpy as np
from napari_soct.processing.io.writers import save_ome_zarr, save_tiff

out, budget = sys.argv[1], float(sys.argv[2])
shape, chunks = (8, 1024, 1024), (4, 256, 256)

def fill(block_info=None):
    # value = z * 2**20 + y * 2**10 + x, made in uint32 straight away (the test data cost one chunk)
    (z0, z1), (y0, y1), (x0, x1) = block_info[None]["array-location"]
    u = np.uint32
    z = np.arange(z0, z1, dtype=u)[:, None, None]
    y = np.arange(y0, y1, dtype=u)[None, :, None]
    return (z * u(2**20) + y * u(2**10)) + np.arange(x0, x1, dtype=u)

source = da.map_blocks(fill, dtype=np.uint32, chunks=tuple((c,) * (n // c) for n, c in zip(shape, chunks)))
# Warm-up: lazy imports and codec set-up are not the writers' buffers.
save_ome_zarr(out + "/warm.ome.zarr", source[:, :64, :64], memory_budget_gb=budget)
save_tiff(out + "/warm.tif", source[:, :64, :64], memory_budget_gb=budget)
peaks = {}
for name, write in (("ome_zarr", lambda: save_ome_zarr(out + "/big.ome.zarr", source, memory_budget_gb=budget)),
                    ("tiff", lambda: save_tiff(out + "/big.tif", source, memory_budget_gb=budget))):
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    write()
    peaks[name] = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
print(json.dumps(peaks))
"""


def _lazy_reference(shape):
    z = da.arange(shape[0], dtype=np.uint32, chunks=shape[0])[:, None, None]
    y = da.arange(shape[1], dtype=np.uint32, chunks=256)[None, :, None]
    x = da.arange(shape[2], dtype=np.uint32, chunks=256)
    return z * np.uint32(2**20) + y * np.uint32(2**10) + x


def test_dask_array_larger_than_budget_is_written_block_by_block(tmp_path):
    # 32 MiB of uint32 written under a 4 MiB budget, measured with tracemalloc in a fresh interpreter
    # (threads left by other tests would allocate while it counts).
    budget = 4 * 2**20
    out = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, str(tmp_path), str(budget / 2**30)],
                         check=True, capture_output=True, text=True).stdout
    peaks = json.loads(out.strip().splitlines()[-1])
    nbytes = 8 * 1024 * 1024 * 4
    assert nbytes >= 8 * budget
    print({k: f"{v / 2**20:.2f} MiB" for k, v in peaks.items()})
    assert peaks["ome_zarr"] < budget, f"OME-Zarr writer peak {peaks['ome_zarr'] / 2**20:.2f} MiB"
    assert peaks["tiff"] < budget, f"TIFF writer peak {peaks['tiff'] / 2**20:.2f} MiB"
    # The outputs are right, checked chunk by chunk against an independent lazy construction.
    expected = _lazy_reference((8, 1024, 1024))
    image = open_ome_zarr(tmp_path / "big.ome.zarr")
    assert bool((image.as_dask(0) == expected).all().compute())
    assert image.levels[1].shape == (8, 512, 512)
    np.testing.assert_array_equal(image.levels[1][3, 100:164, 200:264],
                                  np.rint(_mean_2x2_reference(expected[3, 200:328, 400:528].compute())))
    tiff = zarr.open(tifffile.imread(tmp_path / "big.tif", aszarr=True), mode="r")
    assert bool((da.from_zarr(tiff) == expected).all().compute())


# ----------------------------------------------------------------------------------------------- napari glue


def test_compression_from_the_file_name(tmp_path):
    from napari_soct import _writer

    pick = _writer.compression_from_filename
    assert pick("a/brain.zstd.ome.zarr", (".ome.zarr", ".zarr"), writers.OME_ZARR_COMPRESSIONS, "blosc-lz4") == "zstd"
    assert pick("brain.ome.zarr", (".ome.zarr", ".zarr"), writers.OME_ZARR_COMPRESSIONS, "blosc-lz4") == "blosc-lz4"
    assert pick("scan.v2.tif", (".tif", ".tiff"), writers.TIFF_COMPRESSIONS, "zlib") == "zlib"
    assert pick("scan.RAW.TIF", (".tif", ".tiff"), writers.TIFF_COMPRESSIONS, "zlib") == "none"
    data = np.arange(32 * 32, dtype=np.uint16).reshape(32, 32)
    meta = {"name": "x", "scale": [1.0, 1.0], "translate": [0.0, 0.0], "units": ("pixel", "pixel"),
            "axis_labels": ("-2", "-1"), "multiscale": False, "rgb": False}
    [tif] = _writer.write_image_tiff(str(tmp_path / "x.zstd.tif"), data, meta)
    with tifffile.TiffFile(tif) as f:
        assert f.pages[0].compression == 50000
    [folder] = _writer.write_image_ome_zarr(str(tmp_path / "x.none.ome.zarr"), data, meta)
    codecs = json.loads((tmp_path / "x.none.ome.zarr" / "0" / "zarr.json").read_text())["codecs"]
    assert [c["name"] for c in codecs] == ["bytes"]  # no compressor
    [folder] = _writer.write_image_ome_zarr(str(tmp_path / "y"), data, meta)  # the dialog may omit it
    assert folder.endswith("y.ome.zarr")
    with pytest.raises(OutputExistsError, match="does not replace"):
        _writer.write_image_ome_zarr(str(tmp_path / "y.ome.zarr"), data, meta)


@pytest.mark.gui
def test_napari_saves_image_and_labels_layers(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer(show=True)
    rng = np.random.default_rng(7)
    image_data = rng.random((3, 520, 560)).astype(np.float32)  # big enough for two pyramid levels
    image = viewer.add_image(da.from_array(image_data, chunks=(2, 64, 64)), name="scan", scale=(0.01, 0.005, 0.005),
                             translate=(0.5, 1.0, 2.0), units="mm", axis_labels=("z", "y", "x"))
    labels_data = _labels_volume((3, 520, 560))
    labels = viewer.add_labels(labels_data, name="cells", scale=(0.01, 0.005, 0.005), units="mm")

    viewer.layers.selection = {image}
    assert viewer.layers.save(str(tmp_path / "scan.ome.zarr"), selected=True, plugin="napari-soct") == [
        str(tmp_path / "scan.ome.zarr")]
    assert viewer.layers.save(str(tmp_path / "scan.zstd.tif"), selected=True, plugin="napari-soct")
    viewer.layers.selection = {labels}
    assert viewer.layers.save(str(tmp_path / "cells.ome.zarr"), selected=True, plugin="napari-soct")
    assert viewer.layers.save(str(tmp_path / "cells.tif"), selected=True, plugin="napari-soct")
    # Both layers at once: a folder with one OME-Zarr per layer.
    written = viewer.layers.save(str(tmp_path / "both"), plugin="napari-soct")
    assert sorted(written) == [str(tmp_path / "both" / "cells.ome.zarr"), str(tmp_path / "both" / "scan.ome.zarr")]

    # Read back with our reader, in the viewer.
    [scan] = viewer.open(str(tmp_path / "scan.ome.zarr"), plugin="napari-soct")
    assert scan.multiscale and scan.scale == pytest.approx((0.01, 0.005, 0.005))
    np.testing.assert_array_equal(np.asarray(scan.data[0]), image_data)
    assert _transforms(_ome_attrs(tmp_path / "scan.ome.zarr")["multiscales"][0]["datasets"][0])[1] == [0.5, 1.0, 2.0]
    cells = open_ome_zarr(tmp_path / "cells.ome.zarr")
    assert cells.levels[0].dtype == np.uint64
    np.testing.assert_array_equal(cells.levels[0][...], labels_data)
    np.testing.assert_array_equal(cells.levels[1][...], labels_data[:, ::2, ::2])
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "cells.tif"), labels_data)
    with tifffile.TiffFile(tmp_path / "scan.zstd.tif") as tif:
        assert tif.pages[0].compression == 50000
        np.testing.assert_array_equal(tif.asarray(), image_data)
    np.testing.assert_array_equal(open_ome_zarr(tmp_path / "both" / "cells.ome.zarr").levels[0][...], labels_data)

    # A multiscale layer writes its own levels; an existing output is refused with a clear error.
    viewer.layers.selection = {scan}
    viewer.layers.save(str(tmp_path / "again.ome.zarr"), selected=True, plugin="napari-soct")
    again, first = open_ome_zarr(tmp_path / "again.ome.zarr"), open_ome_zarr(tmp_path / "scan.ome.zarr")
    assert len(again.levels) == len(first.levels) > 1
    for a, b in zip(again.levels, first.levels):
        np.testing.assert_array_equal(a[...], b[...])
    with pytest.raises(OutputExistsError, match="already exists"):
        viewer.layers.save(str(tmp_path / "cells.ome.zarr"), selected=True, plugin="napari-soct")

    shot = viewer.screenshot(canvas_only=True, flash=False)
    assert shot[..., :3].astype(float).mean(axis=-1).std() > 5, "screenshot is blank"
