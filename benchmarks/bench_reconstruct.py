"""Benchmark: every step of the in-slice chain on a synthetic acquisition, against reading the raw data once.

For each step (run in a fresh process, so its peak RSS is its own): wall time, throughput in MB/s of the
step's input (float32 voxels), peak RSS. The chain's total is compared with reading every raw tile once
(``RawTile.read``, the same reader the preprocessing uses), the issue's yardstick (<= 3x).

Usage::

    python benchmarks/bench_reconstruct.py --preset bench --data bench_data
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

MB = 1e6

_CHILD = r"""
import json, resource, sys, time
from napari_soct.pipeline import STEPS
step, source, out, budget, workers = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]), int(sys.argv[5])
s = STEPS[step]
params = s.params(memory_budget_gb=budget, workers=workers) if step != "preprocess" else s.params(
    memory_budget_gb=budget, workers=workers, generate_previews=False)
start = time.perf_counter()
s.run(source, out, params=params)
print(json.dumps({"seconds": time.perf_counter() - start,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def _input_bytes(path: Path) -> int:
    from napari_soct.processing.io.omezarr import open_ome_zarr
    from napari_soct.processing.slices import find_slice_files

    total = 0
    for p in find_slice_files(path).values():
        arr = open_ome_zarr(p).levels[0]
        total += arr.size * arr.dtype.itemsize
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="bench")
    parser.add_argument("--data", type=Path, default=Path("bench_data"))
    parser.add_argument("--budget-gb", type=float, default=4.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", default="curvature,illumination,stitch,beam,crop,normalize")
    args = parser.parse_args()

    from napari_soct.processing.io.rawtiles import open_raw_acquisition
    from napari_soct.processing.synthetic import SyntheticAcquisition, make_acquisition

    acq_dir = args.data / f"{args.preset}-seed0"
    if not (acq_dir / ".complete").exists():
        shutil.rmtree(acq_dir, ignore_errors=True)
        make_acquisition(acq_dir, preset=args.preset, seed=0)
        (acq_dir / ".complete").touch()
    acq = SyntheticAcquisition.load(acq_dir)
    work = args.data / f"{args.preset}-chain"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)

    raw = open_raw_acquisition(acq.raw_dir)
    start = time.perf_counter()
    for sid in raw.slice_ids:
        for tile in raw.tiles[sid].values():
            tile.read()
    read_seconds = time.perf_counter() - start
    raw_mb = raw.nbytes_raw() / MB

    rows = []
    source = acq.raw_dir
    for step in ["preprocess", *args.steps.split(",")]:
        out = work / step
        in_mb = raw_mb if step == "preprocess" else _input_bytes(source) / MB
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD, step, str(source), str(out), str(args.budget_gb), str(args.workers)],
            check=True, capture_output=True, text=True,
        )
        record = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append((step, in_mb, record["seconds"], record["peak_rss_mb"]))
        source = out

    chain_seconds = sum(r[2] for r in rows if r[0] != "preprocess")
    print(f"## In-slice chain ({args.preset} preset, {raw_mb / 1e3:.2f} GB raw, {len(raw.slice_ids)} slices)\n")
    print(f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; workers="
          f"{args.workers}, memory budget {args.budget_gb} GiB per step; one run.\n")
    print("| step | input MB | seconds | MB/s | peak RSS MiB |")
    print("|---|---|---|---|---|")
    print(f"| read raw tiles once (yardstick) | {raw_mb:.0f} | {read_seconds:.1f} | {raw_mb / read_seconds:.0f} | |")
    for step, in_mb, seconds, peak in rows:
        print(f"| {step} | {in_mb:.0f} | {seconds:.1f} | {in_mb / seconds:.0f} | {peak:.0f} |")
    print(f"\nChain after preprocessing: {chain_seconds:.1f} s = {chain_seconds / read_seconds:.2f}x reading the raw "
          f"data once; with preprocessing {(chain_seconds + rows[0][2]) / read_seconds:.2f}x.")


if __name__ == "__main__":
    main()
