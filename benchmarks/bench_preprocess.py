"""Benchmark: raw tile reading and mosaic grid creation on a synthetic acquisition.

Measures, side by side in one run:

* raw read throughput (MB/s of raw ``.bin`` bytes): our reader (repeat averaging, galvo roll, crop, (z, y, x)
  layout, finite check) against plain ``numpy.fromfile`` of the same files, the physical limit;
* mosaic grid creation (``preprocess_acquisition``) throughput and peak memory (max RSS of a fresh process,
  and its increase over the process after imports), with 1 and 2 workers and a memory budget.

Usage::

    python benchmarks/bench_preprocess.py --preset bench --data bench_data --repeats 3

The acquisition is made once under ``--data`` (kept for later runs). Results are printed as a Markdown table.
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
import time
from pathlib import Path

import numpy as np

MB = 1e6


def _drop_caches() -> bool:
    """Drop the page cache when allowed (root on bare metal), so reads come from disk."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def bench_read(raw_dir: Path, repeats: int, cold: bool) -> dict:
    from napari_soct.processing.io.rawtiles import open_raw_acquisition
    from napari_soct.processing.preprocess.mosaic import galvo_decision_for_slice

    acq = open_raw_acquisition(raw_dir)
    tiles = [t for sid in acq.slice_ids for t in acq.tiles[sid].values()]
    shifts = {sid: galvo_decision_for_slice(acq, sid).shift for sid in acq.slice_ids}
    total = sum(t.info.expected_bytes for t in tiles)

    def numpy_fromfile():
        for t in tiles:
            for f in t.bin_files:
                np.fromfile(f, dtype="<f4")

    def ours():
        for t in tiles:
            t.read(shifts[t.z])

    times = {"numpy.fromfile": [], "napari-soct reader": []}
    for _ in range(repeats):
        for name, fn in (("numpy.fromfile", numpy_fromfile), ("napari-soct reader", ours)):
            if cold:
                _drop_caches()
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {"bytes": total, "n_tiles": len(tiles), "times": times}


_PREPROCESS_CHILD = r"""
import json, resource, sys, time
from napari_soct.processing.preprocess import preprocess_acquisition
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
raw, out, workers, budget = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
start = time.perf_counter()
r = preprocess_acquisition(raw, out, workers=workers, memory_budget_gb=budget, generate_previews=True)
elapsed = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": elapsed, "peak_rss_kb": peak, "base_rss_kb": base, "workers_used": r.workers_used,
                  "estimate_bytes": r.peak_memory_estimate_bytes}))
"""


def bench_preprocess(raw_dir: Path, scratch: Path, workers: int, budget_gb: float, cold: bool) -> dict:
    out = scratch / f"pre_w{workers}"
    shutil.rmtree(out, ignore_errors=True)
    if cold:
        _drop_caches()
    proc = subprocess.run(
        [sys.executable, "-c", _PREPROCESS_CHILD, str(raw_dir), str(out), str(workers), str(budget_gb)],
        check=True, capture_output=True, text=True,
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["output_bytes"] = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    shutil.rmtree(out, ignore_errors=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="bench")
    parser.add_argument("--data", type=Path, default=Path("bench_data"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget-gb", type=float, default=4.0)
    args = parser.parse_args()

    from napari_soct.processing.synthetic import SyntheticAcquisition, make_acquisition

    acq_dir = args.data / f"{args.preset}-seed0"
    if (acq_dir / ".complete").exists():
        acq = SyntheticAcquisition.load(acq_dir)
    else:
        shutil.rmtree(acq_dir, ignore_errors=True)
        t0 = time.perf_counter()
        acq = make_acquisition(acq_dir, preset=args.preset, seed=0)
        (acq_dir / ".complete").touch()
        print(f"made {args.preset} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    cold = _drop_caches()

    # Preprocessing first: a child process inherits its parent's peak RSS, so the parent stays small until then.
    pre = {w: [bench_preprocess(acq.raw_dir, args.data, w, args.budget_gb, cold) for _ in range(args.repeats)]
           for w in (1, 2)}
    read = bench_read(acq.raw_dir, args.repeats, cold)
    size_mb = read["bytes"] / MB

    print(f"## Preprocessing benchmark ({args.preset} preset, {size_mb / 1e3:.2f} GB raw, {read['n_tiles']} tiles)\n")
    print(f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"numpy {np.__version__}; page cache {'dropped before each run' if cold else 'warm (could not drop)'}; "
          f"median of {args.repeats} runs.\n")
    print("| what | median s | MB/s (raw bytes) | ratio to numpy.fromfile |")
    print("|---|---|---|---|")
    ref = statistics.median(read["times"]["numpy.fromfile"])
    for name, times in read["times"].items():
        med = statistics.median(times)
        print(f"| read all tiles: {name} | {med:.2f} | {size_mb / med:.0f} | {med / ref:.2f}x time |")
    for w, runs in pre.items():
        med = statistics.median(r["seconds"] for r in runs)
        peak = max(r["peak_rss_kb"] for r in runs) / 1024
        base = max(r["base_rss_kb"] for r in runs) / 1024
        est = runs[0]["estimate_bytes"] / 2**20
        print(f"| preprocess, workers={w} (used {runs[0]['workers_used']}), budget {args.budget_gb} GiB | "
              f"{med:.2f} | {size_mb / med:.0f} | {med / ref:.2f}x time; peak RSS {peak:.0f} MiB "
              f"({peak - base:.0f} MiB over imports; estimate {est:.0f} MiB) |")


if __name__ == "__main__":
    main()
