"""Quality report: the tiny chain's real outputs (steps 0-9, 15, 16) plus hand-made assembly tables in the
contract's format (steps 10-14), with injected faults that must show as warnings/errors with their reasons."""

from __future__ import annotations

import base64
import csv
import json
import os
import shutil
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import imageio.v3 as iio
import numpy as np
import pytest

from napari_soct.pipeline.steps import STEPS
from napari_soct.processing.io.atomic import OutputExistsError
from napari_soct.processing.io.omezarr import create_ome_zarr_image, create_ome_zarr_pyramid, open_ome_zarr
from napari_soct.processing.io.tables import (
    SliceConfigRow,
    read_shifts_xy,
    read_slice_config,
    write_shifts_xy,
    write_slice_config,
)
from napari_soct.processing.preprocess import preprocess_acquisition
from napari_soct.processing.report import ReportParams, generate_report
from napari_soct.processing.stack import (
    AtlasParams,
    BiasFieldParams,
    align_to_atlas,
    assess_quality,
    correct_bias_field,
    detect_rehoming,
)
from napari_soct.processing.stack.transforms import PairTransform, write_pairwise_registration
from napari_soct.processing.synthetic import make_acquisition

#: The in-slice chain as ``napari-soct reconstruct`` runs it by default (resample and curvature are off).
CHAIN = (("illumination", "03_illumination"), ("stitch", "04_stitch"), ("beam", "05_beam"), ("crop", "06_crop"),
         ("normalize", "07_normalize"))
GLITCH_MM = 0.3
BAD_SLICE = 3  # emptied before quality assessment: auto-excluded


class _Page(HTMLParser):
    """Images (with their data- attributes), SVG elements, summary rows and findings rows of a report page."""

    def __init__(self):
        super().__init__()
        self.images, self.svg_tags, self.summary, self.findings, self.links = [], [], {}, [], []
        self._finding = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for key in ("src", "href"):
            if a.get(key):
                self.links.append(a[key])
        if tag == "img":
            self.images.append(a)
        if tag in ("circle", "rect", "path", "polyline", "line", "svg"):
            self.svg_tags.append((tag, a.get("class", "")))
        if tag == "tr" and "data-status" in a:
            self.summary[a["data-step"]] = a["data-status"]
        if tag == "tr" and "data-check" in a:
            self._finding = [a["data-check"], a["data-step"], ""]

    def handle_data(self, data):
        if self._finding is not None:
            self._finding[2] += data

    def handle_endtag(self, tag):
        if tag == "tr" and self._finding is not None:
            self.findings.append(tuple(self._finding))
            self._finding = None


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    page.close()
    return page


def _decode(img: dict) -> np.ndarray:
    src = img["src"]
    assert src.startswith("data:image/png;base64,")
    return iio.imread(base64.b64decode(src.split(",", 1)[1]), extension=".png")


def _assert_aspect(image: np.ndarray, rows_mm: float, cols_mm: float, what: str) -> None:
    """The image's aspect ratio matches the physical extent to within one pixel of rounding."""
    h, w = image.shape[:2]
    expected = rows_mm / cols_mm
    assert h / w == pytest.approx(expected, rel=1.5 / min(h, w) + 0.01), f"{what}: {h}x{w}, expected {expected:.3f}"


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """The tiny chain through step 9 (real outputs), made once for the module."""
    root = tmp_path_factory.mktemp("report")
    acq = make_acquisition(root / "acq", preset="tiny", seed=0, n_slices=5)
    preprocess_acquisition(acq.raw_dir, root / "mosaic")
    rec = root / "rec"
    source = root / "mosaic"
    for name, folder in CHAIN:  # the default in-slice chain, step by step, into numbered folders
        STEPS[name].run(source, rec / folder)
        source = rec / folder
    assess_quality(rec / "07_normalize", root / "mosaic" / "slice_config.csv", rec / "08_quality")
    detect_rehoming(root / "mosaic" / "shifts_xy.csv", rec / "09_rehoming")
    return SimpleNamespace(acq=acq, root=root, mosaic=root / "mosaic", rec=rec)


