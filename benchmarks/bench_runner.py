"""Benchmark: the pipeline runner's scaling and per-slice task overhead (issue 5).

Three ways to compute the same per-slice steps (preprocess, illumination, stitch, beam, crop, normalize) of
an acquisition, side by side in one process run, each into a fresh folder:

- ``direct``: the step functions called one after the other with ``workers=1`` (no runner, no dask), in a fresh
  process on one core like a worker (:data:`napari_soct.pipeline.runner.ONE_CORE_ENVIRON`: BLAS, OpenMP, numba and
  zarr's codec threads single-threaded);
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
import json
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


def _direct_steps(raw: Path, out: Path, queue) -> None:
    from napari_soct.pipeline.steps import STEPS as REGISTRY

    seconds = {}
    start = time.perf_counter()
    source = out / "00_preprocess"
    pre = REGISTRY["preprocess"]
    pre.run(raw, source, params=pre.params(workers=1, generate_previews=False))
    seconds["preprocess"] = time.perf_counter() - start
    for i, name in enumerate(STEPS):
        step = REGISTRY[name]
        target = out / f"{i + 3:02d}_{name}"
        t0 = time.perf_counter()
        step.run(source, target, params=step.params(workers=1))
        seconds[name] = time.perf_counter() - t0
        source = target
    queue.put((time.perf_counter() - start, seconds))


def direct(raw: Path, out: Path) -> tuple[float, str, dict]:
    """The steps in a fresh process with the environment of one worker (one core)."""
    import multiprocessing

    from napari_soct.pipeline.runner import ONE_CORE_ENVIRON

    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    saved = {k: os.environ.get(k) for k in ONE_CORE_ENVIRON}
    os.environ.update(ONE_CORE_ENVIRON)  # inherited by the spawned child before it imports anything
    try:
        child = ctx.Process(target=_direct_steps, args=(raw, out, queue))
        child.start()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    seconds, per_step = queue.get()
    child.join()
    if child.exitcode:
        raise RuntimeError(f"direct run failed (exit code {child.exitcode})")
    return seconds, checksum(out / f"{len(STEPS) + 2:02d}_{STEPS[-1]}"), per_step


def runner(raw: Path, out: Path, workers: int) -> tuple[float, str, dict]:
    from napari_soct.pipeline.runner import RunParams, run_pipeline
    from napari_soct.processing.preprocess import PreprocessParams

    # The default scheduler: the run starts (and times) its own LocalCluster of `workers` processes.
    start = time.perf_counter()
    run_pipeline(RunParams(raw_dir=str(raw), out_dir=str(out), assemble=False, workers=workers, scheduler="local"),
                 step_params={"preprocess": PreprocessParams(generate_previews=False)})
    seconds = time.perf_counter() - start
    per_step = {name: json.loads((out / ".soct" / f"{name}.json").read_text())["seconds"]
                for name in ("preprocess", *STEPS)}
    return seconds, checksum(out / "07_normalize"), per_step


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
    steps: dict[str, dict[str, list[float]]] = {k: {} for k in times}
    load = [os.getloadavg()[0]]
    for _ in range(args.repeats):
        for label in times:
            out = work / label.replace(" ", "")
            shutil.rmtree(out, ignore_errors=True)
            seconds, digest, per_step = direct(raw, out) if label == "direct" else runner(raw, out, int(label[-1]))
            print(f"{label}: {seconds:.1f} s", {k: round(v, 1) for k, v in per_step.items()}, flush=True)
            times[label].append(seconds)
            for name, value in per_step.items():
                steps[label].setdefault(name, []).append(value)
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
    print("\nPer step (median s; the runner's from its records):\n")
    print("| step | " + " | ".join(times) + " | 2 workers / 1 |")
    print("|---|" + "---|" * (len(times) + 1))
    for name in ("preprocess", *STEPS):
        m = {k: statistics.median(steps[k][name]) for k in times}
        print(f"| {name} | " + " | ".join(f"{m[k]:.1f}" for k in times) + f" | {m['runner 2'] / m['runner 1']:.2f} |")
    print(f"\nrunner overhead (runner 1 / direct - 1): {100 * (med['runner 1'] / med['direct'] - 1):+.1f} %; "
          f"scaling (runner 2 / runner 1): {med['runner 2'] / med['runner 1']:.2f}x; identical outputs: "
          f"{len(set.union(*sums.values())) == 1}")


if __name__ == "__main__":
    main()
