"""Slice alignment dock widget (issue 9): look at a pair of consecutive slices, correct its transform by hand,
save it into ``pairwise_registration.csv`` and restack. The work is done by
:class:`~napari_soct.processing.stack.manual.AlignmentSession`; this widget only wires controls to it."""

from __future__ import annotations

import threading
import weakref
from pathlib import Path

import napari
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error, show_info
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGridLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from ..processing.params import params_from_mapping
from ..processing.progress import Cancelled
from ..processing.stack.manual import ENHANCEMENTS, OVERLAY_MODES, VIEW_MODES, open_alignment, restack_inputs
from ._step_widget import _ProgressBridge

__all__ = ["SliceAlignmentWidget", "NUDGE_KEYS"]

OVERLAY_LAYER = "alignment: overlay"
#: Key bindings on the viewer: key -> (direction of x, y, rotation, z; "small" or "large" step).
NUDGE_KEYS = {
    "Shift-Left": ((-1, 0, 0, 0), "small"), "Shift-Right": ((1, 0, 0, 0), "small"),
    "Shift-Up": ((0, -1, 0, 0), "small"), "Shift-Down": ((0, 1, 0, 0), "small"),
    "Control-Shift-Left": ((-1, 0, 0, 0), "large"), "Control-Shift-Right": ((1, 0, 0, 0), "large"),
    "Control-Shift-Up": ((0, -1, 0, 0), "large"), "Control-Shift-Down": ((0, 1, 0, 0), "large"),
    "Alt-Left": ((0, 0, -1, 0), "small"), "Alt-Right": ((0, 0, 1, 0), "small"),
    "Alt-Shift-Left": ((0, 0, -1, 0), "large"), "Alt-Shift-Right": ((0, 0, 1, 0), "large"),
    "Shift-PageUp": ((0, 0, 0, -1), "small"), "Shift-PageDown": ((0, 0, 0, 1), "small"),
}


def _spin(decimals: int, low: float, high: float, step: float, value: float = 0.0, tip: str = "") -> QDoubleSpinBox:
    box = QDoubleSpinBox()
    box.setDecimals(decimals)
    box.setRange(low, high)
    box.setSingleStep(step)
    box.setValue(value)
    box.setKeyboardTracking(False)  # one edit (and one undo step) per finished entry, not per digit
    box.setToolTip(tip)
    return box