@pytest.fixture(scope="module")
def faulty(chain):
    """A reconstruction with every step 0-16 and injected faults.

    Steps 1-7: the real folders (linked). Step 7 is copied with slice 3 emptied, so the real quality step
    excludes it. Step 9 runs on shifts with an encoder glitch at slice 2. Steps 10-14 are tables in the
    contract's format, 12 and 14 in folders named otherwise. Steps 15-16 run for real on a small volume.
    """
    out = chain.root / "faulty"
    out.mkdir()
    for folder in ("03_illumination", "04_stitch", "05_beam", "06_crop"):
        os.symlink(chain.rec / folder, out / folder)
    normalize = out / "07_normalize"
    shutil.copytree(chain.rec / "07_normalize", normalize)
    bad = normalize / f"slice_z{BAD_SLICE:02d}_normalize.ome.zarr"
    image = open_ome_zarr(bad)
    arr = create_ome_zarr_image(bad, image.shape, image.scales_mm[0], chunks=image.shape,
                                attributes=image.attributes)
    arr[...] = np.random.default_rng(0).random(image.shape, dtype=np.float32) * 0.01
    quality = assess_quality(normalize, chain.mosaic / "slice_config.csv", out / "08_quality")
    assert quality.excluded == [BAD_SLICE]  # the fault is real before the report sees it

    shifts = read_shifts_xy(chain.mosaic / "shifts_xy.csv")
    shifts[1].x_shift_mm += GLITCH_MM  # slice 2 reported 0.3 mm off: step 1->2 out, step 2->3 back
    shifts[2].x_shift_mm -= GLITCH_MM
    glitched = chain.root / "glitched"
    glitched.mkdir()
    write_shifts_xy(glitched / "shifts_xy.csv", shifts)
    shutil.copy(chain.mosaic / "slice_config.csv", glitched / "slice_config.csv")
    rehoming = detect_rehoming(glitched / "shifts_xy.csv", out / "09_rehoming")
    assert {(d.fixed_id, d.moving_id) for d in rehoming.glitches} == {(1, 2), (2, 3)}

    common = out / "10_common"
    common.mkdir()
    with (common / "common_space.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["slice_id", "offset_y_px", "offset_x_px", "residual_y_px", "residual_x_px", "position_source"])
        for sid in range(5):
            source = {BAD_SLICE: "local_median", 2: "median"}.get(sid, "motor")  # 3 is excluded, 2 is used
            w.writerow([sid, 10 + sid, 12 - 2 * sid, 0.25, -0.1, source])
    metrics = {"step": "common-space", "seconds": 1.25, "params": {}}
    (common / "common_space_metrics.json").write_text(json.dumps(metrics))

    interp = out / "11_interpolate"
    interp.mkdir()
    rows = [SliceConfigRow(slice_id=sid, use=sid != 0) for sid in range(5)]
    rows[BAD_SLICE].auto_excluded = True
    rows[BAD_SLICE].interpolation_failed = True
    rows[BAD_SLICE].interpolation_fallback_reason = "overlap NCC 0.12 < min_overlap_correlation 0.3"
    write_slice_config(interp / "slice_config_final.csv", rows)

    register = out / "pairwise"  # not the numbered name: found by its file
    register.mkdir()
    write_pairwise_registration(register / "pairwise_registration.csv", [
        PairTransform(1, 2, z_match_plane=16, z_match_ncc=0.9, expected_z_plane=15, tx_px=0.8, ty_px=-0.4,
                      rotation_deg=0.3, ncc_before=0.7, ncc_after=0.92, confidence=0.95, status="ok"),
        PairTransform(2, 4, z_match_plane=15, z_match_ncc=0.8, expected_z_plane=15, tx_px=1.5, ty_px=0.5,
                      rotation_deg=-0.2, ncc_before=0.2, ncc_after=0.1, confidence=0.6, status="ok"),
    ])
    exclude = out / "13_exclude"
    exclude.mkdir()
    rows = [SliceConfigRow(slice_id=sid, use=sid != 0) for sid in range(5)]
    rows[4].auto_excluded = True
    rows[4].auto_exclude_reason = "registration cluster: ncc_after 0.10 on pair 2->4"
    write_slice_config(exclude / "slice_config.csv", rows)
    (exclude / "auto_exclude_report.json").write_text(json.dumps({"excluded": [4], "clusters": [[4]]}))

    stack = out / "stacked"  # not the numbered name either
    stack.mkdir()
    with (stack / "z_matches.csv").open("w", newline="") as fh:  # the columns step 14 writes
        w = csv.writer(fh)
        w.writerow(["pair", "fixed_id", "moving_id", "expected", "found", "used", "overlap_planes", "ncc", "outlier",
                    "source", "action"])
        w.writerow(["1-2", 1, 2, 15, 16, 16, 16, 0.91, 0, "registration", "found"])
        w.writerow(["2-4", 2, 4, 15, 7, 15, 17, 0.62, 1, "ncc", "replaced"])  # 8 planes off: an error
    with (stack / "stacking_decisions.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["slice_id", "source", "z0", "fixed_id", "gate", "reason", "confidence", "cumulative_tx_px",
                    "cumulative_ty_px", "capped"])
        w.writerows([[1, "common", 0, -1, "reference", "", "", 0, 0, 0],
                     [2, "common", 16, 1, "full", "", 0.95, 0.8, -0.4, 0],
                     [4, "common", 31, 2, "skip", "confidence 0.10 < 0.3", 0.1, 0.8, -0.4, 0]])
    truth = np.asarray(chain.acq.true_volume[...], dtype=np.float32)
    volume = truth[::2, :96, :150]  # anisotropic on purpose: 20 um planes, 10 um pixels
    scale = (0.02, 0.01, 0.01)
    writer = create_ome_zarr_pyramid(stack / "subject.ome.zarr", volume.shape, scale, chunks=(8, 64, 64), n_levels=2,
                                     attributes={"section_thickness_planes": 8, "slice_z0": {"1": 0, "2": 8}})
    writer.write((slice(None),) * 3, volume)
    bias = correct_bias_field(stack / "subject.ome.zarr", out / "15_bias",
                              BiasFieldParams(mode="global", shrink_factor=4, n_iterations=10, n_fitting_levels=1))
    np.save(chain.root / "template.npy", volume)
    align_to_atlas(stack / "subject.ome.zarr", chain.root / "template.npy", out / "16_atlas",
                   AtlasParams(template_voxel_um=10.0, max_iterations=5, n_resolutions=1))
    return SimpleNamespace(out=out, volume_shape=volume.shape, scale=scale, bias=bias)


