"""Benchmark: label upscaling, ours against the seed's method and scipy.ndimage.zoom, side by side in one run.

Measures, on an atlas-like label volume (the Allen CCF 25 um annotation's shape, 528 x 320 x 456 uint32 = 308 MB,
~500 smooth regions with ids up to 6e8 inside an ellipsoid, background 0 outside):

* the same subvolume upscaled by an integer and a non-integer factor (output ~1 GB uncompressed) with
  - the seed's method, reimplemented here: Pillow ``resize(NEAREST)`` two axes at a time through numpy memmaps
    (y-x planes first, then the z-x planes of that result), the result written as BigTIFF (uncompressed);
  - ``scipy.ndimage.zoom(order=0)`` in memory (input and output fit in memory);
  - ``upscale_labels`` to OME-Zarr (blosc and zstd, with its label pyramid) and to BigTIFF (zstd);
  each in a fresh process (peak RSS of that process), median of ``--repeats`` runs, with the exactness of its
  output (share of voxels equal to the centred nearest-neighbour reference, checked on every voxel);
* ``--scale``: the whole 308 MB volume upscaled 11x to 410 GB of uncompressed-equivalent OME-Zarr (compressed on
  disk), memory budget 1 GiB, then checked on random boxes and deleted.

Usage::

    python benchmarks/bench_upscale.py --data /tmp/upscale_bench --repeats 3 [--scale]

Throughput is output voxels (level 0) per second and MB/s of the uncompressed level 0 (pyramid levels are extra
work not counted). The machine is shared: CPU seconds are given too, and the load average before and after.
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
from fractions import Fraction
from pathlib import Path

import numpy as np

MB = 1e6
ATLAS_SHAPE = (528, 320, 456)


def synthetic_atlas(shape, seed: int = 0, n_bins: int = 9, dtype=np.uint32, max_id: int = 600_000_000):
    """Atlas-like labels: up to ``n_bins**3`` smooth curved regions with large ids inside an ellipsoid."""
    rng = np.random.default_rng(seed)
    nz, ny, nx = shape
    waves = [(rng.normal(0, 2.5, (4, 3)), rng.uniform(0, 2 * np.pi, 4)) for _ in range(3)]
    ids = rng.choice(np.arange(1, max_id, dtype=np.int64), n_bins**3, replace=False).astype(dtype)
    out = np.empty(shape, dtype)
    y, x = np.meshgrid(np.linspace(-1, 1, ny), np.linspace(-1, 1, nx), indexing="ij")
    for z0 in range(0, nz, 16):
        z = np.linspace(-1, 1, nz)[z0 : z0 + 16, None, None]
        region = np.zeros((len(z), ny, nx), np.int64)
        for freqs, phases in waves:
            field = sum(np.sin(f[0] * z + f[1] * y + f[2] * x + p) for f, p in zip(freqs, phases))
            region = region * n_bins + np.clip(((field / 4 + 0.5) * n_bins).astype(np.int64), 0, n_bins - 1)
        labels = ids[region]
        labels[(z**2 / 0.9 + y**2 / 0.8 + x**2 / 0.95) > 1] = 0
        out[z0 : z0 + 16] = labels
    return out


def seed_resize_planes(src: np.ndarray, shape, step1: np.ndarray, step2: np.ndarray) -> None:
    """The seed's method: Pillow NEAREST resize of the y-x planes into ``step1``, then of the z-x planes of
    ``step1`` (the volume "virtually rotated") into ``step2``. Pillow works on int32 ("I" mode) images."""
    from PIL import Image

    oz, oy, ox = shape
    for z in range(src.shape[0]):
        image = Image.fromarray(np.ascontiguousarray(src[z]).astype(np.int32), mode="I")
        step1[z] = np.asarray(image.resize((ox, oy), Image.NEAREST)).astype(src.dtype)
    for y in range(oy):
        image = Image.fromarray(np.ascontiguousarray(step1[:, y, :]).astype(np.int32), mode="I")
        step2[:, y, :] = np.asarray(image.resize((ox, oz), Image.NEAREST)).astype(src.dtype)


def seed_method(src_path, out, shape) -> None:
    """The seed's whole method: memmapped intermediate volumes on disk, the result written as BigTIFF."""
    import tifffile

    src = np.load(src_path, mmap_mode="r")
    step1 = np.memmap(f"{out}.step1", dtype=src.dtype, mode="w+", shape=(src.shape[0], shape[1], shape[2]))
    step2 = np.memmap(f"{out}.step2", dtype=src.dtype, mode="w+", shape=tuple(shape))
    seed_resize_planes(src, shape, step1, step2)
    step2.flush()
    tifffile.imwrite(out, step2, bigtiff=True, photometric="minisblack")
    del step1, step2
    os.remove(f"{out}.step1")
    os.remove(f"{out}.step2")


