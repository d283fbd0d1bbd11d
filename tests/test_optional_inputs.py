"""Optional step inputs (``Input(..., optional=True)``): declaration rules, the command line's '' / none, and
the widget left empty (offscreen Qt: no viewer needed)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from napari_soct.pipeline.cli import build_parser, main
from napari_soct.pipeline.steps import STEPS, Input
from napari_soct.processing.io.omezarr import create_ome_zarr_image


def test_only_existing_paths_can_be_optional():
    assert Input("table", "a table", "file", optional=True, empty="none: motor-only").placeholder == \
        "(none: motor-only)"
    assert Input("folder", "a folder", "dir", optional=True).placeholder == "(none)"
    assert Input("folder", "a folder", "dir").placeholder == ""
    for mode in ("out_dir", "out_file", "image", "labels", "points"):
        with pytest.raises(ValueError, match=f"optional, not '{mode}'"):
            Input("x", "x", mode, optional=True)
    with pytest.raises(ValueError, match="set optional=True"):
        Input("x", "x", "file", empty="none")
    stack = {i.name: i for i in STEPS["stack"].inputs}
    assert stack["registration_csv"].optional and not stack["common_dir"].optional
    assert not stack["out_dir"].optional


@pytest.mark.parametrize("text, expected", [("", ""), ("none", ""), ("None", ""), ("reg.csv", Path("reg.csv"))])
def test_the_command_line_takes_empty_or_none_for_an_optional_input(text, expected):
    args = build_parser().parse_args(["stack", "common", text, "out"])
    assert args.registration_csv == expected and args.common_dir == Path("common")
    # A required input stays a path (an empty one is the function's to refuse, as before).
    assert build_parser().parse_args(["stack", "", "reg.csv", "out"]).common_dir == Path("")


def _two_slices(folder: Path) -> None:
    rng = np.random.default_rng(0)
    for k in range(2):
        data = np.zeros((12, 40, 44), np.float32)
        data[:8, 4:-4, 4:-4] = 1.0 + rng.random((8, 32, 36), dtype=np.float32)
        soct = {"slice_id": k, "voxel_size_um": [10.0] * 3, "origin_mm": [1.0, 2.0], "canvas_origin_mm": [1.0, 2.0],
                "stage_z_mm": 5.0 + 0.05 * k}
        arr = create_ome_zarr_image(folder / f"slice_z{k:02d}_common.ome.zarr", data.shape, (0.01,) * 3,
                                    chunks=(12, 40, 44), attributes={"soct": soct})
        arr[...] = data


def test_stack_on_the_command_line_without_registration(tmp_path, capsys):
    _two_slices(tmp_path / "10_common")
    assert main(["stack", str(tmp_path / "10_common"), "", str(tmp_path / "14_stack"), "--subject", "s",
                 "--quiet"]) == 0
    with (tmp_path / "14_stack" / "stacking_decisions.csv").open() as fh:
        decisions = list(csv.DictReader(fh))
    assert [(d["gate"], d["reason"]) for d in decisions] == [("reference", ""), ("skip", "no registration")]
    assert (tmp_path / "14_stack" / "s.ome.zarr").is_dir() and "stack:" in capsys.readouterr().out


def test_the_widget_passes_an_empty_optional_input_as_empty_text(qtbot, tmp_path):
    from napari_soct.pipeline.steps import get_step
    from napari_soct.widgets._step_widget import StepWidget

    widget = StepWidget(get_step("stack"))
    registration = widget.input_widgets["registration_csv"]
    assert registration.value is None and registration.line_edit.native.placeholderText() == "(none: motor-only)"
    widget.input_widgets["common_dir"].value = tmp_path
    widget.input_widgets["out_dir"].value = tmp_path / "out"
    assert widget.inputs() == [tmp_path, "", tmp_path / "out"]
    registration.value = tmp_path / "reg.csv"
    assert widget.inputs()[1] == tmp_path / "reg.csv"
    registration.value = None  # emptied again (the line edit's clear button)
    assert widget.inputs()[1] == ""
    # A required input left empty is still refused, naming it.
    widget.input_widgets["common_dir"].line_edit.value = ""
    with pytest.raises(ValueError, match="choose the common dir"):
        widget.inputs()