def _check_images(page: _Page, slice_files: dict[int, Path], volumes: dict[str, tuple], files: dict[str, Path]):
    """Every embedded PNG decodes, and has the aspect ratio of what it shows (computed from the source)."""
    assert page.images
    for img in page.images:
        image = _decode(img)
        assert image.size and image.std() > 0, img.get("alt")
        if img["data-kind"] == "aip":
            source = open_ome_zarr(slice_files[(img["data-step"], int(img["data-slice"]))])
            _, ny, nx = source.shape
            _assert_aspect(image, ny * source.scales_mm[0][1], nx * source.scales_mm[0][2], img["alt"])
        elif img["data-kind"] == "ortho":
            (nz, ny, nx), (dz, dy, dx) = volumes[img["data-step"]]
            rows, cols = {"xy": (ny * dy, nx * dx), "xz": (nz * dz, nx * dx), "yz": (nz * dz, ny * dy)}[
                img["data-view"]]
            _assert_aspect(image, rows, cols, img["alt"])
        else:
            original = iio.imread(files[img["data-file"]])
            _assert_aspect(image, original.shape[0], original.shape[1], img["alt"])


def test_report_of_the_tiny_chain_lists_every_step_with_its_status(chain):
    result = generate_report(chain.rec)
    assert result.path == chain.rec / "report.html" and result.path.is_file()
    ran = {s.key for s in result.steps if s.ran}
    # The folders the chain wrote, plus preprocessing, 8 and 9.
    assert ran == {name for name, _ in CHAIN} | {"preprocess", "quality", "rehoming"}
    assert {"resample", "curvature"}.isdisjoint(ran)
    not_run = {s.key for s in result.steps if not s.ran}
    assert not_run == {"resample", "curvature", "common-space", "interpolate", "register", "auto-exclude", "stack",
                       "bias", "atlas"}
    assert all(result.step(k).status == "not run" and result.step(k).worst is None for k in not_run)
    assert not [f for f in result.findings if f.step in not_run]  # missing optional steps are no errors
    assert result.mosaic_dir == chain.mosaic  # found through the chain's recorded source

    # Ground truth: the phantom's only fault is one missing tile; no glitch, no re-homing, no poor slice.
    cfg = chain.acq.config
    assert cfg.encoder_glitch_slice is None and cfg.rehoming_slice is None
    (missing_sid, mx, my), = cfg.missing_tiles
    pre = result.step("preprocess")
    assert pre.status == "warning" and pre.worst.check == "missing_tiles"
    assert pre.worst.row == {"slice_id": missing_sid} and f"({mx}, {my})" in pre.worst.message
    stitch = result.step("stitch")  # the missing tile leaves a hole in that slice only
    assert stitch.status == "warning" and {f.row["slice_id"] for f in result.findings if f.step == "stitch"} == {
        missing_sid}
    for key in ran - {"preprocess", "stitch"}:
        assert result.step(key).status == "ok", (key, result.step(key).worst)
    assert result.status == "warning"
    seconds = json.loads((chain.rec / "04_stitch" / "stitch_metrics.json").read_text())["seconds"]
    assert stitch.seconds == pytest.approx(seconds)

    page = _parse(result.path)
    assert page.summary == {s.key: s.status for s in result.steps}
    assert not [u for u in page.links if not (u.startswith("data:image/png;base64,") or u.startswith("#"))]
    assert ("svg", "plot") in page.svg_tags and not [t for t in page.svg_tags if t[1] == "mark-glitch"]
    normalize = open_ome_zarr(next((chain.rec / "07_normalize").glob("*.ome.zarr")))
    slice_files = {("normalize", sid): p for sid, p in
                   ((int(p.name[7:9]), p) for p in (chain.rec / "07_normalize").glob("slice_z*.ome.zarr"))}
    aips = [i for i in page.images if i["data-kind"] == "aip"]
    assert sorted(int(i["data-slice"]) for i in aips) == list(range(5)) and normalize.shape[0] > 1
    _check_images(page, slice_files, {}, {p.name: p for p in (chain.mosaic / "previews").glob("*.png")})


