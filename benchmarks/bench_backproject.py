"""Benchmark: backprojection of a straightened volume, ours (pull) against a scatter baseline, and peak memory.

Measures, side by side in one process:

* **speed**: the backprojection of one straightened volume into its minimum bounding box, in memory, by

  - ours: :func:`napari_soct.processing.backproject.pull.pull_block` (each swept voxel pulls a trilinear
    interpolation from the straightened volume);
  - the baseline: the approach Ouroboros describes, written here from its documentation: per bounding box of
    128 consecutive slices, scatter every slice pixel into the box with trilinear weights using
    ``numpy.add.at`` (weights and weighted values), divide by the weights, then copy the boxes' non-zero
    voxels into the output;

  reported as output voxels per second (same output box for both), medians of ``--repeats`` interleaved runs,
  with the mean absolute error of each against the analytic volume the slices were sampled from;
* **end to end**: our backproject step (straightened TIFF in, zstd TIFF out) against the whole described
  pipeline (box volumes saved as TIFFs, then the output assembled chunk by chunk from their non-zero voxels);
* **memory**: the complete backproject step (TIFF + OME-Zarr outputs) in a fresh process with an output ten
  times its memory budget: peak resident memory (``ru_maxrss``) and its increase over the process after
  imports.

Usage::

    python benchmarks/bench_backproject.py --repeats 3

Results are printed as Markdown tables.
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


def _field(z, y, x):
    """A smooth test volume (analytic, so both methods can be checked)."""
    return (np.sin(z / 9.0) + np.cos(y / 7.0) + np.sin(x / 11.0) + 0.002 * x).astype(np.float32)


def make_case(length: int, size: int, seed: int = 0):
    """Slices along a curved 3D path (voxel units): geometry, straightened volume, output box."""
    from napari_soct.processing.backproject.geometry import SliceGeometry, sample_path, slice_rects_from_frames

    t = np.linspace(0, 1, 9)
    rng = np.random.default_rng(seed)
    points = np.stack([length * 0.35 * t + 12 * np.sin(3 * t), 60 + length * 0.25 * np.sin(2.5 * t),
                       60 + length * 0.8 * t], axis=1) + rng.normal(0, 0.5, (len(t), 3))
    samples = sample_path(points, 1.0)
    rects = slice_rects_from_frames(samples, size, size, 1.0, (1.0, 1.0, 1.0))
    geometry = SliceGeometry.from_rects(rects, size, size)
    g = geometry
    rows = np.arange(size, dtype=np.float32)
    stack = np.empty((g.n_slices, size, size), np.float32)
    for i in range(g.n_slices):
        o, dv, du = g.origins[i + 1], g.row_steps[i + 1], g.column_steps[i + 1]
        p = o[:, None, None] + dv[:, None, None] * rows[None, :, None] + du[:, None, None] * rows[None, None, :]
        stack[i] = _field(*p)
    lo, hi = geometry.swept_bounds()
    return rects, geometry, stack, lo, hi


def ours(geometry, stack, lo, hi, mode="intensity", workers=1, out=None):
    from napari_soct.processing.backproject.pull import plan_slabs, pull_block

    if out is None:
        out = np.zeros(tuple(hi - lo), np.float32 if mode == "intensity" else stack.dtype)
    else:
        out.fill(0)
    plan = plan_slabs(geometry)
    swept = pull_block(plan, out, lo, lambda a, b: stack[a:b], mode=mode, workers=workers)
    return out, swept


def scatter_baseline(rects_xyz, stack, lo, hi, slices_per_box=128, out=None):
    """Ouroboros's described approach: per box, trilinear scatter with numpy.add.at, normalise, merge."""
    n, height, width = stack.shape
    if out is None:
        out = np.zeros(tuple(hi - lo), np.float32)
    else:
        out.fill(0)
    zyx = rects_xyz[..., ::-1]
    rows = np.arange(height, dtype=np.float32)[None, :, None, None]
    cols = np.arange(width, dtype=np.float32)[None, None, :, None]
    for start in range(0, n, slices_per_box):
        r = zyx[start : start + slices_per_box]
        o = r[:, 0]
        du, dv = (r[:, 1] - o) / (width - 1), (r[:, 3] - o) / (height - 1)
        points = (o[:, None, None, :] + cols * du[:, None, None, :] + rows * dv[:, None, None, :]).astype(np.float32)
        points = points.reshape(-1, 3)
        values = stack[start : start + slices_per_box].reshape(-1)
        box_lo = np.floor(points.min(axis=0)).astype(np.int64)
        box_shape = np.floor(points.max(axis=0)).astype(np.int64) + 2 - box_lo
        volume = np.zeros(int(np.prod(box_shape)), np.float32)
        weights = np.zeros(int(np.prod(box_shape)), np.float32)
        local = points - box_lo.astype(np.float32)
        base = np.floor(local)
        frac = local - base
        base = base.astype(np.int64)
        for dz in (0, 1):
            wz = frac[:, 0] if dz else 1 - frac[:, 0]
            for dy in (0, 1):
                wy = frac[:, 1] if dy else 1 - frac[:, 1]
                for dx in (0, 1):
                    wx = frac[:, 2] if dx else 1 - frac[:, 2]
                    w = wz * wy * wx
                    flat = ((base[:, 0] + dz) * box_shape[1] + base[:, 1] + dy) * box_shape[2] + base[:, 2] + dx
                    np.add.at(weights, flat, w)
                    np.add.at(volume, flat, w * values)
        hit = weights > 0
        volume[hit] /= weights[hit]
        volume = volume.reshape(box_shape)
        a, b = np.maximum(box_lo, lo), np.minimum(box_lo + box_shape, hi)
        src = volume[tuple(slice(x - s, y - s) for x, y, s in zip(a, b, box_lo))]
        dst = out[tuple(slice(x - s, y - s) for x, y, s in zip(a, b, lo))]
        nonzero = src != 0
        dst[nonzero] = src[nonzero]
    return out


