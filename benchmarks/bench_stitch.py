"""Benchmark: 3D stitching (issue 3, step 4) on the ``bench`` synthetic acquisition.

Measures, in one run:

* **accuracy against the truth**: tile positions (RMS after removing the global translation) with image
  placement (affine model alone and with the clamped residual refinement) and with motor placement, and the
  fitted stage affine against the injected one - on the mosaic grids as preprocessed (vignetting not
  corrected) and on their depth projections with the true flat field divided out (the chain's input, the
  illumination step comes first);
* **speed and memory**, each configuration in a fresh process (imports before the clock; peak RSS = that
  process's max RSS), median of ``--repeats`` runs, side by side with merely reading every tile of the mosaic
  grids once (the floor for any step that reads them) and with copying them (read and write once, the floor
  for a step that also writes as much).

Usage::

    python benchmarks/bench_stitch.py --data bench_data --repeats 3

The mosaic grids are ``<data>/bench-seed0-mosaic`` (or ``-mosaics``) when present, otherwise they are made
with ``preprocess_acquisition`` into ``<data>/bench-seed0-mosaics``. Stitched outputs go to ``--out`` (deleted
between runs). Results are printed as Markdown tables.
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


def find_mosaics(data: Path, acq_dir: Path) -> Path:
    for name in ("bench-seed0-mosaic", "bench-seed0-mosaics"):
        if (data / name).is_dir() and list((data / name).glob("mosaic_grid_3d_z*.ome.zarr")):
            return data / name
    from napari_soct.processing.preprocess import preprocess_acquisition

    out = data / "bench-seed0-mosaics"
    preprocess_acquisition(acq_dir / "raw", out, if_exists="skip", generate_previews=False)
    return out


def _rms(estimated: np.ndarray, true: np.ndarray) -> float:
    e = (estimated - estimated.mean(axis=0)) - (true - true.mean(axis=0))
    return float(np.sqrt((e**2).sum(axis=1).mean()))


def accuracy(acq_dir: Path, mosaics: Path) -> str:
    from napari_soct.processing.io.mosaic import open_mosaic_grid
    from napari_soct.processing.slices import find_slice_files
    from napari_soct.processing.stitch import (
        StitchParams,
        affine_parameters,
        fit_stage_affine,
        nominal_positions,
        place_tiles,
        plan_placements,
        register_grid,
        tile_projection,
    )
    from napari_soct.processing.synthetic import SyntheticAcquisition

    acq = SyntheticAcquisition.load(acq_dir)
    truth = affine_parameters(acq.stage_affine_matrix[::-1, ::-1])
    rows = []

    def positions_rms(sid, positions):
        tiles = sorted(positions)
        est = np.array([positions[t] for t in tiles])
        return _rms(est, np.array([acq.true_tile_position_px(sid, *t) for t in tiles]))

    def pair_errors(sid, pairs):
        out = []
        for p in pairs:
            if p.shift is not None:
                true = np.subtract(acq.true_tile_position_px(sid, *p.b), acq.true_tile_position_px(sid, *p.a))
                out.append(float(np.hypot(*np.subtract(p.shift, true))))
        return out

    def add_row(label, plans_or_placements, fit, pairs_by_slice):
        model = [positions_rms(s, pl.model_positions) for s, pl in plans_or_placements.items()]
        final = [positions_rms(s, pl.positions) for s, pl in plans_or_placements.items()]
        errs = [e for s, ps in pairs_by_slice.items() for e in pair_errors(s, ps)]
        used = sum(p.shift is not None for ps in pairs_by_slice.values() for p in ps)
        total = sum(len(ps) for ps in pairs_by_slice.values())
        if fit is not None:
            est = affine_parameters(fit.matrix)
            aff = (f"{100 * (est['scale_x'] / truth['scale_x'] - 1):+.3f} | "
                   f"{100 * (est['scale_y'] / truth['scale_y'] - 1):+.3f} | "
                   f"{est['rotation_deg'] - truth['rotation_deg']:+.3f} | {est['shear_deg'] - truth['shear_deg']:+.3f}")
        else:
            aff = "- | - | - | -"
        pair = f"{np.median(errs):.3f} / {np.percentile(errs, 90):.3f}" if errs else "-"
        rows.append(f"| {label} | {max(model):.3f} | {max(final):.3f} | {aff} | {used}/{total} | {pair} |")

    start = time.perf_counter()
    plans, pooled = plan_placements(mosaics, StitchParams())
    seconds = time.perf_counter() - start
    add_row("image, mosaic grids as preprocessed (vignetting in)", {s: p.placement for s, p in plans.items()}, pooled,
            {s: p.pairs for s, p in plans.items()})
    motor, _ = plan_placements(mosaics, StitchParams(placement="motor"))
    add_row("motor (stage positions)", {s: p.placement for s, p in motor.items()}, None, {})

    # The chain's input: projections with the true flat field divided out (same pipeline functions).
    pairs, nominal, pixel = {}, {}, {}
    for sid, path in find_slice_files(mosaics).items():
        grid = open_mosaic_grid(path)
        nominal[sid], _ = nominal_positions(grid)
        pixel[sid] = (grid.voxel_size_um[1] * 1e-3, grid.voxel_size_um[2] * 1e-3)
        pairs[sid] = register_grid(lambda x, y, g=grid: tile_projection(g.read_tile(x, y) / acq.flatfield),
                                   grid.tile_positions(), nominal[sid])
    fit = fit_stage_affine(pairs, nominal, pixel)
    placements = {
        sid: place_tiles(nominal[sid], pairs[sid], fit.matrix, pixel[sid], max_residual_px=2.0,
                         tile_sigma_px=fit.tile_sigma_px, excluded={(a, b) for s, a, b in fit.rejected if s == sid})
        for sid in pairs
    }
    add_row("image, true flat field divided out", placements, fit, pairs)
    header = (
        f"Truth: rotation {truth['rotation_deg']:.3f} deg, shear {truth['shear_deg']:.3f} deg, scale x "
        f"{truth['scale_x']:.4f}, scale y {truth['scale_y']:.4f}; tile jitter {acq.config.tile_jitter_px} px, drift "
        f"{acq.config.drift_px} px/slice. Registration pass (5 slices, pooled affine): {seconds:.1f} s.\n\n"
        "| placement | tile RMS, model (worst slice) px | tile RMS, final (worst slice) px | scale x err % | "
        "scale y err % | rotation err deg | shear err deg | pairs used | pair error median / p90 px |\n"
        "|---|---|---|---|---|---|---|---|---|\n"
    )
    return header + "\n".join(rows)


_CHILD = r"""
import json, resource, sys, time
mode, src, out, budget = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
extra = json.loads(sys.argv[5])
from napari_soct.processing.stitch import StitchParams, stitch_slices
from napari_soct.processing.io.mosaic import open_mosaic_grid
from napari_soct.processing.slices import find_slice_files
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
cpu0 = time.process_time()
start = time.perf_counter()
if mode in ("read", "copy"):
    from pathlib import Path
    from napari_soct.processing.io.mosaic import create_mosaic_grid_like
    n = 0
    for sid, path in find_slice_files(src).items():
        g = open_mosaic_grid(path)
        dst = create_mosaic_grid_like(Path(out) / path.name, g) if mode == "copy" else None
        for x, y in g.tile_positions():
            tile = g.read_tile(x, y)
            n += tile.nbytes
            if dst is not None:
                dst[g.tile_region(x, y)] = tile
    info = {"bytes": n}