def test_injected_faults_show_as_warnings_and_errors_with_reasons(chain, faulty):
    result = generate_report(faulty.out, params=ReportParams(preview_size_px=128))
    status = {s.key: s.status for s in result.steps}
    assert {k for k, v in status.items() if v == "not run"} == {"resample", "curvature"}
    assert result.step("register").status == "error"
    assert result.status == "error"
    by_check: dict[str, list] = {}
    for f in result.findings:
        by_check.setdefault(f.check, []).append(f)

    # Pair 2 -> 4 has ncc_after 0.1: an error, with the seed's troubleshooting hint next to it.
    (ncc,) = by_check["pair_ncc_after"]
    assert ncc.level == "error" and ncc.row == {"fixed_id": 2, "moving_id": 4} and "0.1" in ncc.message
    assert "check the slice alignment" in ncc.hint
    assert result.step("register").worst.row == {"fixed_id": 2, "moving_id": 4}
    assert "pair_confidence" not in by_check  # 0.6 and 0.95 are fine
    # The slice emptied before the real quality step: auto-excluded, the reason taken from its slice_config.
    reason = {r.slice_id: r.auto_exclude_reason for r in read_slice_config(faulty.out / "08_quality" /
                                                                            "slice_config.csv")}[BAD_SLICE]
    (excluded,) = by_check["quality_auto_excluded"]
    assert excluded.row == {"slice_id": BAD_SLICE} and reason and reason in excluded.message
    assert result.step("quality").status == "error"  # its score is far below 0.3
    assert [f.row for f in by_check["quality_score"]] == [{"slice_id": BAD_SLICE}]
    # The glitch: both steps of the round trip flagged, exactly as the real re-homing step classified them.
    kinds = json.loads((faulty.out / "09_rehoming" / "rehoming_report.json").read_text())["steps"]
    assert sorted((f.row["fixed_id"], f.row["moving_id"]) for f in by_check["glitch"]) == sorted(
        (d["fixed_id"], d["moving_id"]) for d in kinds if d["kind"] == "glitch")
    assert result.step("rehoming").status == "warning"
    # Contract tables of steps 10, 11, 13, 14 (12 and 14 in folders named otherwise).
    assert [f.row for f in by_check["estimated_position"]] == [{"slice_id": 2}]  # excluded slice 3: by design
    assert "min_overlap_correlation" in by_check["interpolation_failed"][0].message
    assert "registration cluster" in by_check["auto_excluded"][0].message
    assert [f.level for f in by_check["z_overlap"]] == ["error"] and by_check["z_overlap"][0].row == {
        "fixed_id": 2, "moving_id": 4}
    (skipped,) = by_check["transform_skipped"]
    assert skipped.row["slice_id"] == 4 and "confidence 0.10 < 0.3" in skipped.message
    assert [f.row["moving_id"] for f in by_check["z_overlap_corrected"]] == [4]
    assert result.step("register").folder.name == "pairwise" and result.step("stack").folder.name == "stacked"
    # Real bias and atlas runs are read (their metrics files), with their seconds.
    bias_seconds = json.loads((faulty.out / "15_bias" / "bias_metrics.json").read_text())["seconds"]
    assert result.step("bias").ran and result.step("bias").seconds == pytest.approx(bias_seconds)
    assert result.step("atlas").ran and result.step("common-space").seconds == pytest.approx(1.25)

    page = _parse(result.path)
    listed = {(c, s) for c, s, _ in page.findings}
    assert ("pair_ncc_after", "register") in listed and ("glitch", "rehoming") in listed
    row = next(text for c, s, text in page.findings if c == "pair_ncc_after")
    assert "pair 2 -> 4" in row and "check the slice alignment" in row  # the hint sits next to the failing check
    glitch_marks = [t for t in page.svg_tags if t[1] == "mark-glitch"]
    assert len(glitch_marks) == 2  # the glitched slice, on the x and the y plot
    slice_files = {(step, sid): p for step, folder in (("normalize", "07_normalize"),) for sid, p in
                   ((int(p.name[7:9]), p) for p in (faulty.out / folder).glob("slice_z*.ome.zarr"))}
    volumes = {"stack": (faulty.volume_shape, faulty.scale), "bias": (faulty.volume_shape, faulty.scale)}
    files = {p.name: p for p in (chain.mosaic / "previews").glob("*.png")}
    files.update({p.name: p for p in (faulty.out / "16_atlas").glob("*.png")})
    _check_images(page, slice_files, volumes, files)
    views = {(i["data-step"], i["data-view"]) for i in page.images if i["data-kind"] == "ortho"}
    assert views == {(s, v) for s in ("stack", "bias") for v in ("xy", "xz", "yz")}
    assert any(i.get("data-file", "").endswith("_ras_preview.png") for i in page.images)