def bench_exactness() -> None:
    """Ids kept exactly? Small volumes of ids up to each dtype's maximum (above 2**24 and 2**53), factor 2.5."""
    from scipy import ndimage

    from napari_soct.processing.upscale import resample_labels

    print("\nExactness on 12x14x16 volumes of random ids (0, 1, 2, 7, max-1, max and, for 32/64 bits, "
          "2**24+1, 2**24+3, 2**31+5, for 64 bits 2**53+1, 2**53+3, 2**63+11, 2**64-3), factor 2.5, every voxel "
          "compared with the centred nearest-neighbour reference:\n")
    print("| dtype | upscale_labels | seed's method (Pillow) | scipy.ndimage.zoom(order=0) |")
    print("|---|---|---|---|")
    rng = np.random.default_rng(0)
    for dtype in ("uint8", "uint16", "uint32", "uint64"):
        info = np.iinfo(dtype)
        ids = [0, 1, 2, 7, info.max - 1, info.max]
        ids += [2**24 + 1, 2**24 + 3, 2**31 + 5] if info.bits >= 32 else []
        ids += [2**53 + 1, 2**53 + 3, 2**63 + 11, 2**64 - 3] if info.bits == 64 else []
        ids = np.array(sorted(set(ids)), dtype=dtype)
        src = ids[rng.integers(0, len(ids), (12, 14, 16))]
        shape = (30, 35, 40)
        ref = src[np.ix_(*[reference_index(n, o) for n, o in zip(src.shape, shape)])]

        def score(out) -> str:
            if isinstance(out, str):
                return out
            lost = len(set(np.unique(src).tolist()) - set(np.unique(out).tolist()))
            return f"{100 * np.mean(out == ref):.2f} % equal, {lost} id(s) lost"

        ours = resample_labels(src, shape)
        try:
            seed = np.empty(shape, src.dtype)
            seed_resize_planes(src, shape, np.empty((12, 35, 40), src.dtype), seed)
        except (TypeError, ValueError, OverflowError) as err:
            seed = f"fails: {type(err).__name__}: {err}"
        zoomed = ndimage.zoom(src, 2.5, order=0)
        print(f"| {dtype} | {score(ours)} | {score(seed)} | {score(zoomed)} |")


def reference_index(n_in: int, n_out: int) -> np.ndarray:
    return np.array([min(int(Fraction(2 * j + 1, 2) * Fraction(n_in, n_out)), n_in - 1) for j in range(n_out)])


# Each method runs in a child process: its own peak RSS, nothing shared with the others.
_CHILD = r"""
import json, sys, time, os
args = json.loads(sys.argv[1])
import numpy as np
# Imports before the clock starts (the package imports dask and zarr: about a second).
sys.path.insert(0, args["bench_dir"])
from bench_upscale import seed_method
from scipy import ndimage
from napari_soct.processing.upscale import upscale_labels


def vm_hwm_kb():
    # Peak RSS of this process image (ru_maxrss would include the parent's, inherited across fork and exec).
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])


base = vm_hwm_kb()
src_path, out, shape, method = args["src"], args["out"], tuple(args["shape"]), args["method"]
t0, c0 = time.perf_counter(), time.process_time()
if method == "seed":
    seed_method(src_path, out, shape)
elif method == "zoom":
    src = np.load(src_path)
    zoomed = ndimage.zoom(src, [o / n for o, n in zip(shape, src.shape)], order=0)
    assert zoomed.shape == shape, zoomed.shape
    np.save(out, zoomed)
else:
    r = upscale_labels(src_path, out, shape=",".join(map(str, shape)), compression=args["compression"],
                       memory_budget_gb=args["budget"], workers=args["workers"],
                       pyramid=args.get("pyramid", "nearest"))
wall, cpu = time.perf_counter() - t0, time.process_time() - c0
print(json.dumps({"seconds": wall, "cpu": cpu, "peak_rss_kb": vm_hwm_kb(), "base_rss_kb": base}))
"""