class SliceAlignmentWidget(QWidget):
    """Dock widget: inspect and correct slice-to-slice transforms, save them as manual rows, restack."""

    def __init__(self, napari_viewer=None):
        super().__init__()
        self.viewer = napari_viewer
        self.session = None
        self.worker = None
        self.restack_result = None
        self.rendering = None  # what is shown: overlay, display images, NCC
        self._syncing = False
        self._bound_keys: list[str] = []
        self._cancel_event = threading.Event()
        self._bridge = _ProgressBridge()
        self._bridge.progressed.connect(self._on_progress)

        self.source_edit = QLineEdit()
        self.source_edit.setPlaceholderText("reconstruction folder, alignment package, or pairwise_registration.csv")
        self.browse_button = QPushButton("...")
        self.common_edit = QLineEdit()
        self.common_edit.setPlaceholderText("10_common (only for a bare pairwise_registration.csv)")
        self.open_button = QPushButton("Open")
        self.pair_combo = QComboBox()
        self.view_combo = QComboBox()
        self.view_combo.addItems(VIEW_MODES)
        self.view_combo.setToolTip("overlap: mean of the planes where the slices meet; aip: average intensity "
                                   "projection; plane: the moving slice's plane j on the fixed plane z + j")
        self.plane_spin = QSpinBox()
        self.plane_spin.setRange(0, 9999)
        self.plane_spin.setToolTip("Plane j of the moving slice (plane view)")
        self.overlay_combo = QComboBox()
        self.overlay_combo.addItems(OVERLAY_MODES)
        self.enhance_combo = QComboBox()
        self.enhance_combo.addItems(ENHANCEMENTS)
        self.enhance_combo.setToolTip("Contrast enhancement for viewing only (the NCC uses the images as they are)")
        self.tx_spin = _spin(3, -1e5, 1e5, 0.5, tip="Translation x of the moving slice (canvas px)")
        self.ty_spin = _spin(3, -1e5, 1e5, 0.5, tip="Translation y of the moving slice (canvas px)")
        self.rotation_spin = _spin(3, -180.0, 180.0, 0.1, tip="Rotation about the pair's centre (degrees)")
        self.z_spin = QSpinBox()
        self.z_spin.setRange(1, 9999)
        self.z_spin.setKeyboardTracking(False)
        self.z_spin.setToolTip("z overlap: plane of the fixed slice where the moving slice's top lies")
        self.small_px = _spin(3, 0.001, 1000.0, 0.25, 1.0, "Small step of Shift+arrows (px)")
        self.large_px = _spin(3, 0.001, 1000.0, 1.0, 5.0, "Large step of Ctrl+Shift+arrows (px)")
        self.small_deg = _spin(3, 0.001, 90.0, 0.05, 0.1, "Small step of Alt+Left/Right (degrees)")
        self.large_deg = _spin(3, 0.001, 90.0, 0.5, 1.0, "Large step of Alt+Shift+Left/Right (degrees)")
        self.ncc_label = QLabel("NCC -")
        self.keys_label = QLabel("keys on the viewer: Shift+arrows move (Ctrl+Shift: large step), Alt+Left/Right "
                                 "rotate (Alt+Shift: large), Shift+PageUp/PageDown z overlap")
        self.keys_label.setWordWrap(True)
        self.undo_button = QPushButton("Undo")
        self.redo_button = QPushButton("Redo")
        self.reset_button = QPushButton("Reset to automatic")
        self.verified_check = QCheckBox("verified")
        self.save_button = QPushButton("Save")
        self.restack_button = QPushButton("Save && restack")
        self.package_edit = QLineEdit()
        self.package_edit.setPlaceholderText("alignment package (.zip or folder) / returned table (.csv)")
        self.export_button = QPushButton("Export package")
        self.import_button = QPushButton("Import transforms")
        self.progress = QProgressBar()
        self.status = QLabel("Open a reconstruction folder (10_common + 12_register) or an alignment package.")
        self.status.setWordWrap(True)

        form = QFormLayout()
        source_row = QHBoxLayout()
        source_row.addWidget(self.source_edit)
        source_row.addWidget(self.browse_button)
        form.addRow("source", source_row)
        form.addRow("slices", self.common_edit)
        form.addRow("", self.open_button)
        form.addRow("pair", self.pair_combo)
        form.addRow("view", self.view_combo)
        form.addRow("plane", self.plane_spin)
        form.addRow("overlay", self.overlay_combo)
        form.addRow("enhance", self.enhance_combo)
        form.addRow("tx (px)", self.tx_spin)
        form.addRow("ty (px)", self.ty_spin)
        form.addRow("rotation (deg)", self.rotation_spin)
        form.addRow("z overlap (plane)", self.z_spin)
        steps = QGridLayout()
        for i, (label, box) in enumerate((("small px", self.small_px), ("large px", self.large_px),
                                          ("small deg", self.small_deg), ("large deg", self.large_deg))):
            steps.addWidget(QLabel(label), i // 2, 2 * (i % 2))
            steps.addWidget(box, i // 2, 2 * (i % 2) + 1)
        form.addRow("steps", steps)
        form.addRow("", self.keys_label)
        form.addRow("", self.ncc_label)
        edit_row = QHBoxLayout()
        for w in (self.undo_button, self.redo_button, self.reset_button, self.verified_check):
            edit_row.addWidget(w)
        save_row = QHBoxLayout()
        save_row.addWidget(self.save_button)
        save_row.addWidget(self.restack_button)
        package_row = QHBoxLayout()
        package_row.addWidget(self.export_button)
        package_row.addWidget(self.import_button)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(edit_row)
        layout.addLayout(save_row)
        layout.addWidget(self.package_edit)
        layout.addLayout(package_row)
        layout.addWidget(self.progress)
        layout.addWidget(self.status)
        layout.addStretch(1)

        self.browse_button.clicked.connect(self._browse)
        self.open_button.clicked.connect(self.open_source)
        self.pair_combo.currentIndexChanged.connect(self._on_pair)
        for combo in (self.view_combo, self.overlay_combo, self.enhance_combo):
            combo.currentIndexChanged.connect(self._on_view)
        self.plane_spin.valueChanged.connect(self._on_view)
        for name, box in (("tx_px", self.tx_spin), ("ty_px", self.ty_spin), ("rotation_deg", self.rotation_spin),
                          ("z_match_plane", self.z_spin)):
            box.valueChanged.connect(lambda value, name=name: self._on_transform_edited(name, value))
        self.undo_button.clicked.connect(self.undo)
        self.redo_button.clicked.connect(self.redo)
        self.reset_button.clicked.connect(self.reset_to_automatic)
        self.verified_check.toggled.connect(self._on_verified)
        self.save_button.clicked.connect(self.save)
        self.restack_button.clicked.connect(self.restack)
        self.export_button.clicked.connect(self.export_package)
        self.import_button.clicked.connect(self.import_transforms)
        self._set_enabled(False)

    # --- opening and choosing
    def _set_enabled(self, on: bool) -> None:
        for w in (self.pair_combo, self.view_combo, self.plane_spin, self.overlay_combo, self.enhance_combo,
                  self.tx_spin, self.ty_spin, self.rotation_spin, self.z_spin, self.undo_button, self.redo_button,
                  self.reset_button, self.verified_check, self.save_button, self.restack_button, self.export_button,
                  self.import_button):
            w.setEnabled(on)

    def _browse(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Reconstruction folder or alignment package")
        if folder:
            self.source_edit.setText(folder)

    def _fail(self, err: Exception) -> None:
        self.status.setText(f"error: {err}")
        show_error(str(err))

    def open_source(self) -> None:
        """Open the folder/package/table named in the source box."""
        try:
            session = open_alignment(self.source_edit.text().strip(),
                                     common_dir=self.common_edit.text().strip() or None)
        except (OSError, ValueError, KeyError) as err:
            self._fail(err)
            return
        self.session = session
        self._syncing = True
        self.pair_combo.clear()
        self.pair_combo.addItems([session.label(k) for k in session.keys])
        self.view_combo.clear()
        self.view_combo.addItems(session.views)
        self._syncing = False
        self._set_enabled(True)
        self.restack_button.setEnabled(session.reconstruction is not None)
        self._bind_keys()
        where = session.reconstruction or session.package or session.table_path
        self.status.setText(f"{len(session.keys)} pair(s) of {where}; table {session.table_path}")
        self._on_pair()

    @property
    def key(self):
        if self.session is None or self.pair_combo.currentIndex() < 0:
            return None
        return self.session.keys[self.pair_combo.currentIndex()]

    def _on_pair(self, *_) -> None:
        if self._syncing or self.key is None:
            return
        self._sync_controls()
        self._refresh()

    def _on_view(self, *_) -> None:
        if not self._syncing and self.key is not None:
            self._refresh()

    # --- editing
    def _sync_controls(self) -> None:
        """Controls from the session's state of the current pair (without recording edits)."""
        s = self.session.state(self.key)
        self._syncing = True
        try:
            self.tx_spin.setValue(s.tx_px)
            self.ty_spin.setValue(s.ty_px)
            self.rotation_spin.setValue(s.rotation_deg)
            self.z_spin.setValue(s.z_match_plane)
            self.verified_check.setChecked(s.verified)
            self.pair_combo.setItemText(self.pair_combo.currentIndex(), self.session.label(self.key))
        finally:
            self._syncing = False
        self.undo_button.setEnabled(self.session.can_undo(self.key))
        self.redo_button.setEnabled(self.session.can_redo(self.key))
        self.reset_button.setEnabled(self.session.automatic.get(self.key) is not None)

    def _on_transform_edited(self, name: str, value) -> None:
        """A spin box was edited: its value replaces that one (the others keep their exact, unrounded values)."""
        if self._syncing or self.key is None:
            return
        try:
            self.session.set_transform(self.key, **{name: value})
        except ValueError as err:
            self._fail(err)
        self._after_edit()

    def nudge(self, dx: int = 0, dy: int = 0, drotation: int = 0, dz: int = 0, size: str = "small") -> None:
        """Move the moving slice by the small or large step (what the bound keys do)."""
        if self.key is None:
            return
        px = (self.small_px if size == "small" else self.large_px).value()
        deg = (self.small_deg if size == "small" else self.large_deg).value()
        try:
            self.session.nudge(self.key, dx_px=dx * px, dy_px=dy * px, drotation_deg=drotation * deg, dz=dz)
        except ValueError as err:
            self._fail(err)
        self._after_edit()

    def undo(self) -> None:
        if self.key is not None:
            self.session.undo(self.key)
            self._after_edit()

    def redo(self) -> None:
        if self.key is not None:
            self.session.redo(self.key)
            self._after_edit()

    def reset_to_automatic(self) -> None:
        if self.key is not None:
            try:
                self.session.reset_to_automatic(self.key)
            except ValueError as err:
                self._fail(err)
            self._after_edit()

    def _on_verified(self, checked: bool) -> None:
        if not self._syncing and self.key is not None:
            self.session.set_verified(self.key, checked)
            self._after_edit()

    def _after_edit(self) -> None:
        self._sync_controls()
        self._refresh()

    # --- view
    def _refresh(self) -> None:
        """Redraw the overlay of the current pair and its NCC."""
        key = self.key
        view = self.view_combo.currentText() or self.session.reference_view
        plane = self.plane_spin.value()
        try:
            shown = self.session.render(key, view, self.overlay_combo.currentText(), plane,
                                        self.enhance_combo.currentText())
            auto = self.session.automatic.get(key)
            auto_ncc = self.session.ncc(key, view, plane, pair=auto) if auto is not None else float("nan")
        except (ValueError, KeyError) as err:
            self._fail(err)
            return
        self.rendering = shown
        self.ncc_label.setText(f"NCC {shown.ncc:.4f}   (automatic {auto_ncc:.4f})")
        if self.viewer is None:
            return
        f = self.session.images.factor
        pixel = self.session.images.pixel_mm
        kwargs = {"scale": tuple(p * f for p in pixel), "translate": tuple(p * (f - 1) / 2 for p in pixel)}
        rgb = shown.overlay.ndim == 3
        layer = self.viewer.layers[OVERLAY_LAYER] if OVERLAY_LAYER in self.viewer.layers else None
        if layer is not None and getattr(layer, "rgb", False) != rgb:
            self.viewer.layers.remove(layer)
            layer = None
        if layer is None:
            limits = None if rgb else ((-1.0, 1.0) if self.overlay_combo.currentText() == "difference" else (0.0, 1.0))
            extra = {"rgb": True} if rgb else {"contrast_limits": limits, "colormap": "PiYG" if limits[0] < 0
                                                else "gray"}
            self.viewer.add_image(shown.overlay, name=OVERLAY_LAYER, units=("mm", "mm"), **kwargs, **extra)
        else:
            layer.data = shown.overlay
            layer.scale, layer.translate = kwargs["scale"], kwargs["translate"]
            if not rgb:
                difference = self.overlay_combo.currentText() == "difference"
                layer.contrast_limits = (-1.0, 1.0) if difference else (0.0, 1.0)
                layer.colormap = "PiYG" if difference else "gray"

    # --- keys
    def _bind_keys(self) -> None:
        if self.viewer is None or self._bound_keys:
            return
        me = weakref.ref(self)

        def make(direction, size):
            def handler(_viewer):
                widget = me()
                if widget is not None and widget.session is not None:
                    widget.nudge(*direction, size=size)
            return handler

        for key, (direction, size) in NUDGE_KEYS.items():
            self.viewer.bind_key(key, make(direction, size), overwrite=True)
            self._bound_keys.append(key)

    def unbind_keys(self) -> None:
        """Remove the nudge keys from the viewer."""
        if self.viewer is not None:
            for key in self._bound_keys:
                self.viewer.bind_key(key, None)
        self._bound_keys = []

    def closeEvent(self, event) -> None:  # noqa: N802 - Qt name
        self.unbind_keys()
        super().closeEvent(event)

    # --- saving, restacking, packages
    def save(self) -> Path | None:
        if self.session is None:
            return None
        try:
            path = self.session.save()
        except (OSError, ValueError) as err:
            self._fail(err)
            return None
        note = f"; notes in {self.session.slice_config}" if self.session.slice_config else ""
        manual = sum(self.session.state(k).manual for k in self.session.keys)
        self.status.setText(f"saved {path} ({manual} pair(s) set by hand){note}")
        self._sync_controls()
        return path

    def restack(self):
        """Save, then run the registered ``stack`` step on the reconstruction in a thread worker."""
        from ..pipeline.steps import get_step

        if self.session is None or self.session.reconstruction is None:
            self._fail(ValueError("restacking needs a reconstruction folder (an alignment package has no slices)"))
            return None
        if self.save() is None:
            return None
        step = get_step("stack")
        try:
            inputs, mapping = restack_inputs(self.session.reconstruction)
            params = params_from_mapping(step.params, mapping)
        except (OSError, ValueError) as err:
            self._fail(err)
            return None
        self._cancel_event.clear()
        emit = self._bridge.progressed.emit
        self.worker = create_worker(
            step.run, *inputs, params=params, progress=lambda d, t, m: emit(d, t, m), cancel=self._cancel_event,
            _start_thread=False,
            _connect={"returned": self._on_restacked, "errored": self._on_restack_error,
                      "finished": self._on_restack_finished},
        )
        self.restack_button.setEnabled(False)
        self.progress.setValue(0)
        self.status.setText(f"restacking into {inputs[2]}...")
        self.worker.start()
        return self.worker

    def _on_progress(self, done: int, total: int, message: str) -> None:
        self.progress.setMaximum(max(total, 1))
        self.progress.setValue(min(done, max(total, 1)))
        self.status.setText(message)

    def _on_restacked(self, result) -> None:
        from .._layers import ome_zarr_layers
        from ..pipeline.steps import get_step

        self.restack_result = result
        self.status.setText(get_step("stack").summary(result).splitlines()[0])
        if self.viewer is not None:
            for data, kwargs, kind in ome_zarr_layers(result.path, "image"):
                if kwargs["name"] in self.viewer.layers:
                    self.viewer.layers.remove(kwargs["name"])
                self.viewer.add_layer(napari.layers.Layer.create(data, kwargs, kind))
        show_info(self.status.text())

    def _on_restack_error(self, err: Exception) -> None:
        if isinstance(err, Cancelled):
            self.status.setText("restack cancelled")
        else:
            self._fail(err)

    def _on_restack_finished(self) -> None:
        self.restack_button.setEnabled(self.session is not None and self.session.reconstruction is not None)

    def export_package(self) -> Path | None:
        """Write an alignment package (AIPs + the current table) to the path in the package box."""
        if self.session is None:
            return None
        text = self.package_edit.text().strip()
        if not text:
            text, _ = QFileDialog.getSaveFileName(self, "Alignment package", "alignment_package.zip", "*.zip")
            if not text:
                return None
        try:
            path = self.session.export_package(text, if_exists="overwrite")
        except (OSError, ValueError) as err:
            self._fail(err)
            return None
        self.status.setText(f"wrote the alignment package {path}")
        return path

    def import_transforms(self) -> list | None:
        """Apply the manual/verified rows of a returned table (path in the package box) as edits."""
        if self.session is None:
            return None
        text = self.package_edit.text().strip()
        if not text:
            text, _ = QFileDialog.getOpenFileName(self, "Returned transforms", "", "*.csv")
            if not text:
                return None
        try:
            keys = self.session.import_table(text)
        except (OSError, ValueError) as err:
            self._fail(err)
            return None
        self._after_edit()
        self.status.setText(f"imported {len(keys)} pair(s) from {text} (save to keep them)")
        return keys