def test_threshold_overrides_change_the_status(chain, faulty, tmp_path):
    params = ReportParams(thresholds="pair_ncc_after=0.05:0.01; pair_ncc_gain=off; z_overlap=10:20; "
                          "z_overlap_spread=10; z_overlap_corrected=off, transform_skipped=off", previews=False)
    result = generate_report(faulty.out, tmp_path / "relaxed.html", params)
    assert result.step("register").status == "ok"
    assert "pair_ncc_after" not in {f.check for f in result.findings}
    assert result.step("stack").status == "ok"
    text = (tmp_path / "relaxed.html").read_text()
    assert "&lt; 0.05 warning, &lt; 0.01 error" in text and "<img" not in text
    stricter = generate_report(faulty.out, tmp_path / "strict.html",
                               ReportParams(thresholds="glitch=error", previews=False))
    assert stricter.step("rehoming").status == "error"
    with pytest.raises(ValueError, match="thresholds.*unknown check 'ncc'"):
        generate_report(faulty.out, tmp_path / "x.html", ReportParams(thresholds="ncc=0.5"))
    with pytest.raises(ValueError, match="thresholds.*numbers"):
        generate_report(faulty.out, tmp_path / "x.html", ReportParams(thresholds="pair_ncc_after=high"))
    assert not (tmp_path / "x.html").exists()