def scatter_baseline_tuple(rects_xyz, stack, lo, hi, slices_per_box=128, out=None):
    """The same scatter with ``numpy.add.at(volume, (z, y, x), ...)`` index tuples, as often written."""
    n, height, width = stack.shape
    if out is None:
        out = np.zeros(tuple(hi - lo), np.float32)
    else:
        out.fill(0)
    zyx = rects_xyz[..., ::-1]
    rows = np.arange(height, dtype=np.float32)[None, :, None, None]
    cols = np.arange(width, dtype=np.float32)[None, None, :, None]
    for start in range(0, n, slices_per_box):
        r = zyx[start : start + slices_per_box]
        o = r[:, 0]
        du, dv = (r[:, 1] - o) / (width - 1), (r[:, 3] - o) / (height - 1)
        points = (o[:, None, None, :] + cols * du[:, None, None, :] + rows * dv[:, None, None, :]).astype(np.float32)
        points = points.reshape(-1, 3)
        values = stack[start : start + slices_per_box].reshape(-1)
        box_lo = np.floor(points.min(axis=0)).astype(np.int64)
        box_shape = tuple(np.floor(points.max(axis=0)).astype(np.int64) + 2 - box_lo)
        volume = np.zeros(box_shape, np.float32)
        weights = np.zeros(box_shape, np.float32)
        local = points - box_lo.astype(np.float32)
        base = np.floor(local)
        frac = local - base
        base = base.astype(np.int64)
        for dz in (0, 1):
            for dy in (0, 1):
                for dx in (0, 1):
                    w = ((frac[:, 0] if dz else 1 - frac[:, 0]) * (frac[:, 1] if dy else 1 - frac[:, 1])
                         * (frac[:, 2] if dx else 1 - frac[:, 2]))
                    index = (base[:, 0] + dz, base[:, 1] + dy, base[:, 2] + dx)
                    np.add.at(weights, index, w)
                    np.add.at(volume, index, w * values)
        hit = weights > 0
        volume[hit] /= weights[hit]
        a, b = np.maximum(box_lo, lo), np.minimum(box_lo + np.asarray(box_shape), hi)
        src = volume[tuple(slice(x - s, y - s) for x, y, s in zip(a, b, box_lo))]
        dst = out[tuple(slice(x - s, y - s) for x, y, s in zip(a, b, lo))]
        nonzero = src != 0
        dst[nonzero] = src[nonzero]
    return out


