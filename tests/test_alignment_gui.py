"""GUI test of the slice alignment widget (issue 9) on a phantom reconstruction (real viewer, under Xvfb).

The phantom goes through the chain (preprocess, steps 1-7, then the registered common-space, register and stack
steps); one pair's registration row is overwritten with a wrong transform; the known correction is applied
through the widget's controls (bound keys and spin boxes), saved, restacked through the widget, and the pair's
placement in the stacked volume is measured against the phantom's true volume."""

from __future__ import annotations

import math
import shutil
from dataclasses import replace

import numpy as np
import pytest
from scipy.ndimage import map_coordinates
from scipy.optimize import minimize

from napari_soct.pipeline.steps import STEPS
from napari_soct.processing.io.omezarr import open_ome_zarr
from napari_soct.processing.io.tables import read_slice_config
from napari_soct.processing.params import params_from_mapping
from napari_soct.processing.stack.manual import open_alignment, restack_inputs
from napari_soct.processing.stack.transforms import read_pairwise_registration, write_pairwise_registration

napari = pytest.importorskip("napari")
from qtpy.QtCore import Qt  # noqa: E402

PAIR = (2, 3)  # the pair misregistered on purpose
ERROR = {"tx_px": 4.0, "ty_px": -3.0, "rotation_deg": 2.5}  # what is added to its automatic transform
PROBE_PLANE = 7  # a slice's own plane where its placement is measured (the stack keeps the lower slice, blend none)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    from napari_soct.pipeline.reconstruct import ReconstructParams, reconstruct
    from napari_soct.processing.preprocess import preprocess_acquisition
    from napari_soct.processing.synthetic import make_acquisition

    root = tmp_path_factory.mktemp("alignment_phantom")
    acq = make_acquisition(root / "acq", preset="tiny", seed=0, n_slices=5)
    preprocess_acquisition(acq.raw_dir, root / "mosaic")
    rec = root / "rec"
    reconstruct(root / "mosaic", rec, ReconstructParams(assemble=False))
    config = str(root / "mosaic" / "slice_config.csv")
    STEPS["common-space"].run(rec / "07_normalize", root / "mosaic" / "shifts_xy.csv", rec / "10_common",
                              params=STEPS["common-space"].params(slice_config=config))
    STEPS["register"].run(rec / "10_common", rec / "12_register", params=STEPS["register"].params(slice_config=config))
    stacked = STEPS["stack"].run(rec / "10_common", rec / "12_register" / "pairwise_registration.csv",
                                 rec / "14_stack", params=STEPS["stack"].params(blend="none", slice_config=config))
    return acq, rec, np.asarray(acq.true_volume[...], dtype=np.float32), stacked


# --- placement against the truth --------------------------------------------------------------------------------
def _rigid(tx, ty, theta_deg, centre):
    th = math.radians(theta_deg)
    r = np.array([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]])
    m = np.eye(3)
    m[:2, :2] = r
    m[:2, 2] = centre - r @ centre + (tx, ty)
    return m


def slice_placements(result, acq, truth, pad=12):
    """Per slice, the rigid map ``Q`` (3x3 on (x, y, 1)) with ``stacked(p) = truth(Q^-1 p)`` on its own plane
    PROBE_PLANE, fitted by maximising the Pearson correlation (whole-pixel search, then Nelder-Mead), and the
    slice's data mask. The truth frame: stacked pixel (0, 0) is truth voxel (canvas_origin_mm - FOV/2 -
    volume_origin_mm) / pixel_mm (docs/contributing.md); slice k's plane p is the truth's plane k T + p."""
    volume = open_ome_zarr(result.path).levels[0]
    offset = ((np.array(result.canvas_origin_mm) - np.array(acq.fov_mm[::-1]) / 2 - np.array(acq.volume_origin_mm))
              / np.array(acq.pixel_mm))
    assert np.allclose(offset, np.round(offset), atol=1e-6), offset
    oy, ox = np.round(offset).astype(int)
    t_planes = round(acq.config.slice_thickness_um / acq.true_volume_voxel_size_um[0])
    out = {}
    for sid, z0 in result.slice_z0.items():
        plane = np.asarray(volume[z0 + PROBE_PLANE], dtype=np.float64)
        source = truth[sid * t_planes + PROBE_PLANE]
        ny, nx = plane.shape
        big = np.zeros((ny + 2 * pad, nx + 2 * pad))
        rows, cols = np.arange(-pad, ny + pad) + oy, np.arange(-pad, nx + pad) + ox
        in_rows, in_cols = (rows >= 0) & (rows < source.shape[0]), (cols >= 0) & (cols < source.shape[1])
        big[np.ix_(in_rows, in_cols)] = source[np.ix_(rows[in_rows], cols[in_cols])]
        mask = plane > 0
        yy, xx = np.nonzero(mask)
        points = np.stack([xx, yy, np.ones_like(xx)]).astype(float)
        values = plane[mask]
        centre = np.array([(nx - 1) / 2, (ny - 1) / 2])

        def cost(v):
            src = np.linalg.inv(_rigid(*v, centre)) @ points
            sampled = map_coordinates(big, [src[1] + pad, src[0] + pad], order=1, mode="constant")
            ok = sampled > 0
            return -np.corrcoef(sampled[ok], values[ok])[0, 1]

        start = min(((dx, dy) for dy in range(-8, 9) for dx in range(-8, 9)), key=lambda d: cost((*d, 0.0)))
        simplex = [[*start, 0.0], [start[0] + 0.5, start[1], 0.0], [start[0], start[1] + 0.5, 0.0], [*start, 1.0]]
        fit = minimize(cost, [*start, 0.0], method="Nelder-Mead",
                       options={"xatol": 1e-3, "fatol": 1e-8, "initial_simplex": simplex})
        assert -fit.fun > 0.85, (sid, fit)  # the slice really matches the truth there
        out[sid] = (_rigid(*fit.x, centre), mask)
    return out


