"""Benchmark: N4 bias field correction (step 15) of a volume larger than the memory budget.

Side by side in one run, each in a fresh process (peak RSS = VmHWM of that process, and its increase over the
process after imports):

* **ours**: ``correct_bias_field`` (mode global): shrunk copy read block by block, N4 on it, field interpolated
  and applied block by block into a multiscale OME-Zarr, under ``--budget-gb``;
* **SimpleITK, whole volume** (the usual recipe): the whole volume in memory, ``BinShrink`` by the same factors,
  the same N4 settings, ``GetLogBiasFieldAsImage`` evaluated on the full-resolution image, divided, written as a
  one-level OME-Zarr.

Input: the ``bench`` phantom's true volume (``bench_data/bench-seed0``, 195 x 348 x 348 float32 = 94 MB) times a
smooth injected field (a factor of about 0.5 to 1.8). Accuracy: std over tissue of ``log(corrected / true)``,
relative to the std of the injected log field (1 = nothing removed, 0 = all).

Usage::

    python benchmarks/bench_bias.py --data bench_data/bench-seed0 --repeats 3

Prints a Markdown table (medians over repeats).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np

WORKER = r"""
import json, sys, time
args = json.loads(sys.argv[1])
import numpy as np
import SimpleITK as sitk
from napari_soct.processing.io.omezarr import create_ome_zarr_image, open_ome_zarr
from napari_soct.processing.stack.bias import BiasFieldParams, correct_bias_field

def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

base = hwm()
out = args["out"]
t0, c0 = time.perf_counter(), time.process_time()
if args["method"] == "ours":
    params = BiasFieldParams(mode="global", shrink_factor=args["shrink"], max_fit_voxels=args["max_fit"],
                             n_iterations=args["iterations"], n_fitting_levels=args["levels"], workers=args["workers"],
                             memory_budget_gb=args["budget"])
    result = correct_bias_field(args["volume"], out, params)
    factors, path = list(result.shrink_factors), str(result.path)
    n4_seconds = result.report["seconds_n4"]
else:
    image = open_ome_zarr(args["volume"])
    array = image.levels[0][...]
    full = sitk.GetImageFromArray(array)
    full.SetSpacing([float(s) for s in image.scales_mm[0][::-1]])
    factors = args["factors"]
    small = sitk.BinShrink(full, [int(f) for f in factors[::-1]])
    mask = sitk.Cast(small > 0, sitk.sitkUInt8)
    n4 = sitk.N4BiasFieldCorrectionImageFilter()
    n4.SetNumberOfThreads(args["workers"])
    n4.SetMaximumNumberOfIterations([args["iterations"]] * args["levels"])
    t1 = time.perf_counter()
    n4.Execute(small, mask)
    n4_seconds = time.perf_counter() - t1
    log_field = sitk.GetArrayFromImage(n4.GetLogBiasFieldAsImage(full))
    corrected = array / np.exp(log_field)
    path = out + "/sitk_corrected.ome.zarr"
    arr = create_ome_zarr_image(path, corrected.shape, image.scales_mm[0], chunks=(32, 128, 128))
    arr[...] = corrected
seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
print(json.dumps({"seconds": seconds, "cpu": cpu, "n4_seconds": n4_seconds, "peak": hwm(), "base": base, "path": path,
                  "factors": factors}))