def scatter_pipeline(rects_xyz, straightened_tiff: Path, lo, hi, out_path: Path, temp: Path,
                     slices_per_box=128, planes_per_chunk=64, compression="zstd") -> None:
    """The whole described pipeline: per box, scatter (as :func:`scatter_baseline`) and save the box volume
    to a TIFF; then build the output chunk by chunk (z planes) from the boxes' non-zero voxels, and write it."""
    import tifffile

    stack = tifffile.memmap(straightened_tiff) if _is_uncompressed(straightened_tiff) else \
        tifffile.imread(straightened_tiff)
    n = stack.shape[0]
    boxes = []
    temp.mkdir(parents=True, exist_ok=True)
    for index, start in enumerate(range(0, n, slices_per_box)):
        part = np.asarray(stack[start : start + slices_per_box], np.float32)
        r = rects_xyz[start : start + slices_per_box]
        points = r.reshape(-1, 3)[:, ::-1]
        box_lo = np.floor(points.min(axis=0)).astype(np.int64) - 1
        box_hi = np.floor(points.max(axis=0)).astype(np.int64) + 3
        volume = scatter_baseline(r, part, box_lo, box_hi, slices_per_box)
        path = temp / f"{index}.tif"
        tifffile.imwrite(path, volume)
        boxes.append((box_lo, box_hi, path))
    shape = tuple(int(x) for x in hi - lo)

    def planes():
        for z0 in range(0, shape[0], planes_per_chunk):
            z1 = min(shape[0], z0 + planes_per_chunk)
            chunk = np.zeros((z1 - z0, *shape[1:]), np.float32)
            c_lo = lo + np.array([z0, 0, 0])
            c_hi = lo + np.array([z1, shape[1], shape[2]])
            for box_lo, box_hi, path in boxes:
                a, b = np.maximum(box_lo, c_lo), np.minimum(box_hi, c_hi)
                if (b <= a).any():
                    continue
                volume = tifffile.memmap(path)
                src = np.asarray(volume[tuple(slice(x - s, y - s) for x, y, s in zip(a, b, box_lo))])
                dst = chunk[tuple(slice(x - s, y - s) for x, y, s in zip(a, b, c_lo))]
                nonzero = src != 0
                dst[nonzero] = src[nonzero]
                del volume
            yield from chunk

    tifffile.imwrite(out_path, planes(), shape=shape, dtype=np.float32, photometric="minisblack",
                     compression=compression)


def _is_uncompressed(path) -> bool:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        return tif.pages[0].compression == 1


