"""Benchmark: stacking (step 14) of a few-GB stack of common-space slices under a memory budget.

Side by side in one run, each in a fresh process (imports before the clock; peak RSS = that process's VmHWM):

* **read once** (a floor): every input slice read once, chunk row by chunk row, and nothing else;
* **write once** (a floor): level 0 of the output's shape written once (slice data, same chunks and compression),
  no pyramid;
* **stack, motor only**: ``stack_slices`` without a registration (z overlaps by NCC; every slice placed by whole
  pixels, so no resampling), all pyramid levels written in the same pass;
* **stack, registered**: with a ``pairwise_registration.csv`` giving every pair a small rotation and a sub-pixel
  translation (every slice resampled, the slow path) and the registration's z matches.

Input (made once under ``--work``): slices cut from the ``bench`` phantom's true volume (195 x 348 x 348 at
7 x 5 x 5 um, ``bench_data/bench-seed0``) tiled ``--tile`` x ``--tile`` laterally: slice k = true planes
``28 k + p`` for ``p < 40`` (cuts of 196 um), zeros down to 48 planes, painted on one canvas with a margin,
``stage_z_mm`` 0.196 mm apart, written as step 10 writes them (OME-Zarr, chunks 16 x 256 x 256, blosc-lz4, a
pyramid halving y and x).

Usage::

    python benchmarks/bench_stacking.py --data bench_data/bench-seed0 --repeats 3

Prints a Markdown table (medians over repeats). Throughput = input bytes (all slices) / wall seconds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np

T, P, NZ, MARGIN = 28, 40, 48, 8

WORKER = r"""
import json, sys, time
args = json.loads(sys.argv[1])
import numpy as np
from napari_soct.processing.io.omezarr import open_ome_zarr
from napari_soct.processing.slices import find_slice_files
from napari_soct.processing.stack.stacking import StackParams, stack_slices

def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

base = hwm()
t0, c0 = time.perf_counter(), time.process_time()
info = {}
if args["method"] == "read":
    total = 0.0
    for sid, path in find_slice_files(args["common"]).items():
        arr = open_ome_zarr(path).levels[0]
        for z in range(0, arr.shape[0], arr.chunks[0]):
            total += float(np.asarray(arr[z:z + arr.chunks[0]]).sum(dtype=np.float64))
elif args["method"] == "write":
    from napari_soct.processing.io.omezarr import create_ome_zarr_image
    first = open_ome_zarr(next(iter(find_slice_files(args["common"]).values()))).levels[0]
    block = np.asarray(first[:16], dtype=np.float32)  # real slice data, so it compresses like the stack
    shape = args["out_shape"]
    arr = create_ome_zarr_image(args["out"] + "/copy.ome.zarr", tuple(shape), (0.01,) * 3, chunks=(16, 256, 256))
    for z in range(0, shape[0], 16):
        n = min(16, shape[0] - z)
        arr[z:z + n] = block[:n, :shape[1], :shape[2]]
else:
    result = stack_slices(args["common"], args["registration"], args["out"],
                          StackParams(workers=args["workers"], memory_budget_gb=args["budget"], if_exists="overwrite"))
    info = {"shape": list(result.shape), "slab": result.slab_planes, "levels": [list(v) for v in result.voxel_sizes_um],
            "z0": result.slice_z0}
seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
print(json.dumps({"seconds": seconds, "cpu": cpu, "peak": hwm(), "base": base, **info}))
"""


def make_inputs(data: Path, work: Path, tile: int) -> tuple[Path, Path, int]:
    """Common-space slices from the bench truth, and a registration with small rotations and sub-pixel shifts."""
    from napari_soct.processing.io.omezarr import create_ome_zarr_pyramid, pyramid_level_count
    from napari_soct.processing.stack.transforms import PairTransform, write_pairwise_registration
    from napari_soct.processing.synthetic import SyntheticAcquisition

    common, registration = work / f"common_tile{tile}", work / f"pairwise_registration_tile{tile}.csv"
    acq = SyntheticAcquisition.load(data)
    truth = acq.true_volume
    n_slices = (truth.shape[0] - P) // T + 1
    canvas = (truth.shape[1] * tile + 2 * MARGIN, truth.shape[2] * tile + 2 * MARGIN)
    if not common.exists():
        tmp = work / f".common_tile{tile}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        voxel = list(acq.true_volume_voxel_size_um)
        origin = [float(acq.volume_origin_mm[0]), float(acq.volume_origin_mm[1])]
        for k in range(n_slices):
            planes = np.asarray(truth[k * T:k * T + P], dtype=np.float32)
            soct = {"slice_id": k, "voxel_size_um": voxel, "origin_mm": origin, "canvas_origin_mm": origin,
                    "stage_z_mm": round(5.0 + k * T * voxel[0] / 1000, 6)}
            # As step 10 writes them: a pyramid halving y and x (for viewing; the stacker surveys a coarse level).
            writer = create_ome_zarr_pyramid(tmp / f"slice_z{k:02d}_common.ome.zarr", (NZ, *canvas),
                                             tuple(v * 1e-3 for v in voxel), chunks=(16, 256, 256),
                                             n_levels=pyramid_level_count(canvas), attributes={"soct": soct})
            for z in range(0, NZ, 16):
                block = np.zeros((16, *canvas), np.float32)
                part = planes[z:z + 16]
                if len(part):
                    block[:len(part), MARGIN:-MARGIN, MARGIN:-MARGIN] = np.tile(part, (1, tile, tile))
                writer.write((slice(z, z + 16), slice(None), slice(None)), block)
        tmp.rename(common)
    rng = np.random.default_rng(0)
    centre = ((canvas[1] - 1) / 2, (canvas[0] - 1) / 2)
    write_pairwise_registration(registration, [
        PairTransform(k, k + 1, z_match_plane=T, z_match_ncc=0.9, expected_z_plane=T,
                      tx_px=float(rng.uniform(-1.5, 1.5)), ty_px=float(rng.uniform(-1.5, 1.5)),
                      rotation_deg=float(rng.uniform(-0.4, 0.4)), center_x_px=centre[0], center_y_px=centre[1],
                      confidence=0.9) for k in range(n_slices - 1)], if_exists="overwrite")
    return common, registration, n_slices


def run(method: str, args, common: Path, registration: str, out_shape=None) -> dict:
    out = args.work / f"out_{method}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    job = {"method": method, "common": str(common), "registration": registration, "out": str(out),
           "workers": args.workers, "budget": args.budget_gb, "out_shape": out_shape}
    done = subprocess.run([sys.executable, "-c", WORKER, json.dumps(job)], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("bench_data/bench-seed0"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_stacking"))
    parser.add_argument("--tile", type=int, default=4, help="lateral tiling of the truth (canvas side)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget-gb", type=float, default=1.0)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    common, registration, n_slices = make_inputs(args.data, args.work, args.tile)
    from napari_soct.processing.io.omezarr import open_ome_zarr
    from napari_soct.processing.slices import find_slice_files

    files = find_slice_files(common)
    first = open_ome_zarr(next(iter(files.values()))).levels[0]
    in_bytes = 4 * sum(math.prod(open_ome_zarr(p).levels[0].shape) for p in files.values())
    methods = (("read", "read the inputs once (floor)", ""),
               ("write", "write level 0 once (floor: same shape, chunks, compression)", ""),
               ("motor", "stack, motor only", ""),
               ("registered", "stack, registered (resampled)", str(registration)))
    rows = {m: [] for m, _, _ in methods}
    shape = None
    for _ in range(args.repeats):
        for method, _, reg in methods:
            if method == "write" and shape is None:
                shape = run("motor", args, common, "")["shape"]
            rows[method].append(run(method, args, common, reg, shape))
    shape = rows["motor"][0]["shape"]
    out_bytes = 4 * math.prod(shape)
    load = os.getloadavg()
    print(f"{n_slices} slices of {'x'.join(map(str, first.shape))} float32 ({in_bytes / 1e9:.2f} GB in), stacked into "
          f"{'x'.join(map(str, shape))} ({out_bytes / 1e9:.2f} GB level 0) + levels "
          f"{[tuple(round(v, 1) for v in lv) for lv in rows['motor'][0]['levels']]} um; budget "
          f"{args.budget_gb:g} GiB (slabs of {rows['motor'][0]['slab']} planes), {args.workers} workers, "
          f"{args.repeats} runs each, medians; {platform.machine()}, {os.cpu_count()} cores, load average "
          f"{load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f} after the runs\n")
    print("| method | wall (s) | CPU (s) | input MB/s | peak RSS (MiB) | RSS over imports (MiB) |")
    print("|---|---|---|---|---|---|")
    med = {}
    for method, label, _ in methods:
        m = {k: statistics.median(r[k] for r in rows[method]) for k in ("seconds", "cpu", "peak", "base")}
        med[method] = m
        print(f"| {label} | {m['seconds']:.1f} | {m['cpu']:.1f} | {in_bytes / 1e6 / m['seconds']:.0f} | "
              f"{m['peak'] / 2**20:.0f} | {(m['peak'] - m['base']) / 2**20:.0f} |")
    floor = {k: med["read"][k] + med["write"][k] for k in ("seconds", "cpu")}
    for method in ("motor", "registered"):
        print(f"\n{method}: wall {med[method]['seconds'] / med['read']['seconds']:.2f} x reading once, "
              f"{med[method]['seconds'] / floor['seconds']:.2f} x reading + writing once; CPU "
              f"{med[method]['cpu'] / med['read']['cpu']:.2f} x reading, {med[method]['cpu'] / floor['cpu']:.2f} x "
              "reading + writing")


if __name__ == "__main__":
    main()
