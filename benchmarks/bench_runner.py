"""Benchmark: the pipeline runner's scaling and per-slice task overhead (issue 5).

Three ways to compute the same per-slice steps (preprocess, illumination, stitch, beam, crop, normalize) of
an acquisition, side by side in one process run, each into a fresh folder:

- ``direct``: the step functions called one after the other with ``workers=1`` (no runner, no dask);
- ``runner 1``: ``run_pipeline`` with its default scheduler, a ``LocalCluster`` it starts with 1 worker process
  (records, one dask task per slice; the cluster's start is counted);
- ``runner 2``: the same with 2 worker processes.

The overhead of the runner is ``runner 1 / direct - 1``; the scaling figure is ``runner 2 / runner 1``. Every
output's checksum is compared across the three (they must be identical).

Usage::

    python benchmarks/bench_runner.py --data bench_data --preset bench --repeats 1
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import shutil
import statistics
import time
from pathlib import Path

import numpy as np

STEPS = ("illumination", "stitch", "beam", "crop", "normalize")


def checksum(folder: Path) -> str:
    from napari_soct.processing.io.omezarr import open_ome_zarr

    h = hashlib.sha256()
    for path in sorted(folder.glob("*.ome.zarr")):
        h.update(np.ascontiguousarray(open_ome_zarr(path).levels[0][...]).tobytes())
    return h.hexdigest()[:16]


def direct(raw: Path, out: Path) -> tuple[float, str]:
    from napari_soct.pipeline.steps import STEPS as REGISTRY

    start = time.perf_counter()
    source = out / "00_preprocess"
    pre = REGISTRY["preprocess"]
    pre.run(raw, source, params=pre.params(workers=1, generate_previews=False))
    for i, name in enumerate(STEPS):
        step = REGISTRY[name]
        target = out / f"{i + 3:02d}_{name}"
        step.run(source, target, params=step.params(workers=1))
        source = target
    return time.perf_counter() - start, checksum(source)


def runner(raw: Path, out: Path, workers: int) -> tuple[float, str]:
    from napari_soct.pipeline.runner import RunParams, run_pipeline
    from napari_soct.processing.preprocess import PreprocessParams

    # The default scheduler: the run starts (and times) its own LocalCluster of `workers` processes.
    start = time.perf_counter()
    run_pipeline(RunParams(raw_dir=str(raw), out_dir=str(out), assemble=False, workers=workers, scheduler="local"),
                 step_params={"preprocess": PreprocessParams(generate_previews=False)})
    return time.perf_counter() - start, checksum(out / "07_normalize")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=Path("bench_data"))
    parser.add_argument("--preset", default="bench")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    from napari_soct.processing.synthetic import make_acquisition

    acq_dir = args.data / f"{args.preset}-seed0"
    if not (acq_dir / ".complete").exists():
        shutil.rmtree(acq_dir, ignore_errors=True)
        make_acquisition(acq_dir, preset=args.preset, seed=0)
        (acq_dir / ".complete").touch()
    raw = acq_dir / "raw"
    work = args.data / f"{args.preset}-runner"
    times: dict[str, list[float]] = {"direct": [], "runner 1": [], "runner 2": []}
    sums: dict[str, set] = {k: set() for k in times}
    load = [os.getloadavg()[0]]
    for _ in range(args.repeats):
        for label in times:
            out = work / label.replace(" ", "")
            shutil.rmtree(out, ignore_errors=True)
            seconds, digest = direct(raw, out) if label == "direct" else runner(raw, out, int(label[-1]))
            times[label].append(seconds)
            sums[label].add(digest)
            load.append(os.getloadavg()[0])
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"## Runner ({args.preset}, {args.repeats} run(s) each, interleaved)\n")
    print(f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
          f"load average {min(load):.1f}-{max(load):.1f} during the run.\n")
    print("| how | median s | runs s | checksum |")
    print("|---|---|---|---|")
    for k, v in times.items():
        print(f"| {k} | {med[k]:.1f} | {', '.join(f'{x:.1f}' for x in v)} | {', '.join(sorted(sums[k]))} |")
    print(f"\nrunner overhead (runner 1 / direct - 1): {100 * (med['runner 1'] / med['direct'] - 1):+.1f} %; "
          f"scaling (runner 2 / runner 1): {med['runner 2'] / med['runner 1']:.2f}x; identical outputs: "
          f"{len(set.union(*sums.values())) == 1}")


if __name__ == "__main__":
    main()