def pair_error_px(placements, pair) -> float:
    """Largest displacement (px) of the moving slice relative to the fixed one, over the corners of their data."""
    (qa, ma), (qb, mb) = placements[pair[0]], placements[pair[1]]
    yy, xx = np.nonzero(ma | mb)
    corners = np.array([[x, y, 1.0] for x in (xx.min(), xx.max()) for y in (yy.min(), yy.max())]).T
    return float(np.hypot(*((qb @ corners) - (qa @ corners))[:2]).max())


# --- the widget -------------------------------------------------------------------------------------------------
def test_alignment_widget_corrects_a_misregistered_pair(make_napari_viewer, qtbot, phantom, tmp_path):
    acq, built, truth, automatic_stack = phantom
    rec = tmp_path / "rec"
    shutil.copytree(built, rec)
    table = rec / "12_register" / "pairwise_registration.csv"
    automatic = {(p.fixed_id, p.moving_id): p for p in read_pairwise_registration(table)}
    assert PAIR in automatic and automatic[PAIR].status == "ok"
    error_auto = pair_error_px(slice_placements(automatic_stack, acq, truth), PAIR)

    # Misregister the pair (an automatic-looking row) and stack it with the registered step: the "before".
    auto = automatic[PAIR]
    wrong = replace(auto, tx_px=auto.tx_px + ERROR["tx_px"], ty_px=auto.ty_px + ERROR["ty_px"],
                    rotation_deg=auto.rotation_deg + ERROR["rotation_deg"])
    write_pairwise_registration(table, [wrong if k == PAIR else p for k, p in automatic.items()], if_exists="overwrite")
    step = STEPS["stack"]
    inputs, mapping = restack_inputs(rec)
    assert mapping["blend"] == "none"  # the last stacking's parameters are reused
    before = step.run(*inputs, params=params_from_mapping(step.params, mapping))
    error_before = pair_error_px(slice_placements(before, acq, truth), PAIR)

    viewer = make_napari_viewer(show=True)
    _, widget = viewer.window.add_plugin_dock_widget("napari-soct", "Slice alignment (manual transforms)")
    widget.source_edit.setText(str(rec))
    widget.open_button.click()
    assert widget.session is not None, widget.status.text()
    keys = widget.session.keys
    widget.pair_combo.setCurrentIndex(keys.index(PAIR))
    assert widget.key == PAIR and widget.tx_spin.value() == pytest.approx(wrong.tx_px, abs=1e-3)
    layer = viewer.layers["alignment: overlay"]
    assert layer.rgb and layer.data.shape[:2] == widget.session.images.shape
    for view, overlay, enhance in (("plane", "checkerboard", "clahe"), ("aip", "difference", "sharpen"),
                                   ("overlap", "two-colour", "none")):
        widget.view_combo.setCurrentText(view)
        widget.overlay_combo.setCurrentText(overlay)
        widget.enhance_combo.setCurrentText(enhance)
        assert viewer.layers["alignment: overlay"].rgb == (overlay == "two-colour")
    ncc_wrong = widget.rendering.ncc
    start = widget.session.state(PAIR)
    states = [start]

    # The known correction, through the controls: x by the bound keys (4 small steps of 1 px), y in its spin
    # box, the rotation by keys (2 large steps of 1 degree and 1 small step of 0.5 degree).
    canvas = viewer.window._qt_viewer.canvas.native
    widget.small_px.setValue(1.0)
    widget.small_deg.setValue(0.5)
    widget.large_deg.setValue(1.0)
    for _ in range(4):
        qtbot.keyClick(canvas, Qt.Key_Left, Qt.ShiftModifier)
        states.append(widget.session.state(PAIR))
    widget.ty_spin.setValue(widget.ty_spin.value() - ERROR["ty_px"])
    states.append(widget.session.state(PAIR))
    for modifiers in (Qt.AltModifier | Qt.ShiftModifier, Qt.AltModifier | Qt.ShiftModifier, Qt.AltModifier):
        qtbot.keyClick(canvas, Qt.Key_Left, modifiers)
        states.append(widget.session.state(PAIR))
    corrected = widget.session.state(PAIR)
    assert len(set(states)) == len(states) == 9  # every key press and the spin box made one edit
    assert corrected.tx_px == pytest.approx(auto.tx_px, abs=1e-6)  # the CSV keeps 9 digits
    assert corrected.ty_px == pytest.approx(auto.ty_px, abs=1e-3)  # the spin box shows 3 decimals
    assert corrected.rotation_deg == pytest.approx(auto.rotation_deg, abs=1e-6)
    assert corrected.manual and widget.tx_spin.value() == pytest.approx(auto.tx_px, abs=1e-3)
    assert widget.rendering.ncc > ncc_wrong + 0.05

    # Undo / redo round-trip exactly, through the buttons.
    for expected in reversed(states[:-1]):
        widget.undo_button.click()
        assert widget.session.state(PAIR) == expected
    assert not widget.undo_button.isEnabled() and widget.rendering.ncc == pytest.approx(ncc_wrong, abs=1e-12)
    for expected in states[1:]:
        widget.redo_button.click()
        assert widget.session.state(PAIR) == expected
    assert not widget.redo_button.isEnabled()

    # Verified, save and restack through the widget (a worker: the main thread stays free).
    widget.verified_check.setChecked(True)
    widget.restack_button.click()
    assert widget.worker is not None
    qtbot.waitUntil(lambda: widget.restack_result is not None and widget.restack_button.isEnabled(), timeout=60_000)
    assert not widget.status.text().startswith("error"), widget.status.text()
    saved = {(p.fixed_id, p.moving_id): p for p in read_pairwise_registration(table)}
    assert saved[PAIR].manual and saved[PAIR].verified and saved[PAIR].confidence == 1.0
    assert not any(p.manual for k, p in saved.items() if k != PAIR)
    notes = {r.slice_id: r.notes for r in read_slice_config(mapping["slice_config"])}
    assert "manual alignment 2->3" in notes[3]
    decision = next(d for d in widget.restack_result.decisions if d.slice_id == PAIR[1])
    assert decision.manual and decision.gate == "full" and decision.reason == "manual"
    error_after = pair_error_px(slice_placements(widget.restack_result, acq, truth), PAIR)
    print(f"\npair {PAIR[0]}->{PAIR[1]} placement error against the truth: automatic {error_auto:.2f} px, "
          f"misregistered {error_before:.2f} px, corrected in the widget {error_after:.2f} px; NCC "
          f"{ncc_wrong:.4f} -> {widget.rendering.ncc:.4f}")
    assert error_before > 5.0
    assert error_after < 1.0
    volume = viewer.layers[open_ome_zarr(widget.restack_result.path).name or widget.restack_result.path.name]
    assert volume.data is not None
    viewer.layers.remove(volume)  # look at the overlay
    gray = viewer.screenshot(canvas_only=True, flash=False)[..., :3].mean(axis=-1)
    assert gray.std() > 5

    # Alignment package: export through the widget, align on "the laptop" (the package), import the table back.
    package = tmp_path / "pairs.zip"
    widget.package_edit.setText(str(package))
    assert widget.export_button.isEnabled()
    widget.export_button.click()
    assert package.is_file(), widget.status.text()
    widget.source_edit.setText(str(package))
    widget.open_button.click()
    assert widget.session.package == package and widget.session.views == ("aip",)
    assert not widget.restack_button.isEnabled()
    widget.pair_combo.setCurrentIndex(keys.index((1, 2)))
    widget.verified_check.setChecked(True)
    widget.pair_combo.setCurrentIndex(keys.index(PAIR))
    assert widget.session.state(PAIR) == replace(corrected, verified=True)
    widget.save_button.click()
    returned = widget.session.table_path
    assert returned.is_file() and returned.parent == tmp_path
    widget.source_edit.setText(str(rec))
    widget.open_button.click()
    assert not widget.session.state((1, 2)).verified
    widget.package_edit.setText(str(returned))
    widget.import_button.click()
    assert widget.session.state((1, 2)).verified and widget.session.state(PAIR) == replace(corrected, verified=True)
    assert open_alignment(rec).state((1, 2)).verified is False  # imported, not yet saved
    widget.unbind_keys()