def test_if_exists_text_format_and_cli(chain, tmp_path, capsys):
    from napari_soct.pipeline.cli import main

    path = tmp_path / "r.txt"
    first = generate_report(chain.rec, path, ReportParams(format="text"))
    text = path.read_text()
    assert "overall status: warning" in text and "[warning] preprocess: slice 1" in text
    assert text.count("not run") == 9
    with pytest.raises(OutputExistsError):
        generate_report(chain.rec, path, ReportParams(format="text"))
    path.write_text("kept")
    assert generate_report(chain.rec, path, ReportParams(format="text", if_exists="skip")).skipped
    assert path.read_text() == "kept"
    generate_report(chain.rec, path, ReportParams(format="text", if_exists="overwrite"))
    assert path.read_text().startswith("S-OCT reconstruction report") and first.status == "warning"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # atomic: no temporary left

    out = tmp_path / "cli.html"
    assert main(["report", str(chain.rec), "--output", str(out), "--no-previews", "--quiet"]) == 0
    assert out.is_file() and "report: warning" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "nothing")]) == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no pipeline outputs"):
        generate_report(empty)


def test_mosaic_found_as_a_sibling_and_unreadable_files_reported(chain, tmp_path):
    # A reconstruction folder holding only a quality step; the preprocessing sits next to it.
    root = tmp_path / "subject"
    shutil.copytree(chain.mosaic, root / "mosaic", ignore=shutil.ignore_patterns("*.ome.zarr"))
    shutil.copytree(chain.rec / "08_quality", root / "rec" / "08_quality")
    (root / "rec" / "05_beam").mkdir()  # an interrupted step: its folder without outputs
    (root / "rec" / "06_crop").mkdir()
    (root / "rec" / "06_crop" / "crop_metrics.json").write_text("{not json")
    result = generate_report(root / "rec", params=ReportParams(previews=False))
    assert result.mosaic_dir == root / "mosaic" and result.step("preprocess").ran
    assert result.step("beam").status == "warning" and "05_beam" in result.step("beam").worst.message
    assert result.step("crop").status == "error" and "not valid JSON" in result.step("crop").worst.message
    assert result.step("quality").status == "ok" and result.step("normalize").status == "not run"
    # A second candidate next to it (another subject?) is ambiguous: none is guessed, the parameter decides.
    (root / "other").mkdir()
    shutil.copy(root / "mosaic" / "preprocess_metrics.json", root / "other")
    again = generate_report(root / "rec", params=ReportParams(previews=False, if_exists="overwrite"))
    assert again.mosaic_dir is None and not again.step("preprocess").ran
    assert "give the parameter mosaic_dir" in again.path.read_text()
    chosen = generate_report(root / "rec", params=ReportParams(previews=False, if_exists="overwrite",
                                                               mosaic_dir=str(root / "other")))
    assert chosen.mosaic_dir == root / "other" and chosen.step("preprocess").ran


def test_previews_match_a_reference_and_stream_under_the_budget(tmp_path):
    import tracemalloc

    from skimage.transform import resize

    from napari_soct.processing.report.previews import slice_aip, volume_sections

    shape, scale = (24, 700, 500), (0.01, 0.005, 0.005)  # 34 MB, one level: read in row bands
    yy, xx = np.mgrid[: shape[1], : shape[2]]
    pattern = (np.sin(yy / 40) + np.cos(xx / 25) + 3 + (yy > 400) * (xx < 150)).astype(np.float32)
    volume = pattern * (1 + 0.1 * np.random.default_rng(1).random(shape, dtype=np.float32))
    volume[20:] = 0  # past the imaged depth: no data, left out of the projection
    path = tmp_path / "slice_z00_big.ome.zarr"
    create_ome_zarr_pyramid(path, shape, scale, chunks=(24, 64, 64), n_levels=1).write((slice(None),) * 3, volume)
    budget = 4 * 2**20
    tracemalloc.start()
    aip = slice_aip(path, 128, budget)
    sections = volume_sections(path, 128, budget)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 3 * budget < volume.nbytes / 2, peak

    def agrees(image, reference):
        reference = resize(reference, image.shape, anti_aliasing=True)
        return np.corrcoef(image.ravel().astype(float), reference.ravel())[0, 1]

    assert aip.shape == (128, round(128 * 500 / 700))
    assert agrees(aip, volume[:20].mean(axis=0)) > 0.98
    assert agrees(sections["xy"], volume[12]) > 0.98
    assert agrees(sections["xz"], volume[:, 350, :]) > 0.95 and agrees(sections["yz"], volume[:, :, 250]) > 0.95
    _assert_aspect(sections["xz"], 24 * 0.01, 500 * 0.005, "xz")
    _assert_aspect(sections["yz"], 24 * 0.01, 700 * 0.005, "yz")