def run_child(args: dict) -> dict:
    proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(args)], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{args['method']} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def read_output(path: Path, method: str) -> np.ndarray:
    import tifffile

    if method == "zoom":
        return np.load(path, mmap_mode="r")
    if str(path).endswith((".tif", ".tiff")):
        return tifffile.memmap(path) if method == "seed" else tifffile.imread(path)
    import zarr

    return zarr.open_array(str(Path(path) / "0"), mode="r")


def agreement(output, src: np.ndarray, shape) -> float:
    """Share of output voxels equal to the centred nearest-neighbour reference (every voxel, plane by plane)."""
    iz, iy, ix = (reference_index(n, o) for n, o in zip(src.shape, shape))
    equal = 0
    for z0 in range(0, shape[0], 32):
        ref = src[np.ix_(iz[z0 : z0 + 32], iy, ix)]
        equal += int(np.count_nonzero(np.asarray(output[z0 : z0 + 32]) == ref))
    return equal / float(np.prod(shape))


def disk_bytes(path: Path) -> int:
    path = Path(path)
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size if path.exists() else 0


def remove(path: Path) -> None:
    path = Path(path)
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()


METHODS = [
    ("seed's method (Pillow + memmaps -> BigTIFF)", {"method": "seed"}, "out.tif"),
    ("scipy.ndimage.zoom(order=0), in memory", {"method": "zoom"}, "out.npy"),
    ("upscale_labels -> OME-Zarr blosc (blosclz) + pyramid", {"method": "ours", "compression": "blosc"},
     "out.ome.zarr"),
    ("upscale_labels -> OME-Zarr zstd + pyramid", {"method": "ours", "compression": "zstd"}, "out.ome.zarr"),
    ("upscale_labels -> BigTIFF zstd", {"method": "ours", "compression": "zstd"}, "ours.tif"),
]


def bench_side_by_side(data: Path, atlas: np.ndarray, factor: str, repeats: int, budget: float, workers: int):
    sub = np.ascontiguousarray(atlas[240:288, 128:192, 196:260])  # 48 x 64 x 64, through the middle
    src_path = data / "sub.npy"
    np.save(src_path, sub)
    f = Fraction(factor)
    shape = tuple(int(n * f + Fraction(1, 2)) for n in sub.shape)
    rows = []
    for name, extra, out_name in METHODS:
        out = data / out_name
        runs, exact, stored = [], None, 0
        for rep in range(repeats):
            remove(out)
            args = {"src": str(src_path), "out": str(out), "shape": shape, "budget": budget, "workers": workers,
                    "bench_dir": str(Path(__file__).parent), **extra}
            runs.append(run_child(args))
            if rep == 0:
                stored = disk_bytes(out)
                exact = agreement(read_output(out, extra["method"]), sub, shape)
        remove(out)
        rows.append((name, runs, exact, stored))
    return sub, shape, rows