"""


def make_input(data: Path, work: Path) -> tuple[Path, Path]:
    """The bench truth volume times a smooth field, as an OME-Zarr; returns it and the saved truth (.npy)."""
    from napari_soct.processing.io.omezarr import create_ome_zarr_pyramid
    from napari_soct.processing.synthetic import SyntheticAcquisition

    volume, truth_path = work / "biased.ome.zarr", work / "truth.npy"
    if volume.exists() and truth_path.exists():
        return volume, truth_path
    acq = SyntheticAcquisition.load(data)
    truth = np.asarray(acq.true_volume[...], dtype=np.float32)
    np.save(truth_path, truth)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n, dtype=np.float32) for n in truth.shape], indexing="ij")
    log_bias = 0.35 * x - 0.25 * y + 0.2 * z + 0.2 * np.cos(1.5 * x + 0.5 * y)
    np.save(work / "log_bias.npy", log_bias)
    scale = tuple(v * 1e-3 for v in acq.true_volume_voxel_size_um)
    writer = create_ome_zarr_pyramid(volume, truth.shape, scale, chunks=(32, 128, 128), n_levels=1)
    writer.write((slice(None),) * 3, truth * np.exp(log_bias))
    return volume, truth_path


def run(method: str, args, volume: Path, out: Path, factors=None) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    job = {"method": method, "volume": str(volume), "out": str(out), "shrink": args.shrink, "max_fit": args.max_fit,
           "iterations": args.iterations, "levels": args.levels, "workers": args.workers, "budget": args.budget_gb,
           "factors": factors}
    done = subprocess.run([sys.executable, "-c", WORKER, json.dumps(job)], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def residual(path: str, truth: np.ndarray, log_bias: np.ndarray, tissue: np.ndarray) -> float:
    from napari_soct.processing.io.omezarr import open_ome_zarr

    corrected = open_ome_zarr(path).levels[0][...]
    return float(np.log(corrected[tissue] / truth[tissue]).std() / log_bias[tissue].std())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("bench_data/bench-seed0"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_bias"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget-gb", type=float, default=0.05)
    parser.add_argument("--shrink", type=int, default=4)
    parser.add_argument("--max-fit", type=int, default=100_000)
    parser.add_argument("--iterations", type=int, default=25)
    parser.add_argument("--levels", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    from skimage.filters import threshold_otsu

    args.work.mkdir(parents=True, exist_ok=True)
    volume, truth_path = make_input(args.data, args.work)
    truth = np.load(truth_path)
    log_bias = np.load(args.work / "log_bias.npy")
    tissue = truth > threshold_otsu(truth)
    rows = {"ours": [], "sitk": []}
    factors = None
    for _ in range(args.repeats):
        ours = run("ours", args, volume, args.work / "ours")
        factors = ours["factors"]
        ours["residual"] = residual(ours["path"], truth, log_bias, tissue)
        rows["ours"].append(ours)
        ref = run("sitk", args, volume, args.work / "sitk", factors)
        ref["residual"] = residual(ref["path"], truth, log_bias, tissue)
        rows["sitk"].append(ref)
    mb = truth.nbytes / 1e6
    print(f"Volume {'x'.join(map(str, truth.shape))} float32 ({mb:.0f} MB), budget {args.budget_gb * 1024:.0f} MiB, "
          f"N4 on shrink {tuple(factors)} ({args.levels} levels x {args.iterations} iterations), "
          f"{args.workers} SimpleITK threads, {args.repeats} runs each, medians; {platform.processor() or 'cpu'}, "
          f"{os.cpu_count()} cores\n")
    print("| method | wall (s) | CPU (s) | N4 wall (s) | MB/s | peak RSS (MiB) | RSS over imports (MiB) | "
          "residual / injected |")
    print("|---|---|---|---|---|---|---|---|")
    med = {}
    for name, label in (("ours", "ours (streamed)"), ("sitk", "SimpleITK whole volume")):
        r = rows[name]
        m = {k: statistics.median(x[k] for x in r) for k in ("seconds", "cpu", "n4_seconds", "peak", "base",
                                                               "residual")}
        med[name] = m
        print(f"| {label} | {m['seconds']:.1f} | {m['cpu']:.1f} | {m['n4_seconds']:.1f} | {mb / m['seconds']:.1f} | "
              f"{m['peak'] / 2**20:.0f} | {(m['peak'] - m['base']) / 2**20:.0f} | {m['residual']:.3f} |")
    print(f"\nratios ours / SimpleITK: wall {med['ours']['seconds'] / med['sitk']['seconds']:.2f}, "
          f"CPU {med['ours']['cpu'] / med['sitk']['cpu']:.2f}, "
          f"RSS over imports {(med['ours']['peak'] - med['ours']['base']) / (med['sitk']['peak'] - med['sitk']['base']):.2f}")


if __name__ == "__main__":
    main()
