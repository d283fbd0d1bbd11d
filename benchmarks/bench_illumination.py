"""Benchmark: our BaSiC (illumination correction, step 3) against basicpy 2.0, side by side in one run.

For each phantom preset (``tiny``, ``small``, ``bench``) the same depth planes of slice 0 (all tiles of the
plane: one BaSiC fit each) are fitted by

* ours, ``basic_fit`` plane by plane (cold start: what basicpy does), in this process;
* basicpy 2.0 with its defaults (working size 128, or the tile size when smaller: basicpy would upsample
  small tiles, ours never does), in its own virtual environment (basicpy caps scipy below 1.13, so it cannot
  live in ours): a subprocess reads the same tiles from ``.npy`` files and writes its flat-fields back;

and both flat-fields are compared with the phantom's true vignetting (Pearson correlation). Timings are the
median over planes and runs of one plane's fit, after one untimed warm-up fit on each side; the two are
interleaved plane by plane (basicpy runs as a worker process fed through a pipe) so both see the same load. Then the whole
step (``correct_illumination`` on slice 0: every plane, warm start from plane to plane, batched planes, read
and write included) runs in a fresh process per memory budget (and with ``plane_step=4``) for its throughput, peak memory (VmHWM, imports
included, about 100 MiB) and accuracy over all planes below the cut surface.

Planes that count: those entirely below the true cut surface in every tile (``z >= ceil(deepest surface) +
1``), as in ``tests/test_illumination.py``.

Usage::

    python -m venv /tmp/basicpy-venv && /tmp/basicpy-venv/bin/pip install "basicpy==2.0.*"
    python benchmarks/bench_illumination.py --data bench_data --presets tiny,small,bench

``--basicpy-python`` points at the venv's interpreter; when it does not exist the script tries to build the
venv (``--build-venv``) and reports why if that fails. The ``bench`` acquisition is read from
``bench_data/bench-seed0`` (made by the preprocessing benchmark) and preprocessed once into
``bench_data/bench-seed0-mosaic``; ``tiny`` and ``small`` are made under ``bench_data/illum-<preset>-seed0``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BASICPY_SCRIPT = r'''
# basicpy worker: fits the plane whose index arrives on stdin, answers with the time; "save" writes the flats.
import json, sys, time, warnings
from importlib.metadata import version
import numpy as np
warnings.filterwarnings("ignore")
from basicpy import BaSiC
data = np.load(sys.argv[1])          # (planes, tiles, y, x)
# Its default working size (128), but never above the tiles' size (basicpy would upsample; ours never does).
size = min(128, *data.shape[2:])
BaSiC(get_darkfield=False, working_size=size).fit(data[0])   # warm-up, untimed
flats = np.empty((len(data),) + data.shape[2:], np.float32)
import torch, scipy
print(json.dumps({"ready": True, "version": version("basicpy"), "working_size": size, "torch": torch.__version__,
                  "scipy": scipy.__version__, "threads": torch.get_num_threads()}), flush=True)
for line in sys.stdin:
    if line.strip() == "save":
        np.save(sys.argv[2], flats)
        print(json.dumps({"saved": True}), flush=True)
        break
    p = int(line)
    model = BaSiC(get_darkfield=False, working_size=size)
    t0 = time.perf_counter()
    model.fit(data[p])
    seconds = time.perf_counter() - t0
    flats[p] = np.asarray(model.flatfield, np.float32)
    print(json.dumps({"seconds": seconds}), flush=True)
'''

STEP_SCRIPT = r'''
import json, sys, time
from napari_soct.processing.correct import IlluminationParams, correct_illumination
start = time.perf_counter()
result = correct_illumination(sys.argv[1], sys.argv[2], IlluminationParams(if_exists="overwrite", workers=1,
                              memory_budget_gb=float(sys.argv[3]), plane_step=int(sys.argv[4])))
seconds = time.perf_counter() - start
(sid, metrics), = result.metrics.items()
# VmHWM, not ru_maxrss: the latter keeps the high-water mark of the forked parent across exec.
hwm = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(json.dumps({"seconds": seconds, "max_rss": hwm,
                  "metrics": {k: v for k, v in metrics.items() if k not in ("planes", "tiles")}}))
'''


def _corr(a, b) -> float:
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


def ensure_basicpy(python: Path, build: bool) -> tuple[Path | None, str]:
    """The basicpy interpreter, building the venv when asked; (None, why) when there is none."""
    if python.exists():
        return python, ""
    if not build:
        return None, f"{python} does not exist (run with --build-venv or build it as in the usage)"
    venv = python.parent.parent
    steps = [[sys.executable, "-m", "venv", str(venv)], [str(python), "-m", "pip", "install", "basicpy==2.0.*"]]
    for cmd in steps:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            return None, f"`{' '.join(cmd)}` failed: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}"
    return python, ""


def acquisition_for(preset: str, data: Path):
    """(acquisition with truth, folder of mosaic grids), made or preprocessed once."""
    from napari_soct.processing.preprocess import preprocess_acquisition
    from napari_soct.processing.synthetic import make_acquisition
    from napari_soct.processing.synthetic.acquisition import SyntheticAcquisition

    if preset == "bench":
        root = data / "bench-seed0"
        if not root.exists():
            raise SystemExit(f"{root} is missing: make it with benchmarks/bench_preprocess.py --preset bench")
        acq = SyntheticAcquisition.load(root)
        mosaic = data / "bench-seed0-mosaic"
    else:
        root = data / f"illum-{preset}-seed0"
        acq = SyntheticAcquisition.load(root) if (root / "truth").exists() else make_acquisition(root, preset=preset)
        mosaic = root / "mosaic"
    if not any(mosaic.glob("mosaic_grid_3d_z*.ome.zarr")):
        preprocess_acquisition(acq.raw_dir, mosaic, generate_previews=False, if_exists="skip")
    return acq, mosaic


def tissue_planes(acq, sid) -> list[int]:
    deepest = acq.interface_range_samples(sid)[1]
    return list(range(int(np.ceil(deepest)) + 1, acq.config.n_z))


def bench_preset(preset, data, n_planes, repeats, basicpy_python, basicpy_repeats, budgets, work):
    from napari_soct.processing.correct import basic_fit
    from napari_soct.processing.io.mosaic import open_mosaic_grid

    acq, mosaic = acquisition_for(preset, data)
    sid = acq.slice_ids[0]
    path = next(mosaic.glob(f"mosaic_grid_3d_z{sid:02d}.ome.zarr"))
    grid = open_mosaic_grid(path)
    counted = tissue_planes(acq, sid)
    stride = max(1, len(counted) // n_planes)
    planes = counted[::stride][:n_planes]
    positions = grid.tile_positions()
    start = time.perf_counter()
    tiles = np.stack([grid.read_tile(x, y) for x, y in positions])  # (tiles, z, y, x): the read-once floor
    read_seconds = time.perf_counter() - start
    stack = np.ascontiguousarray(tiles[:, planes].transpose(1, 0, 2, 3))  # (planes, tiles, y, x)
    del tiles
    truth = acq.flatfield
    row = {"preset": preset, "tiles": len(positions), "tile": "x".join(map(str, grid.tile_shape)),
           "planes": len(planes), "counted": f"{counted[0]}-{counted[-1]}"}

    # Ours (in this process) and basicpy (a worker in its venv) fit the same planes, interleaved plane by plane
    # so that both see the same machine load; cold starts, one plane at a time, as basicpy works.
    worker = None
    if basicpy_python is not None:
        tiles_file, flats_file = work / f"{preset}_tiles.npy", work / f"{preset}_basicpy_flats.npy"
        np.save(tiles_file, stack)
        script = work / "basicpy_worker.py"
        script.write_text(BASICPY_SCRIPT)
        worker = subprocess.Popen([str(basicpy_python), str(script), str(tiles_file), str(flats_file)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        ready = worker.stdout.readline()
        if not ready:
            row["basicpy_error"] = worker.stderr.read().strip().splitlines()[-1]
            worker = None
        else:
            row["bp_info"] = json.loads(ready)
    basic_fit(stack[0], backend="numpy")  # warm-up
    ours_times, bp_times, ours = [], [], []
    for r in range(repeats):
        for p in range(len(planes)):
            t0 = time.perf_counter()
            fit = basic_fit(stack[p], backend="numpy")
            ours_times.append(time.perf_counter() - t0)
            if r == 0:
                ours.append(_corr(fit.flatfield, truth))
            if worker is not None and r < basicpy_repeats:
                worker.stdin.write(f"{p}\n")
                worker.stdin.flush()
                bp_times.append(json.loads(worker.stdout.readline())["seconds"])
    row.update(ours_mean=np.mean(ours), ours_min=np.min(ours), ours_s=statistics.median(ours_times))
    if worker is not None:
        worker.stdin.write("save\n")
        worker.stdin.flush()
        worker.stdout.readline()
        worker.wait()
        theirs = [_corr(f, truth) for f in np.load(flats_file)]
        row.update(bp_mean=np.mean(theirs), bp_min=np.min(theirs), bp_s=statistics.median(bp_times))
        tiles_file.unlink(missing_ok=True)

    # The whole step on the slice, fresh process per memory budget: throughput, peak memory, accuracy over all
    # counted planes.
    nbytes = 4 * len(positions) * int(np.prod(grid.tile_shape))
    row["slice_mb"] = nbytes / 1e6
    row["read_s"] = read_seconds
    row["steps"] = []
    for budget, plane_step in budgets:
        out = work / f"{preset}_step"
        proc = subprocess.run([sys.executable, "-c", STEP_SCRIPT, str(path), str(out), str(budget), str(plane_step)],
                              capture_output=True, text=True, check=True)
        step = json.loads(proc.stdout.strip().splitlines()[-1])
        fields = np.load(step["metrics"]["flatfield_path"])
        step_corr = [_corr(fields[z], truth) for z in counted]
        row["steps"].append(dict(
            budget=budget, plane_step=plane_step, mean=np.mean(step_corr), min=np.min(step_corr), seconds=step["seconds"],
            s_plane=step["metrics"]["seconds_fit"] / grid.tile_shape[0], mbs=nbytes / 1e6 / step["seconds"],
            rss=step["max_rss"] / 2**20, estimate=step["metrics"]["memory_estimate_bytes"] / 2**20,
            z_block=step["metrics"]["z_block"], same=np.mean([_corr(fields[z], truth) for z in planes])))
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=Path("bench_data"))
    parser.add_argument("--presets", default="tiny,small,bench")
    parser.add_argument("--planes", type=int, default=8, help="planes compared per preset (spread over depth)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of ours over the planes")
    parser.add_argument("--basicpy-repeats", type=int, default=2, help="runs of basicpy over the planes")
    parser.add_argument("--basicpy-python", type=Path, default=Path("/tmp/basicpy-venv/bin/python"))
    parser.add_argument("--build-venv", action="store_true", help="build the basicpy venv when missing")
    parser.add_argument("--step-runs", default="4:1,0.15:1,4:4",
                        help="runs of the whole step, memory_budget_gb:plane_step, comma separated")
    args = parser.parse_args(argv)

    basicpy_python, why = ensure_basicpy(args.basicpy_python, args.build_venv)
    if basicpy_python is None:
        print(f"basicpy not run: {why}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-illum-") as tmp:
        for preset in args.presets.split(","):
            row = bench_preset(preset, args.data, args.planes, args.repeats, basicpy_python,
                               args.basicpy_repeats, [(float(r.split(":")[0]), int(r.split(":")[1])) for r in args.step_runs.split(",")], Path(tmp))
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "bp_info"}, default=float), flush=True)

    print(f"\nMachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}, numpy {np.__version__}")
    info = next((r["bp_info"] for r in rows if "bp_info" in r), None)
    if info:
        print(f"basicpy {info['version']} (torch {info['torch']}, scipy {info['scipy']}, "
              f"{info['threads']} torch threads)")
    print("\nSame planes, one BaSiC fit per plane (all tiles of the plane), cold start; correlation with the true "
          "vignetting (mean / min over the planes); time: median per plane.\n")
    print("| preset | tiles x (z, y, x) | planes | ours corr mean / min | basicpy corr mean / min | ours s/plane "
          "| basicpy s/plane | speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        bp = (f"{r['bp_mean']:.4f} / {r['bp_min']:.4f}" if "bp_mean" in r else r.get("basicpy_error", "not run"))
        bps = f"{r['bp_s']:.2f}" if "bp_s" in r else "-"
        ratio = f"{r['bp_s'] / r['ours_s']:.1f}x" if "bp_s" in r else "-"
        print(f"| {r['preset']} | {r['tiles']} x {r['tile']} | {r['planes']} | {r['ours_mean']:.4f} / "
              f"{r['ours_min']:.4f} | {bp} | {r['ours_s']:.3f} | {bps} | {ratio} |")
    print("\nThe step on slice 0 (every plane; warm start from plane to plane; read, fit, correct, write), fresh "
          "process per memory budget; 'read once' is reading every tile of the slice once (the floor):\n")
    print("| preset | slice MB | budget GiB | plane_step | z_block | corr mean / min (planes below surface) | corr "
          "mean (the compared planes) | fit s/plane | total s | read once s | MB/s | peak RSS MiB (estimate) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        for st in r["steps"]:
            print(f"| {r['preset']} | {r['slice_mb']:.1f} | {st['budget']:g} | {st['plane_step']} | {st['z_block']} | {st['mean']:.4f} / "
                  f"{st['min']:.4f} | {st['same']:.4f} | {st['s_plane']:.3f} | {st['seconds']:.1f} | "
                  f"{r['read_s']:.1f} | {st['mbs']:.1f} | {st['rss']:.0f} ({st['estimate']:.0f}) |")


if __name__ == "__main__":
    main()