def print_table(title: str, shape, rows, reference_name: str) -> None:
    out_bytes = float(np.prod(shape)) * 4
    ref = statistics.median(r["seconds"] for r in next(rs for n, rs, _, _ in rows if n.startswith(reference_name)))
    print(f"\n{title}: output {'x'.join(map(str, shape))} uint32 = {out_bytes / 1e9:.2f} GB uncompressed\n")
    print("| method | median s | CPU s | M voxels/s | MB/s (uncompressed) | speed-up vs seed | peak RSS MiB "
          "| on disk MB | voxels equal to reference |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, runs, exact, stored in rows:
        med = statistics.median(r["seconds"] for r in runs)
        cpu = statistics.median(r["cpu"] for r in runs)
        peak = max(r["peak_rss_kb"] for r in runs) / 1024
        print(f"| {name} | {med:.2f} | {cpu:.2f} | {np.prod(shape) / med / 1e6:.0f} | {out_bytes / med / MB:.0f} | "
              f"{ref / med:.1f}x | {peak:.0f} | {stored / MB:.1f} | {100 * exact:.3f} % |")


def bench_scale(data: Path, atlas_path: Path, atlas: np.ndarray, factor: int, budget: float, workers: int) -> None:
    from napari_soct.processing.upscale.writers import disk_free_bytes

    shape = tuple(n * factor for n in atlas.shape)
    logical = float(np.prod(shape)) * 4
    free = disk_free_bytes(data)
    print(f"\nScale run: {'x'.join(map(str, atlas.shape))} uint32 ({atlas.nbytes / 1e6:.0f} MB) x{factor} -> "
          f"{'x'.join(map(str, shape))} = {logical / 1e9:.0f} GB uncompressed; {free / 1e9:.0f} GB free on disk")
    out = data / "scale.ome.zarr"
    remove(out)
    load0 = os.getloadavg()
    r = run_child({"src": str(atlas_path), "out": str(out), "shape": shape, "budget": budget, "workers": workers,
                   "method": "ours", "compression": "blosc", "bench_dir": str(Path(__file__).parent)})
    stored = disk_bytes(out)
    import zarr

    level0 = zarr.open_array(str(out / "0"), mode="r")
    iz, iy, ix = (reference_index(n, o) for n, o in zip(atlas.shape, shape))
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(200):
        start = [int(rng.integers(0, n - 64)) for n in shape]
        box = tuple(slice(s, s + 64) for s in start)
        expected = atlas[np.ix_(iz[box[0]], iy[box[1]], ix[box[2]])]
        assert np.array_equal(level0[box], expected), f"mismatch in box {start}"
        checked += expected.size
    levels = len([p for p in out.iterdir() if p.is_dir()])
    remove(out)
    print("\n| output | levels | seconds | CPU s | G voxels/s | GB/s (uncompressed level 0) | peak RSS MiB "
          "| on disk GB | checked voxels (200 random 64^3 boxes) |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {logical / 1e9:.0f} GB OME-Zarr blosc | {levels} | {r['seconds']:.0f} | {r['cpu']:.0f} | "
          f"{np.prod(shape) / r['seconds'] / 1e9:.2f} | {logical / r['seconds'] / 1e9:.2f} | "
          f"{r['peak_rss_kb'] / 1024:.0f} | {stored / 1e9:.2f} | {checked:,} all equal |")
    print(f"\nLoad average (1 min) before / after the scale run: {load0[0]:.1f} / {os.getloadavg()[0]:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=Path("/tmp/upscale_bench"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget-gb", type=float, default=1.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--factors", nargs="+", default=["11", "10.7"])
    parser.add_argument("--scale", action="store_true", help="also run the 410 GB scale run")
    parser.add_argument("--skip-side-by-side", action="store_true")
    args = parser.parse_args()
    args.data.mkdir(parents=True, exist_ok=True)
    atlas_path = args.data / "atlas_25um_like.npy"
    if not atlas_path.exists():
        t0 = time.perf_counter()
        np.save(atlas_path, synthetic_atlas(ATLAS_SHAPE))
        print(f"made the synthetic atlas in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    atlas = np.load(atlas_path, mmap_mode="r")
    import PIL
    import scipy

    print(f"Machine: {platform.machine()}, {os.cpu_count()} CPUs (shared with other jobs), Python "
          f"{platform.python_version()}, numpy {np.__version__}, scipy {scipy.__version__}, Pillow {PIL.__version__}; "
          f"workers={args.workers}, memory budget {args.budget_gb} GiB; median of {args.repeats} runs; load average "
          f"(1 min) at start {os.getloadavg()[0]:.1f}.")
    bench_exactness()
    if not args.skip_side_by_side:
        for factor in args.factors:
            sub, shape, rows = bench_side_by_side(args.data, atlas, factor, args.repeats, args.budget_gb, args.workers)
            print_table(f"Factor {factor} on a {'x'.join(map(str, sub.shape))} subvolume", shape, rows, "seed")
        print(f"\nLoad average (1 min) at the end of the side-by-side runs: {os.getloadavg()[0]:.1f}")
    if args.scale:
        bench_scale(args.data, atlas_path, np.asarray(atlas), 11, args.budget_gb, args.workers)


if __name__ == "__main__":
    main()
