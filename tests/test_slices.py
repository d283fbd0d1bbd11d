"""The per-slice step runner: discovery, outputs, resume, memory-bounded parallelism, errors, cancellation."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass

import numpy as np
import pytest

from napari_soct.processing.io.atomic import OutputExistsError
from napari_soct.processing.io.omezarr import create_ome_zarr_image, open_ome_zarr
from napari_soct.processing.params import param
from napari_soct.processing.progress import Cancelled
from napari_soct.processing.slices import find_slice_files, run_slice_step


@dataclass
class DoubleParams:
    factor: float = param(2.0, "multiplier")
    workers: int = param(2, "parallel slices", min=1)
    memory_budget_gb: float = param(1.0, "budget", min=1e-6)
    if_exists: str = param("error", "existing outputs", choices=("error", "skip", "overwrite"))


def _inputs(folder, ids=(0, 1, 2, 101)):
    folder.mkdir()
    for sid in ids:
        arr = create_ome_zarr_image(folder / f"mosaic_grid_3d_z{sid:02d}.ome.zarr", (2, 4, 4), (1, 1, 1), chunks=(2, 4, 4))
        arr[...] = sid
    (folder / "shifts_xy.csv").write_text("not a slice")
    return folder


def _double(params):
    seen_threads = set()

    def process(in_path, out_tmp, tracker):
        seen_threads.add(threading.get_ident())
        data = open_ome_zarr(in_path).levels[0][...]
        arr = create_ome_zarr_image(out_tmp, data.shape, (1, 1, 1), chunks=data.shape)
        arr[...] = data * params.factor
        return {"mean": float(data.mean())}

    return process, seen_threads


def test_runs_every_slice_and_records_metrics(tmp_path):
    src = _inputs(tmp_path / "in")
    params = DoubleParams()
    process, _ = _double(params)
    calls = []
    result = run_slice_step("double", src, tmp_path / "out", process, params, progress=lambda d, t, m: calls.append((d, t)))
    assert sorted(result.outputs) == [0, 1, 2, 101]
    assert result.outputs[101].name == "slice_z101_double.ome.zarr"
    for sid, path in result.outputs.items():
        assert np.all(open_ome_zarr(path).levels[0][...] == 2 * sid)
    record = json.loads(result.metrics_path.read_text())
    assert record["params"]["factor"] == 2.0 and record["slices"]["101"] == {"mean": 101.0}
    assert sorted(calls)[-1] == (4, 4)


def test_discovery_errors(tmp_path):
    src = _inputs(tmp_path / "in")
    create_ome_zarr_image(src / "slice_z01_stitch.ome.zarr", (1, 1, 1), (1, 1, 1), chunks=(1, 1, 1))
    with pytest.raises(ValueError, match="two files for slice 1"):
        find_slice_files(src)
    with pytest.raises(FileNotFoundError, match="no per-slice"):
        find_slice_files(tmp_path)
    assert find_slice_files(src / "mosaic_grid_3d_z02.ome.zarr") == {2: src / "mosaic_grid_3d_z02.ome.zarr"}


def test_resume_skip_and_refuse(tmp_path):
    src = _inputs(tmp_path / "in")
    process, _ = _double(DoubleParams())
    run_slice_step("double", src, tmp_path / "out", process, DoubleParams())
    with pytest.raises(OutputExistsError, match="slice_z00_double"):
        run_slice_step("double", src, tmp_path / "out", process, DoubleParams())
    (tmp_path / "out" / "slice_z02_double.ome.zarr").rename(tmp_path / "gone")
    result = run_slice_step("double", src, tmp_path / "out", process, DoubleParams(if_exists="skip"))
    assert result.skipped == [0, 1, 101] and list(result.metrics) == [2]


def test_memory_budget_bounds_parallel_slices(tmp_path):
    src = _inputs(tmp_path / "in")
    params = DoubleParams(workers=4, memory_budget_gb=3 / 1024)
    process, _ = _double(params)
    result = run_slice_step("double", src, tmp_path / "out", process, params,
                            memory_per_slice_bytes=lambda p: 1024**2)
    assert result.workers_used == 3
    with pytest.raises(ValueError, match="memory_budget_gb"):
        run_slice_step("double", src, tmp_path / "out2", process, params, memory_per_slice_bytes=lambda p: 1024**3)


def test_failure_and_cancel_leave_no_partial_output(tmp_path):
    src = _inputs(tmp_path / "in")

    def failing(in_path, out_tmp, tracker):
        create_ome_zarr_image(out_tmp, (1, 1, 1), (1, 1, 1), chunks=(1, 1, 1))
        if "z02" in in_path.name:
            raise RuntimeError("broken slice")
        return {}

    with pytest.raises(RuntimeError, match="broken slice"):
        run_slice_step("f", src, tmp_path / "out", failing, DoubleParams(workers=1))
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert not [n for n in names if n.startswith(".")]
    assert "slice_z02_f.ome.zarr" not in names
    cancel = threading.Event()

    def cancelling(in_path, out_tmp, tracker):
        create_ome_zarr_image(out_tmp, (1, 1, 1), (1, 1, 1), chunks=(1, 1, 1))
        cancel.set()
        tracker.advance(1)
        return {}

    with pytest.raises(Cancelled):
        run_slice_step("c", src, tmp_path / "out3", cancelling, DoubleParams(workers=1), cancel=cancel,
                       units_per_slice=lambda p: 1)
    assert not list((tmp_path / "out3").iterdir())