else:
    r = stitch_slices(src, out, StitchParams(memory_budget_gb=budget, workers=2, if_exists="overwrite", **extra))
    info = {"bytes": sum(m["bytes_read"] for m in r.metrics.values()), "workers": r.workers_used,
            "cache_peak": max(m["cache_peak_bytes"] for m in r.metrics.values())}
seconds = time.perf_counter() - start
info.update(seconds=seconds, cpu=time.process_time() - cpu0,
            maxrss_kib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, base_kib=base)
print(json.dumps(info))
"""


def run_child(mode: str, src: Path, out: Path, budget: float, extra: dict) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    proc = subprocess.run([sys.executable, "-c", _CHILD, mode, str(src), str(out), str(budget), json.dumps(extra)],
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def speed(mosaics: Path, out: Path, repeats: int) -> str:
    configs = [
        ("read every tile once (floor)", "read", 4.0, {}),
        ("copy: read and write every tile once, same codec", "copy", 4.0, {}),
        ("motor placement, no blending", "stitch", 4.0, {"placement": "motor", "blending": "none"}),
        ("image placement, diffusion (default)", "stitch", 4.0, {}),
        ("image placement, average", "stitch", 4.0, {"blending": "average"}),
        ("image placement, diffusion, budget 1 GiB", "stitch", 1.0, {}),
    ]
    results = {name: [] for name, *_ in configs}
    for _ in range(repeats):
        for name, mode, budget, extra in configs:  # interleaved, so load changes hit every configuration
            results[name].append(run_child(mode, mosaics, out, budget, extra))
    shutil.rmtree(out, ignore_errors=True)
    floor = statistics.median(r["seconds"] for r in results[configs[0][0]])
    lines = [
        "| configuration | budget GiB | median s | CPU s | input MB/s | time / read-once | peak RSS MiB "
        "| RSS over imports MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, mode, budget, _ in configs:
        runs = results[name]
        sec = statistics.median(r["seconds"] for r in runs)
        cpu = statistics.median(r["cpu"] for r in runs)
        size = runs[0]["bytes"]
        rss = max(r["maxrss_kib"] for r in runs) / 1024
        base = min(r["base_kib"] for r in runs) / 1024
        lines.append(f"| {name} | {budget:g} | {sec:.1f} | {cpu:.1f} | {size / MB / sec:.0f} | {sec / floor:.2f}x | "
                     f"{rss:.0f} | {rss - base:.0f} |")
    n_bytes = results[configs[0][0]][0]["bytes"]
    head = f"Input: {n_bytes / MB:.0f} MB of float32 tiles (uncompressed), read through zarr (blosc-lz4).\n\n"
    return head + "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("bench_data"))
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench_stitch_out"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-speed", action="store_true")
    args = parser.parse_args()
    acq_dir = args.data / "bench-seed0"
    mosaics = find_mosaics(args.data, acq_dir)
    import numpy
    import scipy

    print(f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, numpy "
          f"{numpy.__version__}, scipy {scipy.__version__}; load average at start {os.getloadavg()[0]:.1f}\n")
    print("### Accuracy (bench, 5 slices of 4 x 4 tiles of 160 x 200 x 200)\n")
    print(accuracy(acq_dir, mosaics))
    if not args.skip_speed:
        print(f"\n### Speed and memory (median of {args.repeats}, fresh process each, workers=2)\n")
        print(speed(mosaics, args.out, args.repeats))
        print(f"\nLoad average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