def bench_end_to_end(length: int, size: int, repeats: int, workdir: Path) -> dict:
    """TIFF in, TIFF out (zstd): our backproject step against the described pipeline."""
    import tifffile

    from napari_soct.processing.backproject import backproject_volume
    from napari_soct.processing.backproject.config import bounding_boxes_for, write_configuration

    rects, _, stack, lo, hi = make_case(length, size)
    lo = np.maximum(lo, 0)  # the step's box: source voxels have non-negative indices
    straightened = workdir / "case.tif"
    tifffile.imwrite(straightened, stack)
    boxes, links = bounding_boxes_for(rects)
    config = workdir / "case-configuration.json"
    write_configuration(config, {"slice_rects": rects, "slice_options": {"slice_width": size, "slice_height": size,
                                                                          "output_file_name": "case"},
                                 "volume_cache": {"bounding_boxes": boxes, "link_rects": links}},
                        if_exists="overwrite")
    times = {"ours (step)": [], "baseline pipeline": []}
    for i in range(repeats):
        t0 = time.perf_counter()
        result = backproject_volume(straightened, config, workdir / "ours", if_exists="overwrite",
                                    write_ome_zarr=False, memory_budget_gb=4.0)
        times["ours (step)"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        scatter_pipeline(rects, straightened, lo, hi, workdir / "baseline.tif", workdir / f"boxes{i}")
        times["baseline pipeline"].append(time.perf_counter() - t0)
    ours_out = tifffile.imread(result.tiff_path)
    assert ours_out.shape == tuple(hi - lo)
    voxels = int(np.prod(hi - lo))
    return {"voxels": voxels, "rows": [{"method": k, "seconds": statistics.median(v),
                                        "voxels_per_s": voxels / statistics.median(v)} for k, v in times.items()]}


def _error(out, lo):
    swept = out != 0
    z, y, x = np.nonzero(swept)
    return float(np.abs(out[swept] - _field(z + lo[0], y + lo[1], x + lo[2])).mean())


def _kernels(enabled: bool):
    """Context: our compiled (numba) kernels on or off (``NAPARI_SOCT_JIT``)."""
    import contextlib

    @contextlib.contextmanager
    def switch():
        before = os.environ.get("NAPARI_SOCT_JIT")
        os.environ["NAPARI_SOCT_JIT"] = "1" if enabled else "0"
        try:
            yield
        finally:
            if before is None:
                os.environ.pop("NAPARI_SOCT_JIT", None)
            else:
                os.environ["NAPARI_SOCT_JIT"] = before

    return switch()


def bench_speed(length: int, size: int, repeats: int, tuples: bool = True) -> dict:
    from napari_soct.processing._jit import numba_module

    rects, geometry, stack, lo, hi = make_case(length, size)
    voxels = int(np.prod(hi - lo))
    labels = (stack > 1.0).astype(np.uint64) * np.uint64(2**60) + np.uint64(7)
    # (name, function, output dtype, kernels on): ours with the numpy code and with the numba kernels (when
    # installed), the baselines; run interleaved, so all see the same machine load.
    methods = [("ours (numpy)", lambda out: ours(geometry, stack, lo, hi, out=out)[0], np.float32, False),
               ("baseline", lambda out: scatter_baseline(rects, stack, lo, hi, out=out), np.float32, False),
               ("ours (numpy), 2 threads", lambda out: ours(geometry, stack, lo, hi, workers=2, out=out)[0],
                np.float32, False),
               ("ours (numpy), labels", lambda out: ours(geometry, labels, lo, hi, mode="labels", out=out)[0],
                labels.dtype, False)]
    compile_seconds = None
    if numba_module() is not None:
        methods[1:1] = [
            ("ours (numba)", lambda out: ours(geometry, stack, lo, hi, out=out)[0], np.float32, True),
            ("ours (numba), 2 threads", lambda out: ours(geometry, stack, lo, hi, workers=2, out=out)[0],
             np.float32, True),
            ("ours (numba), labels", lambda out: ours(geometry, labels, lo, hi, mode="labels", out=out)[0],
             labels.dtype, True)]
        # First calls compile the kernels (or load them from numba's disk cache): timed apart.
        start = time.perf_counter()
        with _kernels(True):
            ours(geometry, stack, lo, hi)
            ours(geometry, labels, lo, hi, mode="labels")
        compile_seconds = time.perf_counter() - start
    if tuples:
        methods.append(("baseline, index tuples",
                        lambda out: scatter_baseline_tuple(rects, stack, lo, hi, out=out), np.float32, False))

    # Each method writes into its own output box, allocated (and its pages touched) once, outside the timings:
    # the first touch of freshly mapped pages cost this VM up to 0.35 s per 126 MB box, a cost of the
    # allocation, not of the method (the backproject step reuses its slab buffer).
    def box(dtype):
        buffer = np.empty(tuple(hi - lo), dtype)
        buffer.fill(0)
        return buffer

    outs = {name: box(dtype) for name, _, dtype, _ in methods}
    times = {name: [] for name, *_ in methods}
    results = {}
    for _ in range(repeats):
        for name, function, _, kernels in methods:
            with _kernels(kernels):
                t0 = time.perf_counter()
                results[name] = function(outs[name])
                times[name].append(time.perf_counter() - t0)
    swept = int(np.count_nonzero(results["ours (numpy)"]))
    rows = []
    for name, values in times.items():
        seconds = statistics.median(values)
        intensity = "labels" not in name
        rows.append({"method": name, "seconds": seconds, "voxels_per_s": voxels / seconds,
                     "error": _error(results[name], lo) if intensity else None,
                     "covered": int(np.count_nonzero(results[name])) if intensity else None})
    return {"slices": geometry.n_slices, "size": size, "samples": int(stack.size), "box": (hi - lo).tolist(),
            "voxels": voxels, "swept": swept, "rows": rows, "compile_seconds": compile_seconds}


_MEMORY_CHILD = r"""
import json, sys, time
from napari_soct.processing.backproject import backproject_volume

def status(key):  # kB fields of /proc/self/status (VmHWM is this process's peak; ru_maxrss survives exec)
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

args = json.loads(sys.argv[1])
import scipy.interpolate, scipy.ndimage, scipy.spatial, tifffile, zarr  # noqa: E401,F401  (the steps' imports)
from napari_soct.processing._jit import warm_up
warm_up()  # the numba runtime and the compiled kernels are code, counted with the imports
if args["step"] == "straighten":
    import numpy as np
    from napari_soct.processing.backproject import straighten_volume
    from napari_soct.processing.io.images import open_image
    source = open_image(args["source"])
base = status("VmRSS")
t0 = time.perf_counter()
if args["step"] == "straighten":
    result = straighten_volume(source, np.array(args["points"]), args["out"], width=64, height=64,
                               points_in_voxels=True, memory_budget_gb=args["budget"] / 2**30,
                               if_exists="overwrite", name="memory-straighten")
else:
    result = backproject_volume(args["tiff"], args["config"], args["out"], min_bounding_box=False,
                                memory_budget_gb=args["budget"] / 2**30, if_exists="overwrite")
seconds = time.perf_counter() - t0
print(json.dumps({"base": base, "peak": status("VmHWM"), "seconds": seconds, "shape": list(result.shape)}))
"""


def bench_memory(budget: int, workdir: Path) -> list[dict]:
    """Both steps in fresh processes on volumes ten times the budget: a straightening of a lazy OME-Zarr
    source, and a full-extent backprojection."""
    from napari_soct.processing.backproject import straighten_volume
    from napari_soct.processing.io.omezarr import create_ome_zarr_image

    depth = 400
    side = int(np.ceil(np.sqrt(10 * budget / 4 / depth)))
    shape = (depth, side, side)
    points = [[2.0, side / 2, side / 2], [depth / 2, side / 2 + 5, side / 2 - 4], [depth - 3.0, side / 2, side / 2]]
    # Source for straightening: chunks written with a smooth pattern (zarr reads the chunks a batch needs).
    source = workdir / "source.ome.zarr"
    array = create_ome_zarr_image(source, shape, (1.0, 1.0, 1.0), chunks=(32, 64, 64), compression="zstd")
    plane = np.add.outer(np.sin(np.arange(side) / 9.0), np.cos(np.arange(side) / 7.0)).astype(np.float32)
    for z in range(0, depth, 32):
        array[z : z + 32] = plane[None] * np.ones((min(32, depth - z), 1, 1), np.float32)
    straightened = straighten_volume(np.zeros(shape, np.float32), np.array(points), workdir, width=32, height=32,
                                     points_in_voxels=True, if_exists="overwrite", name="memory")
    runs = []
    for step, args in (("straighten", {"source": str(source), "points": points, "out": str(workdir / "s")}),
                       ("backproject", {"tiff": str(straightened.tiff_path),
                                        "config": str(straightened.config_path), "out": str(workdir / "b")})):
        payload = json.dumps({"step": step, "budget": budget, **args})
        done = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, payload], check=True, capture_output=True,
                              text=True)
        child = json.loads(done.stdout.strip().splitlines()[-1])
        child.update({"step": step, "budget": budget, "volume_bytes": int(np.prod(shape)) * 4,
                      "volume_shape": list(shape)})
        runs.append(child)
    return runs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--length", type=int, default=500, help="path length in voxels")
    parser.add_argument("--size", type=int, default=96, help="slice width and height in pixels")
    parser.add_argument("--budget-mib", type=float, default=64.0, help="memory budget of the memory run")
    args = parser.parse_args()
    from napari_soct.processing.memory import return_large_buffers_to_os

    return_large_buffers_to_os()
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPU(s), Python {platform.python_version()}, "
          f"numpy {np.__version__}")
    speed = bench_speed(args.length, args.size, args.repeats)
    print(f"\n### Speed: {speed['slices']} slices of {speed['size']} x {speed['size']} ({speed['samples']:,} "
          f"samples), output box {' x '.join(map(str, speed['box']))} = {speed['voxels']:,} voxels "
          f"({speed['swept']:,} swept); median of {args.repeats} interleaved runs\n")
    print("| method | seconds | output voxels/s | voxels covered | mean abs error |")
    print("|---|---:|---:|---:|---:|")
    baseline = next(r for r in speed["rows"] if r["method"] == "baseline")
    for r in speed["rows"]:
        error = f"{r['error']:.4f}" if r["error"] is not None else "-"
        covered = f"{r['covered']:,}" if r["covered"] is not None else "-"
        print(f"| {r['method']} | {r['seconds']:.3f} | {r['voxels_per_s'] / 1e6:.2f} M | {covered} | {error} |")
    for r in speed["rows"]:
        if r["method"].startswith("ours"):
            print(f"- baseline / {r['method']}: **{baseline['seconds'] / r['seconds']:.2f}x**")
    if speed["compile_seconds"] is not None:
        print(f"- first calls of the numba kernels (compilation or disk-cache load, both modes): "
              f"{speed['compile_seconds']:.2f} s, not in the timings")
    with tempfile.TemporaryDirectory(prefix="bench-backproject-") as tmp:
        end = bench_end_to_end(args.length, args.size, args.repeats, Path(tmp))
    print(f"\n### End to end: straightened TIFF in, zstd TIFF out ({end['voxels']:,} output voxels); median of "
          f"{args.repeats} interleaved runs\n")
    print("| method | seconds | output voxels/s |")
    print("|---|---:|---:|")
    for r in end["rows"]:
        print(f"| {r['method']} | {r['seconds']:.3f} | {r['voxels_per_s'] / 1e6:.2f} M |")
    print(f"\nours / baseline pipeline: **{end['rows'][1]['seconds'] / end['rows'][0]['seconds']:.2f}x**")
    with tempfile.TemporaryDirectory(prefix="bench-backproject-") as tmp:
        runs = bench_memory(int(args.budget_mib * 2**20), Path(tmp))
    mib = 2**20
    shape = " x ".join(map(str, runs[0]["volume_shape"]))
    print(f"\n### Memory: volumes of {shape} float32 ({runs[0]['volume_bytes'] / mib:.0f} MiB), budget "
          f"{runs[0]['budget'] / mib:.0f} MiB, each step in a fresh process\n")
    print("| step | volume / budget | peak RSS | RSS after imports | increase | increase / budget | seconds |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for run in runs:
        increase = run["peak"] - run["base"]
        what = ("straighten (source read lazily)" if run["step"] == "straighten"
                else "backproject (full-extent output)")
        print(f"| {what} | {run['volume_bytes'] / run['budget']:.1f} | {run['peak'] / mib:.0f} MiB | "
              f"{run['base'] / mib:.0f} MiB | {increase / mib:.1f} MiB | {increase / run['budget']:.2f} | "
              f"{run['seconds']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
